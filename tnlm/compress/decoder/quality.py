"""Does a compressed causal language model still work? Perplexity and greedy answers.

* :func:`perplexity`: sliding-window perplexity of a causal LM on a text stream, scored
  as the Hugging Face perplexity guide and lm-eval score WikiText (every token but the
  first predicted exactly once, with up to ``max_length - 1`` tokens of context);
* :func:`greedy_answers`: greedy (deterministic) answers of a chat model to questions,
  through the tokenizer's chat template, batched with left padding;
* :func:`answer_agreement`: the fraction of identical answers of two models;
* :func:`answer_token_agreement`: the teacher-forced top-1 agreement of a model with
  reference answers, token by token (moves where identical answers stay at 0);
* :func:`simple_questions`, :func:`question_keys`: 50 short everyday questions shipped with
  tnlm and their accepted answers (``tnlm/data/questions.txt``);
* :func:`answers_correct`: a keyword check of answers against those keys;
* :func:`natural_eval_text`: held-out natural English from the labelled data folder
  beside the working directory (SST-2 dev, CoLA dev, SICK trial), when it is there.
"""

from __future__ import annotations

import csv
import importlib.resources
import inspect
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tnlm.compress.quality import read_sick
from tnlm.compress.text import check_texts

__all__ = ["NEUTRAL_GENERATION", "PerplexityResult", "answer_agreement",
           "answer_token_agreement", "answers_correct", "encode_stream", "eos_ids",
           "greedy_answers", "natural_eval_text", "neutral_generation", "perplexity",
           "prompt_ids", "question_keys", "simple_questions", "until_eos", "window_spans"]

#: the labelled data folder, relative to the working directory
DEFAULT_SHARED_DIR = Path("../shared/data")

#: what a model's ``generation_config`` may set that would change the logits before the
#: token is picked (Qwen2.5-Instruct sets ``repetition_penalty`` 1.1): greedy answers and
#: self-generated texts are the model's own distribution, so each is passed to
#: ``generate`` at its neutral value (:func:`neutral_generation`)
NEUTRAL_GENERATION = dict(
    repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0, bad_words_ids=None, sequence_bias=None, min_length=0,
    min_new_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
    exponential_decay_length_penalty=None, suppress_tokens=None, begin_suppress_tokens=None,
    guidance_scale=None, watermarking_config=None, renormalize_logits=False,
    remove_invalid_values=False)


