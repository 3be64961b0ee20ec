"""FLOP-based mode choice for MPO torch modules.

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
The equations and their cached plans live in :mod:`tnlm.core.plan`.
"""

from __future__ import annotations

from tnlm.core.plan import apply_plan, dense_plan

__all__ = ["MODES", "CONTRACT_EFFICIENCY", "choose_mode"]

MODES = ("auto", "contract", "dense")

#: time-per-FLOP of the contract path relative to the dense path (measured, see above)
CONTRACT_EFFICIENCY = 1.5


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
