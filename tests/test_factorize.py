from math import prod

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tnlm import factorize, padded_dim
from tnlm.core.factorize import arrange_central


@pytest.mark.parametrize(
    "dim, expected",
    [
        (768, (3, 4, 4, 4, 4)),
        (1024, (4, 4, 4, 4, 4)),
        (3072, (4, 4, 8, 6, 4)),
        (4096, (4, 4, 8, 8, 4)),
        (384, (2, 4, 4, 4, 3)),
        (1536, (4, 4, 6, 4, 4)),
    ],
)
def test_paper_table(dim, expected):
    assert factorize(dim, 5) == expected


def test_central_site_gets_largest_factor():
    assert arrange_central([4, 4, 4, 6, 8]) == (4, 4, 8, 6, 4)
    assert arrange_central([2, 3, 5, 7]) == (3, 7, 5, 2)


def test_vocab_rejected_with_hint_and_padded():
    with pytest.raises(ValueError, match=r"vocab=30522 .*5087.*pad=True.*30720"):
        factorize(30522, 5, name="vocab")
    assert padded_dim(30522, 5) == 30720
    assert prod(factorize(30720, 5)) == 30720


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_dim(bad):
    with pytest.raises((ValueError, TypeError), match="dim"):
        factorize(bad, 3)


def test_numpy_ints_accepted():
    import numpy as np

    assert factorize(np.int64(768), np.int64(5)) == (3, 4, 4, 4, 4)


def test_bad_n_sites():
    with pytest.raises(ValueError, match="n_sites"):
        factorize(64, 0)
    with pytest.raises(ValueError, match="sites"):
        factorize(8, 4)  # 2*2*2 has only three prime factors


@given(st.integers(1, 6), st.lists(st.sampled_from([2, 3, 4, 5]), min_size=6, max_size=10))
def test_factorize_product_and_order(n, factors):
    dim = prod(factors)
    shape = factorize(dim, n)
    assert prod(shape) == dim and len(shape) == n and min(shape) >= 2
    c = (n - 1) // 2
    assert shape[c] == max(shape)