def neutral_generation() -> dict[str, Any]:
    """:data:`NEUTRAL_GENERATION`, those this transformers' ``GenerationConfig`` knows."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    return {k: v for k, v in NEUTRAL_GENERATION.items() if hasattr(known, k)}


@dataclass(frozen=True)
class PerplexityResult:
    """The outcome of :func:`perplexity`.

    Attributes:
        ppl: ``exp(nll / n_tokens)``.
        nll: the total negative log-likelihood (natural log, summed over scored tokens).
        n_tokens: the number of scored tokens (the stream's length minus one when
            ``stride < max_length``).
        n_windows: the number of windows the stream was cut into.
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats): ``log(ppl)``."""
        return self.nll / self.n_tokens


def window_spans(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the sliding-window perplexity over a stream of ``n`` tokens.

    Window ``i`` covers tokens ``[begin, end)`` with ``begin = i * stride`` and
    ``end = min(begin + max_length, n)``; it scores the tokens ``[first, end)`` with
    ``first = max(previous end, begin + 1)`` (0 for the first window's previous end): the
    tokens no earlier window scored, except the window's own first token, which nothing
    in the window precedes. The last window is the first to reach ``n`` (a last window
    that would score nothing, one token after non-overlapping chunks, is left out). With
    ``stride < max_length`` every token ``1 .. n-1`` is scored exactly once; with
    ``stride == max_length`` the windows are non-overlapping chunks and the first token of
    each chunk is not scored (as in the HF perplexity guide).

    Returns:
        ``[(begin, end, first), ...]`` in stream order.

    Raises:
        ValueError: ``n < 2``, ``max_length < 2`` or ``stride`` not in ``[1, max_length]``.
    """
    if n < 2:
        raise ValueError(f"the token stream must hold at least 2 tokens, got {n}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    spans = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        first = max(prev_end, begin + 1)
        if first < end:  # a last chunk of one token scores nothing
            spans.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return spans


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def encode_stream(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text`` as the tokenizer encodes one string (its special tokens
    included): the stream :func:`perplexity` scores."""
    ids = tokenizer(text)["input_ids"]
    if ids and isinstance(ids[0], list):  # a tokenizer that always batches
        ids = ids[0]
    return [int(i) for i in ids]


def perplexity(model: nn.Module, tokenizer: Any, text: str | Sequence[str], *,
               max_length: int = 256, stride: int = 128, batch_size: int = 8,
               progress: bool = False) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM on one token stream.

    The text (documents joined with ``"\\n\\n"``) is tokenized once, as the tokenizer
    encodes a single string by default (its special tokens included, e.g. a BOS), into a
    stream of ``n`` tokens. Windows of ``max_length`` tokens start every ``stride`` tokens
    (:func:`window_spans`); in each window the model predicts token ``t`` from the
    window's tokens before it, and only the tokens not scored by an earlier window count
    (the overlap's labels are -100 in the HF guide's words), and a window's first token is
    never predicted. With ``stride < max_length`` every token but the stream's first is
    scored once (``n_tokens = n - 1``); with ``stride == max_length`` this is
    non-overlapping chunking (the first token of each chunk is not scored). Over the
    scored tokens ``S``::

        nll = -sum_{t in S} log p(x_t | x_{begin(t)} .. x_{t-1})
        ppl = exp(nll / n_tokens),   n_tokens = |S|

    where ``begin(t)`` is the start of the window that scores ``t``. Only the stream's first
    window starts with the tokenizer's BOS (if it adds one); later windows start mid-text,
    as SVD-LLM's and the HF guide's WikiText scoring slice one tokenized stream (a model
    trained always to see a BOS first, e.g. Gemma, scores worse without it, dense and
    compressed alike). Windows of full length
    go through the model ``batch_size`` at a time (shape ``(batch, max_length)``); the
    last window, if shorter, runs alone. No padding is ever used, so batching does not
    change the result. Runs under ``torch.no_grad()`` in eval mode; the training flag is
    restored.

    Args:
        model: a causal LM whose ``forward(input_ids=...)`` returns an object with
            ``.logits`` of shape ``(batch, length, vocab)``.
        tokenizer: a callable returning ``{"input_ids": [...]}`` for one string.
        text: one string or documents joined with ``"\\n\\n"``.
        max_length: tokens per window (the context is at most ``max_length - 1``).
        stride: how far each window moves (``1 <= stride <= max_length``).
        batch_size: full windows per forward pass.
        progress: show a tqdm bar over forward passes.

    Returns:
        A :class:`PerplexityResult`; ``ppl`` is ``inf`` when ``exp`` of the mean NLL
        overflows a float (a mean NLL above about 709.8 nats).

    Raises:
        ValueError: an empty text, a stream shorter than 2 tokens, bad window arguments.
    """
    if not isinstance(text, str):
        text = "\n\n".join(text)
    if not text:
        raise ValueError("text must not be empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ids = encode_stream(tokenizer, text)
    spans = window_spans(len(ids), max_length, stride)
    stream = torch.tensor(ids, dtype=torch.long)
    full = [s for s in spans if s[1] - s[0] == max_length]
    short = [s for s in spans if s[1] - s[0] != max_length]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in short]
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
    device = _device(model)
    if progress:
        from tqdm.auto import tqdm
        groups = tqdm(groups, desc="perplexity", unit="batch")
    was_training = model.training
    model.eval()
    total = 0.0
    scored = 0
    try:
        with torch.no_grad():
            for group in groups:
                batch = torch.stack([stream[b:e] for b, e, _ in group]).to(device)
                logits = model(input_ids=batch, **extra).logits
                for row, (b, e, first) in enumerate(group):
                    # logits at position p predict token p + 1 (stream positions b + p)
                    pred = logits[row, first - b - 1:e - b - 1].float()
                    target = batch[row, first - b:e - b]
                    nll = F.cross_entropy(pred, target, reduction="sum")
                    total += float(nll.double())
                    scored += e - first
    finally:
        model.train(was_training)
    try:
        ppl = math.exp(total / scored)
    except OverflowError:  # a mean NLL above ~709.8 nats: not finite, as the callers check
        ppl = math.inf
    return PerplexityResult(ppl=ppl, nll=total, n_tokens=scored, n_windows=len(spans))


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """The token ids of one question as a prompt: the chat template with the generation
    prompt (its own special tokens, none added), or else the question, a newline and the
    tokenizer's default special tokens."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(question + "\n")["input_ids"]
    return [int(i) for i in ids]


def eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The end-of-sequence token ids a generation stops at: the model's generation config's
    (one or several) and then the tokenizer's, each once."""
    out: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in out:
                out.append(int(v))
    return out


def until_eos(ids: Sequence[int], eos: Sequence[int]) -> list[int]:
    """``ids`` up to and including the first of ``eos``; all of them when none occurs."""
    ids = list(ids)
    end = next((k for k, t in enumerate(ids) if t in eos), None)
    return ids if end is None else ids[:end + 1]


def greedy_answers(model: nn.Module, tokenizer: Any, questions: Sequence[str], *,
                   max_new_tokens: int = 32, batch_size: int = 8,
                   return_ids: bool = False) -> list[str] | tuple[list[str], list[list[int]]]:
    """Greedy answers of a causal LM to questions, one string per question.

    Each question becomes a prompt through the tokenizer's chat template
    (``apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)``)
    or, for a tokenizer without one, the raw question followed by ``"\\n"``. Prompts of
    similar length are batched (``batch_size`` at a time, left-padded with the pad token,
    or the EOS token when there is none, with an attention mask of zeros over the
    padding) and decoded by ``model.generate(do_sample=False, use_cache=True,
    max_new_tokens=...)``, stopping at the model's or the tokenizer's EOS; what the model's
    ``generation_config`` sets that would change the logits (a repetition penalty, ...) is
    passed at its neutral value (:data:`NEUTRAL_GENERATION`): each token is the argmax.
    Each answer is the decoding of the new tokens with special tokens skipped, stripped of
    surrounding whitespace. The tokenizer is not modified. Runs in eval mode; the training
    flag is restored. With ``return_ids`` also the generated token ids of each answer, up to
    and including the first EOS (the targets :func:`answer_token_agreement` scores exactly).

    With left padding and the mask, a batched answer equals the one-by-one answer up to
    float rounding in the attention over different shapes (exactly equal on a trained
    model in practice; see the tests).

    Raises:
        TypeError: ``questions`` is one string (or holds something else than strings).
        ValueError: ``max_new_tokens`` or ``batch_size`` not an int >= 1, or a tokenizer
            with neither a pad nor an EOS token.
    """
    questions = check_texts(questions, "questions")
    for name, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    eos = eos_ids(model, tokenizer)
    neutral = neutral_generation()
    device = _device(model)
    answers: list[str] = [""] * len(prompts)
    answer_ids: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), int(pad), dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    n = len(prompts[i])
                    ids[row, width - n:] = torch.tensor(prompts[i], dtype=torch.long)
                    mask[row, width - n:] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     do_sample=False, num_beams=1, use_cache=True,
                                     max_new_tokens=max_new_tokens, pad_token_id=int(pad),
                                     eos_token_id=eos or None, **neutral)
                for row, i in enumerate(idx):
                    new = out[row, width:].tolist()
                    answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
                    answer_ids[i] = until_eos(new, eos)
    finally:
        model.train(was_training)
    return (answers, answer_ids) if return_ids else answers


