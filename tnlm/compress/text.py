"""Unlabeled text for calibration and healing, with nothing downloaded.

:func:`generated_sentences` come from tnlm's own grammar (:mod:`tnlm.textgen`);
:func:`docstring_sentences` splits plain-English sentences out of the docstrings
of the Python source installed on the machine (the standard library and
transformers; parsed with ``ast``, nothing is imported or executed);
:func:`lm_sentences` are natural prose shipped with tnlm
(``tnlm/data/lm_sentences.txt.gz``: sentences written by SmolLM2-135M-Instruct,
Apache-2.0, answering short prompts on everyday topics;
``experiments/make_lm_sentences.py`` remakes the file). :func:`lm_held_out`
(``tnlm/data/lm_held_out.txt.gz``, :data:`LM_HELD_OUT` sentences) are written the same
way about topics that no prompt of the first file names, and are never part of the
default text: the main job measures natural-text quality on them. A user's own text
(one sentence per line) is read by :func:`read_sentences`.
"""

from __future__ import annotations

import ast
import functools
import gzip
import importlib.resources
import importlib.util
import os
import pathlib
import random
import re
import sysconfig
from collections.abc import Sequence
from typing import Any

from tnlm.textgen import generate

__all__ = ["DEFAULT_TEXT_SOURCE", "compression_sizes", "default_text", "docstring_roots",
           "docstring_sentences", "generated_sentences", "lm_held_out", "lm_sentences",
           "read_sentences", "split_sentences", "text_lines", "LM_HELD_OUT", "NotUtf8Error",
           "decode_utf8"]

DEFAULT_TEXT_SOURCE = ("generated sentences, docstrings of the installed Python source and "
                       "natural prose shipped with tnlm")

#: how many shipped natural-prose sentences are held out (:func:`lm_held_out`)
LM_HELD_OUT = 256

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_WORD = re.compile(r"^[A-Za-z][a-z]*(?:'[a-z]+)?[,;:]?$")


def docstring_roots(packages: Sequence[str] = ("transformers",)) -> list[pathlib.Path]:
    """The standard library's folder and the folders of the installed ``packages`` (those
    that are not installed are skipped): where :func:`docstring_sentences` looks."""
    roots = [pathlib.Path(sysconfig.get_paths()["stdlib"])]
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec and spec.origin:
            roots.append(pathlib.Path(spec.origin).parent)
    return roots


def docstring_sentences(roots: Sequence[pathlib.Path] | None = None, max_files: int = 4000,
                        min_words: int = 5, max_words: int = 40, seed: int = 0) -> list[str]:
    """Plain-English sentences split out of the docstrings of installed Python source (parsed
    with ast, nothing is imported): stdlib + transformers by default. A sentence is kept if it
    has min..max words, starts with a capital letter, ends with '.', and (apart from its final
    period) every token is a plain word, optionally followed by , ; or :  -- this drops code,
    identifiers, paths and reST markup. Deduplicated, shuffled."""
    if roots is None:
        roots = docstring_roots()
    files = []
    for root in roots:
        files += sorted(p for p in root.rglob("*.py")
                        if "test" not in p.parts and "tests" not in p.parts
                        and "site-packages" not in p.relative_to(root).parts)
    rng = random.Random(seed)
    rng.shuffle(files)
    seen, out = set(), []
    for path in files[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, _DOC_NODES):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                    words = sent.split()
                    if not (min_words <= len(words) <= max_words):
                        continue
                    if not sent[0].isupper() or not sent.endswith("."):
                        continue
                    body = words[:-1] + [words[-1][:-1]]
                    if all(_WORD.match(w) for w in body) and sent not in seen:
                        seen.add(sent)
                        out.append(sent)
    rng.shuffle(out)
    return out


def text_lines(text: str) -> list[str]:
    """The lines of ``text``, ending at "\\n", "\\r\\n" or a lone "\\r" (universal newlines,
    as ``open()`` reads): ``str.splitlines()`` would also split inside a line at U+2028,
    ``\\x85``, ``\\x0c``, ..."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


class NotUtf8Error(ValueError):
    """Bytes that are not UTF-8 text: ``offset`` is the first invalid byte's, counted in
    the bytes given (a byte-order mark included)."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"not UTF-8 text: byte offset {offset}")
        self.offset = offset


