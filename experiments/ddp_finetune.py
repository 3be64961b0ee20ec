"""Lightweight fine-tuning of an MPO model with DistributedDataParallel (gloo, CPU).

Usage:
    torchrun --nproc_per_node 2 experiments/ddp_finetune.py [--steps 5] [--out ddp.json]

Each rank builds the same MPO model (fixed seed), wraps it in
``torch.nn.parallel.DistributedDataParallel`` and trains on its own shard of a
synthetic classification batch stream; central tensors stay frozen. At the end
every rank hashes its auxiliary tensors; rank 0 checks that all hashes agree,
that the auxiliaries moved and the central tensors did not, and writes a JSON.
With ``--minilm`` the offline MiniLM is used instead of a small random BERT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tnlm.bridge import make_optimizer
from tnlm.integration import MPOConfig, get_mpo_model


def build(minilm: bool):
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    if minilm:
        from tnlm.integration import default_model_path

        model = BertForSequenceClassification.from_pretrained(str(default_model_path()),
                                                              num_labels=2)
        n_sites = 5
    else:
        cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=32, num_labels=2)
        model = BertForSequenceClassification(cfg)
        n_sites = 3
    config = MPOConfig(target_modules=["query", "key", "value", "dense"], n_sites=n_sites)
    return get_mpo_model(model, config, progress=False)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--minilm", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = build(args.minilm)
    mods = [m for _, m in model.mpo_modules()]
    aux0 = [m.cores[k].detach().clone() for m in mods for k in m.auxiliary_indices]
    central0 = [m.cores[m.central_index].detach().clone() for m in mods]
    ddp = DDP(model)
    opt = make_optimizer(model, lr=1e-3)
    gen = torch.Generator().manual_seed(1000 + rank)  # a different shard on every rank
    vocab = model.config.vocab_size
    for _ in range(args.steps):
        ids = torch.randint(1, vocab, (4, 12), generator=gen)
        labels = torch.randint(0, 2, (4,), generator=gen)
        loss = ddp(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    aux = [m.cores[k] for m in mods for k in m.auxiliary_indices]
    central = [m.cores[m.central_index] for m in mods]
    mine = digest(aux)
    hashes = [None] * world
    dist.all_gather_object(hashes, mine)
    result = dict(
        world_size=world, steps=args.steps, aux_hashes=hashes,
        identical=len(set(hashes)) == 1,
        aux_moved=any(not torch.equal(a, b) for a, b in zip(aux0, aux)),
        central_frozen=all(torch.equal(a, b) for a, b in zip(central0, central)),
    )
    if rank == 0:
        print(json.dumps(result, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
    ok = result["identical"] and result["aux_moved"] and result["central_frozen"]
    # Every rank is past its last collective before any rank tears its group down.
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads, destroyed there, can abort the
    # process ("terminate called without an active exception", SIGABRT) after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
