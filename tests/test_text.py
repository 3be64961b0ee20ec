"""The shipped natural-prose sentences and the default text built from them."""

import re

import pytest

from tnlm.compress.text import (
    LM_HELD_OUT,
    default_text,
    generated_sentences,
    lm_held_out,
    lm_sentences,
)


def test_the_shipped_sentences_are_plain_distinct_sentences():
    text = lm_sentences() + lm_held_out()
    assert len(lm_held_out()) == LM_HELD_OUT
    assert len(lm_sentences()) >= 4000
    assert len(set(text)) == len(text)
    for s in text:
        words = s.split()
        assert 5 <= len(words) <= 40, s
        assert s[0].isupper() and s[-1] in ".!?", s
        assert s.isascii() and s.isprintable(), s
        assert not re.search(r"[#*|<>_\[\]{}=~`\\]|https?:", s), s


def test_held_out_sentences_are_never_in_the_default_text():
    text = set(default_text(seed=1))
    assert not text & set(lm_held_out())
    assert set(lm_sentences()) <= text


def test_default_text_parts():
    without = default_text(seed=0, n_lm=0)
    assert without[:4000] == generated_sentences(4000, seed=0)
    assert not set(without) & set(lm_sentences())
    some = default_text(seed=0, n_lm=10)
    assert some == without + lm_sentences()[:10]
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="n_lm must be None"):
            default_text(n_lm=bad)
