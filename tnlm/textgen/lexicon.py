"""The generators' word lists, kept as data in ``tnlm/textgen/words/*.json``, and the
version of the text they generate.

Each file is one JSON object of named lists (``grammar.json`` for
:mod:`tnlm.textgen.grammar`, ``captions.json`` for :mod:`tnlm.textgen.captions`); a list
of lists is a list of word tuples (a verb's forms, a noun's singular and plural, ...).
The order of every list is part of the output: a generator draws from it by position.

:data:`TEXT_VERSION` names the generated text: the generator version and a hash of the
word lists. It changes when a word does, or when :data:`GENERATOR_VERSION` is raised (do
that whenever a change of the code changes the sentences), and is recorded with results
made on the generated text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from typing import Any

__all__ = ["GENERATOR_VERSION", "TEXT_VERSION", "WORD_FILES", "load_words", "read_word_file",
           "words_digest"]

#: raised by hand whenever the generators' code changes their output for the same words
GENERATOR_VERSION = 1
#: the word files in ``tnlm/textgen/words/`` (without ``.json``)
WORD_FILES = ("captions", "grammar")


@cache
def read_word_file(name: str) -> dict[str, Any]:
    """The JSON object of ``tnlm/textgen/words/<name>.json`` as stored (lists of lists kept).

    Raises:
        ValueError: ``name`` is not one of :data:`WORD_FILES`.
    """
    if name not in WORD_FILES:
        raise ValueError(f"name must be one of {WORD_FILES}, got {name!r}")
    text = files("tnlm.textgen").joinpath("words", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return [tuple(x) if isinstance(x, list) else x for x in value]
    return value


def load_words(name: str) -> dict[str, Any]:
    """The named lists of a word file, ready for a generator: a fresh copy whose lists of
    lists are lists of tuples (see :func:`read_word_file`)."""
    return {k: _tuples(v) for k, v in read_word_file(name).items()}


def words_digest(lists: Mapping[str, Any], generator_version: int = GENERATOR_VERSION) -> str:
    """``"textgen<version>-<12 hex digits>"``: the generator version and the SHA-256 of the
    word lists ``lists`` (file name -> its JSON object) in canonical JSON."""
    blob = json.dumps({"generator": generator_version, "words": lists}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    return f"textgen{generator_version}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


#: the version of the generated text: :data:`GENERATOR_VERSION` and the word lists' hash
TEXT_VERSION = words_digest({name: read_word_file(name) for name in WORD_FILES})
