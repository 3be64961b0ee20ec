"""Scene captions from a compositional grammar, written for this project.

One sentence describes what someone or something is doing, and where: who (a number, a
describing word, a person or an animal, what they wear) x what (an action and its object)
x where, said in one of several English constructions -- active ("A young man is slicing
an onion."), passive ("An onion is being sliced by a young man."), negated ("There is no
woman riding a horse.", "Nobody is playing the piano."), existential ("There are two dogs
running through the snow."), coordinated ("A girl is singing and a boy is playing the
guitar."), or a position ("Three children are sitting on a bench."). Words and frames
were written for tnlm: no corpus, no licence. Used by :mod:`tnlm.textgen.grammar`.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from tnlm.textgen.lexicon import load_words

__all__ = ["caption"]

# the word lists (tnlm/textgen/words/captions.json): people and animals are (singular,
# plural); objects by kind; an action is (progressive, past participle, object kind);
# moves take paths, positions take spots; a number is (words, how many)
_W = SimpleNamespace(**load_words("captions"))


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _who(rng: random.Random, plural: bool, animals: bool = False,
         definite: bool = True) -> tuple[str, str]:
    """(noun phrase, singular noun): e.g. ('two tall men in a red shirt', 'man')."""
    sing, plur = rng.choice(_W.animals if animals else _W.people)
    noun = plur if plural else sing
    head = noun
    if rng.random() < 0.45:
        head = f"{rng.choice(_W.animal_adj if animals else _W.person_adj)} {noun}"
    if plural:
        phrase = f"{rng.choice(_W.numbers)[0]} {head}"
    else:
        phrase = _a(head) if not definite or rng.random() < 0.8 else f"the {head}"
    if not animals and rng.random() < 0.25:
        wear = f"{rng.choice(_W.colours)} {rng.choice(_W.clothes)}"
        phrase += rng.choice([f" in {_a(wear)}", f" wearing {_a(wear)}"])
    return phrase, sing


def _doing(rng: random.Random, animals: bool) -> tuple[str, str, str | None]:
    """(progressive phrase, past participle, object) of one action."""
    if animals or rng.random() < 0.3:
        if rng.random() < 0.5:
            return f"{rng.choice(_W.moves)} {rng.choice(_W.paths)}", "", None
        return f"{rng.choice(_W.positions)} {rng.choice(_W.spots)}", "", None
    prog, pp, kind = rng.choice(_W.actions)
    obj = rng.choice(_W.obj[kind])
    return f"{prog} {obj}", pp, obj


def caption(rng: random.Random) -> str:
    """One scene caption (see the module docstring), capitalised, ending in '.'."""
    animals = rng.random() < 0.2
    plural = rng.random() < 0.3
    k = rng.random()
    who, noun = _who(rng, plural, animals, definite=not 0.28 <= k < 0.4)
    act, pp, obj = _doing(rng, animals)
    be = "are" if plural else "is"
    where = f" {rng.choice(_W.places)}" if obj and rng.random() < 0.4 else ""
    if obj and k < 0.18:  # passive
        s = f"{obj} is being {pp} by {who}{where}"
    elif k < 0.28:  # negation
        form = rng.random()
        if form < 0.4:
            s = f"there is no {noun} {act}{where}"
        elif form < 0.7 and not animals:
            s = f"nobody is {act}{where}"
        else:
            s = f"{who} {be} not {act}{where}"
    elif k < 0.4:  # existential
        s = f"there {be} {who} {act}{where}"
    elif k < 0.52:  # coordination
        other, _ = _who(rng, False, rng.random() < 0.2)
        act2, _, _ = _doing(rng, False)
        s = f"{who} {be} {act} and {other} is {act2}"
    else:
        s = f"{who} {be} {act}{where}"
    return s[0].upper() + s[1:] + "."

