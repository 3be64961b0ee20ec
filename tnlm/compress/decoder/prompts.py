"""Chat prompts for a model to answer: the instructions behind tnlm's self-written text.

A prompt is a kind of text (a description, an opinion, a story, an explanation, a review,
a news report, ...; :data:`KINDS`) about an everyday topic (:data:`TOPICS`, 184 of them).
:func:`chat_prompts` draws them with a seed. The shipped prose
(:func:`tnlm.compress.text.lm_sentences`) is SmolLM2-135M-Instruct's answers to such
prompts, and a causal LM's chat text (``self_generated_text(chat=True)``) is a model's
own answers to them. :data:`HELD_OUT_TOPICS` are named by no prompt of :data:`TOPICS`:
the held-out prose (:func:`tnlm.compress.text.lm_held_out`) is about them only.

None of the prompts asks a question of the kind of
:func:`tnlm.compress.decoder.quality.simple_questions` (facts to recall): those stay held
out.
"""

from __future__ import annotations

import random

__all__ = ["TOPICS", "HELD_OUT_TOPICS", "KINDS", "topics", "chat_prompts"]

TOPICS = """
a family dinner; a rainy afternoon; a city park; a mountain hike; a beach holiday; a train
journey; an airport; a small village; a busy market; a football match; a tennis game; a
swimming pool; a birthday party; a wedding; a school classroom; a university lecture; a
job interview; an office meeting; a hospital visit; a dentist; a restaurant meal; a coffee
shop; baking bread; cooking pasta; a vegetable garden; a farm; horses; dogs; cats; birds in
winter; the ocean; a river; a forest fire; a snowstorm; a summer heat wave; the night sky;
the moon; planets; electricity; computers; smartphones; the internet; video games; a new
movie; an old film; a comedy; a horror film; a documentary; a television series; a novel;
a poetry reading; a museum; a painting; a concert; jazz music; a rock band; learning the
piano; a dance class; a theatre play; a library; a bookshop; a newspaper; elections; a city
council; taxes; a bank; saving money; shopping for clothes; a car repair; riding a bicycle;
public transport; traffic; building a house; moving to a new flat; neighbours; friendship;
an argument; an apology; a first date; grandparents; children playing; a baby; a teenager;
growing old; health and exercise; a cold; sleep; dreams; breakfast; fruit; chocolate; tea;
a picnic; camping; fishing; a lake; an island; a desert; a volcano; earthquakes; climate;
recycling; a factory; a scientist; a doctor; a nurse; a teacher; a police officer; a
firefighter; a pilot; a chef; an artist; a musician; a writer; a farmer; a shop owner; a
programmer; mathematics; history; ancient Rome; the Middle Ages; a castle; a king; a war;
peace; a festival; a holiday tradition; a religious ceremony; a foreign language; a
translation; a letter; an email; a phone call; a lost wallet; a stolen bike; a surprise; a
mistake; a success; a failure; a competition; a prize; a hobby; photography; knitting;
woodwork; a chess game; a puzzle; a magic trick; a circus; a zoo; wild animals; insects;
flowers; trees; autumn leaves; spring; a storm at sea; a lighthouse; a ship; a space
rocket; a robot; medicine; a pharmacy; a supermarket; a kitchen; a bathroom; cleaning the
house; laundry; a broken window; a leaking roof; a noisy street; a quiet evening; a long
walk; a marathon; a gym; yoga; a bad restaurant; a great holiday; a disappointing book; a
boring lecture; an exciting match; a funny story; a sad ending; a scary night
"""

#: topics of the held-out prose only (none of them is in TOPICS)
HELD_OUT_TOPICS = """
a bus strike; a garage sale; a thunderstorm at night; a science fair; a soup kitchen; an
old photograph; a tailor; a bakery at dawn; a lost cat; a village fete; a ferry crossing;
a power cut; a spelling contest; a bee keeper; a skating rink; a mountain cabin
"""

KINDS = [
    "Write a short description of {t}.",
    "Write a few sentences giving your opinion about {t}.",
    "Tell a very short story about {t}.",
    "Explain {t} to a child in a few sentences.",
    "Write a short review of {t}, good or bad.",
    "Write a few simple sentences about {t}.",
    "Describe what people do at {t}.",
    "Write a short news report about {t}.",
]


def topics(text: str = TOPICS) -> list[str]:
    """The topics of a ``;``-separated list (:data:`TOPICS`, :data:`HELD_OUT_TOPICS`)."""
    return [t.strip() for t in " ".join(text.split()).split(";") if t.strip()]


def chat_prompts(n: int, seed: int = 0, held_out: bool = False) -> list[str]:
    """``n`` prompts, each a random kind of :data:`KINDS` about a random topic of
    :data:`TOPICS` (``held_out``: of :data:`HELD_OUT_TOPICS`), drawn with ``random.Random(seed)``.

    Raises:
        ValueError: ``n`` is not an int >= 0.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    ts, out = topics(HELD_OUT_TOPICS if held_out else TOPICS), []
    while len(out) < n:
        out.append(rng.choice(KINDS).format(t=rng.choice(ts)))
    return out
