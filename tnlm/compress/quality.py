"""Does a compressed model still work? Embedding agreement and sentence-similarity quality.

* :func:`embedding_cosine`: per sentence, the cosine between the mean-pooled embeddings
  of two models (a compressed one and its original);
* :func:`sick_spearman`: Spearman correlation between the cosine of the two sentences'
  embeddings and the gold relatedness of SICK-style pairs (the usual sentence-embedding
  metric; the file is the user's, read from a path).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tnlm.compress.text import NotUtf8Error, check_texts, decode_utf8
from tnlm.core.validation import check_positive_int
from tnlm.integration import mean_pooled

__all__ = ["EMBED_MAX_LENGTH", "embedding_cosine", "embed", "spearman", "read_sick",
           "sick_spearman"]

#: tokens per sentence the embeddings are computed on (longer sentences are truncated)
EMBED_MAX_LENGTH = 128


def embed(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 64,
          max_length: int = EMBED_MAX_LENGTH) -> torch.Tensor:
    """Sentence embeddings (len(sentences), hidden) as the model computes them
    (:func:`tnlm.integration.mean_pooled`: masked mean, L2-normalised, in eval mode), in
    batches.

    Raises:
        TypeError: ``sentences`` is one string (its characters would be the sentences) or
            holds items that are not strings; ``batch_size`` is not an int.
        ValueError: ``batch_size`` below 1.
    """
    sentences = check_texts(sentences, "sentences")
    batch_size = check_positive_int(batch_size, "batch_size")
    return torch.cat([mean_pooled(model, tokenizer, list(sentences[i:i + batch_size]),
                                  max_length)
                      for i in range(0, len(sentences), batch_size)])


def embedding_cosine(student: nn.Module, teacher: nn.Module, tokenizer: Any,
                     sentences: Sequence[str], batch_size: int = 64,
                     max_length: int = EMBED_MAX_LENGTH) -> torch.Tensor:
    """Per-sentence cosine between the mean-pooled embeddings of two models.

    Raises:
        TypeError: ``sentences`` is one string or holds items that are not strings.
        ValueError: ``sentences`` is empty.
    """
    sentences = check_texts(sentences, "sentences")
    if not sentences:
        raise ValueError("sentences must not be empty")
    s = embed(student, tokenizer, sentences, batch_size, max_length)
    t = embed(teacher, tokenizer, sentences, batch_size, max_length)
    return torch.nn.functional.cosine_similarity(s, t, dim=-1)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0 of ``x``, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each value
    counts = np.diff(np.r_[starts, len(x)])
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(starts + (counts - 1) / 2.0, counts)
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of ``a`` and ``b``: the Pearson correlation of their
    ranks, tied values taking the mean of their ranks (as ``scipy.stats.spearmanr``;
    SICK's gold relatedness scores are heavily tied, so row order must not matter).

    Returns ``nan`` (undefined) when an input holds NaN, is constant, or has fewer than
    2 values.

    Raises:
        ValueError: ``a`` and ``b`` differ in length or are not 1-D.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"a and b must be 1-D sequences of one length, got shapes "
                         f"{x.shape} and {y.shape}")
    if len(x) < 2 or np.isnan(x).any() or np.isnan(y).any():
        return math.nan
    rx = _average_ranks(x)
    ry = _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denom == 0:  # a constant input: no ranking to correlate
        return math.nan
    return float(rx @ ry) / denom


def read_sick(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a SICK file (tab-separated, header with ``sentence_A``, ``sentence_B``,
    ``relatedness_score``; other columns kept; a byte-order mark is dropped), one dict per
    pair.

    Raises:
        ValueError: the file is not UTF-8 text, lacks those columns, holds no pairs, or a
            row lacks a sentence or a numeric score (the message names the file and line).
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = decode_utf8(data)
    except NotUtf8Error as err:
        raise ValueError(f"{path} is not a SICK file ({err})") from None
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t",
                                   quoting=csv.QUOTE_NONE))
    except csv.Error as err:
        raise ValueError(f"{path} is not a SICK file ({err})") from None
    if not rows or not {"sentence_A", "sentence_B", "relatedness_score"} <= set(rows[0]):
        raise ValueError(f"{path} is not a SICK file (needs sentence_A, sentence_B and "
                         "relatedness_score columns)")
    for i, r in enumerate(rows):
        try:
            ok = bool(r["sentence_A"]) and bool(r["sentence_B"]) and math.isfinite(
                float(r["relatedness_score"]))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path} is not a SICK file: line {i + 2} lacks a sentence_A, a "
                             f"sentence_B or a numeric relatedness_score")
    return rows


def sick_spearman(model: nn.Module, tokenizer: Any, path: str | os.PathLike) -> float:
    """Spearman correlation of embedding cosines with the relatedness of the pairs in
    ``path`` (:func:`read_sick`); ``nan`` when undefined (:func:`spearman`: a cosine is
    NaN, or every cosine is the same).

    Raises:
        ValueError: the file lacks those columns or holds no pairs.
    """
    rows = read_sick(path)
    a = embed(model, tokenizer, [r["sentence_A"] for r in rows])
    b = embed(model, tokenizer, [r["sentence_B"] for r in rows])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()
    return spearman(cos, [float(r["relatedness_score"]) for r in rows])
