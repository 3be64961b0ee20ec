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

Training on the dense path (:class:`TrainCost`, from the layer's
:class:`~tnlm.core.plan.BlockPlan`): W is rebuilt from the blocks ``L · C · R`` around the
central site, in the order (``C·R`` first or ``L·C`` first) that, with the backward pass it
implies, costs the fewest FLOPs for the blocks that need a gradient; the blocks' gradients
come either from the weight gradient ``G = x^T dy`` (one ``2 rows I J`` GEMM, then
projections costing ``2 I J`` times a bond) or from contracting ``x`` and ``dy`` with the
other blocks directly (planned per row count), whichever is cheaper for the call.
"""

from __future__ import annotations

from functools import lru_cache
from math import prod
from typing import NamedTuple

from tnlm.core.plan import (
    BlockPlan,
    ChainPath,
    ChainPlans,
    block_plan,
    chain_plans,
    check_chain,
)
from tnlm.core.validation import check_positive_int, check_site_index, check_size

__all__ = ["MODES", "CONTRACT_EFFICIENCY", "ForwardCost", "forward_cost", "choose_mode",
           "TrainStrategy", "TrainCost", "train_cost"]

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

    Raises:
        TypeError / ValueError: ``in_dim`` / ``out_dim`` not an int in ``[1, product of
            the cores' input / output legs]`` (:func:`_check_dims`).
    """

    def __init__(self, plans: ChainPlans, in_dim: int, out_dim: int) -> None:
        in_dim, out_dim = _check_dims(plans.core_shapes, in_dim, out_dim)
        self.plans = plans
        lines = []
        for p in plans.apply:
            w = [1.0 if blas == "GEMM" else CONTRACT_EFFICIENCY for _, _, blas in p.step_cost]
            lines.append((sum(c[0] * wk for c, wk in zip(p.step_cost, w)),
                          sum(c[1] * wk for c, wk in zip(p.step_cost, w))))
        self.lines = tuple(lines)
        self.rebuild_flops = plans.dense.flops
        self.gemm_row_flops = 2 * in_dim * out_dim

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


def _check_dims(core_shapes: tuple[tuple[int, ...], ...], in_dim: int,
                out_dim: int) -> tuple[int, int]:
    """``(in_dim, out_dim)`` as ints >= 1 that fit the chain's legs (at most the products
    of its input / output site dimensions: a padded layer's are smaller), or a
    ``TypeError`` / ``ValueError`` naming the argument."""
    in_dim, out_dim = check_positive_int(in_dim, "in_dim"), check_positive_int(out_dim, "out_dim")
    for name, dim, leg in (("in_dim", in_dim, 1), ("out_dim", out_dim, 2)):
        size = prod(s[leg] for s in core_shapes)
        if dim > size:
            raise ValueError(f"{name}={dim} does not fit the cores: their "
                             f"{'input' if leg == 1 else 'output'} legs "
                             f"{tuple(s[leg] for s in core_shapes)} hold {size}")
    return in_dim, out_dim


@lru_cache(maxsize=256)
def _forward_cost(core_shapes: tuple[tuple[int, ...], ...], in_dim: int,
                  out_dim: int) -> ForwardCost:
    return ForwardCost(chain_plans(core_shapes), in_dim, out_dim)


def forward_cost(core_shapes: tuple[tuple[int, ...], ...], in_dim: int,
                 out_dim: int) -> ForwardCost:
    """The cached :class:`ForwardCost` of cores of these shapes (call it when the cores
    are set, not in a forward pass).

    Raises:
        TypeError / ValueError: ``core_shapes`` do not form a chain
            (:func:`~tnlm.core.plan.check_chain`), or ``in_dim`` / ``out_dim`` are not ints
            >= 1 that fit the cores' input / output legs.
    """
    shapes = check_chain(core_shapes)
    return _forward_cost(shapes, *_check_dims(shapes, in_dim, out_dim))


def choose_mode(core_shapes: tuple[tuple[int, ...], ...], rows: int,
                in_shape: tuple[int, ...], in_dim: int, out_dim: int,
                rebuild: bool = True) -> tuple[str, int, int]:
    """``(mode, contract_flops, dense_flops)`` for ``rows`` input rows.

    Dense FLOPs are ``2 * rows * I * J`` for the GEMM plus, when ``rebuild``, the
    rebuild of W; the contract path wins when its weighted FLOPs are fewer.
    ``in_shape`` must be the cores' input site dimensions (kept for the signature).

    Raises:
        TypeError / ValueError: ``rows`` not an int >= 0, ``in_shape`` not the cores' input
            legs, or as :func:`forward_cost`.
    """
    rows = check_size(rows, "rows")
    shapes = check_chain(core_shapes)
    if tuple(in_shape) != tuple(s[1] for s in shapes):
        raise ValueError(f"in_shape {tuple(in_shape)} does not match the cores' input legs")
    return forward_cost(shapes, in_dim, out_dim).flops(rows, rebuild)


