"""Markdown table of healing screens (results/heal_screen/, experiments/heal_screen.py).

Runs whose names differ only by a ``_s<seed>`` suffix form one row (mean ± std over
seeds; a name without the suffix is seed 0). The default-text column: the recorded
``text_version`` (:data:`tnlm.textgen.TEXT_VERSION`), ``captions`` for the text with scene
captions (recorded so before the version was a hash), ``pre-caption`` before them. Files
that are not screen results (no ``cosine_mean``) are skipped with a note on stderr.

Usage:
    python experiments/heal_table.py results/heal_screen/trainall_lr5e-4_2000*.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

COLS = (("cosine_mean", 3), ("cosine_train", 3), ("cosine_dev_mean", 3),
        ("sick_spearman", 4), ("sick_train_spearman", 4), ("heal_seconds", 0))


#: options shown when they differ from these values
OPTIONS = (("w_attn", 0.0), ("attn_relations", "qk"), ("extra", 0), ("extra_doc", 0),
           ("extra_tsv", ""), ("twins", 0), ("w_cos", 1.0), ("w_hidden", 1.0))
#: text versions recorded as hashes that are the same text as an earlier name: results with
#: either are comparable (tests/test_textgen.py pins the generated sentences)
SAME_TEXT = {"textgen1-f89873f696fc": "captions"}


def options(d: dict) -> str:
    shown = [(k, d[k]) for k, default in OPTIONS if k in d and d[k] != default]
    if d.get("w_attn", 0.0) == 0.0:
        shown = [(k, v) for k, v in shown if k != "attn_relations"]
    return ", ".join(f"{k}={Path(v).parent.name + '/' + Path(v).name if k == 'extra_tsv' else v}"
                     for k, v in shown)


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
        d = json.loads(Path(f).read_text())
        if "cosine_mean" not in d:
            print(f"skipped {f}: not a heal_screen result", file=sys.stderr)
            continue
        name = re.sub(r"_s\d+$", "", Path(f).stem)
        groups.setdefault(name, []).append(d)
    print("| run | default text | budget | steps | train | lr | options | seeds | "
          "held-out cosine | "
          "cosine on training sentences | SST-2 dev cosine | SICK trial (orig. 0.7994) | "
          "SICK train pairs (orig. 0.7783) | heal s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, ds in groups.items():
        d = ds[0]
        cells = [cell([x[c] for x in ds if x.get(c) is not None], k) for c, k in COLS]
        text = d.get("text_version", "pre-caption")
        text = SAME_TEXT.get(text, text)
        print(f"| {name} | {text} | {d['budget']} | {d['heal_steps']} | {d['train']} | "
              f"{d['lr']:g} | {options(d)} | {len(ds)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
