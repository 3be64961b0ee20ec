"""Markdown tables of the main-job runs in results/main_job/ (experiments/main_job_screen.py).

Usage: python experiments/main_job_table.py [--dir results/main_job]

Prints one row per run (screens) and, for runs named ``final_<budget>_s<seed>.json``,
a summary row per budget with mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

COLS = ("cosine_mean", "cosine_dev_mean", "sick_spearman")


def _text(d: dict) -> str:
    t = d.get("text", "default")
    if d.get("grammar", "").startswith("pre-grammar"):
        return "pre-grammar default"
    if t == "default":
        return "default"
    return Path(t).parent.name + "/" + Path(t).name if "/" in t else t


def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="results/main_job")
    args = ap.parse_args()
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(Path(args.dir).glob("*.json"))}
    print("| run | text | kept | heal steps | options | held-out cosine | SST-2 dev cosine "
          "| SICK (orig. 0.799) | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, d in runs.items():
        opts = []
        for key, default in (("lr", 3e-4), ("w_hidden", 1.0), ("w_rel", 0.0),
                             ("allocation", "sensitivity")):
            if d.get(key, default) != default:
                opts.append(f"{key}={d[key]}")
        if d.get("neighbours"):
            opts.append("neighbour pairs")
        if d.get("plain"):
            opts.append("plain SVD")
        print(f"| {name} | {_text(d)} | {d['ratio']:.1%} | {d['heal_steps']} | "
              f"{', '.join(opts)} | {_fmt(d['cosine_mean'])} | {_fmt(d.get('cosine_dev_mean'))} "
              f"| {_fmt(d['sick_spearman'], 4)} | {d['wall_seconds']:.0f} |")
    finals: dict[str, list[dict]] = {}
    for name, d in runs.items():
        m = re.fullmatch(r"final_([0-9.]+)_s\d+", name)
        if m:
            finals.setdefault(m.group(1), []).append(d)
    if not finals:
        return
    print()
    print("| kept | seeds | held-out cosine | SST-2 dev cosine | SICK Spearman | wall s |")
    print("|---|---|---|---|---|---|")
    for _budget, ds in sorted(finals.items(), key=lambda kv: -float(kv[0])):
        cells = []
        for col in COLS + ("wall_seconds",):
            xs = [d[col] for d in ds if d.get(col) is not None]
            digits = 0 if col == "wall_seconds" else (4 if col == "sick_spearman" else 3)
            sd = f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else ""
            cells.append(f"{statistics.mean(xs):.{digits}f}{sd}" if xs else "")
        print(f"| {ds[0]['ratio']:.1%} | {len(ds)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
