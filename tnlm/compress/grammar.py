"""Everyday English from a small probabilistic grammar, written for this project.

The main job needs unlabeled text on a machine with no data and no network. This module
generates it: scene descriptions ("Two children are playing with a ball in the park."),
scene captions from a larger compositional lexicon (:mod:`tnlm.compress.captions`),
opinions and reviews, including the lower-case, space-tokenised fragments of review
corpora ("a warm , funny and often moving film ."), plain facts and news, questions,
negations, instructions, and short dialogue lines, over a lexicon of a few hundred
words. Everything here (frames and words) was written for tnlm: no corpus, no licence.

Deterministic for a seed. ``generate(n, seed)`` returns ``n`` distinct sentences.
"""

from __future__ import annotations

import random

from tnlm.compress.captions import caption

__all__ = ["generate"]

_SUBJ_SING = [
    "a man", "a woman", "the boy", "the girl", "a child", "an old man", "an old woman",
    "a young man", "a young woman", "the teacher", "my friend", "the doctor", "a dog",
    "the cat", "a chef", "a musician", "the driver", "our neighbour", "a student", "the nurse",
    "a farmer", "the pilot", "a tourist", "the waiter", "a police officer", "the baby",
    "a little girl", "a tall man", "the photographer", "a cyclist", "the manager",
    "my brother", "her sister", "his father", "the old lady", "a horse", "a bird", "the puppy",
    "a kitten", "the goalkeeper", "a surfer", "a hiker", "the singer", "a boy in a red shirt",
    "a woman in a blue dress", "a man with a hat", "the girl with long hair", "a worker",
]
_SUBJ_PLUR = [
    "two men", "three kids", "a group of people", "the players", "two women", "some children",
    "the students", "a few friends", "two dogs", "several tourists", "the workers",
    "a couple", "the boys", "four girls", "a crowd of fans", "the musicians", "two cyclists",
    "some teenagers", "the soldiers", "a family",
]
# (progressive, past, present 3rd person, base)
_VERBS = [
    ("playing a guitar", "played a guitar", "plays a guitar", "play a guitar"),
    ("riding a bike", "rode a bike", "rides a bike", "ride a bike"),
    ("cutting an onion", "cut an onion", "cuts an onion", "cut an onion"),
    ("reading a book", "read a book", "reads a book", "read a book"),
    ("walking along the beach", "walked along the beach", "walks along the beach",
     "walk along the beach"),
    ("cooking dinner", "cooked dinner", "cooks dinner", "cook dinner"),
    ("running", "ran", "runs", "run"),
    ("talking on the phone", "talked on the phone", "talks on the phone", "talk on the phone"),
    ("swimming", "swam", "swims", "swim"),
    ("climbing a rock", "climbed a rock", "climbs a rock", "climb a rock"),
    ("playing football", "played football", "plays football", "play football"),
    ("painting a picture", "painted a picture", "paints a picture", "paint a picture"),
    ("sleeping", "slept", "sleeps", "sleep"),
    ("singing a song", "sang a song", "sings a song", "sing a song"),
    ("eating a sandwich", "ate a sandwich", "eats a sandwich", "eat a sandwich"),
    ("jumping over a fence", "jumped over a fence", "jumps over a fence", "jump over a fence"),
    ("writing a letter", "wrote a letter", "writes a letter", "write a letter"),
    ("dancing", "danced", "dances", "dance"),
    ("washing the car", "washed the car", "washes the car", "wash the car"),
    ("slicing a tomato", "sliced a tomato", "slices a tomato", "slice a tomato"),
    ("sitting on a bench", "sat on a bench", "sits on a bench", "sit on a bench"),
    ("looking at the mountains", "looked at the mountains", "looks at the mountains",
     "look at the mountains"),
    ("throwing a ball", "threw a ball", "throws a ball", "throw a ball"),
    ("catching a frisbee", "caught a frisbee", "catches a frisbee", "catch a frisbee"),
    ("drinking coffee", "drank coffee", "drinks coffee", "drink coffee"),
    ("peeling a potato", "peeled a potato", "peels a potato", "peel a potato"),
    ("playing the piano", "played the piano", "plays the piano", "play the piano"),
    ("fixing a bicycle", "fixed a bicycle", "fixes a bicycle", "fix a bicycle"),
    ("carrying a heavy box", "carried a heavy box", "carries a heavy box",
     "carry a heavy box"),
    ("waiting for the bus", "waited for the bus", "waits for the bus", "wait for the bus"),
    ("crossing the street", "crossed the street", "crosses the street", "cross the street"),
    ("feeding the ducks", "fed the ducks", "feeds the ducks", "feed the ducks"),
    ("laughing", "laughed", "laughs", "laugh"),
    ("watching television", "watched television", "watches television", "watch television"),
    ("typing on a laptop", "typed on a laptop", "types on a laptop", "type on a laptop"),
    ("skiing down a slope", "skied down a slope", "skis down a slope", "ski down a slope"),
    ("riding a horse", "rode a horse", "rides a horse", "ride a horse"),
    ("playing with a ball", "played with a ball", "plays with a ball", "play with a ball"),
    ("building a sandcastle", "built a sandcastle", "builds a sandcastle",
     "build a sandcastle"),
    ("cleaning the kitchen", "cleaned the kitchen", "cleans the kitchen", "clean the kitchen"),
    ("mixing eggs in a bowl", "mixed eggs in a bowl", "mixes eggs in a bowl",
     "mix eggs in a bowl"),
    ("brushing a dog", "brushed a dog", "brushes a dog", "brush a dog"),
    ("taking a photo", "took a photo", "takes a photo", "take a photo"),
    ("driving a truck", "drove a truck", "drives a truck", "drive a truck"),
    ("opening a window", "opened a window", "opens a window", "open a window"),
    ("playing chess", "played chess", "plays chess", "play chess"),
    ("planting a tree", "planted a tree", "plants a tree", "plant a tree"),
    ("shouting at the referee", "shouted at the referee", "shouts at the referee",
     "shout at the referee"),
]
_WHERE = [
    "in the kitchen", "near the river", "at the station", "on a sunny day", "in the rain",
    "outside the house", "in a crowded street", "at night", "in front of a building",
    "under a tree", "on the grass", "in the snow", "in the park", "on the beach",
    "in a small room", "at the market", "on the stage", "in the garden", "by the lake",
    "on a busy road", "in an empty field", "at the airport", "in the classroom",
    "on the roof", "in a restaurant", "at the top of a hill", "in the woods",
    "next to a fountain", "behind the school", "in the office",
]
_ADV = ["slowly", "quickly", "happily", "carefully", "quietly", "loudly", "alone", "together",
        "again", "for hours"]
