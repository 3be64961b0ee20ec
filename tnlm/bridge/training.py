"""The training path of :class:`~tnlm.bridge.layer.MPOLinear`'s dense mode.

When a core needs a gradient, the chain is cut around the central tensor into three
blocks ``L · C · R`` (:class:`~tnlm.core.plan.BlockPlan`): :func:`left_block` and
:func:`right_block` contract the cores on either side, and :func:`block_linear` (an
``autograd.Function``) builds W by GEMMs once per call, keeps it for the input gradient,
and gives each block that needs one its gradient by projecting the weight gradient
``G = dy^T x`` (or, when cheaper, contracting x and dy with the other blocks), in the
order and route :class:`~tnlm.bridge.cost.TrainCost` plans cheapest. Frozen blocks get no
gradient; a product of frozen blocks (:func:`block_product`) may be passed in, cached by
the layer. Gradients equal autograd's through the chain's einsums (tested in float64,
``tests/test_block_training.py``). Stateless: the layer keeps the plans and the caches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tnlm.core.plan import BlockPlan

__all__ = ["block_linear", "block_product", "left_block", "right_block"]


def left_block(bp: BlockPlan, ops: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L[ai, aj, d] = T_0 ··· T_{c-1}`` (``(1, 1, 1)`` ones when c = 0), differentiable."""
    Ai, Aj, _, _, _, _, D2, _ = bp.dims
    c = bp.centre
    if c == 0:
        return ops[0].new_ones(1, 1, 1)
    if bp.left is None:  # one core (1, i, j, d): a view
        return ops[0].reshape(Ai, Aj, D2)
    return bp.left.run_torch(*[o.reshape(v) for o, v in zip(ops[:c], bp.left_views)]) \
        .reshape(Ai, Aj, D2)


def right_block(bp: BlockPlan, ops: Sequence[torch.Tensor]) -> torch.Tensor:
    """``R[e, pi, pj] = T_{c+1} ··· T_{n-1}`` (``(1, 1, 1)`` ones when c = n - 1)."""
    _, _, _, _, Pi, Pj, _, D3 = bp.dims
    c = bp.centre
    if c == len(ops) - 1:
        return ops[-1].new_ones(1, 1, 1)
    if bp.right is None:
        return ops[-1].reshape(D3, Pi, Pj)
    return bp.right.run_torch(*[o.reshape(v) for o, v in zip(ops[c + 1:], bp.right_views)]) \
        .reshape(D3, Pi, Pj)


def block_product(bp: BlockPlan, which: str, L: torch.Tensor, C: torch.Tensor,
                   R: torch.Tensor) -> torch.Tensor:
    """``C·R`` as ``(D2, Mi Mj Pi Pj)`` (``which="cr"``) or ``L·C`` as ``(Ai Aj Mi Mj, D3)``:
    one GEMM each."""
    Ai, Aj, Mi, Mj, Pi, Pj, D2, D3 = bp.dims
    if which == "cr":
        return torch.mm(C.reshape(D2 * Mi * Mj, D3), R.reshape(D3, Pi * Pj)).view(D2, -1)
    return torch.mm(L.reshape(Ai * Aj, D2), C.reshape(D2, Mi * Mj * D3)).view(-1, D3)


