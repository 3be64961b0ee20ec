"""What the main-job screens share besides the job itself: natural held-out text and how a
result is written.

The text split and the measures are the job's (:func:`tnlm.compress.encoder.split_text`,
:func:`tnlm.compress.encoder.measure`), so ``main_job_screen.py`` (the whole job per run)
and ``heal_screen.py`` (healing variants on one cached truncation) split and measure as
``tnlm compress`` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tnlm.compress.text import read_sentences
from tnlm.textgen import TEXT_VERSION


def dev_sentences(path: str, n: int = 500) -> list[str]:
    """The first ``n`` sentences of the first column of ``path`` (its header line skipped):
    natural text never trained on, for a second cosine (read before the long work)."""
    return read_sentences(path, column=0)[1:n + 1]


def write_result(out: dict[str, Any], path: str, keys: Sequence[str]) -> None:
    """Write ``out`` (with ``text_version``: :data:`tnlm.textgen.TEXT_VERSION`, the version of
    the generated default text) as JSON to ``path`` and print ``keys`` of it on one line."""
    out = dict(out, text_version=TEXT_VERSION)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in keys}))
