"""Compression of the offline MiniLM against baselines at equal parameters, label-free.

Usage:
    python experiments/compress_minilm.py --method data_aware --budget 0.5 --heal-steps 300 \
        --seed 0 --out results/compress/data_aware_0.5_s0.json

Methods (the 36 encoder linear layers; ``budget`` = fraction of their parameters kept):
  data_aware   tnlm's default: whitened 2-site MPOs (every input leg on site 0), uniform
               fraction per layer (tnlm.compress.pipeline)
  sensitivity  the same, ranks allocated from end-to-end embedding drops measured on a probe
               set (tnlm compress's default); layers may stay dense
  greedy       the same, ranks allocated greedily on the calibration output errors
  lowrank      plain low-rank SVD of each weight (2-site MPO of W, no calibration)
  mpo_plain    the paper's balanced 5-site MPO, uniform bond cap, truncated on the weights
Every method gets the same healing: distillation from the original model
(tnlm.compress.distill) on the same unlabeled sentences, same steps, seed and schedule.

Data: calibration and healing sentences are SST-2 + CoLA *training* sentences (labels
ignored) or, with ``--text docstrings``, sentences from installed docstrings. Metrics on
text never trained on: mean/min cosine of the mean-pooled embeddings to the original on
SST-2 dev sentences, and SICK (trial) relatedness Spearman of the embedding cosine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tnlm.compress.allocate import uniform_overrides  # noqa: E402
from tnlm.compress.distill import HealConfig, heal  # noqa: E402
from tnlm.compress.pipeline import CompressionConfig, compress_model  # noqa: E402
from tnlm.compress.quality import embedding_cosine, sick_spearman  # noqa: E402
from tnlm.compress.text import docstring_sentences, read_sentences, split_sentences  # noqa: E402
from tnlm.integration import MPOConfig, default_model_path, get_mpo_model  # noqa: E402
from tnlm.integration.architectures import default_targets  # noqa: E402

METHODS = ("data_aware", "sensitivity", "greedy", "lowrank", "mpo_plain")


def training_text(data_dir: Path, source: str, seed: int) -> list[str]:
    if source == "docstrings":
        return docstring_sentences(seed=seed)
    sst = read_sentences(data_dir / "sst2" / "train.tsv", column=0)[1:]
    cola = read_sentences(data_dir / "cola" / "train.tsv", column=0)
    return [s for s in sst if len(s.split()) >= 4] + cola


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--heal-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", choices=("sst2cola", "docstrings"), default="sst2cola")
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    data = Path(args.data_dir)
    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    model = AutoModel.from_pretrained(path).eval()
    targets = default_targets(model)  # the 36 encoder linears
    text = training_text(data, args.text, args.seed)
    calibration, rest = split_sentences(text, [args.calibration, -1], seed=args.seed)
    dev = read_sentences(data / "sst2" / "dev.tsv", column=0)[1:1 + args.eval_size]
    sick = data / "sick" / "trial.tsv"
    t0 = time.perf_counter()
    heal_cfg = HealConfig(steps=args.heal_steps, lr=args.lr, seed=args.seed)
    progress = not args.no_progress
    if args.method == "mpo_plain":
        overrides = uniform_overrides(model, MPOConfig(target_modules=targets), args.budget)
        student = get_mpo_model(model, MPOConfig(target_modules=targets, overrides=overrides),
                                progress=False)
        before = sum(m.in_dim * m.out_dim for _, m in student.mpo_modules())
        after = sum(sum(c.numel() for c in m.cores) for _, m in student.mpo_modules())
    else:
        cfg = CompressionConfig(targets, budget=args.budget,
                                allocation=args.method if args.method in ("greedy", "sensitivity")
                                else "uniform",
                                whiten=args.method != "lowrank", heal=None)
        res = compress_model(model, tok, calibration, cfg, progress=progress)
        student, before, after = res.model, res.params_before, res.params_after
    t_trunc = time.perf_counter() - t0
    cos0 = embedding_cosine(student, teacher, tok, dev)
    sick0 = sick_spearman(student, tok, sick) if sick.is_file() else None
    t1 = time.perf_counter()
    h = heal(student, teacher, tok, calibration + rest, heal_cfg, progress=progress) \
        if args.heal_steps else None
    t_heal = time.perf_counter() - t1
    cos = embedding_cosine(student, teacher, tok, dev)
    out = dict(
        method=args.method, budget=args.budget, heal_steps=args.heal_steps, lr=args.lr,
        seed=args.seed, text=args.text, params_before=before, params_after=after,
        ratio=after / before, cosine_before_heal=float(cos0.mean()),
        cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
        sick_original=sick_spearman(teacher, tok, sick) if sick.is_file() else None,
        sick_before_heal=sick0,
        sick=sick_spearman(student, tok, sick) if sick.is_file() else None,
        seconds_truncation=t_trunc, seconds_healing=t_heal,
        seconds_per_step=h.seconds_per_step if h else None,
        final_loss=float(np.mean(h.losses[-20:])) if h and h.losses else None,
        torch_threads=torch.get_num_threads())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
