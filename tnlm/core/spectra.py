"""Bond spectra: entanglement entropy, discarded-weight tails and the central bond.

A bond's spectrum ``s`` is the singular values of the matrix unfolded at that bond
(float64, descending), so ``Σ s² = ||W||_F²`` at every bond. Keeping the first r
values discards the weight ``tail_sums(s)[r] = Σ_{i >= r} s_i²`` (Eckart-Young for
that unfolding).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from tnlm.core.validation import all_finite, check_site_index

__all__ = ["central_bond", "spectrum_entropy", "tail_sums"]


def _one_spectrum(s: Any) -> np.ndarray:
    """``s`` as a float64 array of one bond's singular values: 1-D (a scalar counts as
    one value), else a ``ValueError`` (a 2-D array would be read as one long spectrum)."""
    try:
        w = np.asarray(s, dtype=np.float64)
    except ValueError as err:  # ragged, e.g. the spectra of several bonds
        raise ValueError(f"s must be a 1-D array of one bond's singular values: {err}") from err
    if w.ndim > 1:
        raise ValueError(f"s must be a 1-D array of one bond's singular values, got shape "
                         f"{w.shape}")
    return w


def spectrum_entropy(s: np.ndarray, alpha: float = 1.0) -> float:
    """Entropy of singular values ``s`` with ``p = s² / Σ s²`` (natural log).

    ``alpha == 1``: von Neumann, ``-Σ p ln p``; otherwise Rényi,
    ``ln(Σ p^α) / (1 - α)``; ``alpha == inf``: min-entropy ``-ln max p``.

    Raises:
        TypeError: ``alpha`` is not a real number (``bool`` included).
        ValueError: ``alpha`` is not > 0 (NaN included), ``s`` is not 1-D (e.g. the list
            of every bond's spectrum: one bond at a time), or ``s`` holds NaN or Inf.
    """
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number > 0, got {alpha!r}")
    alpha = float(alpha)
    if not alpha > 0 or math.isnan(alpha):
        raise ValueError(f"alpha must be > 0, got {alpha}")
    w = _one_spectrum(s)
    if not all_finite(w):
        raise ValueError("s (the singular values) holds NaN or infinite values")
    w = w**2
    total = w.sum()
    if total <= 0:
        return 0.0
    p = w[w > 0] / total
    if alpha == 1.0:
        return float(-(p * np.log(p)).sum())
    if math.isinf(alpha):
        return float(-np.log(p.max()))
    return float(np.log((p**alpha).sum()) / (1.0 - alpha))


def tail_sums(s: np.ndarray) -> np.ndarray:
    """Discarded weight per kept count: ``tail[r] = Σ_{i >= r} s_i²`` for r = 0..len(s).

    Float64, length ``len(s) + 1``, non-increasing; ``tail[0]`` is the total weight
    and ``tail[len(s)] == 0``. Summed from the smallest value up. ``ValueError`` unless
    ``s`` is 1-D (one bond's spectrum).
    """
    w = _one_spectrum(s).reshape(-1) ** 2
    return np.append(np.cumsum(w[::-1])[::-1], 0.0)


def central_bond(bond_dims: Sequence[int], central_index: int) -> int:
    """The bond used as "the central bond": of the (one or two) bonds touching the
    central tensor (site ``central_index``), the one with the larger bond dimension,
    the left one (``central_index - 1``) on a tie.

    With the paper's site shapes (large factors in the middle, the larger ones right
    of it) this is the most entangled cut of the chain, e.g. bond 2 of a 5-site
    768 x 768 MPO with bond dims (9, 144, 256, 16).

    Raises:
        TypeError: ``central_index`` is not an int (``bool`` and floats included).
        ValueError: for a single-site chain (no bonds), or ``central_index`` not a site
            of the chain (``range(len(bond_dims) + 1)``; negative indices count from
            the end).
    """
    dims = tuple(bond_dims)
    if not dims:
        raise ValueError("the chain has a single site and no bonds")
    c = check_site_index(central_index, len(dims) + 1, "central_index")
    candidates = [k for k in (c - 1, c) if 0 <= k < len(dims)]
    return max(candidates, key=lambda k: (dims[k], -k))
