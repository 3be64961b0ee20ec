"""Wall time of layer-by-layer compression's calibration and decompositions: 1 rank vs 2.

``compress_layerwise`` (method ``tnlm`` without block fitting, residual allocation: the
capture, the dense pass for the spectra, each block's statistics and truncations) on
SmolLM2-135M (``tnlm.integration.loading.default_llm_path()``; a random-init Llama of
its shape when it is not installed), in fresh processes, on the same cores:

* 1 rank: one process, ``torch.set_num_threads(2)``;
* 2 ranks: ``torchrun --nproc_per_node 2`` (gloo), each rank ``torch.set_num_threads(1)``.

Both use 2 cores. One table: each stage's seconds (``LayerwiseResult.seconds``: the
capture of block 0's inputs; the dense pass and whitened spectra of the allocation; per
block the teacher's outputs, the statistics and the truncations; the pass measuring each
block's output error; a rank's stage time includes its waits for the other) and the
wall time from a barrier before the
call to one after it, with the ratio 2 ranks / 1 rank measured in the same run; and
whether both runs chose the same ranks and truncation errors (they must: the statistics
are all-reduced, each truncation computed by one rank and broadcast).

    python benchmarks/bench_distributed.py [--sequences 32] [--seq-len 128] [--repeats 1]
    python benchmarks/bench_distributed.py --tiny     # a small random Llama: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: SmolLM2-135M's shape, for the random-init stand-in
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
               tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
#: LayerwiseResult.seconds' stages, as the table names them (no fitting: "fitting" is the
#: pass that measures each block's output error)
STAGES = {"capture": "capture", "allocation": "spectra", "truncation": "truncation",
          "fitting": "errors"}


def load_model(tiny: bool):
    """``(model, source)``: SmolLM2 (GGUF), or a random-init Llama of its shape or tiny."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tnlm.integration.loading import default_llm_path, load_pretrained

    path = None if tiny else default_llm_path()
    if path is not None:
        return load_pretrained(path)[0].eval(), f"SmolLM2-135M ({path.name})"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(TINY if tiny else SMOLLM2))).eval()
    return model, "tiny random Llama" if tiny else "random-init Llama of SmolLM2's shape"


def child(args: argparse.Namespace) -> None:
    """One process of a run: rank ``RANK`` of ``WORLD_SIZE`` (torchrun) or alone."""
    import torch

    sys.path.insert(0, str(ROOT))
    from tnlm.compress.distributed import barrier, process_group_from_env
    from tnlm.compress.layerwise import LayerwiseConfig, compress_layerwise
    from tnlm.integration.architectures import default_targets

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(2 // world if world <= 2 else 1)
    model, source = load_model(args.tiny)
    seqs = torch.randint(0, model.config.vocab_size, (args.sequences, args.seq_len),
                         generator=torch.Generator().manual_seed(0))
    cfg = LayerwiseConfig(default_targets(model), budget=args.budget, method="tnlm",
                          fit_steps=0, batch_size=args.batch_size, allocation="residual")
    with process_group_from_env() as (rank, size):
        barrier("the start")
        t0 = time.perf_counter()
        res = compress_layerwise(model, seqs, cfg, progress=False)
        barrier("the end")
        wall = time.perf_counter() - t0
    if rank == 0:
        Path(args.out).write_text(json.dumps(dict(
            source=source, world=size, threads=torch.get_num_threads(), wall=wall,
            seconds=res.seconds, ranks=res.ranks, errors=res.errors)))


def run(world: int, args: argparse.Namespace, out: Path) -> dict:
    me = [__file__, "--child", "--out", str(out), "--sequences", str(args.sequences),
          "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
          "--budget", str(args.budget)] + (["--tiny"] if args.tiny else [])
    if world == 1:
        cmd = [sys.executable, *me]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(port), *me]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // world)),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the {world}-rank run failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small random Llama (smoke run)")
    ap.add_argument("--sequences", type=int, default=32, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8,
                    help="sequences per batch (the 2 ranks share the batches)")
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each, alternating; the fastest wall time is reported")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    for name in ("sequences", "seq_len", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if -(-args.sequences // args.batch_size) < 2:
        ap.error("--sequences / --batch-size must make at least 2 batches (one per rank)")
    best: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for world in (1, 2):
                r = run(world, args, Path(tmp) / f"run{world}_{k}.json")
                if world not in best or r["wall"] < best[world]["wall"]:
                    best[world] = r
    one, two = best[1], best[2]
    print(f"{one['source']}: {args.sequences} sequences x {args.seq_len} tokens, batches "
          f"of {args.batch_size}, budget {args.budget}, method tnlm without fitting, "
          f"residual allocation; fastest of {args.repeats}")
    print(f"{'stage':<12} {'1 rank x 2 threads':>19} {'2 ranks x 1 thread':>19} {'ratio':>7}")
    rows = [(label, one["seconds"].get(s), two["seconds"].get(s)) for s, label in STAGES.items()]
    rows.append(("wall", one["wall"], two["wall"]))
    for stage, a, b in rows:
        if a is None or b is None:
            continue
        ratio = f"{b / a:.3f}" if a > 0 else "-"
        print(f"{stage:<12} {a:>18.2f}s {b:>18.2f}s {ratio:>7}")
    same = one["ranks"] == two["ranks"]
    rel = max((abs(one["errors"][k] - two["errors"][k]) / max(abs(one["errors"][k]), 1e-30)
               for k in one["errors"]), default=0.0)
    print(f"same ranks: {same}; truncation errors agree to {rel:.1e} (relative)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