# ---------------------------------------------------------------- training on the dense path
class TrainStrategy(NamedTuple):
    """How one training call of the dense path runs (see :class:`TrainCost`).

    ``order``: ``"cr"`` (W = L · (C·R); C·R kept for the backward) or ``"lc"`` (W = (L·C) · R).
    ``route``: ``"gemm"`` (form G = x^T dy, project it onto the blocks) or ``"env"``
    (contract x and dy with the other blocks along ``paths``), ``"none"`` when no block
    needs a gradient. ``via``: for the gemm route, how the block on the far side of the
    kept product gets its gradient: ``"h"`` / ``"k"`` (through ``L^T G`` / ``G R^T``, also
    giving C's) or ``"lc"`` / ``"cr"`` (forming the other product). ``paths``: for the env
    route, one ``(block, key, path)`` per block needing a gradient: the block (``"l"``,
    ``"c"``, ``"r"``), the key of its equation in :attr:`BlockPlan.ENV` and the chosen
    :class:`~tnlm.core.plan.ChainPath`. ``flops``: the planned FLOPs of the call (forward
    GEMM, forming L and R, rebuild, input gradient, block gradients).
    """

    order: str
    route: str
    via: str
    paths: tuple
    flops: int


class TrainCost:
    """The cheapest :class:`TrainStrategy` of one layer's dense path for any call, by
    arithmetic on planned FLOPs (memoized per row count and gradient pattern).

    Args:
        blocks: the layer's :class:`~tnlm.core.plan.BlockPlan`.
    """

    def __init__(self, blocks: BlockPlan) -> None:
        self.blocks = blocks
        self._memo: dict[tuple, TrainStrategy] = {}

    def candidates(self, rows: int, need_x: bool, need_l: bool, need_c: bool, need_r: bool,
                   cached: str | None = None) -> list[TrainStrategy]:
        """Every strategy for this call with its FLOPs. ``need_*``: which of x, L, C, R need
        a gradient; ``cached``: ``"cr"`` / ``"lc"`` when that product of frozen blocks is
        cached (its FLOPs are not paid by the order that keeps it)."""
        f, env = self.blocks.flops, self.blocks.env
        rows = int(rows)
        gemm = f["gemm_row"] * rows
        common = gemm + (gemm if need_x else 0) + f["blocks"]
        out = []
        for order in ("cr", "lc"):
            # the product of the order (C·R or L·C) is kept for the backward; a cached one
            # (of frozen blocks) is not paid
            fwd = (0 if cached == order else f[order]) + f["w_" + order]
            if not (need_l or need_c or need_r):
                out.append(TrainStrategy(order, "none", "", (), common + fwd))
                continue
            # gemm route; "near" gets its gradient from the kept product, "far" through
            # L^T G (order cr) / G R^T (order lc), or by forming the other product
            near, far = (need_l, need_r) if order == "cr" else (need_r, need_l)
            other = "lc" if order == "cr" else "cr"
            b = gemm + (f["w_" + order] if near else 0)
            via = ""
            if need_c:  # H = L^T G (or K = G R^T), then dC and the far block from it
                b += f["w_" + order] + f[order] * (1 + far)
                via = "h" if order == "cr" else "k"
            elif far:
                through = f["w_" + order] + f[order]
                forming = f[other] + f["w_" + other]
                via = ("h" if order == "cr" else "k") if through <= forming else other
                b += min(through, forming)
            out.append(TrainStrategy(order, "gemm", via, (), common + fwd + b))
            # env route: each needed gradient as one planned einsum of x, dy and the blocks
            keys = []
            if need_l:
                keys.append(("l", "l_cr" if order == "cr" else "l"))
            if need_c:
                keys.append(("c", "c"))
            if need_r:
                keys.append(("r", "r_lc" if order == "lc" else "r"))
            paths = tuple((blk, key, env[key].path(rows)) for blk, key in keys)
            e = sum(p.flops(rows) for _, _, p in paths)
            out.append(TrainStrategy(order, "env", "", paths, common + fwd + e))
        return out

    def choose(self, rows: int, need_x: bool, need_l: bool, need_c: bool, need_r: bool,
               cached: str | None = None) -> TrainStrategy:
        """The strategy with the fewest FLOPs (ties: the first of cr/lc, gemm before env)."""
        key = (int(rows), need_x, need_l, need_c, need_r, cached)
        hit = self._memo.get(key)
        if hit is None:
            hit = min(self.candidates(*key), key=lambda s: s.flops)
            if len(self._memo) > 512:
                self._memo.clear()
            self._memo[key] = hit
        return hit


@lru_cache(maxsize=256)
def _train_cost(core_shapes: tuple[tuple[int, ...], ...], centre: int) -> TrainCost:
    return TrainCost(block_plan(core_shapes, centre))


def train_cost(core_shapes: tuple[tuple[int, ...], ...], centre: int) -> TrainCost:
    """The cached :class:`TrainCost` of cores of these shapes cut around ``centre`` (call
    it when the cores are set).

    Raises:
        TypeError / ValueError: ``core_shapes`` do not form a chain
            (:func:`~tnlm.core.plan.check_chain`), or ``centre`` is not an int in ``[0, n)``.
    """
    shapes = check_chain(core_shapes)
    return _train_cost(shapes, check_site_index(centre, len(shapes), "centre", negative=False))
