"""Parameter budgets: counts of MPOs with capped bonds, and the bonds that meet a budget.

Counts without decomposing
--------------------------
Without truncation bond k is bounded by the rank bound
``min(prod_{s<=k} i_s j_s, prod_{s>k} i_s j_s)``; with ``max_bond = chi`` it is
``min(rank bound, chi)``. :func:`max_bond_for_params` and :func:`uniform_max_bond`
give the largest uniform cap within a budget.

Global bond allocation (:func:`allocate_bonds`)
-----------------------------------------------
Many MPOs under one parameter budget. Objective: minimise ``Σ_m ε_m²`` over
modules m, where ``ε_m`` is the estimated relative error of module m::

    ε_m² = Σ_k Σ_{i >= χ_{m,k}} s_{m,k,i}² / ||W_m||_F²

(s_{m,k} the cached spectrum of bond k, ``mpo.bond_spectra()``, of the matrix W_m
the MPO represents). ``ε_m`` is an upper bound of the true relative error of
``mpo.truncate(max_bond=χ_m)``: every truncation step of the canonical sweep
projects the matrix orthogonally, which can only shrink the later bonds'
spectra, so the true squared error ``Σ_k (discarded at bond k)²`` is at most the
sum of the original tails (Oseledets 2011, TT-SVD bound). It is tight when a
single bond is cut.

Greedy: start from the full bonds (``χ_{m,k} = len(s_{m,k})``) and repeatedly
apply the single cut (one bond of one module, by ``step`` values) that adds the
least ``Δε_m²`` per parameter saved, until the total parameter count is within the
budget. Parameters are counted exactly (:func:`params_for_bonds`,
``Σ_k χ_{k-1}·i_k·j_k·χ_k`` with ``χ_{-1} = χ_{n-1} = 1``); after a cut,
neighbouring bonds larger than their rank bound (``χ_k <= χ_{k-1}·i_k·j_k`` and
``χ_k <= i_{k+1}·j_{k+1}·χ_{k+1}``) are lowered to it, so the bond dims of
:meth:`Allocation.apply` are exactly the allocated ones.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import prod

import numpy as np

from tnlm.core.mpo import MPO
from tnlm.core.spectra import tail_sums
from tnlm.core.table import format_table
from tnlm.core.validation import check_number, check_positive_int, check_shape

__all__ = [
    "Allocation",
    "allocate_bonds",
    "bond_bounds",
    "check_fraction",
    "max_bond_for_params",
    "mpo_params",
    "params_for_bonds",
    "uniform_max_bond",
]


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float, checked to be a fraction in (0, 1] (a share of parameters kept):
    the one check of every budget fraction; ``name`` is the argument named in the errors.

    Raises:
        TypeError: ``value`` is not a real number (``bool`` included).
        ValueError: ``value`` is not finite or not in (0, 1].
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def _site_shapes(in_shape: Sequence[int], out_shape: Sequence[int]
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Both site shapes checked (:func:`check_shape`) and of equal length."""
    in_shape, out_shape = check_shape(in_shape, "in_shape"), check_shape(out_shape, "out_shape")
    if len(in_shape) != len(out_shape):
        raise ValueError(f"in_shape {in_shape} and out_shape {out_shape} must have the same "
                         "number of sites")
    return in_shape, out_shape


def bond_bounds(in_shape: Sequence[int], out_shape: Sequence[int],
                max_bond: int | None = None) -> list[int]:
    """The n-1 internal bond dimensions of a generic matrix's MPO (capped at ``max_bond``).

    Raises:
        TypeError, ValueError: site shapes that are not sequences of ints >= 1 or differ
            in length; ``max_bond`` not an int >= 1.
    """
    in_shape, out_shape = _site_shapes(in_shape, out_shape)
    site = [i * j for i, j in zip(in_shape, out_shape)]
    n = len(site)
    cap = check_positive_int(max_bond, "max_bond") if max_bond is not None else float("inf")
    return [int(min(prod(site[: k + 1]), prod(site[k + 1:]), cap)) for k in range(n - 1)]


