"""Where a compressed model loses SICK: its pair cosines against the original's.

Loads the original model and a saved compressed one (``heal_screen.py --save DIR`` or
``tnlm compress --out DIR``), embeds both sentences of every SICK pair with each, and
prints: the Spearman correlation of each with the gold relatedness, of the student's pair
cosines with the teacher's, the embedding cosine student-to-teacher on SICK's sentences,
and per entailment label the mean shift of the pair cosine (student - teacher).

Usage:
    python experiments/sick_pairs.py DIR [--sick ../shared/data/sick/train.tsv] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tnlm.compress.quality import embed, read_sick, spearman  # noqa: E402
from tnlm.integration import MPOModel, default_model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--sick", default="../shared/data/sick/train.tsv")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    from transformers import AutoModel, AutoTokenizer

    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    student = MPOModel.from_pretrained(AutoModel.from_pretrained(path), args.model_dir).eval()
    rows = read_sick(args.sick)
    a_text, b_text = [r["sentence_A"] for r in rows], [r["sentence_B"] for r in rows]
    gold = np.array([float(r["relatedness_score"]) for r in rows])
    label = np.array([r.get("entailment_judgment", "") for r in rows])

    def pair_cos(m):
        a, b = embed(m, tok, a_text), embed(m, tok, b_text)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy(), a, b

    t, ta, tb = pair_cos(teacher)
    s, sa, sb = pair_cos(student)
    out = dict(pairs=len(rows), spearman_teacher=spearman(t, gold),
               spearman_student=spearman(s, gold), spearman_student_teacher=spearman(s, t),
               cosine_to_teacher=float(torch.cat([
                   torch.nn.functional.cosine_similarity(sa, ta, dim=-1),
                   torch.nn.functional.cosine_similarity(sb, tb, dim=-1)]).mean()),
               shift_mean=float((s - t).mean()))
    for lab in sorted(set(label) - {""}):
        m = label == lab
        out[f"shift_{lab.lower()}"] = float((s - t)[m].mean())
        out[f"pairs_{lab.lower()}"] = int(m.sum())
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
