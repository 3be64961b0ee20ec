"""Everyday English from a small probabilistic grammar, written for this project.

The main job needs unlabeled text on a machine with no data and no network. This module
generates it: scene descriptions ("Two children are playing with a ball in the park."),
scene captions from a larger compositional lexicon (:mod:`tnlm.textgen.captions`),
opinions and reviews, including the lower-case, space-tokenised fragments of review
corpora ("a warm , funny and often moving film ."), plain facts and news, questions,
negations, instructions, and short dialogue lines, over a lexicon of a few hundred
words (in ``tnlm/textgen/words/grammar.json``). Everything here (frames and words) was
written for tnlm: no corpus, no licence.

Deterministic for a seed. ``generate(n, seed)`` returns ``n`` distinct sentences.
"""

from __future__ import annotations

import numbers
import random
from types import SimpleNamespace

from tnlm.textgen.captions import caption
from tnlm.textgen.lexicon import load_words

__all__ = ["generate"]

# the word lists (tnlm/textgen/words/grammar.json); a verb is (progressive, past,
# present 3rd person, base)
_W = SimpleNamespace(**load_words("grammar"))


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _scene(rng: random.Random) -> str:
    if rng.random() < 0.06:
        return f"There is no one {rng.choice(_W.verbs)[0]} {rng.choice(_W.where)}."
    plural = rng.random() < 0.3
    subj = rng.choice(_W.subj_plur if plural else _W.subj_sing)
    prog, past, pres, base = rng.choice(_W.verbs)
    k = rng.random()
    if k < 0.55:
        neg = rng.random() < 0.12
        aux = ("are" if plural else "is") + (" not" if neg else "")
        s = f"{subj} {aux} {prog}"
    elif k < 0.8:
        s = f"{subj} {past}"
    else:
        s = f"{subj} {base if plural else pres}"
    if rng.random() < 0.65:
        s += f" {rng.choice(_W.where)}"
    if rng.random() < 0.15:
        s += f" {rng.choice(_W.adv)}"
    if rng.random() < 0.12:
        other = rng.choice(_W.subj_sing + _W.subj_plur)
        s += f" while {other} {'watch' if other in _W.subj_plur else 'watches'}"
    return _cap(s) + "."


def _adjectives(rng: random.Random, positive: bool) -> str:
    pool = _W.adj_pos if positive else _W.adj_neg
    a = rng.sample(pool, rng.choice([1, 1, 2, 3]))
    if rng.random() < 0.4:
        a[0] = f"{rng.choice(_W.intens)} {a[0]}"
    if len(a) == 1:
        return a[0]
    return ", ".join(a[:-1]) + f" and {a[-1]}"


def _opinion(rng: random.Random) -> str:
    thing = rng.choice(_W.things)
    positive = rng.random() < 0.5
    k = rng.random()
    if k < 0.45:
        s = f"{thing} is {_adjectives(rng, positive)}"
    elif k < 0.7:
        s = f"{thing} {rng.choice(_W.opinion_verbs)}"
    elif k < 0.85:
        adj = _adjectives(rng, positive)
        s = f"{'an' if adj[0] in 'aeiou' else 'a'} {adj} {rng.choice(_W.kinds)}"
    else:
        s = f"{rng.choice(_W.sayings)} {thing} is {_adjectives(rng, positive)}"
    if rng.random() < 0.35:
        s += f" {rng.choice(_W.reasons)}"
    if rng.random() < 0.35:  # the lower-case, space-tokenised style of review corpora
        s = s.lower().replace(",", " ,").replace("'s", " 's")
        return s + rng.choice([" .", "", " !"])
    return _cap(s) + rng.choice([".", ".", "!"])


def _fact(rng: random.Random) -> str:
    s = rng.choice(_W.facts)
    k = rng.random()
    if k < 0.2:
        s = f"{rng.choice(_W.sayings)} {s}"
    elif k < 0.35:
        s += f", {rng.choice(_W.reasons)}"
    return _cap(s) + "."


def generate(n: int = 4000, seed: int = 0) -> list[str]:
    """``n`` distinct sentences (fewer only if the grammar runs out), shuffled by ``seed``.

    Mix: 25 % scene descriptions, 25 % scene captions
    (:func:`tnlm.textgen.captions.caption`: a larger, compositional lexicon and more
    constructions), 30 % opinions and reviews, 12 % facts and news, 8 % questions,
    instructions and reported speech.

    Raises:
        ValueError: ``n`` not an int >= 0 or ``seed`` not an int (a bool is neither).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0 (the number of sentences), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int (the same seed, the same sentences), "
                         f"got {seed!r}")
    n, seed = int(n), int(seed)
    rng = random.Random(seed)
    out: dict[str, None] = {}
    limit = n * 30
    while len(out) < n and limit:
        limit -= 1
        k = rng.random()
        if k < 0.25:
            s = _scene(rng)
        elif k < 0.5:
            s = caption(rng)
        elif k < 0.8:
            s = _opinion(rng)
        elif k < 0.92:
            s = _fact(rng)
        elif k < 0.96:
            s = rng.choice(_W.questions)
        else:
            s = rng.choice(_W.commands) + rng.choice([".", "!", ", please."])
        out[s] = None
    return list(out)
