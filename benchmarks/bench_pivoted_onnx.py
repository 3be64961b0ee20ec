"""ONNX Runtime: one gauge-fixed layer written three ways, in one run.

Usage:  OMP_NUM_THREADS=1 python benchmarks/bench_pivoted_onnx.py [--in 384] [--out 1536]
            [--rank 168] [--repeats 50]

A rank-r layer y = x @ W with W gauge-fixed (``tnlm.core.pivot``: r pivot rows of the
basis are the identity, the other I - r rows are C), exported with ``torch.onnx`` and run
by ONNX Runtime on one thread, batches of 1 and 8 sequences x 64 tokens:

* ``gather``: ``(x[..., p] + x[..., q] @ C) @ R``, the PivotedLinear's own forward: two
  Gathers on the feature axis, r (I + J - r) numbers;
* ``chain``: ``(x @ B) @ R`` with B the (I, r) basis, the form ``export_onnx`` writes
  (``tnlm.export.factorized.PivotedChain``, which now stores the same two shapes in the
  balanced gauge: the same time): r (I + J) numbers;
* ``dense``: ``x @ W``, I J numbers.

Medians over interleaved repeats; ratios against ``chain``. The defaults are MiniLM's
384 x 1536 FFN input at 50 % of its parameters (rank 168 gauge-fixed).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Gather(nn.Module):
    def __init__(self, p, q, C, R):
        super().__init__()
        self.p, self.q, self.C, self.R = p, q, nn.Parameter(C), nn.Parameter(R)

    def forward(self, x):
        return (x.index_select(-1, self.p) + x.index_select(-1, self.q) @ self.C) @ self.R


class Chain(nn.Module):
    def __init__(self, B, R):
        super().__init__()
        self.B, self.R = nn.Parameter(B), nn.Parameter(R)

    def forward(self, x):
        return (x @ self.B) @ self.R


class Dense(nn.Module):
    def __init__(self, W):
        super().__init__()
        self.W = nn.Parameter(W)

    def forward(self, x):
        return x @ self.W


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--in", dest="I", type=int, default=384)
    ap.add_argument("--out", dest="J", type=int, default=1536)
    ap.add_argument("--rank", type=int, default=168)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    I, J, r = args.I, args.J, args.rank
    if not 1 <= r <= min(I, J):
        ap.error(f"--rank must be in [1, min(in, out)] = [1, {min(I, J)}], got {r}")
    torch.manual_seed(0)
    p = torch.randperm(I)[:r].sort().values
    keep = torch.ones(I, dtype=torch.bool)
    keep[p] = False
    q = torch.arange(I)[keep]
    C, R = torch.randn(I - r, r) / r**0.5, torch.randn(r, J) / r**0.5
    B = torch.zeros(I, r)
    B[p], B[q] = torch.eye(r), C
    models = {"gather": Gather(p, q, C, R), "chain": Chain(B, R), "dense": Dense(B @ R)}
    work = Path(tempfile.mkdtemp(prefix="bench_pivoted_"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sessions = {}
    x0 = torch.randn(2, 64, I)
    for name, m in models.items():
        path = work / f"{name}.onnx"
        torch.onnx.export(m, (x0,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 1: "tokens"}}, dynamo=False)
        sessions[name] = ort.InferenceSession(str(path), so)
    ref = sessions["dense"].run(None, {"x": x0.numpy()})[0]
    for name, s in sessions.items():
        err = float(np.abs(s.run(None, {"x": x0.numpy()})[0] - ref).max())
        print(f"{name}: max |y - y_dense| = {err:.2e}")
    print(f"\nI={I}, J={J}, rank {r}; ONNX Runtime 1 thread, median of {args.repeats} "
          "interleaved repeats\n")
    print("| batch x 64 tokens | " + " | ".join(f"{n} ms" for n in sessions)
          + " | gather / chain | dense / chain |")
    print("|---|" + "---|" * (len(sessions) + 2))
    for b in (1, 8):
        x = np.random.default_rng(b).standard_normal((b, 64, I)).astype(np.float32)
        times: dict[str, list[float]] = {n: [] for n in sessions}
        for _ in range(3):
            for s in sessions.values():
                s.run(None, {"x": x})
        for _ in range(args.repeats):
            for n, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[n].append(time.perf_counter() - t)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        print(f"| {b} | " + " | ".join(f"{med[n]:.3f}" for n in sessions)
              + f" | {med['gather'] / med['chain']:.2f} | {med['dense'] / med['chain']:.2f} |")


if __name__ == "__main__":
    main()
