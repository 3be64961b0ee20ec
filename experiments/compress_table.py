"""Aggregate results/compress/*.json into the compression table and plot of docs/results.md.

Usage:
    python experiments/compress_table.py --plot docs/figures/compression.png
Prints a markdown table (method x budget, mean ± std over seeds) to stdout.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

LABELS = {
    "data_aware": "data-aware MPO (whitened, 2 sites)",
    "sensitivity": "data-aware MPO, sensitivity allocation",
    "greedy": "data-aware MPO, greedy ranks",
    "lowrank": "low-rank SVD (plain)",
    "mpo_plain": "balanced 5-site MPO (plain)",
}


def fmt(values: list[float], digits: int = 3) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}"


def two_panels(left: str):
    """A figure of two panels against the kept fraction: ``left`` (a cosine) and SICK."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].set(xlabel="fraction of encoder-linear parameters kept", ylabel=left)
    axes[1].set(xlabel="fraction of encoder-linear parameters kept",
                ylabel="SICK relatedness Spearman")
    return fig, axes


def save_panels(fig, axes, path: str) -> None:
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results/compress")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for f in sorted(Path(args.results).glob("*_s*.json")):
        r = json.loads(f.read_text())
        groups[(r["method"], r["budget"], r["text"], r["heal_steps"])].append(r)
    print("| method | text | kept | heal steps | seeds | cosine before heal | cosine (mean) "
          "| cosine (min) | SICK Spearman (orig.) | SICK Spearman | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (method, _, text, steps), rs in sorted(groups.items(),
                                                    key=lambda kv: (-kv[0][1], kv[0][0])):
        print(f"| {LABELS.get(method, method)} | {text} | {np.mean([r['ratio'] for r in rs]):.1%} "
              f"| {steps} | {len(rs)} | {fmt([r['cosine_before_heal'] for r in rs])} "
              f"| {fmt([r['cosine_mean'] for r in rs])} | {fmt([r['cosine_min'] for r in rs])} "
              f"| {fmt([r['sick_original'] for r in rs])} | {fmt([r['sick'] for r in rs])} "
              f"| {fmt([r['seconds_per_step'] for r in rs], 2)} |")
    if args.plot:
        fig, axes = two_panels("embedding cosine to the original (SST-2 dev)")
        for method in LABELS:
            rows = sorted(((b, rs) for (m, b, t, _), rs in groups.items()
                           if m == method and t == "sst2cola"), key=lambda x: x[0])
            if not rows:
                continue
            x = [np.mean([r["ratio"] for r in rs]) for _, rs in rows]
            for ax, key in zip(axes, ("cosine_mean", "sick")):
                y = [np.mean([r[key] for r in rs]) for _, rs in rows]
                e = [np.std([r[key] for r in rs]) for _, rs in rows]
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=LABELS[method])
        orig = [r["sick_original"] for rs in groups.values() for r in rs if r["sick_original"]]
        if orig:
            axes[1].axhline(orig[0], color="k", ls="--", lw=1, label="original model")
        save_panels(fig, axes, args.plot)


if __name__ == "__main__":
    main()
