"""Exact MPO decomposition of MiniLM's weights against dense SVD and quimb, in one run.

Usage:  python benchmarks/bench_decompose.py [--repeats 5] [--sites 4,4,6,2,2]

For every encoder linear matrix (36) and the word embedding it times
  * tnlm  ``MPO.from_matrix`` (method="auto": exact -> successive Householder QRs)
  * tnlm  ``MPO.from_matrix(method="svd")`` (successive SVDs, spectra cached)
  * dense ``numpy.linalg.svd(W, full_matrices=False)`` (one SVD per matrix)
  * quimb ``MatrixProductOperator.from_dense`` on the square 384x384 matrices with the
    same site dimensions, exact (cutoff=0, which quimb splits by QR) and with
    method="svd" (successive SVDs, like tnlm's method="svd")
Timings are medians of interleaved repeats; ratios are against quimb and dense SVD
measured in this same run. Relative Frobenius round-trip errors are printed beside.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np

from tnlm import MPO
from tnlm.integration import load_default_weights

warnings.filterwarnings("ignore")


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def timeit(fn, repeats):
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sites", default="4,4,6,2,2", help="site dims for the 384x384 quimb comparison")
    args = ap.parse_args()
    sites = tuple(int(s) for s in args.sites.split(","))

    import quimb.tensor as qtn

    weights = load_default_weights()
    linear = {k.removesuffix(".weight"): v.T.astype(np.float64)
              for k, v in weights.items() if k.startswith("encoder.") and k.endswith("dense.weight")
              or any(k.endswith(f"self.{p}.weight") for p in ("query", "key", "value"))}
    assert len(linear) == 36, len(linear)

    rows, totals = [], {"tnlm": 0.0, "tnlm_svd": 0.0, "dense": 0.0}
    sq = {"tnlm": [], "tnlm_svd": [], "quimb": [], "quimb_svd": [], "dense": []}
    for name, W in linear.items():
        shape_kw = dict(in_shape=sites, out_shape=sites) if W.shape == (384, 384) else {}
        fns = {
            "tnlm": lambda W=W, kw=shape_kw: MPO.from_matrix(W, **kw),
            "tnlm_svd": lambda W=W, kw=shape_kw: MPO.from_matrix(W, method="svd", **kw),
            "dense": lambda W=W: np.linalg.svd(W, full_matrices=False),
        }
        if W.shape == (384, 384):
            fns["quimb"] = lambda W=W: qtn.MatrixProductOperator.from_dense(W, dims=sites, cutoff=0.0)
            fns["quimb_svd"] = lambda W=W: qtn.MatrixProductOperator.from_dense(
                W, dims=sites, cutoff=0.0, method="svd")
        # interleave the methods so machine noise hits all of them alike
        per = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                per[k].append(timeit(fn, 1)[0])
        med = {k: statistics.median(v) for k, v in per.items()}
        for k in totals:
            totals[k] += med[k]
        if "quimb" in med:
            for k in sq:
                sq[k].append(med[k])
        err = rel(MPO.from_matrix(W, **shape_kw).to_matrix(), W)
        err_q = rel(fns["quimb"]().to_dense(), W) if "quimb" in fns else float("nan")
        rows.append((name, W.shape, med, err, err_q))

    print(f"{'matrix':45s} {'shape':>12s} {'tnlm ms':>8s} {'svd ms':>8s} {'dense ms':>8s} "
          f"{'quimb ms':>8s} {'err tnlm':>9s} {'err quimb':>9s}")
    for name, shape, med, err, err_q in rows:
        q = med.get("quimb", float("nan")) * 1e3
        print(f"{name:45s} {str(shape):>12s} {med['tnlm']*1e3:8.1f} {med['tnlm_svd']*1e3:8.1f} "
              f"{med['dense']*1e3:8.1f} {q:8.1f} {err:9.1e} {err_q:9.1e}")

    E = weights["embeddings.word_embeddings.weight"].astype(np.float64)
    e_t, _ = timeit(lambda: MPO.from_matrix(E, pad=True), 1)
    e_s, _ = timeit(lambda: MPO.from_matrix(E, pad=True, method="svd"), 1)
    e_d, _ = timeit(lambda: np.linalg.svd(E, full_matrices=False), 1)
    e_err = rel(MPO.from_matrix(E, pad=True).to_matrix(), E)
    print(f"{'embeddings.word_embeddings (padded 30720)':45s} {str(E.shape):>12s} {e_t*1e3:8.1f} "
          f"{e_s*1e3:8.1f} {e_d*1e3:8.1f} {'-':>8s} {e_err:9.1e} {'-':>9s}")

    n = len(sq["quimb"])
    s = {k: sum(v) for k, v in sq.items()}
    print(f"\n384x384 matrices (n={n}, sites {sites}), summed medians:")
    print(f"  tnlm (qr)  {s['tnlm']*1e3:8.1f} ms   ratio vs quimb {s['tnlm']/s['quimb']:.2f}   "
          f"vs dense SVD {s['tnlm']/s['dense']:.2f}")
    print(f"  tnlm (svd) {s['tnlm_svd']*1e3:8.1f} ms   ratio vs quimb {s['tnlm_svd']/s['quimb']:.2f}   "
          f"vs dense SVD {s['tnlm_svd']/s['dense']:.2f}")
    print(f"  quimb      {s['quimb']*1e3:8.1f} ms   (cutoff=0: QR splits)")
    print(f"  quimb svd  {s['quimb_svd']*1e3:8.1f} ms   tnlm (svd) / quimb svd "
          f"{s['tnlm_svd']/s['quimb_svd']:.2f}")
    print(f"  dense SVD  {s['dense']*1e3:8.1f} ms")
    tot = {k: v + x for (k, v), x in zip(totals.items(), (e_t, e_s, e_d))}
    print(f"\nall 36 linear + word embedding: tnlm (qr) {tot['tnlm']:.2f} s, tnlm (svd) "
          f"{tot['tnlm_svd']:.2f} s, dense SVD {tot['dense']:.2f} s "
          f"(ratios {tot['tnlm']/tot['dense']:.2f}, {tot['tnlm_svd']/tot['dense']:.2f})")


if __name__ == "__main__":
    main()
