"""Scene captions from a compositional grammar, written for this project.

One sentence describes what someone or something is doing, and where: who (a number, a
describing word, a person or an animal, what they wear) x what (an action and its object)
x where, said in one of several English constructions -- active ("A young man is slicing
an onion."), passive ("An onion is being sliced by a young man."), negated ("There is no
woman riding a horse.", "Nobody is playing the piano."), existential ("There are two dogs
running through the snow."), coordinated ("A girl is singing and a boy is playing the
guitar."), or a position ("Three children are sitting on a bench."). Words and frames
were written for tnlm: no corpus, no licence. Used by :mod:`tnlm.compress.grammar`.
"""

from __future__ import annotations

import random

__all__ = ["caption"]

# person nouns: (singular, plural)
_PEOPLE = [
    ("man", "men"), ("woman", "women"), ("boy", "boys"), ("girl", "girls"),
    ("child", "children"), ("person", "people"), ("lady", "ladies"), ("kid", "kids"),
    ("teenager", "teenagers"), ("player", "players"), ("cyclist", "cyclists"),
    ("skier", "skiers"), ("swimmer", "swimmers"), ("dancer", "dancers"),
    ("cook", "cooks"), ("student", "students"), ("soldier", "soldiers"),
    ("musician", "musicians"), ("worker", "workers"), ("athlete", "athletes"),
    ("guy", "guys"), ("baby", "babies"), ("toddler", "toddlers"), ("rider", "riders"),
]
_ANIMALS = [
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("puppy", "puppies"),
    ("kitten", "kittens"), ("bird", "birds"), ("monkey", "monkeys"), ("cow", "cows"),
    ("sheep", "sheep"), ("duck", "ducks"), ("rabbit", "rabbits"), ("goat", "goats"),
]
_PERSON_ADJ = ["young", "old", "little", "tall", "short", "smiling", "bearded", "blond",
               "dark-haired", "elderly", "small", "happy", "sad", "pretty", "skinny", "strong"]
_ANIMAL_ADJ = ["brown", "black", "white", "big", "small", "wet", "spotted", "fluffy", "grey",
               "playful", "tan", "shaggy"]
_COLOURS = ["red", "blue", "green", "black", "white", "yellow", "orange", "pink", "purple",
            "grey", "striped"]
_CLOTHES = ["shirt", "jacket", "dress", "hat", "helmet", "coat", "sweater", "uniform",
            "cap", "swimsuit", "skirt", "scarf"]

# objects by kind
_OBJ = {
    "food": ["an onion", "a tomato", "a potato", "a carrot", "a cucumber", "some bread",
             "some meat", "a lemon", "an apple", "some cheese", "a fish", "some garlic",
             "a pepper", "a banana"],
    "music": ["a guitar", "the piano", "a flute", "the drums", "a violin", "a trumpet",
              "a keyboard", "a harp"],
    "ball": ["a ball", "a football", "a tennis ball", "a basketball", "a frisbee",
             "a stick", "a toy"],
    "ride": ["a bike", "a horse", "a motorcycle", "a skateboard", "a scooter", "a wave",
             "an elephant", "a camel"],
    "read": ["a book", "a newspaper", "a letter", "a magazine", "a map", "a menu"],
    "write": ["a letter", "a note", "a story", "a list", "a name", "a poem"],
    "water": ["the river", "a pool", "the lake", "the sea", "a fountain", "the water"],
}
# (progressive, past participle, object kind or None); present/past built from these
_ACTIONS = [
    ("slicing", "sliced", "food"), ("cutting", "cut", "food"), ("peeling", "peeled", "food"),
    ("cooking", "cooked", "food"), ("eating", "eaten", "food"), ("washing", "washed", "food"),
    ("chopping", "chopped", "food"), ("frying", "fried", "food"),
    ("playing", "played", "music"), ("tuning", "tuned", "music"),
    ("carrying", "carried", "music"),
    ("throwing", "thrown", "ball"), ("catching", "caught", "ball"), ("kicking", "kicked", "ball"),
    ("chasing", "chased", "ball"), ("holding", "held", "ball"), ("hitting", "hit", "ball"),
    ("riding", "ridden", "ride"), ("pushing", "pushed", "ride"),
    ("reading", "read", "read"), ("folding", "folded", "read"), ("writing", "written", "write"),
]
# intransitive movements and the paths they take
_MOVES = ["running", "walking", "jumping", "swimming", "climbing", "crawling", "racing",
          "dancing", "rolling", "sliding", "skating", "hopping", "diving", "wandering"]
