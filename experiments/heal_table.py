"""Markdown table of healing screens (results/heal_screen/, experiments/heal_screen.py).

Runs whose names differ only by a ``_s<seed>`` suffix form one row (mean ± std over
seeds; a name without the suffix is seed 0).

Usage:
    python experiments/heal_table.py results/heal_screen/trainall_lr5e-4_2000*.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

COLS = (("cosine_mean", 3), ("cosine_train", 3), ("cosine_dev_mean", 3),
        ("sick_spearman", 4), ("sick_train_spearman", 4), ("heal_seconds", 0))


def cell(xs: list[float], digits: int) -> str:
    if not xs:
        return ""
    sd = f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else ""
    return f"{statistics.mean(xs):.{digits}f}{sd}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    groups: dict[str, list[dict]] = {}
    for f in args.files:
        name = re.sub(r"_s\d+$", "", Path(f).stem)
        groups.setdefault(name, []).append(json.loads(Path(f).read_text()))
    print("| run | budget | steps | train | lr | seeds | held-out cosine | cosine on training "
          "sentences | SST-2 dev cosine | SICK trial (orig. 0.7994) | SICK train pairs "
          "(orig. 0.7783) | heal s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, ds in groups.items():
        d = ds[0]
        cells = [cell([x[c] for x in ds if x.get(c) is not None], k) for c, k in COLS]
        print(f"| {name} | {d['budget']} | {d['heal_steps']} | {d['train']} | {d['lr']:g} | "
              f"{len(ds)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
