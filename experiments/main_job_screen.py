"""The main job (``tnlm compress``) with its knobs exposed, for screening its defaults.

Same text split, calibration, allocation, reconstruction, healing and metrics as
``tnlm compress`` on the embedded MiniLM (tnlm/cli.py), plus healing-loss weights, the
healing text, the reconstruction size. One JSON per run with wall time per phase.

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
from experiments.screening import main_job_split, measure, write_result  # noqa: E402
from tnlm.cli import BERT_TARGETS, build_parser  # noqa: E402
from tnlm.compress.distill import HealConfig  # noqa: E402
from tnlm.compress.pipeline import (  # noqa: E402  # noqa: E402
    MAIN_JOB_HEAL_STEPS,
    MAIN_JOB_LR,
    CompressionConfig,
    compress_model,
)
from tnlm.compress.text import (  # noqa: E402
    default_text,
    read_sentences,
)
from tnlm.integration import default_model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli = build_parser().parse_args(["compress"])  # the main job's defaults
    hc = HealConfig()
    ap.add_argument("--budget", type=float, default=cli.budget)
    ap.add_argument("--allocation", default=cli.allocation)
    ap.add_argument("--heal-steps", type=int, default=MAIN_JOB_HEAL_STEPS)
    ap.add_argument("--reconstruct-steps", type=int, default=cli.reconstruct_steps)
    ap.add_argument("--lr", type=float, default=MAIN_JOB_LR)
    ap.add_argument("--w-hidden", type=float, default=hc.w_hidden)
    ap.add_argument("--w-cos", type=float, default=hc.w_cos)
    ap.add_argument("--w-rel", type=float, default=0.0,
                    help="> 0: the relational term (experiments/heal_terms.py)")
    ap.add_argument("--neighbours", action="store_true",
                    help="half of each healing batch: nearest neighbours of the other half")
    ap.add_argument("--plain", action="store_true",
                    help="baseline: plain low-rank SVD of the weights (no whitening)")
    ap.add_argument("--batch-size", type=int, default=hc.batch_size)
    ap.add_argument("--train", default=cli.heal_train)
    ap.add_argument("--text", default="default", help="'default' or a file, one sentence a line")
    ap.add_argument("--text-column", type=int, default=None)
    ap.add_argument("--calibration", type=int, default=cli.calibration)
    ap.add_argument("--sick", default="../shared/data/sick/trial.tsv")
    ap.add_argument("--sick-train", default="../shared/data/sick/train.tsv",
                    help="also SICK on this file ('' to skip)")
    ap.add_argument("--dev-text", default="../shared/data/sst2/dev.tsv",
                    help="natural held-out text (first column, 500 sentences) for a second cosine")
    ap.add_argument("--seed", type=int, default=cli.seed)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.text == "default":
        text = default_text(seed=args.seed)
    else:
        text = read_sentences(args.text, column=args.text_column)
    held_out, calibration, rest, dev = main_job_split(text, args.calibration, args.seed,
                                                      args.dev_text)
    path = str(default_model_path())
    model = AutoModel.from_pretrained(path).eval()
    teacher = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    heal = HealConfig(steps=args.heal_steps, lr=args.lr, seed=args.seed, w_hidden=args.w_hidden,
                      teacher_bf16=cli.teacher_bf16,
                      w_cos=args.w_cos, batch_size=args.batch_size,
                      term=RelationalTerm(args.w_rel, args.neighbours)
                      if args.w_rel or args.neighbours else None,
                      train=args.train)
    cfg = CompressionConfig(BERT_TARGETS, budget=args.budget, allocation=args.allocation,
                            heal=heal, reconstruct_steps=args.reconstruct_steps,
                            whiten=not args.plain)
    res = compress_model(model, tok, calibration, cfg, heal_text=calibration + rest,
                         progress=False)
    wall = time.perf_counter() - t0
    out = dict(vars(args), ratio=res.ratio, seconds=res.seconds, wall_seconds=wall,
               **measure(res.model, teacher, tok, held_out, dev, args.sick, args.sick_train),
               final_loss=res.heal.losses[-1] if res.heal and res.heal.losses else None)
    write_result(out, args.out, ("cosine_mean", "cosine_dev_mean", "sick_spearman",
                                 "wall_seconds", "ratio"))


if __name__ == "__main__":
    main()