_PATHS = ["through the grass", "across the field", "down the street", "into the water",
          "over a fence", "along the shore", "through the snow", "up the stairs",
          "around the yard", "down a hill", "across the room", "through a tunnel",
          "into a pool", "on the sand", "in the mud", "through the woods"]
_POSITIONS = ["sitting", "standing", "lying", "waiting", "resting", "kneeling", "sleeping"]
_SPOTS = ["on a bench", "on the grass", "in the water", "near a tree", "on a rock",
          "by the window", "on the floor", "in the sand", "on a couch", "under an umbrella",
          "in front of a door", "on the steps", "next to a car", "at a table", "on a wall",
          "in a field", "on the beach", "in a boat", "on a stage", "in the shade"]
_PLACES = ["in the kitchen", "in the park", "on the street", "at the beach", "in a field",
           "on a stage", "in the snow", "in the yard", "at a market", "in a gym",
           "outdoors", "indoors", "in a room", "by the road", "in the forest", "at the zoo"]
_NUMBERS = [("two", 2), ("three", 3), ("four", 4), ("some", 3), ("several", 3),
            ("a few", 3), ("a group of", 5), ("many", 5)]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _who(rng: random.Random, plural: bool, animals: bool = False,
         definite: bool = True) -> tuple[str, str]:
    """(noun phrase, singular noun): e.g. ('two tall men in a red shirt', 'man')."""
    sing, plur = rng.choice(_ANIMALS if animals else _PEOPLE)
    noun = plur if plural else sing
    head = noun
    if rng.random() < 0.45:
        head = f"{rng.choice(_ANIMAL_ADJ if animals else _PERSON_ADJ)} {noun}"
    if plural:
        phrase = f"{rng.choice(_NUMBERS)[0]} {head}"
    else:
        phrase = _a(head) if not definite or rng.random() < 0.8 else f"the {head}"
    if not animals and rng.random() < 0.25:
        wear = f"{rng.choice(_COLOURS)} {rng.choice(_CLOTHES)}"
        phrase += rng.choice([f" in {_a(wear)}", f" wearing {_a(wear)}"])
    return phrase, sing


def _doing(rng: random.Random, animals: bool) -> tuple[str, str, str | None]:
    """(progressive phrase, past participle, object) of one action."""
    if animals or rng.random() < 0.3:
        if rng.random() < 0.5:
            return f"{rng.choice(_MOVES)} {rng.choice(_PATHS)}", "", None
        return f"{rng.choice(_POSITIONS)} {rng.choice(_SPOTS)}", "", None
    prog, pp, kind = rng.choice(_ACTIONS)
    obj = rng.choice(_OBJ[kind])
    return f"{prog} {obj}", pp, obj


def caption(rng: random.Random) -> str:
    """One scene caption (see the module docstring), capitalised, ending in '.'."""
    animals = rng.random() < 0.2
    plural = rng.random() < 0.3
    k = rng.random()
    who, noun = _who(rng, plural, animals, definite=not 0.28 <= k < 0.4)
    act, pp, obj = _doing(rng, animals)
    be = "are" if plural else "is"
    where = f" {rng.choice(_PLACES)}" if obj and rng.random() < 0.4 else ""
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

