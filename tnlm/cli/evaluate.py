"""``tnlm eval MODEL [--reference REF] [--text FILE ...]``: does a (compressed) model still work?

* A causal LM: sliding-window perplexity on the text
  (:func:`tnlm.compress.decoder.quality.perplexity`: windows of ``--max-length`` tokens every
  ``--stride``; with ``--stride`` equal to ``--max-length``, what ``tnlm compress`` reports),
  with ``--reference`` the reference's perplexity on the same tokens and their ratio;
  ``--answers``: greedy answers to tnlm's 50 simple questions, how many are right (a keyword
  check) and, with ``--reference``, how many are identical to the reference's.
* An encoder: the cosine of each line's mean-pooled embedding to ``--reference``'s (mean and
  minimum over the text's lines); an encoder has no perplexity, so ``--reference`` is needed.

MODEL and REF are each a tnlm checkpoint (``tnlm compress --out``, ``tnlm export --format
st``, :meth:`MPOModel.save_pretrained` with a ``config.json``) or a transformers model
folder or ``.gguf`` file (a dense model: the reference, or a baseline to score). The
default text: the natural held-out sentences of ``../shared/data`` (SST-2 dev, CoLA dev,
SICK trial) when that folder is there, else tnlm's held-out prose
(``tnlm/data/lm_held_out.txt.gz``). For a causal LM that is what ``tnlm compress``
reports its perplexity on; an encoder's ``tnlm compress`` reports its own held-out split
and the held-out prose (less any sentence it healed on), so its cosines are comparable
with this command's only without ``../shared/data`` (docs/results.md's natural cosine
reads the dev sentences). Two models that cut the text into different tokens
are refused: perplexities (or embeddings) over different tokens are not comparable.

Every argument is checked (paths, numbers, the kind of model each path holds) before any
model is loaded; mistakes are one line naming the argument and what was expected
(:class:`EvalError`, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from tnlm.cli.causal import WINDOW

__all__ = ["EvalError", "add_eval_parser", "cmd_eval"]

#: ``--max-length``'s and ``--stride``'s defaults: the windows ``tnlm compress`` scores with
MAX_LENGTH = STRIDE = WINDOW


class EvalError(ValueError):
    """A wrong argument of ``tnlm eval``: one line naming it and what was expected."""


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to ``subparsers``; returns its parser (``func`` is :func:`cmd_eval`)."""
    p = subparsers.add_parser(
        "eval", help="perplexity (causal LMs) or embedding cosine (encoders) of a model, "
                     "against a reference",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="a tnlm checkpoint (tnlm compress --out) or a transformers model "
                        "folder or .gguf file")
    p.add_argument("--reference", metavar="REF", default=None,
                   help="the model to compare with (the dense original: a folder or .gguf "
                        "file); needed for an encoder")
    p.add_argument("--text", nargs="+", metavar="FILE", default=None,
                   help="UTF-8 text files (a causal LM: the documents, joined by a blank "
                        "line; an encoder: one sentence a line); default: the natural "
                        "held-out sentences of ../shared/data (SST-2, CoLA dev, SICK trial) "
                        "when there, else tnlm's held-out prose (a causal LM: what tnlm "
                        "compress reports its perplexity on)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"causal LMs: tokens per perplexity window; default {MAX_LENGTH}")
    p.add_argument("--stride", type=int, default=None,
                   help=f"causal LMs: how far each window moves (< --max-length: every token "
                        f"after the first scored once, with more context); default {STRIDE}")
    p.add_argument("--batch-size", type=int, default=8, help="windows (or sentences) a pass")
    p.add_argument("--answers", action="store_true",
                   help="causal LMs: greedy answers to tnlm's 50 simple questions, through "
                        "the chat template when the tokenizer has one (right by keyword; "
                        "identical to --reference's)")
    p.add_argument("--json", action="store_true", help="print the measures as JSON")
    p.set_defaults(func=cmd_eval)
    return p


def _kind(path: Path, flag: str) -> tuple[bool, bool]:
    """``(is a tnlm checkpoint, is a causal LM)`` for ``path``, read from its files without
    loading it; :class:`EvalError` naming ``flag`` when it is neither a checkpoint with a
    ``config.json`` nor a model :func:`~tnlm.integration.loading.check_model_source` takes."""
    from tnlm.export.folder import check_checkpoint, is_checkpoint, recorded_class_generates
    from tnlm.integration.architectures import is_causal_type
    from tnlm.integration.loading import check_model_source

    if not path.exists():
        raise EvalError(f"{flag} {path} does not exist")
    if path.is_dir() and is_checkpoint(path):
        try:
            meta = check_checkpoint(path)
        except ValueError as err:
            raise EvalError(f"{flag}: {err}") from None
        if meta.get("lightweight"):
            raise EvalError(f"{flag} {path} is a lightweight task checkpoint (its base model "
                            "holds the other tensors): evaluate it with "
                            "tnlm.export.load_compressed(DIR, base=...) from Python")
        cfg = path / "config.json"
        if not cfg.is_file():
            fmt = "hf" if recorded_class_generates(meta) else "st"
            raise EvalError(f"{flag} {path} is a tnlm checkpoint without config.json: its "
                            "architecture is unknown (tnlm compress --out writes one; or "
                            f"tnlm export DIR --format {fmt} --base FOLDER first)")
        try:
            model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EvalError(f"{flag}: {cfg} is not valid JSON: {err}") from None
        # the class it was saved from decides (a causal LM of a type tnlm has no entry
        # for, saved through the Python API, is still one)
        causal = recorded_class_generates(meta)
        if is_causal_type(model_type) and not causal:
            raise EvalError(f"{flag} {path} holds a {meta.get('base_model_class')}: a "
                            f"{model_type} model without its language-model head has no "
                            "perplexity")
        return True, causal
    try:
        model_type = check_model_source(path).model_type
    except ValueError as err:
        raise EvalError(f"{flag}: {err}") from None
    return False, is_causal_type(model_type)


def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every argument checked before anything is loaded; returns what the run needs."""
    for name in ("max_length", "stride", "batch_size"):
        v = getattr(args, name)
        least = 2 if name == "max_length" else 1
        if v is not None and v < least:
            raise EvalError(f"--{name.replace('_', '-')} must be an int >= {least}, got {v}")
    windows = {name: getattr(args, name) for name in ("max_length", "stride")}  # as given
    args.max_length = MAX_LENGTH if args.max_length is None else args.max_length
    args.stride = STRIDE if args.stride is None else args.stride
    if args.stride > args.max_length:
        raise EvalError(f"--stride must be at most --max-length ({args.max_length}), got "
                        f"{args.stride}")
    model = Path(args.model)
    checkpoint, causal = _kind(model, "MODEL")
    ref = Path(args.reference) if args.reference is not None else None
    if ref is not None:
        ref_checkpoint, ref_causal = _kind(ref, "--reference")
        if ref_causal != causal:
            raise EvalError(f"--reference {ref} is {'a causal LM' if ref_causal else 'an encoder'}"
                            f" but MODEL {model} is {'a causal LM' if causal else 'an encoder'}")
    else:
        ref_checkpoint = False
    if not causal:
        if ref is None:
            raise EvalError(f"MODEL {model} is an encoder: it has no perplexity; pass "
                            "--reference MODEL (the original) to measure the embedding cosine")
        if args.answers:
            raise EvalError("--answers applies to causal LMs; MODEL is an encoder")
        for name, given in windows.items():
            if given is not None:
                raise EvalError(f"--{name.replace('_', '-')} applies to causal LMs (perplexity "
                                "windows); MODEL is an encoder")
    texts = None
    if args.text is not None:
        texts = []
        for f in args.text:
            p = Path(f)
            try:
                t = p.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as err:
                raise EvalError(f"--text {p} cannot be read as UTF-8 text: "
                                f"{getattr(err, 'strerror', None) or err}") from None
            if not t.strip():
                raise EvalError(f"--text {p} is empty")
            texts.append(t.strip("\n"))
    return dict(model=model, checkpoint=checkpoint, causal=causal, ref=ref,
                ref_checkpoint=ref_checkpoint, texts=texts)


def _tokenizer(path: Path, checkpoint: bool, causal: bool) -> Any:
    """The tokenizer of ``path`` (a checkpoint's own; a folder's or a GGUF file's), loaded
    without the model; :class:`EvalError` when a checkpoint holds none, or when a
    folder's is unreadable or empty (only special tokens: every word unknown)."""
    from tnlm.integration.loading import check_model_source, load_tokenizer

    if checkpoint:
        from tnlm.export.folder import has_tokenizer

        if not has_tokenizer(path):
            raise EvalError(f"{path} holds no tokenizer (tnlm compress --out writes one; or "
                            f"tnlm export DIR --format {'hf' if causal else 'st'} --base "
                            "FOLDER first)")
        folder, source, kwargs = path, path, {}
    else:
        source = check_model_source(path)
        folder, kwargs = source.folder, source.kwargs()
    try:
        return load_tokenizer(folder, source, **kwargs)
    except ValueError as err:
        raise EvalError(str(err)) from None


def _load(path: Path, checkpoint: bool) -> Any:
    """The model: a checkpoint through :func:`~tnlm.export.folder.load_compressed` (the
    transformers model inside), any other through
    :func:`~tnlm.integration.loading.load_pretrained`."""
    if checkpoint:
        from tnlm.export.folder import load_compressed

        return load_compressed(path).base_model
    from tnlm.integration.loading import load_pretrained

    return load_pretrained(path)[0]


def _default_text(causal: bool) -> tuple[list[str], str]:
    """The text ``tnlm compress`` measures on and its description."""
    from tnlm.compress.decoder.quality import natural_eval_text
    from tnlm.compress.text import lm_held_out

    text = natural_eval_text()
    if text is not None:
        return text, "natural held-out text (../shared/data dev splits)"
    held = lm_held_out()
    return (["\n".join(held)] if causal else held), "tnlm's held-out prose"


def _lines_of(texts: list[str]) -> list[str]:
    """The non-blank lines of the texts, stripped: an encoder's sentences. Lines end at a
    line feed, CRLF or a lone CR, as :func:`tnlm.compress.text.read_sentences` reads
    ``tnlm compress --text`` (U+2028, form feeds, ``\\x85`` stay inside their line)."""
    from tnlm.compress.text import text_lines

    return [s.strip() for t in texts for s in text_lines(t) if s.strip()]


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``tnlm eval``; prints the measures (one line each, or JSON)."""
    run = _check_args(args)
    if run["texts"] is not None:
        texts, source = run["texts"], ", ".join(str(f) for f in args.text)
    else:
        texts, source = _default_text(run["causal"])
    from tnlm.compress.decoder.quality import encode_stream

    tok = _tokenizer(run["model"], run["checkpoint"], run["causal"])
    if run["causal"]:  # the perplexity predicts every token but the first: 2 at least
        n = len(encode_stream(tok, "\n\n".join(texts)))
        if n < 2:
            raise EvalError(f"{'--text ' if run['texts'] is not None else ''}{source} holds "
                            f"{n} token(s) of MODEL's tokenizer: the perplexity needs at "
                            "least 2")
    ref = ref_tok = None
    if run["ref"] is not None:
        ref_tok = _tokenizer(run["ref"], run["ref_checkpoint"], run["causal"])
        # what is scored: the one stream (perplexity), each line (an encoder's cosine,
        # both models fed MODEL's token ids)
        units = ["\n\n".join(texts)] if run["causal"] else _lines_of(texts)
        if any(encode_stream(tok, u) != encode_stream(ref_tok, u) for u in units):
            raise EvalError(f"MODEL and --reference {run['ref']} cut the text into different "
                            "tokens: " + ("their perplexities are not comparable"
                                          if run["causal"] else "their embeddings of it are "
                                          "not comparable") + " (is it the same model family?)")
    model = _load(run["model"], run["checkpoint"])
    if run["ref"] is not None:
        ref = _load(run["ref"], run["ref_checkpoint"])
    out: dict[str, Any] = dict(model=str(run["model"]), reference=None if ref is None
                               else str(run["ref"]), text=source)
    length = _check_shapes(args, run, model, ref)
    if run["causal"]:
        out.update(_causal(args, model, tok, ref, ref_tok, texts))
    else:
        out.update(_encoder(args, model, tok, ref, texts, length))
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for line in _lines(out):
        print(line)
    return 0


def _check_shapes(args: argparse.Namespace, run: dict[str, Any], model: Any,
                  ref: Any) -> int:
    """What the loaded models allow, checked before any is run: a causal LM's windows
    within both models' learned positions (:func:`~tnlm.integration.architectures.
    position_limit`; rotary positions have no limit); an encoder's embeddings of one width
    (returns the encoder's truncation length: 128 tokens, or fewer positions)."""
    from tnlm.integration.architectures import position_limit

    named = [("MODEL", run["model"], model)] + ([("--reference", run["ref"], ref)]
                                                if ref is not None else [])
    if run["causal"]:
        for flag, path, m in named:
            n = position_limit(m)
            if n is not None and args.max_length > n:
                raise EvalError(f"--max-length {args.max_length} exceeds the {n} positions of "
                                f"{flag} {path}; give at most {n}")
        return args.max_length
    widths = {flag: m.config.get_text_config().hidden_size for flag, _, m in named}
    if len(set(widths.values())) > 1:
        raise EvalError(f"MODEL's embeddings have {widths['MODEL']} dimensions and "
                        f"--reference {run['ref']}'s {widths['--reference']}: their cosine "
                        "is not defined (is it the same model?)")
    return min([128] + [n for _, _, m in named if (n := position_limit(m)) is not None])


def _causal(args: argparse.Namespace, model: Any, tok: Any, ref: Any, ref_tok: Any,
            texts: list[str]) -> dict[str, Any]:
    from tnlm.compress.decoder.quality import perplexity

    text = "\n\n".join(texts)
    kw = dict(max_length=args.max_length, stride=args.stride, batch_size=args.batch_size)
    res = perplexity(model, tok, text, **kw)
    out: dict[str, Any] = dict(kind="causal LM", perplexity=res.ppl, tokens=res.n_tokens,
                               windows=res.n_windows, max_length=args.max_length,
                               stride=args.stride)
    if ref is not None:  # the same tokens (checked before loading)
        r = perplexity(ref, ref_tok, text, **kw)
        out.update(reference_perplexity=r.ppl, perplexity_ratio=res.ppl / r.ppl)
    if args.answers:
        from tnlm.compress.decoder.quality import (
            answer_agreement,
            answers_correct,
            greedy_answers,
            simple_questions,
        )

        qs = simple_questions()
        mine = greedy_answers(model, tok, qs)
        out.update(questions=len(qs), right_answers=sum(answers_correct(mine)))
        if ref is not None:
            theirs = greedy_answers(ref, ref_tok, qs)
            out.update(reference_right_answers=sum(answers_correct(theirs)),
                       identical_answers=round(answer_agreement(mine, theirs) * len(qs)))
    return out


def _encoder(args: argparse.Namespace, model: Any, tok: Any, ref: Any,
             texts: list[str], max_length: int = 128) -> dict[str, Any]:
    from tnlm.compress.quality import embedding_cosine

    sentences = _lines_of(texts)
    cos = embedding_cosine(model, ref, tok, sentences, batch_size=args.batch_size,
                           max_length=max_length)
    return dict(kind="encoder", sentences=len(sentences), cosine_mean=float(cos.mean()),
                cosine_min=float(cos.min()))


def _lines(out: dict[str, Any]) -> list[str]:
    if out["kind"] == "encoder":
        return [f"embedding cosine to {out['reference']} on {out['sentences']:,} lines of "
                f"{out['text']}: mean {out['cosine_mean']:.4f}, min {out['cosine_min']:.4f}"]
    lines = [f"perplexity on {out['tokens']:,} tokens of {out['text']} (windows of "
             f"{out['max_length']}, stride {out['stride']}): {out['perplexity']:.3f}"]
    if "reference_perplexity" in out:
        lines.append(f"reference {out['reference']}: {out['reference_perplexity']:.3f}; "
                     f"ratio {out['perplexity_ratio']:.4f}x")
    if "right_answers" in out:
        line = f"answers to {out['questions']} simple questions: {out['right_answers']} right"
        if "identical_answers" in out:
            line += (f" (reference: {out['reference_right_answers']}); "
                     f"{out['identical_answers']} identical to the reference's")
        lines.append(line)
    if not math.isfinite(out["perplexity"]):
        lines.append("the perplexity is not finite: the model's logits overflowed")
    return lines
