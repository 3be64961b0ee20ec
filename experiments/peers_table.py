"""Aggregate results/peers/*.json (experiments/peers.py) into the table and plot of docs/results.md.

Usage:
    python experiments/peers_table.py results/peers/*.json --plot docs/figures/peers.png
Prints a markdown table: one row per method, text and size, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.compress_table import fmt, save_panels, two_panels  # noqa: E402
from tnlm.compress.encoder import EncoderRecipe  # noqa: E402

DEFAULT_CALIBRATION = EncoderRecipe.calibration

LABELS = {
    "tnlm": "tnlm (main job)",
    "plain": "plain low-rank SVD, same job",
    "whitened": "whitened low rank (uniform rank), same job",
    "layerdrop": "layer dropping + distillation",
    "int8": "dense, int8 dynamic quantization",
}
COLUMNS = ("cos_natural", "cos_sst2", "cos_cola", "cos_sick", "cos_lm", "sick_spearman")


def label(r: dict) -> str:
    name = LABELS[r["method"]]
    if r["method"] == "layerdrop":
        name += f" ({r['layers']} of 6 layers)"
    if r["method"] in ("tnlm", "plain", "whitened", "layerdrop"):
        name += ", former text" if r.get("text") == "grammar" else ""
        name += ", pivoted" if r.get("pivoted") else ""
        if r.get("extra_llm_text"):
            name += f", + {len(r['extra_llm_text'])} LM text files"
        if r.get("user_text"):  # a user's own sentences after the default text
            name += f", + own text ({re.sub(r'_s[0-9]+$', '', Path(r['user_text']).stem)})"
        if r.get("lr") is not None:
            name += f", lr {r['lr']:g}"
        if r.get("calibration") not in (None, DEFAULT_CALIBRATION):
            name += f", {r['calibration']} calibration sentences"
        if "extrapolated" in r.get("_file", ""):  # the sensitivity curve extended below
            # its smallest measured fraction (docs/results.md)
            name += ", curve extended linearly"
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for f in args.files:
        r = json.loads(Path(f).read_text())
        r["_file"] = Path(f).stem
        # one row per method and asked budget: seeds of a data-driven allocation keep
        # slightly different fractions (the row shows their mean)
        asked = r.get("budget") if r.get("budget") is not None else round(r["kept"], 3)
        groups[(label(r), asked, r.get("heal_steps"))].append(r)
    kept_of = {key: float(np.mean([r["kept"] for r in rs])) for key, rs in groups.items()}
    orig = next(iter(groups.values()))[0]["sick_spearman_original"]
    print(f"| method | kept | seeds | natural cosine (mean of 3) | SST-2 dev | CoLA dev | "
          f"SICK sentences | shipped held-out prose | SICK Spearman (orig. {orig:.4f}) | "
          f"wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, rs in sorted(groups.items(), key=lambda kv: (-kept_of[kv[0]], kv[0][0])):
        name, kept = key[0], kept_of[key]
        cells = [fmt([r[c] for r in rs], 4 if c == "sick_spearman" else 3) for c in COLUMNS]
        seeds = "/".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        wall = fmt([r["wall_seconds"] for r in rs], 0)
        print(f"| {name} | {kept:.1%} | {seeds} | " + " | ".join(cells) + f" | {wall} |")
    if args.plot:
        fig, axes = two_panels("cosine to the original (natural text)")
        by_name: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for key, rs in groups.items():
            name, kept = key[0], kept_of[key]
            base = name.replace(f" ({rs[0].get('layers')} of 6 layers)", "")
            by_name[base].append((kept, np.mean([r["cos_natural"] for r in rs]),
                                  np.mean([r["sick_spearman"] for r in rs])))
        # more series than the default cycle's 10 colours: one colour a series
        from matplotlib import colormaps

        colours = colormaps["tab20"].colors
        for k, (name, pts) in enumerate(sorted(by_name.items())):
            pts.sort()
            xs = [p[0] for p in pts]
            style = dict(label=name, color=colours[k % len(colours)])
            axes[0].plot(xs, [p[1] for p in pts], "o-", **style)
            axes[1].plot(xs, [p[2] for p in pts], "o-", **style)
        axes[1].axhline(orig, color="grey", ls="--", lw=1, label="original")
        save_panels(fig, axes, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
