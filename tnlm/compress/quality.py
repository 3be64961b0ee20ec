"""Does a compressed model still work? Embedding agreement and sentence-similarity quality.

* :func:`embedding_cosine`: per sentence, the cosine between the mean-pooled embeddings
  of two models (a compressed one and its original);
* :func:`sick_spearman`: Spearman correlation between the cosine of the two sentences'
  embeddings and the gold relatedness of SICK-style pairs (the usual sentence-embedding
  metric; the file is the user's, read from a path).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tnlm.integration import mean_pooled

__all__ = ["embedding_cosine", "embed", "spearman", "read_sick", "sick_spearman"]

def embed(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 64,
          max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings (len(sentences), hidden) as the model computes them
    (:func:`tnlm.integration.mean_pooled`: masked mean, L2-normalised), in batches."""
    return torch.cat([mean_pooled(model, tokenizer, list(sentences[i:i + batch_size]),
                                  max_length)
                      for i in range(0, len(sentences), batch_size)])


def embedding_cosine(student: nn.Module, teacher: nn.Module, tokenizer: Any,
                     sentences: Sequence[str], batch_size: int = 64,
                     max_length: int = 128) -> torch.Tensor:
    """Per-sentence cosine between the mean-pooled embeddings of two models."""
    if not sentences:
        raise ValueError("sentences must not be empty")
    s = embed(student, tokenizer, sentences, batch_size, max_length)
    t = embed(teacher, tokenizer, sentences, batch_size, max_length)
    return torch.nn.functional.cosine_similarity(s, t, dim=-1)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties broken by order; the scores here are continuous)."""
    ra = np.argsort(np.argsort(np.asarray(a))).astype(np.float64)
    rb = np.argsort(np.argsort(np.asarray(b))).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def read_sick(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a SICK file (tab-separated, header with ``sentence_A``, ``sentence_B``,
    ``relatedness_score``; other columns kept), one dict per pair.

    Raises:
        ValueError: the file is not UTF-8 text, lacks those columns, holds no pairs, or a
            row lacks a sentence or a numeric score (the message names the file and line).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a SICK file (not UTF-8 text: byte offset "
                         f"{err.start})") from None
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
    ``path`` (:func:`read_sick`).

    Raises:
        ValueError: the file lacks those columns or holds no pairs.
    """
    rows = read_sick(path)
    a = embed(model, tokenizer, [r["sentence_A"] for r in rows])
    b = embed(model, tokenizer, [r["sentence_B"] for r in rows])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()
    return spearman(cos, [float(r["relatedness_score"]) for r in rows])
