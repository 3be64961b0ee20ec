"""What the main-job screens share: the main job's text split and its three measures.

Used by ``main_job_screen.py`` (the whole main job per run) and ``heal_screen.py``
(healing variants on one cached truncation), so both split and measure alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tnlm.compress.quality import embedding_cosine, sick_spearman
from tnlm.compress.text import compression_sizes, read_sentences, split_sentences
from tnlm.textgen import TEXT_VERSION


def main_job_split(text: Sequence[str], calibration: int, seed: int,
                   dev_text: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """``(held_out, calibration, rest, dev)``: the main job's split of ``text``
    (:func:`tnlm.compress.text.compression_sizes`) and the first 500 sentences of the
    first column of ``dev_text`` (read before the long work)."""
    dev = read_sentences(dev_text, column=0)[1:501]
    n_eval, n_cal = compression_sizes(len(text), calibration)
    held_out, cal, rest = split_sentences(text, [n_eval, n_cal, -1], seed=seed)
    return held_out, cal, rest, dev


def measure(student: nn.Module, teacher: nn.Module, tok: Any, held_out: Sequence[str],
            dev: Sequence[str], sick: str, sick_train: str | None = None) -> dict[str, float]:
    """The held-out cosine (mean, min), the natural-text cosine and SICK (both models);
    with ``sick_train``, also SICK on that file (the 4,500 training pairs: never trained
    on here, and nine times the trial set's pairs)."""
    cos = embedding_cosine(student, teacher, tok, held_out)
    out = dict(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
               cosine_dev_mean=float(embedding_cosine(student, teacher, tok, dev).mean()),
               sick_spearman_original=sick_spearman(teacher, tok, sick),
               sick_spearman=sick_spearman(student, tok, sick))
    if sick_train:
        out.update(sick_train_spearman_original=sick_spearman(teacher, tok, sick_train),
                   sick_train_spearman=sick_spearman(student, tok, sick_train))
    return out



def write_result(out: dict[str, Any], path: str, keys: Sequence[str]) -> None:
    """Write ``out`` (with ``text_version``: :data:`tnlm.textgen.TEXT_VERSION`, the version of
    the generated default text) as JSON to ``path`` and print ``keys`` of it on one line."""
    out = dict(out, text_version=TEXT_VERSION)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in keys}))