def _block_weight(bp: BlockPlan, order: str, L: torch.Tensor, C: torch.Tensor, R: torch.Tensor,
                  product: torch.Tensor | None, in_dim: int, out_dim: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W^T, product)``: W^T ``(out_dim, in_dim)`` in ``nn.Linear``'s layout (a view of the
    padded ``(out_size, in_size)`` when padded), and the product of ``order`` it came from
    (``product`` when given, e.g. cached)."""
    Ai, Aj, Mi, Mj, Pi, Pj, D2, D3 = bp.dims
    if product is None:
        product = block_product(bp, order, L, C, R)
    if order == "cr":
        Wp = torch.mm(L.reshape(Ai * Aj, D2), product)
    else:
        Wp = torch.mm(product, R.reshape(D3, Pi * Pj))
    # (ai, aj, mi, mj, pi, pj) -> (aj mj pj, ai mi pi): the one copy of W
    Wt = Wp.view(Ai, Aj, Mi, Mj, Pi, Pj).permute(1, 3, 5, 0, 2, 4).reshape(bp.out_size, bp.in_size)
    if (out_dim, in_dim) != Wt.shape:
        Wt = Wt[:out_dim, :in_dim]
    return Wt, product


def _no_autocast(device_type: str) -> Any:
    """A context turning autocast off (the block path's operands already have the compute
    dtype), or a no-op one when it is off anyway (cheaper: called twice per layer and step)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _BlockLinear(torch.autograd.Function):
    """``y = x @ W + b`` with ``W = L · C · R`` (:class:`~tnlm.core.plan.BlockPlan`), for
    training: W is built once (GEMMs, one copy) and kept for the input gradient; the blocks
    that need a gradient get it along the strategy chosen by
    :class:`~tnlm.bridge.cost.TrainCost` (projections of ``G = dy^T x``, or contractions of
    x and dy with the other blocks); the others get none. The gradients equal autograd's
    through the chain's einsums (tested in float64). Double backward (``create_graph``)
    works: the backward then rebuilds W from its inputs with autograd recording."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, L: torch.Tensor, C: torch.Tensor, R: torch.Tensor,
                bias: torch.Tensor | None, product: torch.Tensor | None, meta: tuple
                ) -> torch.Tensor:
        bp, strategy, in_dim, out_dim = meta
        ctx.meta, ctx.given = meta, product is not None  # a given product is a constant
        with _no_autocast(x.device.type):
            Wt, product = _block_weight(bp, strategy.order, L, C, R, product, in_dim, out_dim)
            y = F.linear(x, Wt, bias)
        # W is kept for the input gradient only (a double backward rebuilds it)
        ctx.save_for_backward(x, L, C, R, Wt if ctx.needs_input_grad[0] else None, product)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x, L, C, R, Wt, product = ctx.saved_tensors
        bp, st, in_dim, out_dim = ctx.meta
        need_x, need_l, need_c, need_r, need_b = ctx.needs_input_grad[:5]
        with _no_autocast(dy.device.type):
            if torch.is_grad_enabled():  # create_graph: W and the product as functions of L, C, R
                Wt, product = _block_weight(bp, st.order, L, C, R, product if ctx.given else None,
                                            in_dim, out_dim)
            gx = dy.mm(Wt) if need_x else None
            gb = dy.sum(0) if need_b else None
            dL = dC = dR = None
            if st.route == "gemm":
                dL, dC, dR = _gemm_route(bp, st, x, dy, L, C, R, product, in_dim, out_dim,
                                         need_l, need_c, need_r)
            elif st.route == "env":
                dL, dC, dR = _env_route(bp, st, x, dy, L, C, R, product, in_dim, out_dim)
        return (gx, dL if need_l else None, dC if need_c else None, dR if need_r else None,
                gb, None, None)


def _gemm_route(bp: BlockPlan, st: Any, x: torch.Tensor, dy: torch.Tensor, L: torch.Tensor,
                C: torch.Tensor, R: torch.Tensor, product: torch.Tensor, in_dim: int,
                out_dim: int, need_l: bool, need_c: bool, need_r: bool) -> tuple:
    """The blocks' gradients from ``G = dy^T x`` (the weight gradient, one GEMM)."""
    Ai, Aj, Mi, Mj, Pi, Pj, D2, D3 = bp.dims
    Gt = dy.t().mm(x)  # (out, in), as nn.Linear's weight gradient
    if Gt.shape != (bp.out_size, bp.in_size):
        Gt = F.pad(Gt, (0, bp.in_size - in_dim, 0, bp.out_size - out_dim))
    # (aj mj pj, ai mi pi) -> (ai aj, mi mj pi pj)
    G = Gt.view(Aj, Mj, Pj, Ai, Mi, Pi).permute(3, 0, 4, 1, 5, 2).reshape(Ai * Aj, -1)
    L2, R2 = L.reshape(Ai * Aj, D2), R.reshape(D3, Pi * Pj)
    dL = dC = dR = None
    if st.order == "cr":  # product = C·R (D2, Mi Mj Pi Pj)
        if need_l:
            dL = G.mm(product.t()).view(L.shape)
        if need_c or need_r and st.via == "h":
            H = L2.t().mm(G).view(D2 * Mi * Mj, Pi * Pj)  # L^T G
            if need_r:
                dR = C.reshape(D2 * Mi * Mj, D3).t().mm(H).view(R.shape)
            if need_c:
                dC = H.mm(R2.t()).view(C.shape)
        elif need_r:  # via L·C
            LC = block_product(bp, "lc", L, C, R)
            dR = LC.t().mm(G.view(-1, Pi * Pj)).view(R.shape)
    else:  # product = L·C (Ai Aj Mi Mj, D3)
        G2 = G.view(-1, Pi * Pj)
        if need_r:
            dR = product.t().mm(G2).view(R.shape)
        if need_c or need_l and st.via == "k":
            K = G2.mm(R2.t()).view(Ai * Aj, Mi * Mj * D3)  # G R^T
            if need_l:
                dL = K.mm(C.reshape(D2, Mi * Mj * D3).t()).view(L.shape)
            if need_c:
                dC = L2.t().mm(K).view(C.shape)
        elif need_l:  # via C·R
            CR = block_product(bp, "cr", L, C, R)
            dL = G.mm(CR.t()).view(L.shape)
    return dL, dC, dR


