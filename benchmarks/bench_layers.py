"""MPOLinear / MPOEmbedding speed against nn.Linear / nn.Embedding, measured in the same run.

Usage:  python benchmarks/bench_layers.py [--repeats 7] [--tokens 4096]

MiniLM shapes (384x384, 1536x384, 384x1536; x of 32x128 tokens). For each shape,
untruncated and truncated to about 50% / 25% / 10% of the dense parameters, two
families of site shapes:
  * balanced: 5 sites from ``factorize`` (the paper's layout)
  * io-split: 3 sites, in_shape (I/a, a, 1), out_shape (1, b, J/b) - the input legs
    sit left of the central tensor, the output legs right of it, so contracting x
    costs about 2*rows*(I*d + d*a*b*d + J*d) FLOPs
Each row prints forward and forward+backward time ratios (MPO / dense, medians of
interleaved repeats) for mode=contract, dense and auto, beside the planned FLOP
ratio of the contract path (2*rows*I*J for dense).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from tnlm import MPOEmbedding, MPOLinear
from tnlm.core import max_bond_for_params

torch.manual_seed(0)


def timed(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def fwd(layer, x):
    with torch.no_grad():
        layer(x)


def fwd_bwd(layer, x):
    layer(x).sum().backward()


def io_split(I, J):
    a = 4 if I <= 384 else 8
    b = 4 if J <= 384 else 8
    return (I // a, a, 1), (1, b, J // b)


def bench_linear(I, J, rows, repeats):
    lin = nn.Linear(I, J)
    x = torch.randn(rows, I)
    xg = x.clone().requires_grad_(True)
    configs = []
    for fam in ("balanced", "io-split"):
        shapes = (None, None) if fam == "balanced" else io_split(I, J)
        from tnlm import factorize
        ins, outs = shapes if shapes[0] else (factorize(I, 5), factorize(J, 5))
        configs.append((fam, "exact", ins, outs, None))
        for frac in (0.5, 0.25, 0.1):
            configs.append((fam, f"{int(frac*100)}%", ins, outs, max_bond_for_params(ins, outs, int(frac * lin.weight.numel()))))
    rows_out = []
    for fam, label, ins, outs, mb in configs:
        layer = MPOLinear.from_linear(lin, ins, outs, max_bond=mb)
        params = sum(c.numel() for c in layer.cores) / lin.weight.numel()
        _, cflops, dflops = layer.choose_mode(rows)
        res = {}
        for mode in ("contract", "dense", "auto"):
            layer.mode = mode
            tf, tb, bf, bb = [], [], [], []
            for _ in range(repeats):  # interleave MPO and dense
                tf += timed(lambda layer=layer: fwd(layer, x), 1)
                bf += timed(lambda: fwd(lin, x), 1)
                tb += timed(lambda layer=layer: fwd_bwd(layer, xg), 1)
                bb += timed(lambda: fwd_bwd(lin, xg), 1)
            res[mode] = (statistics.median(tf) / statistics.median(bf),
                         statistics.median(tb) / statistics.median(bb))
        auto_mode = layer.choose_mode(rows)[0]
        rows_out.append((f"{I}x{J}", fam, label, params, cflops / (2 * rows * I * J),
                         res, auto_mode, layer.bond_dims))
        print(f"{I}x{J:<5d} {fam:9s} {label:6s} params {params:5.2f}  flops(contract) "
              f"{cflops / (2 * rows * I * J):5.2f}x  "
              + "  ".join(f"{m}: fwd {r[0]:4.2f} fwd+bwd {r[1]:4.2f}" for m, r in res.items())
              + f"  auto->{auto_mode}  bonds {layer.bond_dims}", flush=True)
    return rows_out


def bench_embedding(rows_list, repeats):
    """Forward (no_grad) of MPOEmbedding / nn.Embedding: gather (mode contract), rebuild of
    the table at every call (mode dense, cache_dense=False) and auto (eval: F.embedding on
    the cached table)."""
    emb = nn.Embedding(30522, 384)
    for mb in (None, 64, 16):
        layer = MPOEmbedding.from_embedding(emb, max_bond=mb)
        params = sum(c.numel() for c in layer.cores) / emb.weight.numel()
        for rows in rows_list:
            ids = torch.randint(0, 30522, (rows,))
            res = {}
            slice_bytes = rows * sum(d0 * j * d1 for d0, _, j, d1 in layer.core_shapes) * 4
            for label, mode, cache in (("gather", "contract", True), ("rebuild", "dense", False),
                                       ("auto", "auto", True)):
                if mode == "contract" and slice_bytes > 2e9:  # the per-id core slices
                    res[label] = float("nan")
                    continue
                layer.mode, layer.cache_dense = mode, cache
                layer.invalidate_cache()
                t, b = [], []
                for _ in range(max(3, repeats)):
                    t += timed(lambda layer=layer, ids=ids: fwd(layer, ids), 1 if mode != "auto" else 20)
                    b += timed(lambda ids=ids: fwd(emb, ids), 1 if mode != "auto" else 20)
                res[label] = statistics.median(t) / statistics.median(b)
            print(f"embedding 30522x384 max_bond={mb} params {params:5.2f} ids {rows:5d}  "
                  "fwd ratio " + "  ".join(f"{m}: {r:7.2f}" for m, r in res.items())
                  + f"  auto->{layer.last_mode}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=32 * 128)
    ap.add_argument("--skip-embedding", action="store_true")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rows {args.tokens}")
    if not args.skip_linear:
        for I, J in ((384, 384), (1536, 384), (384, 1536)):
            bench_linear(I, J, args.tokens, args.repeats)
    if not args.skip_embedding:
        bench_embedding(sorted({64, args.tokens}), args.repeats)


if __name__ == "__main__":
    main()