def _normalize(answer: str) -> str:
    return " ".join(answer.split()).casefold()


def answer_agreement(a: Sequence[str], b: Sequence[str], *, normalize: bool = True) -> float:
    """The fraction of positions ``i`` where ``a[i] == b[i]``; with ``normalize``, compared
    after collapsing runs of whitespace to one space, stripping and case folding.

    Raises:
        TypeError: ``a`` or ``b`` is one string (or holds something else than strings).
        ValueError: the sequences differ in length or are empty.
    """
    a, b = check_texts(a, "a"), check_texts(b, "b")
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("a and b must not be empty")
    if normalize:
        same = sum(_normalize(x) == _normalize(y) for x, y in zip(a, b))
    else:
        same = sum(x == y for x, y in zip(a, b))
    return same / len(a)


def _question_rows() -> list[tuple[str, str]]:
    path = importlib.resources.files("tnlm").joinpath("data", "questions.txt")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            question, _, keys = line.partition("\t")
            rows.append((question.strip(), keys.strip()))
    return rows


def simple_questions() -> list[str]:
    """The 50 short everyday questions shipped with tnlm (``tnlm/data/questions.txt``, one
    per line, before a tab): geography, arithmetic, science, language, everyday life; for
    comparing the greedy answers of a compressed chat model with its original's."""
    return [q for q, _ in _question_rows()]