_THINGS = [
    "the movie", "this film", "the story", "the acting", "the music", "the plot", "the ending",
    "the dialogue", "the book", "the food", "the service", "the hotel", "the game",
    "the concert", "the show", "the new phone", "the soundtrack", "the director's new film",
    "the cast", "the script", "the first half", "the sequel", "this comedy", "the documentary",
    "the restaurant", "the album", "the novel", "the performance", "the camera work",
    "the price", "the room", "the lead actor", "the animation", "the season finale",
]
_ADJ_POS = ["wonderful", "funny", "warm", "charming", "smart", "moving", "beautiful", "clever",
            "gripping", "delightful", "honest", "fresh", "touching", "brilliant", "lovely",
            "thoughtful", "witty", "memorable", "solid", "gorgeous", "tender", "sharp"]
_ADJ_NEG = ["dull", "slow", "clumsy", "boring", "predictable", "forgettable", "empty", "messy",
            "tedious", "shallow", "loud", "confusing", "flat", "lazy", "bland", "awkward",
            "pointless", "tiresome", "overlong", "silly", "stale", "cheap"]
_KINDS = ["film", "movie", "story", "comedy", "drama", "thriller", "book", "show"]
_INTENS = ["very", "really", "quite", "surprisingly", "rather", "painfully", "truly", "too",
           "often", "never", "always", "almost"]
