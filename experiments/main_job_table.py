"""Markdown tables of the main-job runs in results/main_job/ (experiments/main_job_screen.py).

Usage: python experiments/main_job_table.py [--dir results/main_job]

Prints a summary row per method and budget with mean ± std over seeds for runs named
``default_<budget>_s<seed>.json`` (the main job's defaults), ``nocaptions_<budget>_s<seed>.json``
(the same before the default text had scene captions), ``final_<budget>_s<seed>.json``
(the former defaults: 1000 healing steps of the MPO cores at lr 3e-4) and
``plain2500_<budget>_s<seed>.json`` / ``plain2000_...`` / ``plain_...`` (the plain low-rank
baseline with the reconstruction and healing of ``default`` / ``nocaptions`` / ``final``),
then one row per run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.heal_table import cell  # noqa: E402  (mean ± std over seeds)

COLS = ("cosine_mean", "cosine_dev_mean", "sick_spearman")
LABELS = {"default": "main job defaults (data-aware, sensitivity allocation, 2500 steps)",
          "nocaptions": "former defaults: 2000 steps, default text without scene captions",
          "final": "former defaults (1000 healing steps of the MPO cores, lr 3e-4)",
          "plain2500": "plain low-rank SVD, uniform (the same reconstruction and healing)",
          "plain2000": "plain low-rank SVD, uniform (healing of nocaptions)",
          "plain": "plain low-rank SVD, uniform (former healing)"}
STYLES = {"default": "o-", "nocaptions": "o--", "final": "^:", "plain2500": "s-",
          "plain2000": "s:", "plain": "s--"}


def _text(d: dict) -> str:
    t = d.get("text", "default")
    if d.get("grammar", "").startswith(("pre-grammar", "pre-caption")):
        return d["grammar"]
    if t == "default":
        return "default"
    return Path(t).parent.name + "/" + Path(t).name if "/" in t else t


def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="results/main_job")
    ap.add_argument("--plot", default=None, help="also draw the summary rows to this PNG")
    args = ap.parse_args()
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(Path(args.dir).glob("*.json"))}
    groups: dict[tuple[str, str], list[dict]] = {}
    for name, d in runs.items():
        m = re.fullmatch(rf"({'|'.join(LABELS)})_([0-9.]+)_s\d+", name)
        if m:
            groups.setdefault((m.group(1), m.group(2)), []).append(d)
    print("| method | kept | seeds | held-out cosine | SST-2 dev cosine | SICK Spearman "
          "(orig. 0.7994) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for (method, _), ds in sorted(groups.items(),
                                  key=lambda kv: (list(LABELS).index(kv[0][0]), -float(kv[0][1]))):
        cells = []
        for col in COLS + ("wall_seconds",):
            digits = 0 if col == "wall_seconds" else (4 if col == "sick_spearman" else 3)
            cells.append(cell([d[col] for d in ds if d.get(col) is not None], digits))
        print(f"| {LABELS[method]} | {ds[0]['ratio']:.1%} | {len(ds)} | "
              + " | ".join(cells) + " |")
    if args.plot:
        plot(groups, args.plot)
    print()
    print("| run | text | kept | heal steps | options | held-out cosine | SST-2 dev cosine "
          "| SICK (orig. 0.7994) | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, d in runs.items():
        opts = []
        for key, default in (("lr", 3e-4), ("w_hidden", 1.0), ("w_rel", 0.0),
                             ("allocation", "sensitivity")):
            if d.get(key, default) != default:
                opts.append(f"{key}={d[key]}")
        if d.get("train", "cores") != "cores":
            opts.append(f"train={d['train']}")
        if d.get("neighbours"):
            opts.append("neighbour pairs")
        if d.get("plain"):
            opts.append("plain SVD")
        print(f"| {name} | {_text(d)} | {d['ratio']:.1%} | {d['heal_steps']} | "
              f"{', '.join(opts)} | {_fmt(d['cosine_mean'])} | {_fmt(d.get('cosine_dev_mean'))} "
              f"| {_fmt(d['sick_spearman'], 4)} | {d['wall_seconds']:.0f} |")


def plot(groups: dict[tuple[str, str], list[dict]], path: str) -> None:
    """Metric vs kept fraction per method (mean over seeds, error bars = std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.6))
    for method, style in STYLES.items():
        pts = sorted((float(k[1]), ds) for k, ds in groups.items() if k[0] == method)
        if not pts:
            continue
        label = {"default": "main job", "nocaptions": "main job, text without captions",
                 "final": "former main job",
                 "plain2500": "plain low-rank",
                 "plain2000": "plain low-rank, healing of nocaptions",
                 "plain": "plain low-rank, former healing"}[method]
        x = [ds[0]["ratio"] for _, ds in pts]
        for ax, cols in ((axes[0], ("cosine_mean", "cosine_dev_mean")),
                         (axes[1], ("sick_spearman",))):
            for col in cols:
                ys = [[d[col] for d in ds] for _, ds in pts]
                ax.errorbar(x, [statistics.mean(y) for y in ys],
                            yerr=[statistics.stdev(y) if len(y) > 1 else 0 for y in ys],
                            fmt=style, capsize=3,
                            label=f"{label}: " + {"cosine_mean": "held-out",
                                                  "cosine_dev_mean": "SST-2 dev",
                                                  "sick_spearman": "SICK"}[col])
    axes[0].set(xlabel="kept fraction of the encoder-linear parameters",
                ylabel="embedding cosine to the original")
    axes[1].axhline(0.7994, color="gray", lw=0.8, ls=":", label="original")
    axes[1].set(xlabel="kept fraction of the encoder-linear parameters",
                ylabel="SICK Spearman")
    for ax in axes:
        ax.legend(fontsize=6.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
