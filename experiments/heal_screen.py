"""Screen healing variants on one truncated model (the main job's, before healing).

The main job's steps up to healing (text split, calibration, sensitivity allocation,
data-aware truncation, block reconstruction: :func:`tnlm.compress.encoder.compress_encoder`
with no healing steps, exactly as ``tnlm compress``) run once per
(budget, seed) and the result is kept as a full tnlm checkpoint in ``--cache``; each
variant then heals a fresh copy of it and is measured as ``main_job_screen.py`` measures
the main job (held-out cosine, SST-2 dev cosine, SICK), plus the cosine on 256 of the
sentences it trained on (the fit/generalisation gap).

Variants: the healing text (``--extra N`` fresh generated sentences beside the main job's
text; ``--vocab P``: a share P of the extra sentences has words swapped for random words
of the tokenizer's vocabulary), what trains (``--train``), steps, batch size, lr, and one
extra loss term of ``heal_terms.py`` (``--twins``, ``--w-attn``).

Usage:
    python experiments/heal_screen.py --heal-steps 300 --extra 30000 \
        --out results/heal_screen/extra30k.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.heal_terms import (  # noqa: E402
    AttentionTerm,
    TwinTerm,
    swap_words,
    vocabulary_words,
)
from experiments.screening import dev_sentences, write_result  # noqa: E402
from tnlm.compress.distill import HealConfig, heal  # noqa: E402
from tnlm.compress.encoder import (  # noqa: E402
    DEFAULT_SICK,
    EncoderRecipe,
    compress_encoder,
    measure,
    split_text,
)
from tnlm.compress.quality import embedding_cosine, read_sick  # noqa: E402
from tnlm.compress.text import (  # noqa: E402
    default_text,
    docstring_roots,
    docstring_sentences,
)
from tnlm.integration import MPOModel, default_model_path  # noqa: E402
from tnlm.textgen import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    job = EncoderRecipe  # the main job's defaults
    hc = HealConfig()
    ap.add_argument("--budget", type=float, default=job.budget)
    ap.add_argument("--seed", type=int, default=job.seed)
    ap.add_argument("--heal-steps", type=int, default=job.heal_steps)
    ap.add_argument("--lr", type=float, default=job.lr)
    ap.add_argument("--batch-size", type=int, default=hc.batch_size)
    ap.add_argument("--train", default=job.heal_train)
    ap.add_argument("--w-hidden", type=float, default=hc.w_hidden)
    ap.add_argument("--w-cos", type=float, default=hc.w_cos)
    ap.add_argument("--w-attn", type=float, default=0.0,
                    help="> 0: the attention-relation term (experiments/heal_terms.py)")
    ap.add_argument("--attn-relations", default="qk",
                    help="comma-separated: qk (attention), vv (value relation)")
    ap.add_argument("--bucket", type=int, default=hc.bucket)
    ap.add_argument("--teacher-bf16", action="store_true")
    ap.add_argument("--student-bf16", action="store_true")
    ap.add_argument("--twins", type=int, default=0,
                    help="> 0: word-swapped twins per batch (experiments/heal_terms.py)")
    ap.add_argument("--twin-words", type=float, default=0.15)
    ap.add_argument("--w-twin", type=float, default=10.0)
    ap.add_argument("--extra", type=int, default=0, help="fresh generated sentences added")
    ap.add_argument("--extra-doc", type=int, default=0,
                    help="more docstring sentences added (stdlib, transformers, torch, numpy)")
    ap.add_argument("--no-base-text", action="store_true",
                    help="heal on the extra sentences only (plus calibration)")
    ap.add_argument("--vocab", type=float, default=0.0,
                    help="share of the extra sentences with words swapped for vocabulary words")
    ap.add_argument("--p-word", type=float, default=0.3)
    ap.add_argument("--extra-tsv", default="",
                    help="more unlabeled sentences: PATH:COLS (e.g. sick/train.tsv:1,2), header "
                         "skipped, labels ignored; sentences of the --sick file are left out")
    ap.add_argument("--extra-tsv-n", type=int, default=0, help="at most this many (0: all)")
    ap.add_argument("--sick", default=str(DEFAULT_SICK))
    ap.add_argument("--sick-train", default="../shared/data/sick/train.tsv",
                    help="also SICK on this file ('' to skip)")
    ap.add_argument("--save", default="", help="save the healed student here")
    ap.add_argument("--dev-text", default="../shared/data/sst2/dev.tsv")
    ap.add_argument("--cache", default="/work/runs/cache")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.twins and args.w_attn:
        ap.error("--twins and --w-attn are two healing terms: screen one at a time")
    term = (TwinTerm(args.twins, args.twin_words, args.w_twin) if args.twins else
            AttentionTerm(args.w_attn, tuple(args.attn_relations.split(","))) if args.w_attn
            else None)
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    text = default_text(seed=args.seed)
    split = split_text(text, job.calibration, seed=args.seed)
    held_out, calibration, rest = split.held_out, split.calibration, split.rest
    dev = dev_sentences(args.dev_text)
    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    cache = Path(args.cache) / f"b{args.budget}_s{args.seed}"
    if not (cache / "mpo_config.json").is_file():  # the main job up to healing
        model = AutoModel.from_pretrained(path).eval()
        recipe = EncoderRecipe(budget=args.budget, heal_steps=0, seed=args.seed)
        res = compress_encoder(model, tok, recipe, text=text, progress=False)
        res.model.save_pretrained(cache, lightweight=False)
    student = MPOModel.from_pretrained(AutoModel.from_pretrained(path), cache)
    prep = time.perf_counter() - t0
    heal_text = calibration + ([] if args.no_base_text else rest)
    if args.extra:
        seen = set(held_out) | set(heal_text)
        extra = [s for s in generate(args.extra + 2000, seed=10_000 + args.seed)
                 if s not in seen][:args.extra]
        if args.vocab:
            words, rng = vocabulary_words(tok), random.Random(args.seed)
            extra = [swap_words(s, words, args.p_word, rng) if rng.random() < args.vocab else s
                     for s in extra]
        heal_text = heal_text + extra
    if args.extra_doc:
        seen = set(held_out) | set(heal_text)
        roots = docstring_roots(("transformers", "torch", "numpy"))
        doc = [s for s in docstring_sentences(roots=roots, max_files=100_000, seed=args.seed)
               if s not in seen][:args.extra_doc]
        heal_text = heal_text + doc
    if args.extra_tsv:
        path, cols = args.extra_tsv.rsplit(":", 1)
        rows = [line.split("\t") for line in Path(path).read_text("utf-8").splitlines()][1:]
        avoid = set(held_out) | set(heal_text)
        if args.sick:
            avoid |= {r[k] for r in read_sick(args.sick) for k in ("sentence_A", "sentence_B")}
        found = list(dict.fromkeys(r[int(c)] for r in rows for c in cols.split(",")
                                   if len(r) > int(c) and r[int(c)].strip()))
        found = [x for x in found if x not in avoid]
        random.Random(args.seed).shuffle(found)
        heal_text = heal_text + found[:args.extra_tsv_n or None]
    hcfg = HealConfig(steps=args.heal_steps, lr=args.lr, seed=args.seed,
                      batch_size=args.batch_size, train=args.train, w_hidden=args.w_hidden,
                      w_cos=args.w_cos, bucket=args.bucket, teacher_bf16=args.teacher_bf16,
                      student_bf16=args.student_bf16, term=term)
    t1 = time.perf_counter()
    hr = heal(student, teacher, tok, heal_text, hcfg, progress=False)
    heal_s = time.perf_counter() - t1
    train_probe = random.Random(args.seed).sample(rest, 256)
    out = dict(vars(args), n_heal_text=len(heal_text), prep_seconds=prep, heal_seconds=heal_s,
               trained_params=hr.trained_params,
               **measure(student, teacher, tok, held_out, sick=args.sick or None, dev=dev,
                         sick_train=args.sick_train or None),
               cosine_train=float(embedding_cosine(student, teacher, tok, train_probe).mean()),
               final_loss=hr.losses[-1] if hr.losses else None)
    if args.save:
        student.save_pretrained(args.save, lightweight=False)
    write_result(out, args.out, ("cosine_mean", "cosine_train", "cosine_dev_mean",
                                 "sick_spearman", "heal_seconds")
                 + (("sick_train_spearman",) if args.sick_train else ()))


if __name__ == "__main__":
    main()
