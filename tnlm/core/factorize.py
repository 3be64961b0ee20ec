"""Factorizing a matrix dimension into the local dimensions of MPO sites.

The paper's layout puts small factors at the ends of the chain and large ones
in the middle, so that the central tensor carries most parameters::

    factorize(768, 5)  -> (3, 4, 4, 4, 4)
    factorize(3072, 5) -> (4, 4, 8, 6, 4)
    factorize(4096, 5) -> (4, 4, 8, 8, 4)

A dimension without a balanced factorization (a large prime factor, such as
BERT's vocabulary 30522 = 2 * 3 * 5087) is rejected; :func:`padded_dim` gives
the smallest dimension above it that factorizes well (30522 -> 30720).
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache

from tnlm.core.validation import MAX_SITES

__all__ = ["MAX_PAD_FACTOR", "factorize", "padded_dim", "max_padded_sites", "prime_factors",
           "arrange_central", "check_padding"]


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` with multiplicity, ascending."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def arrange_central(factors: list[int]) -> tuple[int, ...]:
    """Order factors with the largest in the middle, alternating right then left.

    ``[4, 4, 4, 6, 8] -> (4, 4, 8, 6, 4)``: the middle site gets the largest
    factor, its right neighbour the next, its left neighbour the next, ...
    """
    n = len(factors)
    out = [0] * n
    center = (n - 1) // 2 if n % 2 else n // 2 - 1
    positions = [center]
    for step in range(1, n):
        for pos in (center + step, center - step):
            if 0 <= pos < n and len(positions) < n:
                positions.append(pos)
    for pos, f in zip(positions, sorted(factors, reverse=True)):
        out[pos] = f
    return tuple(out)


@lru_cache(maxsize=4096)
def _balanced(dim: int, n_sites: int) -> tuple[int, ...] | None:
    """The multiset of ``n_sites`` factors (each >= 2) of ``dim`` with the least Σ log²f."""
    best: tuple[float, tuple[int, ...]] | None = None

    def search(rest: int, k: int, lo: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if k == 1:
            if rest >= lo:
                cand = acc + (rest,)
                score = sum(math.log(f) ** 2 for f in cand)
                if best is None or score < best[0] - 1e-12:
                    best = (score, cand)
            return
        f = lo
        while f**k <= rest:
            if rest % f == 0:
                search(rest // f, k - 1, f, acc + (f,))
            f += 1

    search(dim, n_sites, 2, ())
    return None if best is None else best[1]


def _max_factor(dim: int, n_sites: int) -> int:
    return max(8, 4 * math.ceil(dim ** (1.0 / n_sites)))


def factorize(dim: int, n_sites: int, *, name: str = "dim") -> tuple[int, ...]:
    """Balanced factorization of ``dim`` into ``n_sites`` factors, large ones in the middle.

    Among all factorizations into ``n_sites`` factors >= 2, the one minimising
    Σ_k log²(f_k) (the most even) is chosen and ordered by :func:`arrange_central`.

    Raises:
        ValueError: if ``dim`` has fewer than ``n_sites`` prime factors, or its
            balanced factorization needs a factor larger than
            ``max(8, 4 * ceil(dim ** (1 / n_sites)))`` (e.g. a large prime factor).
            The message names ``name`` and suggests :func:`padded_dim`.
    """
    n_sites = _check_n_sites(n_sites)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"{name} must be a positive int, got {dim!r}")
    dim = int(dim)
    if n_sites == 1:
        return (dim,)
    factors = _balanced(dim, n_sites)
    if factors is None or max(factors) > _max_factor(dim, n_sites):
        primes = "*".join(map(str, prime_factors(dim)))
        try:
            hint = f"or zero-pad it (pad=True) to {padded_dim(dim, n_sites, name=name)}"
        except ValueError:
            hint = f"or use fewer sites (at most {max_padded_sites(dim)} with pad=True)"
        raise ValueError(
            f"{name}={dim} (= {primes}) has no balanced factorization into {n_sites} sites; "
            f"pass an explicit shape, {hint}"
        )
    return arrange_central(list(factors))


def _check_n_sites(n_sites: object) -> int:
    if isinstance(n_sites, bool) or not isinstance(n_sites, numbers.Integral) or n_sites < 1:
        raise ValueError(f"n_sites must be a positive int, got {n_sites!r}")
    if n_sites > MAX_SITES:
        raise ValueError(f"n_sites must be at most {MAX_SITES}, got {n_sites}")
    return int(n_sites)


#: padding may multiply a dimension by at most this factor (more sites than a small
#: dimension has factors would otherwise pad it to 2**n_sites: mostly zeros, or no memory)
MAX_PAD_FACTOR = 16


def check_padding(shape: tuple[int, ...], dim: int, *, name: str = "in_shape",
                  dim_name: str = "I") -> None:
    """An explicit site shape may zero-pad ``dim`` by at most :data:`MAX_PAD_FACTOR`, as
    :func:`padded_dim` does: raise ``ValueError`` naming ``name``, its product and the
    limit otherwise (a shape of large factors on a small dimension would pad it to a
    matrix of mostly zeros, or one no memory holds)."""
    p = math.prod(shape)
    if p > MAX_PAD_FACTOR * dim:
        raise ValueError(f"{name}={tuple(shape)} has product {p}, more than {MAX_PAD_FACTOR}x "
                         f"{dim_name}={dim}: zero-padding may multiply a dimension by at most "
                         f"{MAX_PAD_FACTOR}; pass factors whose product is between {dim} and "
                         f"{MAX_PAD_FACTOR * dim}")


def max_padded_sites(dim: int) -> int:
    """The most sites :func:`padded_dim` accepts for ``dim``."""
    return max(1, min(MAX_SITES, int(math.floor(math.log2(MAX_PAD_FACTOR * dim)))))


def padded_dim(dim: int, n_sites: int, *, name: str = "dim") -> int:
    """Smallest ``d >= dim`` that :func:`factorize` accepts and whose primes are all <= 5.

    ``padded_dim(30522, 5) == 30720`` (= 2^11 * 3 * 5), the paper's padded vocabulary.

    Raises:
        ValueError: ``n_sites`` outside ``1..MAX_SITES`` (32), or so many sites that
            ``d`` would exceed ``MAX_PAD_FACTOR * dim`` (every site needs a factor >= 2).
    """
    n_sites = _check_n_sites(n_sites)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"{name} must be a positive int, got {dim!r}")
    dim = int(dim)
    if 2**n_sites > MAX_PAD_FACTOR * dim:
        raise ValueError(f"n_sites={n_sites} is too many for {name}={dim}: padding would need "
                         f"at least 2**{n_sites} = {2**n_sites} rows, more than "
                         f"{MAX_PAD_FACTOR}x {dim}; use at most {max_padded_sites(dim)} sites")
    d = max(dim, 2**n_sites)
    while True:
        if max(prime_factors(d)) <= 5:
            factors = _balanced(d, n_sites)
            if factors is not None and max(factors) <= _max_factor(d, n_sites):
                return d
        d += 1