def question_keys() -> list[tuple[str, ...]]:
    """The accepted answers of :func:`simple_questions`, in the same order: for each question
    the words or phrases (after the tab in ``questions.txt``, separated by ``|``) of which
    one makes an answer right (``"Paris"``; ``"7"``, ``"seven"``). See :func:`answers_correct`."""
    return [tuple(k.strip() for k in keys.split("|") if k.strip()) for _, keys in _question_rows()]


def answers_correct(answers: Sequence[str],
                    keys: Sequence[Sequence[str]] | None = None) -> list[bool]:
    """Whether each answer contains one of its accepted words or phrases: a keyword check.

    A key matches case-insensitively where it is not part of a longer word (no letter,
    digit, underscore or hyphen directly before or after it: "seven" is not in
    "seven-day"); a space in a key matches any run of whitespace. A key holding a lone
    capital letter as a word (``is A``) is matched case-sensitively ("is a" is not
    "is A"). A keyword check, not a judge: a right word inside a wrong sentence counts
    ("... called Kepler-41B, similar to Earth"), a right answer in other words does not.
    It tells whether compression kept what the dense model knew; compare the counts of
    the dense and the compressed model.

    Args:
        answers: one answer per question (:func:`greedy_answers`).
        keys: the accepted answers per question; default :func:`question_keys` (then
            ``answers`` must answer :func:`simple_questions`, in order).

    Raises:
        ValueError: ``answers`` and ``keys`` differ in length, or a question has no key.
    """
    keys = question_keys() if keys is None else keys
    if len(answers) != len(keys):
        raise ValueError(f"answers must have one entry per question ({len(keys)}), "
                         f"got {len(answers)}")
    out = []
    for i, (answer, accepted) in enumerate(zip(answers, keys)):
        if isinstance(accepted, str) or not accepted:
            raise ValueError(f"keys[{i}] must be a non-empty sequence of strings, "
                             f"got {accepted!r}")
        found = False
        for k in accepted:
            pattern = (r"(?<![\w-])" + r"\s+".join(re.escape(w) for w in k.split())
                       + r"(?![\w-])")
            exact = any(len(w) == 1 and w.isupper() for w in k.split())
            found = found or re.search(pattern, answer,
                                       flags=0 if exact else re.IGNORECASE) is not None
        out.append(found)
    return out


def answer_token_agreement(model: nn.Module, tokenizer: Any, questions: Sequence[str],
                           answers: Sequence[str] | Sequence[Sequence[int]]) -> float:
    """Teacher-forced top-1 agreement of a causal LM with reference answers.

    Each question becomes its prompt as in :func:`greedy_answers`; the reference answer's
    tokens follow it (token ids as given, e.g. ``greedy_answers(..., return_ids=True)``'s,
    EOS included; or a string, tokenised by ``tokenizer(answer, add_special_tokens=False)``),
    and at every answer position the model's argmax next token is compared with the
    reference token.
    Returns matching positions / all answer positions, pooled over the questions. With
    the dense model's greedy answers as references this is the per-token agreement that
    identical answers need at every one of their tokens (identical 32-token answers need
    about ``agreement ** 32``), so it moves where :func:`answer_agreement` stays at 0.
    The dense model scores 1.0 on its own answer ids up to ties in float rounding (on
    decoded answers tokenised again, up to re-tokenisation: special tokens dropped,
    whitespace stripped, other splits); measure it in the same run.

    Raises:
        TypeError: ``questions`` is one string (or holds something else than strings), or
            ``answers`` is one string.
        ValueError: ``questions`` and ``answers`` differ in length, or no answer has a token.
    """
    questions = check_texts(questions, "questions")
    if isinstance(answers, (str, bytes)):
        check_texts(answers, "answers")  # one string: refused, naming answers
    if len(questions) != len(answers):
        raise ValueError(f"questions and answers must have the same length, got "
                         f"{len(questions)} and {len(answers)}")
    device = _device(model)
    same = total = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for question, answer in zip(questions, answers):
                prompt = prompt_ids(tokenizer, question)
                if isinstance(answer, str):
                    answer = tokenizer(answer, add_special_tokens=False)["input_ids"]
                target = [int(i) for i in answer]
                if not target or not prompt:
                    continue
                ids = torch.tensor([prompt + target], device=device)
                logits = model(input_ids=ids).logits[0]
                pred = logits[len(prompt) - 1:len(prompt) + len(target) - 1].argmax(-1)
                same += int((pred.cpu() == torch.tensor(target)).sum())
                total += len(target)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("no answer has a token to compare")
    return same / total


