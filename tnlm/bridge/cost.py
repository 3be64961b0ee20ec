"""FLOP-based mode choice for MPO torch modules.

Two ways to compute ``y = x @ W`` from the cores:

``"contract"``
    contract x[b, i_1..i_n] with the cores along an opt_einsum-planned path
    (the planner may still merge cores first when that is cheaper);
``"dense"``
    rebuild W[I, J] along its planned path, then one GEMM (``F.linear``). When the
    layer may reuse a cached W (:class:`~tnlm.bridge.layer.MPOModule`, ``cache_dense``)
    the rebuild is not counted: it is paid once, not per call.

``mode="auto"`` picks the one with fewer weighted planned FLOPs for the actual number
of rows b. A step of the contract path that is one plain matrix product of reshaped
operands (opt_einsum's ``"GEMM"`` class, e.g. both steps of ``(x @ A) @ B`` for a
low-rank layer) counts its FLOPs as they are; any other step (a tensordot needing
permutes, batched small products) is weighted by :data:`CONTRACT_EFFICIENCY`: such
chains ran ~1.5x slower per FLOP than the dense path's one GEMM on MiniLM shapes
(``benchmarks/bench_layers.py``). Ties go to ``"dense"``.

Everything is resolved when the cores are set (:class:`ForwardCost`, from the layer's
:class:`~tnlm.core.plan.ChainPlans`): choosing at call time is arithmetic on the row
count, no path search and no cache lookup.
"""

from __future__ import annotations

from functools import lru_cache

from tnlm.core.plan import ChainPath, ChainPlans, chain_plans

__all__ = ["MODES", "CONTRACT_EFFICIENCY", "ForwardCost", "forward_cost", "choose_mode"]

MODES = ("auto", "contract", "dense")

#: time-per-FLOP of a non-GEMM contract step relative to the dense GEMM (measured, see above)
CONTRACT_EFFICIENCY = 1.5


class ForwardCost:
    """The mode choice of one chain of cores for any row count, resolved once.

    Args:
        plans: the chain's :class:`~tnlm.core.plan.ChainPlans`.
        in_dim, out_dim: the logical matrix shape (I, J) of the GEMM in the dense path.

    Attributes:
        lines: per candidate path, its weighted FLOPs ``(const, per_row)``.
        rebuild_flops: FLOPs of rebuilding W from the cores.
        gemm_row_flops: ``2 · I · J``, the dense GEMM's FLOPs per row.
    """

    def __init__(self, plans: ChainPlans, in_dim: int, out_dim: int) -> None:
        self.plans = plans
        lines = []
        for p in plans.apply:
            w = [1.0 if blas == "GEMM" else CONTRACT_EFFICIENCY for _, _, blas in p.step_cost]
            lines.append((sum(c[0] * wk for c, wk in zip(p.step_cost, w)),
                          sum(c[1] * wk for c, wk in zip(p.step_cost, w))))
        self.lines = tuple(lines)
        self.rebuild_flops = plans.dense.flops
        self.gemm_row_flops = 2 * int(in_dim) * int(out_dim)

    def contract_path(self, rows: int) -> ChainPath:
        """The contract path with the fewest weighted FLOPs for ``rows`` rows."""
        best, best_cost = 0, None
        for k, (c, r) in enumerate(self.lines):
            cost = c + r * rows
            if best_cost is None or cost < best_cost:
                best, best_cost = k, cost
        return self.plans.apply[best]

    def choose(self, rows: int, rebuild: bool = True) -> tuple[str, ChainPath]:
        """``(mode, contract_path)`` for ``rows`` rows; ``rebuild``: whether the dense path
        pays the rebuild of W (False when a cached W is reused)."""
        best, best_cost = 0, None
        for k, (c, r) in enumerate(self.lines):
            cost = c + r * rows
            if best_cost is None or cost < best_cost:
                best, best_cost = k, cost
        dense = self.gemm_row_flops * rows + (self.rebuild_flops if rebuild else 0)
        return ("contract" if best_cost < dense else "dense"), self.plans.apply[best]

    def flops(self, rows: int, rebuild: bool = True) -> tuple[str, int, int]:
        """``(mode, contract_flops, dense_flops)`` for ``rows`` rows (planned, unweighted)."""
        mode, path = self.choose(rows, rebuild)
        dense = self.gemm_row_flops * rows + (self.rebuild_flops if rebuild else 0)
        return mode, path.flops(rows), dense


@lru_cache(maxsize=256)
def _forward_cost(core_shapes: tuple[tuple[int, ...], ...], in_dim: int,
                  out_dim: int) -> ForwardCost:
    return ForwardCost(chain_plans(core_shapes), in_dim, out_dim)


def forward_cost(core_shapes: tuple[tuple[int, ...], ...], in_dim: int,
                 out_dim: int) -> ForwardCost:
    """The cached :class:`ForwardCost` of cores of these shapes (call it when the cores
    are set, not in a forward pass)."""
    shapes = tuple(tuple(int(d) for d in s) for s in core_shapes)
    return _forward_cost(shapes, int(in_dim), int(out_dim))


def choose_mode(core_shapes: tuple[tuple[int, ...], ...], rows: int,
                in_shape: tuple[int, ...], in_dim: int, out_dim: int,
                rebuild: bool = True) -> tuple[str, int, int]:
    """``(mode, contract_flops, dense_flops)`` for ``rows`` input rows.

    Dense FLOPs are ``2 * rows * I * J`` for the GEMM plus, when ``rebuild``, the
    rebuild of W; the contract path wins when its weighted FLOPs are fewer.
    ``in_shape`` must be the cores' input site dimensions (kept for the signature).
    """
    if tuple(in_shape) != tuple(int(s[1]) for s in core_shapes):
        raise ValueError(f"in_shape {tuple(in_shape)} does not match the cores' input legs")
    return forward_cost(core_shapes, in_dim, out_dim).flops(int(rows), rebuild)
