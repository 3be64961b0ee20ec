"""Causal LMs' calibration and healing text, data-free.

:func:`self_generated_text` lets the dense model write its own calibration and
healing text (data-free, as LLM-QAT does): each sequence starts from a few words of the
generated sentences that ship with tnlm (:func:`tnlm.compress.text.generated_sentences`)
and continues by sampling (temperature, top-p) with the KV cache. The evaluation text is
never used for either. :func:`token_sequences` cuts a token stream into equal-length
sequences (no padding), the form :func:`tnlm.compress.layerwise.compress_layerwise` and
healing take.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.compress.decoder.quality import (
    NEUTRAL_GENERATION,
    eos_ids,
    neutral_generation,
    until_eos,
)
from tnlm.compress.decoder.sampling import NucleusSampler
from tnlm.compress.text import check_texts
from tnlm.core.validation import check_seed

__all__ = ["adds_bos", "check_starts_fit", "check_texts", "generation_is_neutral",
           "self_generated_text",
           "split_held_out", "start_lines", "start_order", "token_sequences"]


@torch.no_grad()
def self_generated_text(model: nn.Module, tokenizer: Any, n: int, *, max_new_tokens: int = 128,
                        temperature: float = 1.0, top_p: float = 0.95, batch_size: int = 16,
                        seed: int = 0, chat: bool = False, progress: bool = False,
                        top_k: int | None = None,
                        starts: Sequence[str] | None = None,
                        shuffle_starts: bool = True) -> list[str]:
    """``n`` texts written by ``model`` itself (sampling with the KV cache; see the module
    docstring): each token drawn from the top-``top_p`` nucleus of the model's
    distribution at ``temperature`` (:class:`tnlm.compress.decoder.sampling.NucleusSampler`),
    among the ``top_k`` most likely tokens when ``top_k`` is given (none by default;
    transformers' own sampling applies 50 unless told otherwise, and tnlm's samples
    were drawn so before this sampler: measured in docs/results.md).

    By default each text continues the first 2-4 words of one of tnlm's generated
    sentences. With ``chat``, each is a conversation instead: one of
    :func:`tnlm.compress.decoder.prompts.chat_prompts` (``n`` of them, drawn with ``seed``) through
    the tokenizer's chat template as the user's turn, followed by the model's answer, its
    special tokens kept up to and including the first end-of-sequence token (the text
    then reads as the chat format the model is used in).

    ``starts``: a few lines of the user's own kind of text (not a corpus: examples). Each
    text then starts with one of them, whole, and the model continues it (with ``chat``:
    each is the user's turn the model answers); the lines are taken in an order shuffled
    with ``seed``, each once before any twice (:func:`start_order`; a repeated line counts
    once). The text stays the model's own: the lines only choose what it writes about.
    ``shuffle_starts=False``: the lines are taken in the order given instead (stripped,
    empty ones dropped, repeats kept; cycled when fewer than ``n``), for a caller that
    drew the order itself (the two halves of ``"mixed"`` text,
    :func:`tnlm.compress.decoder.job.recipe_text`).

    Raises:
        ValueError: ``n``, ``batch_size`` or ``max_new_tokens`` not an int >= 1; ``seed``
            not an int in [0, 2**63 - 1]; ``chat`` with a tokenizer that has no chat
            template; ``temperature``, ``top_p`` or ``top_k`` out of range
            (:class:`~tnlm.compress.decoder.sampling.NucleusSampler`); ``starts`` with no
            non-empty line; a prompt (a line of ``starts``) whose tokens and
            ``max_new_tokens`` run past the model's positions (before any sampling).
        TypeError: ``starts`` one string (its characters would be the lines).
    """
    from tnlm.compress.text import generated_sentences

    for name, v in (("n", n), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    seed = check_seed(seed)
    if not isinstance(shuffle_starts, bool):
        raise TypeError(f"shuffle_starts must be a bool, got {shuffle_starts!r}")
    if starts is None:
        lines = None
    elif shuffle_starts:
        lines = start_order(starts, n, seed)
    else:
        given = start_lines(starts, distinct=False)
        lines = [given[i % len(given)] for i in range(n)]
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True needs a tokenizer with a chat template; this one "
                             "has none (use the plain samples, chat=False)")
        from tnlm.compress.decoder.prompts import chat_prompts

        starts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                add_generation_prompt=True, tokenize=False)
                  for p in (lines if lines is not None else chat_prompts(n, seed))]
    elif lines is not None:
        starts = lines
    else:
        rng = random.Random(seed)
        starts = []
        for s in generated_sentences(max(n, 64), seed=seed)[:n]:
            words = s.split()
            starts.append(" ".join(words[:rng.randint(2, 4)]))
    NucleusSampler(temperature, top_p, top_k=top_k)  # its arguments checked before any work
    _check_fits(model, tokenizer, starts, max_new_tokens, chat, lines)
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    with torch.random.fork_rng():  # the caller's random stream is kept, whatever generate draws
        _generate(model, tokenizer, starts, out, gen, batch_size, temperature, top_p,
                  max_new_tokens, side, pad, was, progress, chat, top_k)
    return out


def start_lines(starts: Sequence[str], distinct: bool = True) -> list[str]:
    """The distinct non-empty lines of ``starts``, stripped, in their first order: what the
    samples start from (:func:`self_generated_text`, ``CausalLMRecipe.starts``). A
    repeated line is kept once, so that no line gets more of the samples than another
    (``distinct=False``: every non-empty line, repeats kept).

    Raises:
        TypeError: ``starts`` one string (its characters would be the lines).
        ValueError: no non-empty line.
    """
    lines = [x.strip() for x in check_texts(starts, "starts") if x.strip()]
    lines = list(dict.fromkeys(lines)) if distinct else lines
    if not lines:
        raise ValueError("starts must hold at least one non-empty line")
    return lines


def start_order(starts: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` of :func:`start_lines` of ``starts``, in an order shuffled with ``seed``: every
    line once before any line twice (rounds of shuffled lines, cut at ``n``)."""
    lines = start_lines(starts)
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        order = list(lines)
        rng.shuffle(order)
        out += order
    return out[:n]


def check_starts_fit(model: nn.Module, tokenizer: Any, starts: Sequence[str],
                     max_new_tokens: int, chat: bool) -> None:
    """``ValueError`` naming the first of the user's ``starts`` lines whose tokens (with
    ``chat``, in the tokenizer's chat template as the user's turn) and ``max_new_tokens``
    would run past the model's positions: what :func:`self_generated_text` refuses before
    sampling, for a caller that checks its lines as soon as the model is loaded."""
    lines = start_lines(starts, distinct=False)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                             add_generation_prompt=True, tokenize=False)
               for p in lines] if chat else lines
    _check_fits(model, tokenizer, prompts, max_new_tokens, chat, lines)


