"""Generated everyday English: the unlabeled text tnlm ships instead of a corpus.

:func:`generate` (:mod:`tnlm.textgen.grammar`) writes scenes, scene captions
(:func:`caption`, :mod:`tnlm.textgen.captions`), opinions and reviews, facts, questions and
instructions from word lists kept as data in ``tnlm/textgen/words/`` (written for tnlm: no
corpus, no licence). :data:`TEXT_VERSION` names that text (:mod:`tnlm.textgen.lexicon`).
Deterministic for a seed; imports nothing else of tnlm.
"""

from tnlm.textgen.captions import caption
from tnlm.textgen.grammar import generate
from tnlm.textgen.lexicon import GENERATOR_VERSION, TEXT_VERSION

__all__ = ["GENERATOR_VERSION", "TEXT_VERSION", "caption", "generate"]