def decode_utf8(data: bytes) -> str:
    """``data`` decoded as UTF-8, a leading byte-order mark dropped; else
    :class:`NotUtf8Error` with the offset of the first invalid byte in ``data``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:  # its offset counts from after a BOM
        raise NotUtf8Error(err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)) \
            from None


def _line_of(data: bytes, offset: int) -> int:
    """The line (from 1) of byte ``offset``, lines ending at LF, CRLF or a lone CR (as
    :func:`read_sentences` splits them)."""
    head = data[:offset]
    return head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1


def read_sentences(path: str | os.PathLike, column: int | None = None) -> list[str]:
    """Non-empty lines of a UTF-8 text file (lines end at a line feed, CRLF or a lone CR; other
    Unicode line breaks such as U+2028 stay inside their line; a byte-order mark is
    dropped); with ``column``, that tab-separated column of every non-empty line (a header
    row is returned like any other line: drop it yourself).

    Raises:
        FileNotFoundError: a missing file or a folder.
        ValueError: a file that is not UTF-8 text (a NUL byte or an invalid
            byte: the message gives its byte offset and line), no sentences, a line
            without ``column``.
    """
    p = pathlib.Path(path)
    if p.is_dir():  # no such file (FileNotFoundError, as before), but say why
        raise FileNotFoundError(f"text file {p} is a directory, not a file")
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    data = p.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"text file {p} holds a NUL byte at byte offset {nul} (line "
                         f"{_line_of(data, nul)}): a binary file, not text")
    try:
        text = decode_utf8(data)
    except NotUtf8Error as err:
        at = err.offset
        raise ValueError(f"text file {p} is not UTF-8: byte 0x{data[at]:02x} at byte offset "
                         f"{at} (line {_line_of(data, at)}) is invalid; convert it "
                         f"to UTF-8 (for Latin-1: iconv -f latin1 -t utf-8)") from None
    out = []
    for i, line in enumerate(text_lines(text)):
        if not line.strip():
            continue
        cell = line
        if column is not None:
            cells = line.split("\t")
            if not -len(cells) <= column < len(cells):
                raise ValueError(f"column {column} is out of range: line {i + 1} of {p} has "
                                 f"{len(cells)} tab-separated column{'s' * (len(cells) > 1)} "
                                 f"(columns count from 0)")
            cell = cells[column]
        if cell.strip():
            out.append(cell.strip())
    if not out:
        raise ValueError(f"text file {p} holds no sentences")
    return out


def split_sentences(sentences: Sequence[str], sizes: Sequence[int],
                    seed: int = 0) -> list[list[str]]:
    """Disjoint random parts of ``sentences`` (deduplicated) of the given sizes; the last
    size may be -1 for "the rest". Raises ``ValueError`` if there are too few."""
    uniq = list(dict.fromkeys(sentences))
    random.Random(seed).shuffle(uniq)
    want = sum(s for s in sizes if s > 0)
    if want > len(uniq):
        raise ValueError(f"need {want} distinct sentences, got {len(uniq)}")
    parts, pos = [], 0
    for s in sizes:
        end = len(uniq) if s < 0 else pos + s
        parts.append(uniq[pos:end])
        pos = end
    return parts


def generated_sentences(n: int = 4000, seed: int = 0) -> list[str]:
    """``n`` distinct everyday English sentences from tnlm's own grammar
    (:func:`tnlm.textgen.generate`: scenes, opinions and reviews, facts,
    questions; no corpus, no licence). Deterministic for a seed."""
    return generate(n, seed=seed)


@functools.lru_cache(maxsize=2)
def _lm_file(name: str) -> tuple[str, ...]:
    path = importlib.resources.files("tnlm").joinpath("data", name)
    try:
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            return tuple(line.strip() for line in f if line.strip())
    except FileNotFoundError:
        raise FileNotFoundError(f"tnlm's package data {path} is missing: reinstall tnlm "
                                f"(pip install -e . from a clone)") from None


def lm_sentences() -> list[str]:
    """The shipped natural-prose sentences for healing and calibration (module docstring),
    in the order they were written."""
    return list(_lm_file("lm_sentences.txt.gz"))


def lm_held_out() -> list[str]:
    """The :data:`LM_HELD_OUT` shipped natural-prose sentences about topics of their own:
    never in :func:`default_text`; the main job's natural-text measure."""
    return list(_lm_file("lm_held_out.txt.gz"))


@functools.lru_cache(maxsize=4)
def _default_docstrings(seed: int) -> tuple[str, ...]:
    return tuple(docstring_sentences(max_files=1500, seed=seed))


def check_texts(texts: Any, name: str = "texts") -> list[str]:
    """``texts`` as a list, after a ``TypeError`` naming ``name`` unless it holds strings:
    one string (whose characters would each be taken for a document) or other items are
    refused; an iterator is read once, here."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of strings (documents), got one "
                        f"{type(texts).__name__} (wrap it in a list: each of its characters "
                        "would be a document)")
    texts = list(texts)
    bad = sorted({type(t).__name__ for t in texts if not isinstance(t, str)})
    if bad:
        raise TypeError(f"{name} must be a sequence of strings (documents), got items of "
                        f"type {', '.join(bad)}")
    return texts


def default_text(seed: int = 0, n_generated: int = 4000, n_docstrings: int = 4000,
                 n_lm: int | None = None) -> list[str]:
    """The main job's text when the user passes none (:data:`DEFAULT_TEXT_SOURCE`):
    ``n_generated`` :func:`generated_sentences`, up to ``n_docstrings``
    :func:`docstring_sentences`, then ``n_lm`` (``None``: all) of the
    :func:`lm_sentences` (0: the former default text, without them); nothing is downloaded."""
    if n_lm is not None and (isinstance(n_lm, bool) or not isinstance(n_lm, int) or n_lm < 0):
        raise ValueError(f"n_lm must be None (all) or an int >= 0, got {n_lm!r}")
    text = generated_sentences(n_generated, seed=seed)
    text += list(_default_docstrings(seed)[:n_docstrings])
    return text + (lm_sentences()[:n_lm] if n_lm != 0 else [])


def compression_sizes(n_sentences: int, n_calibration: int) -> tuple[int, int]:
    """How the main job splits ``n_sentences`` of text: ``(held_out, calibration)`` counts,
    ``min(256, n // 4)`` held out for the cosine and at most ``n_calibration`` for
    calibration; the rest heals (with the calibration sentences). A calibration count
    below 1 means the text is too short."""
    n_eval = min(256, n_sentences // 4)
    return n_eval, min(n_calibration, n_sentences - n_eval)
