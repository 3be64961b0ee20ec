"""The gauge of a low-rank bond fixed by pivoting: a rank-r matrix in ``r (I + J - r)`` numbers.

A 2-site MPO ``W = A B`` (``A``: I x r, site 0; ``B``: r x J, site 1; ``y = x @ W``) stores
``r (I + J)`` numbers, but the bond between the sites carries a gauge: ``A G`` and
``G⁻¹ B`` give the same W for every invertible r x r ``G``, so ``r²`` of those numbers are
redundant (the rank-r matrices form a manifold of dimension ``r (I + J - r)``). Fixing the
gauge so that r chosen rows of site 0 (the *pivots* p) are the identity removes them::

    W = A B = P [ I_r ] (A_p B)        x @ W = (x[p] + x[q] @ C) @ R
                [  C  ]
            C = A_q A_p⁻¹   (I - r) x r      R = A_p B   r x J

with q the other rows and P the permutation putting p first. The storage and the
multiply-adds per token are ``r (I + J - r)``, never more than the dense ``I J`` (equal at
``r = min(I, J)``): at a fixed budget of numbers the bond keeps a larger rank,
``r = ((I + J) - sqrt((I + J)² - 4 f I J)) / 2`` instead of ``f I J / (I + J)`` (at
``f = 0.6`` on a 576 x 576 matrix: 211 instead of 172; at ``f = 0.8``: 318 instead of 230).
The same storage is PIFA's (pivoting factorization of a low-rank layer).

The pivots are chosen on an orthonormal basis of W's column space by LU with partial
pivoting, so ``|C|`` stays small; the factors are computed in float64 and reproduce W to
float64 rounding times the pivot block's condition number (measured: relative error
< 1e-12 on random and trained layers, tests/test_pivot.py).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from tnlm.core.validation import check_positive_int

__all__ = ["PivotedFactors", "pivot_low_rank", "pivoted_params", "pivoted_rank_for_fraction"]


@dataclass
class PivotedFactors:
    """``x @ W = (x[..., pivots] + x[..., rest] @ coef) @ right`` (float64).

    Attributes:
        pivots: (r,) int64, sorted: the input rows whose gauge is the identity.
        rest: (I - r,) int64, sorted: the other input rows.
        coef: (I - r, r): ``A_q A_p⁻¹``.
        right: (r, J): ``A_p B``.
    """

    pivots: torch.Tensor
    rest: torch.Tensor
    coef: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.pivots.numel())

    @property
    def n_params(self) -> int:
        """Stored numbers: ``coef`` and ``right`` (the index vectors are not parameters)."""
        return self.coef.numel() + self.right.numel()

    def matrix(self) -> torch.Tensor:
        """W (I x J), rebuilt: rows p are ``right``, rows q are ``coef @ right``."""
        I = self.pivots.numel() + self.rest.numel()
        W = self.right.new_zeros(I, self.right.shape[1])
        W[self.pivots] = self.right
        W[self.rest] = self.coef @ self.right
        return W


def pivoted_params(in_dim: int, out_dim: int, rank: int) -> int:
    """Numbers a rank-``rank`` bond stores with its gauge fixed: ``r (I + J - r)``."""
    return rank * (in_dim + out_dim - rank)


def pivoted_rank_for_fraction(in_dim: int, out_dim: int, fraction: float) -> int:
    """The largest rank r >= 1 with ``r (I + J - r) <= fraction · I · J`` (at most
    ``min(I, J)``, where the count equals the dense ``I J``); rank 1 where even its count
    exceeds the fraction (callers check the model-wide budget, as
    :func:`tnlm.compress.allocate.smallest_fraction` does). ``ValueError`` for a
    ``fraction`` outside [0, 1] (NaN included); ``TypeError``/``ValueError`` unless
    ``in_dim`` and ``out_dim`` are ints >= 1."""
    in_dim = check_positive_int(in_dim, "in_dim")
    out_dim = check_positive_int(out_dim, "out_dim")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    s, budget = in_dim + out_dim, fraction * in_dim * out_dim
    disc = max(s * s - 4.0 * budget, 0.0)
    r = int(math.floor((s - math.sqrt(disc)) / 2))
    r = max(1, min(r, min(in_dim, out_dim)))
    while r > 1 and pivoted_params(in_dim, out_dim, r) > budget:  # float rounding
        r -= 1
    while r < min(in_dim, out_dim) and pivoted_params(in_dim, out_dim, r + 1) <= budget:
        r += 1
    return r


def _row_permutation(lu_pivots: torch.Tensor, n_rows: int) -> torch.Tensor:
    """LAPACK's row swaps (1-based, one per column) as a permutation of ``n_rows``."""
    perm = list(range(n_rows))
    for k, p in enumerate(lu_pivots.tolist()):
        p -= 1
        perm[k], perm[p] = perm[p], perm[k]
    return torch.tensor(perm, dtype=torch.int64)


def pivot_low_rank(left: torch.Tensor, right: torch.Tensor) -> PivotedFactors:
    """The gauge-fixed factors of ``W = left @ right`` (module docstring).

    Args:
        left: (I, r), site 0 (``A``).
        right: (r, J), site 1 (``B``).

    Returns:
        :class:`PivotedFactors` of rank ``r'``: r, or less when W's numerical rank is lower
        (singular values below ``s_max · max(I, J) · eps`` of float64 dropped; the product
        is unchanged and fewer numbers are stored). At least 1.

    Raises:
        ValueError: the shapes do not chain, or r exceeds ``min(I, J)``.
    """
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(f"left (I, r) and right (r, J) must chain, got {tuple(left.shape)} "
                         f"and {tuple(right.shape)}")
    I, r = (int(d) for d in left.shape)
    J = int(right.shape[1])
    if r > min(I, J):
        raise ValueError(f"rank {r} exceeds min(I, J) = {min(I, J)} for a {I}x{J} matrix")
    A = left.detach().to(torch.float64)
    B = right.detach().to(torch.float64)
    Qa, Ra = torch.linalg.qr(A)          # A = Qa Ra
    Qb, Rb = torch.linalg.qr(B.T)        # B = Rbᵀ Qbᵀ
    U, S, Vh = torch.linalg.svd(Ra @ Rb.T)
    tol = float(S[0]) * max(I, J) * torch.finfo(torch.float64).eps if S.numel() else 0.0
    k = max(1, int((tol < S).sum()))
    basis = Qa @ U[:, :k]                                  # I x k, orthonormal
    core = (S[:k, None] * Vh[:k]) @ Qb.T                   # k x J, W = basis @ core
    _, lu_piv = torch.linalg.lu_factor(basis)
    perm = _row_permutation(lu_piv, I)
    pivots, _ = torch.sort(perm[:k])
    rest, _ = torch.sort(perm[k:])
    Bp = basis[pivots]                                     # k x k, well conditioned
    coef = torch.linalg.solve(Bp.T, basis[rest].T).T       # basis_q Bp⁻¹
    return PivotedFactors(pivots, rest, coef, Bp @ core)