def _count(bond_dims: Sequence[int], in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """:func:`params_for_bonds` without its checks (the greedy allocation's inner loop)."""
    d = [1, *bond_dims, 1]
    return sum(d[k] * i * j * d[k + 1] for k, (i, j) in enumerate(zip(in_shape, out_shape)))


def params_for_bonds(bond_dims: Sequence[int], in_shape: Sequence[int],
                     out_shape: Sequence[int]) -> int:
    """Entries of an MPO with these n-1 bond dims and site shapes (n each).

    Raises:
        TypeError, ValueError: site shapes that are not sequences of ints >= 1 or differ
            in length; ``bond_dims`` not exactly n-1 ints >= 1.
    """
    in_shape, out_shape = _site_shapes(in_shape, out_shape)
    if isinstance(bond_dims, (str, bytes)) or not isinstance(bond_dims, (Sequence, np.ndarray)):
        raise TypeError(f"bond_dims must be a sequence of ints, got {type(bond_dims).__name__}")
    if len(bond_dims) != len(in_shape) - 1:
        raise ValueError(f"bond_dims must have n_sites - 1 = {len(in_shape) - 1} entries for "
                         f"{len(in_shape)} sites, got {len(bond_dims)}")
    bonds = [check_positive_int(b, f"bond_dims[{k}]") for k, b in enumerate(bond_dims)]
    return _count(bonds, in_shape, out_shape)


def mpo_params(in_shape: Sequence[int], out_shape: Sequence[int],
               max_bond: int | None = None) -> int:
    """Number of core entries of that MPO: Σ_k d_{k-1} i_k j_k d_k."""
    return params_for_bonds(bond_bounds(in_shape, out_shape, max_bond), in_shape, out_shape)


def max_bond_for_params(in_shape: Sequence[int], out_shape: Sequence[int], budget: int) -> int:
    """The largest uniform ``max_bond`` whose MPO has at most ``budget`` parameters.

    Raises:
        TypeError: ``budget`` is not a number (``bool`` and strings included).
        ValueError: ``budget`` is NaN, infinite or negative, or even ``max_bond=1``
            exceeds it.
    """
    check_number(budget, "budget")
    in_shape, out_shape = _site_shapes(in_shape, out_shape)
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


def uniform_max_bond(in_shape: Sequence[int], out_shape: Sequence[int], fraction: float, *,
                     dense_params: int | None = None) -> int:
    """The largest uniform ``max_bond`` whose MPO keeps at most ``fraction`` of the dense size.

    The budget is ``int(fraction * dense_params)`` parameters, ``dense_params``
    defaulting to ``prod(in_shape) * prod(out_shape)``; pass the logical ``I * J``
    when the site shapes are zero-padded (e.g. a 30522 vocabulary).

    Raises:
        TypeError: ``fraction`` is not a real number, or ``dense_params`` not an int.
        ValueError: ``fraction`` is not in (0, 1]; ``dense_params`` < 1; or the
            budget is below the smallest MPO of these shapes (``max_bond=1``).
    """
    check_fraction("fraction", fraction)
    if dense_params is None:
        dense_params = prod(in_shape) * prod(out_shape)
    elif isinstance(dense_params, (bool, np.bool_)) or not isinstance(
        dense_params, (int, np.integer)
    ):
        raise TypeError(f"dense_params must be an int, got {dense_params!r}")
    elif dense_params < 1:
        raise ValueError(f"dense_params must be >= 1, got {dense_params}")
    budget = int(fraction * dense_params)
    try:
        return max_bond_for_params(in_shape, out_shape, budget)
    except ValueError as err:
        raise ValueError(f"fraction={fraction} of {dense_params} dense parameters: {err}") from err


def _clamp(chi: list[int], ij: list[int]) -> list[int]:
    """Lower bonds to the rank bounds set by their neighbours until consistent."""
    chi = list(chi)
    changed = True
    while changed:
        changed = False
        for k in range(len(chi)):
            left = chi[k - 1] if k > 0 else 1
            right = chi[k + 1] if k + 1 < len(chi) else 1
            bound = min(left * ij[k], ij[k + 1] * right)
            if chi[k] > bound:
                chi[k], changed = bound, True
    return chi


class _Module:
    """Greedy state of one MPO: spectra tails, current bonds, parameter count."""

    def __init__(self, mpo: MPO) -> None:
        spectra = mpo.bond_spectra() if mpo.n_sites > 1 else []
        norm_sq = float(np.sum(spectra[0] ** 2)) if spectra else 0.0
        # tails[k][c] = Σ_{i >= c} s_{k,i}² / ||W||², c = 0..len(s_k)
        self.tails = [tail_sums(s) / (norm_sq if norm_sq > 0 else 1.0) for s in spectra]
        self.in_shape, self.out_shape = mpo.in_shape, mpo.out_shape
        self.ij = [i * j for i, j in zip(mpo.in_shape, mpo.out_shape)]
        self.chi = _clamp([max(len(s), 1) for s in spectra], self.ij)
        self.params = self.count(self.chi)
        self.err_sq = self.error_sq(self.chi)

    def count(self, chi: list[int]) -> int:
        return _count(chi, self.in_shape, self.out_shape)

    def error_sq(self, chi: list[int]) -> float:
        return float(sum(t[min(c, len(t) - 1)] for t, c in zip(self.tails, chi)))

    def candidate(self, bond: int, step: int) -> tuple[float, int, list[int]] | None:
        """(Δε² per parameter saved, parameters saved, new bonds) of cutting ``bond``."""
        if self.chi[bond] <= 1:
            return None
        chi = list(self.chi)
        chi[bond] = max(1, chi[bond] - step)
        chi = _clamp(chi, self.ij)
        saved = self.params - self.count(chi)
        return (self.error_sq(chi) - self.err_sq) / saved, saved, chi


@dataclass
class Allocation:
    """Per-module bond dimensions chosen by :func:`allocate_bonds`.

    Attributes:
        max_bond: module -> bond dims (n-1 ints; ``[]`` for a single-site MPO).
        errors: module -> estimated relative error ε_m (an upper bound of the true
            ``||W - W'||_F / ||W||_F`` of :meth:`apply`, W the matrix the given MPO
            represents; see the module docstring).
        params: module -> parameters of the truncated MPO (exact).
        dense_params: module -> I·J.
        budget: the absolute parameter budget.
    """

    max_bond: dict[str, list[int]]
    errors: dict[str, float]
    params: dict[str, int]
    dense_params: dict[str, int]
    budget: int
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.names:
            self.names = list(self.max_bond)

    @property
    def total_params(self) -> int:
        """Σ_m params[m]; at most ``budget``."""
        return sum(self.params.values())

    @property
    def total_dense(self) -> int:
        return sum(self.dense_params.values())

    @property
    def total_sq_error(self) -> float:
        """The greedy objective Σ_m ε_m² (sum of estimated relative squared errors)."""
        return float(sum(e**2 for e in self.errors.values()))

    def apply(self, mpos: Mapping[str, MPO]) -> dict[str, MPO]:
        """``{name: mpos[name].truncate(max_bond=self.max_bond[name])}`` for every module."""
        missing = [n for n in self.names if n not in mpos]
        if missing:
            raise ValueError(f"mpos lacks the allocated modules {missing}")
        out = {}
        for name in self.names:
            mpo = mpos[name]
            if mpo.n_sites - 1 != len(self.max_bond[name]):
                raise ValueError(
                    f"mpos[{name!r}] has {mpo.n_sites - 1} bonds, the allocation "
                    f"{len(self.max_bond[name])}"
                )
            out[name] = mpo.truncate(max_bond=self.max_bond[name] or None)
        return out

    def report(self) -> str:
        """A plain-text table: module, bond dims, params, dense params, ratio, est. error."""
        rows = [("module", "bond dims", "params", "dense", "ratio", "est. error")]
        for n in self.names:
            rows.append(
                (
                    n,
                    "-".join(map(str, self.max_bond[n])) or "-",
                    f"{self.params[n]:,}",
                    f"{self.dense_params[n]:,}",
                    f"{self.dense_params[n] / self.params[n]:.2f}x",
                    f"{self.errors[n]:.4f}",
                )
            )
        lines = format_table(rows, left=2)
        lines.append(
            f"total {self.total_params:,} of budget {self.budget:,} params "
            f"({self.total_params / self.total_dense:.1%} of {self.total_dense:,} dense); "
            f"sum of squared est. errors {self.total_sq_error:.4g}"
        )
        return "\n".join(lines)


def _resolve_budget(budget: int | float, total_dense: int) -> int:
    if isinstance(budget, (bool, np.bool_)) or not isinstance(
        budget, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"budget must be an int or a float, got {budget!r}")
    if isinstance(budget, (float, np.floating)):
        try:
            return int(check_fraction("budget", budget) * total_dense)
        except ValueError as err:
            raise ValueError(f"{err} (as a float, a fraction of the dense parameters); pass "
                             "an int for an absolute parameter count") from err
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    if budget > total_dense:
        raise ValueError(
            f"budget={budget} is larger than the {total_dense} dense parameters of the matrices"
        )
    return int(budget)


def allocate_bonds(mpos: Mapping[str, MPO], budget: int | float, *, step: int = 1) -> Allocation:
    """Choose every module's bond dims so that the total MPO size fits ``budget``.

    Args:
        mpos: name -> MPO (typically exact, ``MPO.from_matrix(W)``); their cached
            ``bond_spectra()`` drive the choice, errors are relative to the matrices
            these MPOs represent.
        budget: a float in (0, 1] is a fraction of Σ_m I_m·J_m (the dense
            parameters); an int is an absolute parameter count (<= that sum).
        step: how many singular values one greedy cut removes (larger is faster).

    Raises:
        ValueError: ``mpos`` empty; ``budget`` <= 0, a float > 1, an int above the
            dense total, or below the smallest possible size (all bonds 1);
            ``step`` < 1.
        TypeError: a value of ``mpos`` is not an MPO.
    """
    if not isinstance(mpos, Mapping):
        raise TypeError(f"mpos must be a mapping name -> MPO, got {type(mpos).__name__}")
    if not mpos:
        raise ValueError("mpos is empty: pass at least one MPO")
    for name, mpo in mpos.items():
        if not isinstance(mpo, MPO):
            raise TypeError(f"mpos[{name!r}] must be an MPO, got {type(mpo).__name__}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    names = list(mpos)
    dense = {n: mpos[n].dense_params for n in names}
    target = _resolve_budget(budget, sum(dense.values()))
    modules = [_Module(mpos[n]) for n in names]
    minimum = sum(m.count([1] * len(m.chi)) for m in modules)
    if target < minimum:
        raise ValueError(
            f"budget={budget} ({target} params) is below {minimum}, the size of these MPOs "
            "with every bond dimension 1"
        )

    heap: list[tuple[float, int, int, int, int]] = []
    versions = [0] * len(modules)

    def push(m: int) -> None:
        for k in range(len(modules[m].chi)):
            cand = modules[m].candidate(k, step)
            if cand is not None:
                heapq.heappush(heap, (cand[0], -cand[1], m, k, versions[m]))

    for m in range(len(modules)):
        push(m)
    total = sum(m.params for m in modules)
    while total > target and heap:
        _, _, m, k, version = heapq.heappop(heap)
        if version != versions[m]:
            continue
        mod = modules[m]
        _, saved, chi = mod.candidate(k, step)
        mod.chi, mod.params, mod.err_sq = chi, mod.params - saved, mod.error_sq(chi)
        total -= saved
        versions[m] += 1
        push(m)
    return Allocation(
        max_bond={n: list(m.chi) for n, m in zip(names, modules)},
        errors={n: math.sqrt(max(m.err_sq, 0.0)) for n, m in zip(names, modules)},
        params={n: m.params for n, m in zip(names, modules)},
        dense_params=dense,
        budget=target,
        names=names,
    )
