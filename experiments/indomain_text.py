"""In-domain healing text for the decoder runs: the training splits of the held-out corpora.

The field scores a compressed LLM on WikiText's test split after calibrating on its train
split. The decoder runs of docs/results.md are scored on SST-2 dev, CoLA dev and SICK trial
sentences (``decoder.quality.natural_eval_text``) and heal on data-free text; this script writes
the user-text counterpart: sentences of the *training* splits (SST-2 train lines of at least
``--min-words`` words, CoLA train sentences labelled acceptable; SICK train sentences with
``--corpora ... sick``, though SICK's splits share most sentences), none equal to a held-out
sentence, shuffled with the seed, in documents of ``--per-doc`` sentences
joined by newlines (as the held-out documents are), as many as hold ``--tokens`` tokens of
SmolLM2's tokenizer (default: as many as the job's default text of the seed, read from
``--match``). Writes a JSON list of strings for ``llm_compress.py --text-file``.
``--lines N`` writes the first N sentences instead, one a line: a few examples of the
user's kind of text for ``tnlm compress --lm-starts`` (the model's own texts start there).

    python experiments/indomain_text.py --out results/llm/text/indomain_s0.json
    python experiments/indomain_text.py --lines 64 --out results/llm/text/starts64_s0.txt
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tnlm.compress.decoder.quality import natural_eval_text  # noqa: E402
from tnlm.compress.quality import read_sick  # noqa: E402
from tnlm.integration.loading import LLM_MISSING, load_default_llm  # noqa: E402


def _rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def training_sentences(root: Path, min_words: int) -> dict[str, list[str]]:
    """The training splits' sentences by corpus, each distinct, in file order."""
    sst2 = [r[0].strip() for r in _rows(root / "sst2" / "train.tsv")[1:]
            if r and len(r[0].split()) >= min_words]
    cola = [r[0].strip() for r in _rows(root / "cola" / "train.tsv")
            if len(r) >= 2 and r[1].strip() == "1" and r[0].strip()]
    sick = [s.strip() for r in read_sick(root / "sick" / "train.tsv")
            for s in (r["sentence_A"], r["sentence_B"]) if s.strip()]
    return {k: list(dict.fromkeys(v)) for k, v in
            dict(sst2=sst2, cola=cola, sick=sick).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpora", nargs="+", choices=("sst2", "cola", "sick"),
                   default=["sst2", "cola"],
                   help="the training splits drawn from (default: SST-2 and CoLA; SICK's train "
                        "and trial pairs are built from the same captions: 681 of the 924 "
                        "trial sentences are train sentences too, and more nearly so)")
    p.add_argument("--min-words", type=int, default=6)
    p.add_argument("--per-doc", type=int, default=8)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--match", type=Path,
                   default=Path("results/llm/text/selfgen_s0_n256_b64_nucleus.json"),
                   help="the job's samples of seed 0; with the quarter of the prose it adds, "
                        "their token count is the default --tokens")
    p.add_argument("--lines", type=int, default=None, metavar="N",
                   help="write the first N sentences, one a line (for tnlm compress "
                        "--lm-starts), instead of documents")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.lines is not None and args.lines < 1:
        p.error(f"--lines must be at least 1, got {args.lines}")
    held = natural_eval_text(args.shared)
    if held is None:
        p.error(f"--shared: no held-out text in {args.shared}")
    held_out = {s for doc in held for s in doc.split("\n")}
    loaded = load_default_llm()
    if loaded is None:
        print(LLM_MISSING)
        return 2
    _, tok = loaded
    if args.tokens is None:
        from tnlm.compress.decoder.job import shipped_prose

        default = json.loads(args.match.read_text()) + shipped_prose(args.seed, 0.25)
        args.tokens = len(tok("\n\n".join(default), add_special_tokens=False)["input_ids"])
    by_corpus = {k: v for k, v in training_sentences(args.shared, args.min_words).items()
                 if k in args.corpora}
    pool = [s for v in by_corpus.values() for s in v if s not in held_out]
    dropped = sum(len(v) for v in by_corpus.values()) - len(pool)
    random.Random(args.seed).shuffle(pool)
    if args.lines is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text("\n".join(pool[:args.lines]) + "\n")
        tmp.replace(args.out)
        n = len(tok("\n".join(pool[:args.lines]), add_special_tokens=False)["input_ids"])
        print(json.dumps(dict(corpora=args.corpora, lines=len(pool[:args.lines]), tokens=n,
                              pool=len(pool), equal_to_held_out_dropped=dropped)))
        return 0
    docs, n_tokens, used = [], 0, {k: 0 for k in by_corpus}
    where = {s: k for k, v in by_corpus.items() for s in v}
    for i in range(0, len(pool), args.per_doc):
        doc = pool[i:i + args.per_doc]
        docs.append("\n".join(doc))
        for s in doc:
            used[where[s]] += 1
        n_tokens += len(tok(docs[-1], add_special_tokens=False)["input_ids"]) + 2
        if n_tokens >= args.tokens:
            break
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(docs))
    tmp.replace(args.out)
    print(json.dumps(dict(corpora=args.corpora, documents=len(docs), tokens=n_tokens,
                          target_tokens=args.tokens,
                          sentences_by_corpus=used, pool=len(pool),
                          equal_to_held_out_dropped=dropped), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
