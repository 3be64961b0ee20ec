"""Unlabeled text for calibration and healing, with nothing downloaded or shipped.

:func:`docstring_sentences` splits plain-English sentences out of the docstrings
of the Python source installed on the machine (the standard library and
transformers; parsed with ``ast``, nothing is imported or executed). A user's
own text (one sentence per line) is read by :func:`read_sentences`.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import random
import re
import sysconfig
from collections.abc import Sequence

__all__ = ["default_text", "docstring_sentences", "generated_sentences", "read_sentences",
           "split_sentences"]

DEFAULT_TEXT_SOURCE = "generated sentences and docstrings of the installed Python source"

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_WORD = re.compile(r"^[A-Za-z][a-z]*(?:'[a-z]+)?[,;:]?$")


def docstring_sentences(roots: Sequence[pathlib.Path] | None = None, max_files: int = 4000,
                        min_words: int = 5, max_words: int = 40, seed: int = 0) -> list[str]:
    """Plain-English sentences split out of the docstrings of installed Python source (parsed
    with ast, nothing is imported): stdlib + transformers by default. A sentence is kept if it
    has min..max words, starts with a capital letter, ends with '.', and (apart from its final
    period) every token is a plain word, optionally followed by , ; or :  -- this drops code,
    identifiers, paths and reST markup. Deduplicated, shuffled."""
    if roots is None:
        roots = [pathlib.Path(sysconfig.get_paths()["stdlib"])]
        spec = importlib.util.find_spec("transformers")
        if spec and spec.origin:
            roots.append(pathlib.Path(spec.origin).parent)
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


def read_sentences(path: str | os.PathLike, column: int | None = None) -> list[str]:
    """Non-empty lines of a text file; with ``column``, that tab-separated column (a
    header row is returned like any other line: drop it yourself).

    Raises:
        FileNotFoundError, ValueError: a missing file, no sentences, a missing column.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines()):
        cells = line.split("\t") if column is not None and "\t" in line else [line]
        if len(cells) > 1 and not -len(cells) <= column < len(cells):
            raise ValueError(f"column {column} is out of range: line {i + 1} of {p} has "
                             f"{len(cells)} tab-separated columns")
        cell = cells[column] if len(cells) > 1 else line
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


# ---------------------------------------------------------------------------- generated text
_PEOPLE = ["a man", "a woman", "the boy", "the girl", "a child", "an old man", "a young woman",
           "two men", "three kids", "a group of people", "the teacher", "my friend", "the doctor",
           "a dog", "the cat", "a chef", "the players", "a musician", "the driver", "our neighbour"]
_ACTS = ["is playing a guitar", "is riding a bike", "is cutting an onion", "is reading a book",
         "is walking along the beach", "is cooking dinner", "is running in the park",
         "is talking on the phone", "is swimming in a lake", "is climbing a rock",
         "is playing football", "is painting a picture", "is sleeping on the sofa",
         "is singing a song", "is eating a sandwich", "is jumping over a fence",
         "is writing a letter", "is dancing on the stage", "is washing the car",
         "is slicing a tomato", "is sitting on a bench", "is looking at the mountains"]
_WHERE = ["in the kitchen", "near the river", "at the station", "on a sunny day", "in the rain",
          "outside the house", "in a crowded street", "at night", "in front of a building",
          "under a tree", "on the grass", "in the snow"]
_THINGS = ["the movie", "this film", "the story", "the acting", "the music", "the plot",
           "the ending", "the dialogue", "the book", "the food", "the service", "the hotel",
           "the game", "the concert", "the show", "the new phone"]
_OPINIONS = ["is wonderful", "is painfully slow", "is funny and warm", "feels dull and empty",
             "is a real pleasure", "is clumsy", "never finds its rhythm", "is beautifully made",
             "is too long", "is smart and moving", "falls flat", "is worth every minute",
             "is forgettable", "surprised me", "is a mess", "is charming"]
_REASONS = ["because the characters are so vivid", "although the middle drags",
            "but the jokes do not land", "and the cast is excellent", "even if it is predictable",
            "since nothing really happens", "and I would see it again",
            "though the script is weak"]
_FACTS = ["The meeting was moved to Thursday afternoon.", "Prices rose sharply last year.",
          "The train leaves every twenty minutes.", "Water boils at a lower temperature up high.",
          "The museum is closed on Mondays.", "She finished the report before lunch.",
          "The road was blocked after the storm.", "Most birds fly south in the winter.",
          "He forgot his keys at the office.", "The team won the final by two goals."]


def generated_sentences(n: int = 4000, seed: int = 0) -> list[str]:
    """``n`` distinct everyday English sentences from a small grammar (scene descriptions,
    opinions, plain facts), written for this project: no licence attached to any corpus.
    Deterministic for a seed."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    limit = n * 20
    while len(out) < n and limit:
        limit -= 1
        k = rng.random()
        if k < 0.45:
            s = f"{rng.choice(_PEOPLE)} {rng.choice(_ACTS)}"
            if rng.random() < 0.6:
                s += f" {rng.choice(_WHERE)}"
            s = s[0].upper() + s[1:] + "."
        elif k < 0.85:
            s = f"{rng.choice(_THINGS)} {rng.choice(_OPINIONS)}"
            if rng.random() < 0.5:
                s += f" {rng.choice(_REASONS)}"
            s = s[0].upper() + s[1:] + rng.choice([".", ".", "!"])
        else:
            s = rng.choice(_FACTS)
            if rng.random() < 0.5:
                s = s[:-1] + f", {rng.choice(_REASONS)}."
        out[s] = None
    return list(out)


def default_text(seed: int = 0, n_generated: int = 4000, n_docstrings: int = 4000) -> list[str]:
    """The main job's text when the user passes none (:data:`DEFAULT_TEXT_SOURCE`):
    ``n_generated`` :func:`generated_sentences` then up to ``n_docstrings``
    :func:`docstring_sentences`; nothing is downloaded."""
    text = generated_sentences(n_generated, seed=seed)
    return text + docstring_sentences(max_files=1500, seed=seed)[:n_docstrings]