_OPINION_VERBS = [
    "never finds its rhythm", "falls flat", "is worth every minute", "surprised me",
    "is a mess", "works from start to finish", "drags in the middle", "kept me smiling",
    "wastes a good cast", "feels like a chore", "earns its ending", "is hard to forget",
    "loses its way", "is a real pleasure", "tries too hard", "never quite comes together",
    "holds your attention", "made me cry", "left me cold", "is over far too soon",
]
_REASONS = [
    "because the characters are so vivid", "although the middle drags",
    "but the jokes do not land", "and the cast is excellent", "even if it is predictable",
    "since nothing really happens", "and I would see it again", "though the script is weak",
    "because it takes its time", "but the music saves it", "and the ending is perfect",
    "even though the story is thin", "while the pacing is uneven",
]
_FACTS = [
    "the meeting was moved to Thursday afternoon", "prices rose sharply last year",
    "the train leaves every twenty minutes", "water boils at a lower temperature up high",
    "the museum is closed on Mondays", "she finished the report before lunch",
    "the road was blocked after the storm", "most birds fly south in the winter",
    "he forgot his keys at the office", "the team won the final by two goals",
    "the library opens at nine", "the bridge was built in the last century",
    "the bakery sells fresh bread every morning", "the river floods almost every spring",
    "the company hired fifty new workers", "the concert was cancelled because of the rain",
    "the city plans to build a new school", "the shop on the corner closed last month",
    "the children planted trees along the road", "the flight was delayed by three hours",
    "the price of fuel fell again this week", "the town council approved the budget",
    "a new species of frog was found in the forest", "the hospital opened a new wing",
    "the election results will be announced tonight", "the park will reopen next summer",
]
_QUESTIONS = [
    "Where did you leave the keys?", "What time does the film start?",
    "Have you ever been to the coast?", "Why is the door open?",
    "Can you help me with this box?", "Who is playing the guitar?",
    "Is the museum open today?", "How long does the train take?",
    "Did the children enjoy the show?", "What is the man holding?",
    "Would you like some coffee?", "Which road goes to the station?",
]
_COMMANDS = [
    "Turn left at the second light", "Put the bread in the oven for ten minutes",
    "Close the window before you leave", "Add a pinch of salt to the soup",
    "Call me when you arrive", "Keep the receipt in a safe place",
    "Read the instructions before starting", "Water the plants twice a week",
    "Bring an umbrella tomorrow", "Wash your hands before dinner",
]
_SAYINGS = [
    "I think", "She said that", "Everyone agrees that", "It seems that", "They told us that",
    "I am not sure that", "He believes that", "We heard that", "Nobody expected that",
]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _scene(rng: random.Random) -> str:
    if rng.random() < 0.06:
        return f"There is no one {rng.choice(_VERBS)[0]} {rng.choice(_WHERE)}."
    plural = rng.random() < 0.3
    subj = rng.choice(_SUBJ_PLUR if plural else _SUBJ_SING)
    prog, past, pres, base = rng.choice(_VERBS)
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
        s += f" {rng.choice(_WHERE)}"
    if rng.random() < 0.15:
        s += f" {rng.choice(_ADV)}"
    if rng.random() < 0.12:
        other = rng.choice(_SUBJ_SING + _SUBJ_PLUR)
        s += f" while {other} {'watch' if other in _SUBJ_PLUR else 'watches'}"
    return _cap(s) + "."


def _adjectives(rng: random.Random, positive: bool) -> str:
    pool = _ADJ_POS if positive else _ADJ_NEG
    a = rng.sample(pool, rng.choice([1, 1, 2, 3]))
    if rng.random() < 0.4:
        a[0] = f"{rng.choice(_INTENS)} {a[0]}"
    if len(a) == 1:
        return a[0]
    return ", ".join(a[:-1]) + f" and {a[-1]}"


def _opinion(rng: random.Random) -> str:
    thing = rng.choice(_THINGS)
    positive = rng.random() < 0.5
    k = rng.random()
    if k < 0.45:
        s = f"{thing} is {_adjectives(rng, positive)}"
    elif k < 0.7:
        s = f"{thing} {rng.choice(_OPINION_VERBS)}"
    elif k < 0.85:
        adj = _adjectives(rng, positive)
        s = f"{'an' if adj[0] in 'aeiou' else 'a'} {adj} {rng.choice(_KINDS)}"
    else:
        s = f"{rng.choice(_SAYINGS)} {thing} is {_adjectives(rng, positive)}"
    if rng.random() < 0.35:
        s += f" {rng.choice(_REASONS)}"
    if rng.random() < 0.35:  # the lower-case, space-tokenised style of review corpora
        s = s.lower().replace(",", " ,").replace("'s", " 's")
        return s + rng.choice([" .", "", " !"])
    return _cap(s) + rng.choice([".", ".", "!"])


def _fact(rng: random.Random) -> str:
    s = rng.choice(_FACTS)
    k = rng.random()
    if k < 0.2:
        s = f"{rng.choice(_SAYINGS)} {s}"
    elif k < 0.35:
        s += f", {rng.choice(_REASONS)}"
    return _cap(s) + "."


def generate(n: int = 4000, seed: int = 0) -> list[str]:
    """``n`` distinct sentences (fewer only if the grammar runs out), shuffled by ``seed``.

    Mix: 25 % scene descriptions, 25 % scene captions
    (:func:`tnlm.compress.captions.caption`: a larger, compositional lexicon and more
    constructions), 30 % opinions and reviews, 12 % facts and news, 8 % questions,
    instructions and reported speech."""
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
            s = rng.choice(_QUESTIONS)
        else:
            s = rng.choice(_COMMANDS) + rng.choice([".", "!", ", please."])
        out[s] = None
    return list(out)
