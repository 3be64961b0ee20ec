"""Parameter counts of MPOs with capped bonds, and the cap that meets a budget.

Without truncation bond k is bounded by the rank bound
``min(prod_{s<=k} i_s j_s, prod_{s>k} i_s j_s)``; with ``max_bond = chi`` it is
``min(rank bound, chi)``. These counts need no decomposition.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

__all__ = ["bond_bounds", "params_for_bonds", "mpo_params", "max_bond_for_params"]


def bond_bounds(in_shape: Sequence[int], out_shape: Sequence[int],
                max_bond: int | None = None) -> list[int]:
    """The n-1 internal bond dimensions of a generic matrix's MPO (capped at ``max_bond``)."""
    if len(in_shape) != len(out_shape):
        raise ValueError(f"in_shape {tuple(in_shape)} and out_shape {tuple(out_shape)} must have "
                         "the same number of sites")
    site = [i * j for i, j in zip(in_shape, out_shape)]
    n = len(site)
    cap = max_bond if max_bond is not None else float("inf")
    return [int(min(prod(site[: k + 1]), prod(site[k + 1:]), cap)) for k in range(n - 1)]


def params_for_bonds(bond_dims: Sequence[int], in_shape: Sequence[int],
                     out_shape: Sequence[int]) -> int:
    """Entries of an MPO with these n-1 bond dims and site shapes (n each)."""
    d = [1, *bond_dims, 1]
    return sum(d[k] * i * j * d[k + 1] for k, (i, j) in enumerate(zip(in_shape, out_shape)))


def mpo_params(in_shape: Sequence[int], out_shape: Sequence[int],
               max_bond: int | None = None) -> int:
    """Number of core entries of that MPO: Σ_k d_{k-1} i_k j_k d_k."""
    return params_for_bonds(bond_bounds(in_shape, out_shape, max_bond), in_shape, out_shape)


def max_bond_for_params(in_shape: Sequence[int], out_shape: Sequence[int], budget: int) -> int:
    """The largest uniform ``max_bond`` whose MPO has at most ``budget`` parameters.

    Raises:
        ValueError: if even ``max_bond=1`` exceeds the budget.
    """
    if mpo_params(in_shape, out_shape, 1) > budget:
        raise ValueError(f"budget {budget} is below the smallest MPO of these shapes "
                         f"({mpo_params(in_shape, out_shape, 1)} parameters at max_bond=1)")
    lo, hi = 1, max(bond_bounds(in_shape, out_shape) + [1])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mpo_params(in_shape, out_shape, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
