"""Contraction equations and FLOP-based mode choice for MPO torch modules.

Two ways to compute ``y = x @ W`` from the cores:

``"contract"``
    contract x[b, i_1..i_n] with the cores along an opt_einsum-planned path
    (the planner may still merge cores first when that is cheaper);
``"dense"``
    rebuild W[I, J] along its planned path, then one GEMM (``F.linear``).

``mode="auto"`` picks the one with fewer planned FLOPs for the actual number
of rows b, the contract path's FLOPs weighted by :data:`CONTRACT_EFFICIENCY`:
its chain of smaller einsums (with their permutes) ran ~1.5x slower per FLOP
than the dense path's one GEMM on MiniLM shapes (``benchmarks/bench_layers.py``).
Ties go to ``"dense"``.
Equations depend only on the number of sites; plans are cached per
(core shapes, b) by :func:`tnlm.core.plan.get_plan`.
"""

from __future__ import annotations

from functools import lru_cache

import opt_einsum as oe

from tnlm.core.plan import ContractionPlan, get_plan

__all__ = ["MODES", "dense_equation", "apply_equation", "gather_equation", "choose_mode",
           "dense_plan", "apply_plan", "gather_plan"]

MODES = ("auto", "contract", "dense")

#: time-per-FLOP of the contract path relative to the dense path (measured, see above)
CONTRACT_EFFICIENCY = 1.5


@lru_cache(maxsize=64)
def _symbols(n: int) -> tuple[list[str], list[str], list[str], str]:
    """Bond, in and out symbols for n sites, and the batch symbol."""
    s = [oe.get_symbol(k) for k in range(4 * n + 2)]
    bonds, ins, outs = s[: n + 1], s[n + 1: 2 * n + 1], s[2 * n + 1: 3 * n + 1]
    return bonds, ins, outs, s[3 * n + 1]


@lru_cache(maxsize=64)
def dense_equation(n: int) -> str:
    """``T_0,...,T_{n-1} -> W[i_1..i_n, j_1..j_n]``."""
    bonds, ins, outs, _ = _symbols(n)
    terms = [bonds[k] + ins[k] + outs[k] + bonds[k + 1] for k in range(n)]
    return ",".join(terms) + "->" + "".join(ins) + "".join(outs)


@lru_cache(maxsize=64)
def apply_equation(n: int) -> str:
    """``T_0,...,T_{n-1}, x[b, i_1..i_n] -> y[b, j_1..j_n]``."""
    bonds, ins, outs, b = _symbols(n)
    terms = [bonds[k] + ins[k] + outs[k] + bonds[k + 1] for k in range(n)]
    return ",".join(terms) + "," + b + "".join(ins) + "->" + b + "".join(outs)


@lru_cache(maxsize=64)
def gather_equation(n: int) -> str:
    """Rows of W selected per token: ``S_k[b, d_{k-1}, j_k, d_k] -> y[b, j_1..j_n]``.

    The batch symbol is shared by every operand (a hyperedge), so each token's
    row is a chain contraction of its selected core slices.
    """
    bonds, _, outs, b = _symbols(n)
    terms = [b + bonds[k] + outs[k] + bonds[k + 1] for k in range(n)]
    return ",".join(terms) + "->" + b + "".join(outs)


def dense_plan(core_shapes: tuple[tuple[int, ...], ...]) -> ContractionPlan:
    return get_plan(dense_equation(len(core_shapes)), core_shapes)


def apply_plan(core_shapes: tuple[tuple[int, ...], ...], rows: int,
               in_shape: tuple[int, ...]) -> ContractionPlan:
    return get_plan(apply_equation(len(core_shapes)), (*core_shapes, (rows, *in_shape)))


def gather_plan(core_shapes: tuple[tuple[int, ...], ...], rows: int) -> ContractionPlan:
    shapes = tuple((rows, s[0], s[2], s[3]) for s in core_shapes)
    return get_plan(gather_equation(len(core_shapes)), shapes)


def choose_mode(core_shapes: tuple[tuple[int, ...], ...], rows: int,
                in_shape: tuple[int, ...], in_dim: int, out_dim: int) -> tuple[str, int, int]:
    """``(mode, contract_flops, dense_flops)`` for ``rows`` input rows.

    Dense FLOPs are the rebuild of W plus ``2 * rows * I * J`` for the GEMM; the
    contract path wins when ``CONTRACT_EFFICIENCY * contract_flops < dense_flops``.
    """
    contract = apply_plan(core_shapes, rows, in_shape).flops
    dense = dense_plan(core_shapes).flops + 2 * rows * in_dim * out_dim
    mode = "contract" if CONTRACT_EFFICIENCY * contract < dense else "dense"
    return mode, contract, dense