def _env_route(bp: BlockPlan, st: Any, x: torch.Tensor, dy: torch.Tensor, L: torch.Tensor,
               C: torch.Tensor, R: torch.Tensor, product: torch.Tensor, in_dim: int,
               out_dim: int) -> tuple:
    """The blocks' gradients as planned contractions of x and dy with the other blocks."""
    Ai, Aj, Mi, Mj, Pi, Pj, D2, D3 = bp.dims
    if in_dim != bp.in_size:
        x = F.pad(x, (0, bp.in_size - in_dim))
    if out_dim != bp.out_size:
        dy = F.pad(dy, (0, bp.out_size - out_dim))
    xv, dyv = x.reshape(-1, Ai, Mi, Pi), dy.reshape(-1, Aj, Mj, Pj)
    operands = {"l_cr": lambda: (product.view(D2, Mi, Mj, Pi, Pj),), "l": lambda: (C, R),
                "r_lc": lambda: (product.view(Ai, Aj, Mi, Mj, D3),), "r": lambda: (L, C),
                "c": lambda: (L, R)}
    grads = {}
    for blk, key, path in st.paths:
        grads[blk] = path.plan.run_torch(xv, dyv, *operands[key]())
    return grads.get("l"), grads.get("c"), grads.get("r")


def block_linear(x: torch.Tensor, L: torch.Tensor, C: torch.Tensor, R: torch.Tensor,
                 bias: torch.Tensor | None, product: torch.Tensor | None, bp: BlockPlan,
                 strategy: Any, in_dim: int, out_dim: int) -> torch.Tensor:
    """``y = x @ W + b`` for ``x`` of shape ``(rows, in_dim)``, with ``W = L · C · R`` built
    and differentiated as described in the module docstring.

    Args:
        x: the input rows, in the compute dtype.
        L, C, R: :func:`left_block`, the central core and :func:`right_block` (of the
            cores in the compute dtype).
        bias: ``(out_dim,)`` or ``None``.
        product: the frozen ``L·C`` or ``C·R`` (:func:`block_product`) of
            ``strategy.order``, treated as a constant, or ``None`` to build it.
        bp: the layer's block plan.
        strategy: the :class:`~tnlm.bridge.cost.TrainCost` choice for this call (its
            ``order``, ``route``, ``via`` and ``paths``).
        in_dim, out_dim: the layer's unpadded dimensions.
    """
    return _BlockLinear.apply(x, L, C, R, bias, product, (bp, strategy, in_dim, out_dim))