def _tsv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _cola_rows(path: Path) -> list[tuple[str, str]]:
    """``(sentence, label)`` of each row of a CoLA file, in either of its layouts: two
    columns (``sentence<TAB>label``) or GLUE's four (``source<TAB>label<TAB>original
    label<TAB>sentence``), its first row deciding; blank lines are skipped."""
    rows = [(n, r) for n, r in enumerate(_tsv_rows(path), 1) if r]
    layout = len(rows[0][1]) if rows else 2
    out = []
    for n, r in rows:
        if len(r) != layout or layout not in (2, 4):
            raise ValueError(f"{path}: line {n} has {len(r)} tab-separated columns; a CoLA "
                             "file has 2 on every line (sentence, label) or 4 (source, label, "
                             "original label, sentence)")
        out.append((r[0], r[1]) if layout == 2 else (r[3], r[1]))
    return out


def natural_eval_text(shared_dir: str | os.PathLike | None = None) -> list[str] | None:
    """Held-out natural English for :func:`perplexity`, from the labelled data folder.

    ``shared_dir`` (default ``../shared/data``, relative to the working directory) holds
    ``sst2/dev.tsv`` (``sentence<TAB>label``, its first row dropped when it is a header: a
    label that is not a number), ``cola/dev.tsv`` (no header, ``sentence<TAB>label``, or
    GLUE's ``source<TAB>label<TAB>original label<TAB>sentence``) and ``sick/trial.tsv``
    (SICK pairs). Up to three documents are
    returned, in this order, one per file present, each its sentences in file order joined
    with ``"\\n"``:

    1. SST-2 dev: every sentence (872);
    2. CoLA dev: the sentences labelled acceptable (label 1) only;
    3. SICK trial: every distinct sentence, ``sentence_A`` then ``sentence_B`` of each pair,
       in order of first appearance.

    Labels are not used otherwise. None of these is a training split.

    Returns:
        The documents, or None when the folder does not exist or holds none of the files.

    Raises:
        ValueError: a file that cannot be read (not UTF-8; a CoLA file whose rows have
            neither 2 nor 4 columns, or not all the same number; a SICK file without its
            columns), naming the file, in a folder given as ``shared_dir``; in the default
            folder such a file is left out with a warning.
    """
    root = Path(DEFAULT_SHARED_DIR if shared_dir is None else shared_dir)
    if not root.is_dir():
        return None

    def read(path: Path, rows: Callable[[Path], list]) -> list:
        """The rows of one file; one that cannot be read (not UTF-8, malformed) is an
        error naming it in a folder given as ``shared_dir``, and in the implicit folder
        beside the working directory, which the caller did not name, left out with a
        warning: not the whole measure."""
        try:
            return rows(path)
        except (ValueError, csv.Error) as err:  # UnicodeDecodeError is a ValueError
            what = str(err) if str(path) in str(err) else f"{path}: {err}"
            if shared_dir is not None:
                raise ValueError(what) from None
            warnings.warn(f"{what}; the document is left out of the held-out text",
                          stacklevel=3)
            return []

    docs: list[str] = []
    sst2 = root / "sst2" / "dev.tsv"
    if sst2.is_file():
        rows = read(sst2, _tsv_rows)
        if rows and len(rows[0]) >= 2 and not rows[0][1].strip().isdigit():  # the header
            rows = rows[1:]
        docs.append("\n".join(r[0].strip() for r in rows if r and r[0].strip()))
    cola = root / "cola" / "dev.tsv"
    if cola.is_file():
        rows = read(cola, _cola_rows)
        if rows:
            docs.append("\n".join(s.strip() for s, label in rows
                                  if label.strip() == "1" and s.strip()))
    sick = root / "sick" / "trial.tsv"
    if sick.is_file():
        seen: dict[str, None] = {}
        for r in read(sick, read_sick):
            for s in (r["sentence_A"].strip(), r["sentence_B"].strip()):
                if s:
                    seen.setdefault(s, None)
        docs.append("\n".join(seen))
    docs = [d for d in docs if d]
    return docs or None