def _check_fits(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                chat: bool, lines: Sequence[str] | None) -> None:
    """Refuse, before any sampling, a prompt whose tokens and ``max_new_tokens`` would run
    past the model's positions (a learned table's rows, else ``max_position_embeddings``):
    a learned table fails inside the model, rotary positions run on silently beyond what
    the model was trained on. ``lines``: the user's lines the prompts were made from, one
    a prompt (the error names the line, not its chat-templated prompt); None: the
    prompts are tnlm's, named by their index."""
    from tnlm.integration.architectures import position_limit

    limit = position_limit(model)
    if limit is None:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return
    ids = tokenizer(list(prompts), add_special_tokens=not chat)["input_ids"]  # one call
    for i, t in enumerate(map(len, ids)):
        if t + max_new_tokens > limit:
            p = lines[i] if lines is not None else ""
            what = f"starts: the line {p[:60]!r}{'...' if len(p) > 60 else ''}" \
                if lines is not None else f"prompt {i}"
            raise ValueError(f"{what} is {t} tokens{' in the chat template' if chat else ''}; "
                             f"with max_new_tokens={max_new_tokens} it would run past the "
                             f"model's {limit} positions (at most {limit - max_new_tokens} "
                             "tokens a line)")


def _generate(model, tokenizer, starts, out, gen, batch_size, temperature, top_p,
              max_new_tokens, side, pad, was, progress, chat=False, top_k=None) -> None:
    n = len(starts)
    neutral = neutral_generation()
    try:
        eos = eos_ids(model, tokenizer)  # in the try: the tokenizer's state is restored
        for i in tqdm(range(0, n, batch_size), desc="self-generated text", disable=not progress,
                      leave=False):
            # a chat template writes its own special tokens: none are added
            batch = tokenizer(starts[i:i + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=not chat)
            draws = torch.Generator().manual_seed(
                int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            # sampled by the processor (one uniform number a row, not multinomial's
            # batch x vocab exponentials: tnlm.compress.decoder.sampling); generate keeps its pick
            ids = model.generate(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"], do_sample=False,
                                 num_beams=1,  # one greedy path keeps each draw
                                 logits_processor=[NucleusSampler(temperature, top_p, draws,
                                                                  top_k)],
                                 max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **neutral)
            prompt_len = batch["input_ids"].shape[1]
            for k, (s, row) in enumerate(zip(starts[i:i + batch_size], ids)):
                new = row[prompt_len:].tolist()
                if chat:  # up to and including the first end of sequence
                    new = until_eos(new, eos)
                prompt = batch["input_ids"][k][batch["attention_mask"][k].bool()].tolist()
                out.append(s + _continuation(tokenizer, prompt, new, skip=not chat))
    finally:
        tokenizer.padding_side = side
        tokenizer.pad_token = pad
        model.train(was)


def generation_is_neutral(model: nn.Module) -> bool:
    """Whether ``model``'s ``generation_config`` leaves its logits alone in greedy
    ``generate`` (every key of
    :data:`~tnlm.compress.decoder.quality.NEUTRAL_GENERATION` unset or at its neutral value):
    then its own texts were the same before they were drawn with the neutral values."""
    cfg = getattr(model, "generation_config", None)
    if cfg is None:
        return True
    for key, neutral in NEUTRAL_GENERATION.items():
        value = getattr(cfg, key, None)
        if value is None or value == neutral or (value == [] and neutral is None):
            continue
        return False
    return True


def _continuation(tokenizer: Any, prompt: list[int], new: list[int], skip: bool) -> str:
    """The text of ``new`` after ``prompt``: decoded together with the prompt and cut after
    it, so that a tokenizer that marks a word's leading space on the token (SentencePiece)
    keeps the space between the prompt and the first new token; decoded alone when the
    prompt's text is not a prefix of the whole."""
    whole = tokenizer.decode(prompt + new, skip_special_tokens=skip)
    head = tokenizer.decode(prompt, skip_special_tokens=skip)
    if whole.startswith(head):
        return whole[len(head):]
    return tokenizer.decode(new, skip_special_tokens=skip)


def adds_bos(tokenizer: Any) -> int | None:
    """The BOS id ``tokenizer`` puts first when it encodes text with its special tokens
    (Llama-2, Mistral: ``<s>``), or ``None`` if it puts none (SmolLM2, GPT-2, Qwen2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        first = tokenizer("a", add_special_tokens=True)["input_ids"]
    except (TypeError, KeyError):
        return None
    first = first.tolist() if torch.is_tensor(first) else list(first)
    while first and isinstance(first[0], list):  # a batch of one
        first = first[0]
    return int(bos) if first and first[0] == bos else None


def split_held_out(texts: Sequence[str], fraction: float = 0.1,
                   max_chars: int | None = None) -> tuple[list[str], list[str]]:
    """The texts cut in two, in order: those to calibrate and heal on, and the shortest run of
    texts at the end that holds at least ``fraction`` of all characters, or ``max_chars``
    where that is fewer (at least one text), held out to measure the perplexity on the
    user's own text.

    The held-out part is a contiguous tail, as a test split follows its training split: a
    document is never on both sides. A text of the tail that occurs earlier too (a
    repeated line) is left out of the first part, so nothing held out is healed on.

    Raises:
        TypeError: ``texts`` is one string (or holds something else than strings).
        ValueError: fewer than two texts, ``fraction`` not a number in (0, 1),
            ``max_chars`` < 1, or no text left to heal on once the held-out ones are
            taken out.
    """
    texts = check_texts(texts)
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int)
                                  or max_chars < 1):
        raise ValueError(f"max_chars must be None or an int >= 1, got {max_chars!r}")
    if len(texts) < 2:
        raise ValueError(f"at least 2 texts are needed to hold one out, got {len(texts)}")
    target = fraction * sum(len(t) for t in texts)
    if max_chars is not None:
        target = min(target, max_chars)
    tail, k = 0, len(texts)
    while k > 1 and (k == len(texts) or tail < target):
        k -= 1
        tail += len(texts[k])
    held = set(texts[k:])
    first = [t for t in texts[:k] if t not in held]
    if not first:
        raise ValueError(f"every one of the first {k} texts equals a held-out one: no "
                         f"text is left to heal on")
    return first, texts[k:]


def token_sequences(tokenizer: Any, texts: Sequence[str], length: int,
                    max_sequences: int | None = None) -> torch.Tensor:
    """The texts as one token stream (joined by ``"\\n\\n"``) cut into ``(n, length)``
    sequences (long); the remainder is dropped.

    A tokenizer that starts what it encodes with BOS (:func:`adds_bos`) gets it at the
    start of every sequence (BOS, then ``length - 1`` tokens of the stream without its own
    BOS tokens, which chat templates such as Llama-2's write), as the model sees a prompt:
    its first position, where the attention sink and the largest activations sit, is
    then the one it has at inference.

    With ``max_sequences``, at most that many sequences (the first).

    Raises:
        TypeError: ``texts`` is one string (or holds something else than strings).
        ValueError: ``length`` not an int >= 2, ``max_sequences`` neither None nor an int
            >= 1, or fewer tokens in all than one sequence takes (``length``, or
            ``length - 1`` besides BOS).
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    m = max_sequences
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"max_sequences must be None or an int >= 1, got {m!r}")
    texts = check_texts(texts)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt",
                    add_special_tokens=False)["input_ids"][0]
    bos = adds_bos(tokenizer)
    if bos is not None:  # one BOS a sequence, first (chat templates write their own too)
        ids = ids[ids != bos]
    step = length - (bos is not None)
    n = ids.numel() // step
    if n == 0:
        raise ValueError(f"the text holds {ids.numel()} tokens, fewer than one sequence of "
                         f"length {length}")
    if max_sequences is not None:
        n = min(n, max_sequences)
    out = ids[:n * step].reshape(n, step).long()
    if bos is not None:
        out = torch.cat([torch.full((n, 1), bos, dtype=torch.long), out], dim=1)
    return out
