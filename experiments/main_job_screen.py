"""The main job (``tnlm compress``) with its knobs exposed, for screening its defaults.

The job itself (:func:`tnlm.compress.encoder.compress_encoder`: text split, calibration,
allocation, reconstruction, healing and measures, as ``tnlm compress`` on the embedded
MiniLM), its knobs as flags with the job's defaults (:class:`EncoderRecipe`), plus
healing-loss weights, the plain-SVD baseline, a natural-text cosine and SICK on the
training pairs. One JSON per run with wall time per phase.

Usage:
    python experiments/main_job_screen.py --heal-steps 300 --w-rel 10 \
        --out results/main_job/rel10.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.heal_terms import RelationalTerm  # noqa: E402
from experiments.screening import dev_sentences, write_result  # noqa: E402
from tnlm.compress.distill import HealConfig  # noqa: E402
from tnlm.compress.encoder import DEFAULT_SICK, EncoderRecipe, compress_encoder  # noqa: E402
from tnlm.compress.text import read_sentences  # noqa: E402
from tnlm.integration import default_model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    job = EncoderRecipe  # the main job's defaults
    hc = HealConfig()
    ap.add_argument("--budget", type=float, default=job.budget)
    ap.add_argument("--allocation", default=job.allocation)
    ap.add_argument("--heal-steps", type=int, default=job.heal_steps)
    ap.add_argument("--reconstruct-steps", type=int, default=job.reconstruct_steps)
    ap.add_argument("--lr", type=float, default=job.lr)
    ap.add_argument("--w-hidden", type=float, default=hc.w_hidden)
    ap.add_argument("--w-cos", type=float, default=hc.w_cos)
    ap.add_argument("--w-rel", type=float, default=0.0,
                    help="> 0: the relational term (experiments/heal_terms.py)")
    ap.add_argument("--neighbours", action="store_true",
                    help="half of each healing batch: nearest neighbours of the other half")
    ap.add_argument("--plain", action="store_true",
                    help="baseline: plain low-rank SVD of the weights (no whitening)")
    ap.add_argument("--batch-size", type=int, default=hc.batch_size)
    ap.add_argument("--train", default=job.heal_train)
    ap.add_argument("--text", default="default", help="'default' or a file, one sentence a line")
    ap.add_argument("--text-column", type=int, default=None)
    ap.add_argument("--calibration", type=int, default=job.calibration)
    ap.add_argument("--sick", default=str(DEFAULT_SICK))
    ap.add_argument("--sick-train", default="../shared/data/sick/train.tsv",
                    help="also SICK on this file ('' to skip)")
    ap.add_argument("--dev-text", default="../shared/data/sst2/dev.tsv",
                    help="natural held-out text (first column, 500 sentences) for a second cosine")
    ap.add_argument("--seed", type=int, default=job.seed)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    text = None if args.text == "default" else read_sentences(args.text, column=args.text_column)
    dev = dev_sentences(args.dev_text)
    path = str(default_model_path())
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    recipe = EncoderRecipe(budget=args.budget, allocation=args.allocation,
                           calibration=args.calibration, reconstruct_steps=args.reconstruct_steps,
                           heal_steps=args.heal_steps, lr=args.lr, heal_train=args.train,
                           whiten=not args.plain, seed=args.seed)
    heal = recipe.heal_config(w_hidden=args.w_hidden, w_cos=args.w_cos,
                              batch_size=args.batch_size,
                              term=RelationalTerm(args.w_rel, args.neighbours)
                              if args.w_rel or args.neighbours else None)
    res = compress_encoder(model, tok, recipe, text=text, heal=heal, sick=args.sick or None,
                           dev=dev, sick_train=args.sick_train or None, progress=False)
    wall = time.perf_counter() - t0
    hr = res.compression.heal
    out = dict(vars(args), ratio=res.ratio, seconds=res.compression.seconds, wall_seconds=wall,
               **res.measures, final_loss=hr.losses[-1] if hr and hr.losses else None)
    write_result(out, args.out, ("cosine_mean", "cosine_dev_mean", "sick_spearman",
                                 "wall_seconds", "ratio"))


if __name__ == "__main__":
    main()
