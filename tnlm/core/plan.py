"""Contraction plans: an einsum over a tensor network, path planned once by opt_einsum.

A :class:`ContractionPlan` is built from an equation and the operand shapes,
carries its cost (FLOPs, largest intermediate) and is executed many times.
Plans are cached by (equation, shapes, optimizer): building one is a path
search, executing it is a fixed sequence of pairwise contractions.

FLOPs follow opt_einsum's count: a multiply-add is two operations, so a dense
``(B, I) @ (I, J)`` costs ``2·B·I·J``.

Every einsum equation of tnlm is built here: :func:`network_equation` from a
tensornetwork graph (what :class:`~tnlm.core.mpo.MPO` plans with), and the
equations of a chain of n cores ``T_k[d_{k-1}, i_k, j_k, d_k]`` given only their
shapes (what the torch modules plan with): :func:`dense_equation` (cores -> W),
:func:`apply_equation` (x, cores -> y) and :func:`gather_equation` (selected rows
of W), with the cached plans :func:`dense_plan`, :func:`apply_plan` and
:func:`gather_plan`. The chain equations depend only on the number of sites.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import opt_einsum as oe
import tensornetwork as tn

from tnlm.core import backend as B

__all__ = [
    "ContractionPlan",
    "get_plan",
    "network_equation",
    "dense_equation",
    "apply_equation",
    "gather_equation",
    "dense_plan",
    "apply_plan",
    "gather_plan",
]

#: core shapes of a chain, one ``(d_{k-1}, i_k, j_k, d_k)`` per site
CoreShapes = tuple[tuple[int, ...], ...]


class ContractionPlan:
    """A planned contraction ``equation`` over operands of fixed ``shapes``.

    Attributes:
        equation: the einsum equation, e.g. ``"ab,bc->ac"``.
        shapes: operand shapes the path was planned for.
        path: opt_einsum's pairwise contraction order.
        flops: planned FLOP count (multiply and add counted separately).
        naive_flops: FLOPs of contracting everything in one einsum, no path.
        largest_intermediate: number of elements of the largest intermediate tensor.
    """

    def __init__(
        self, equation: str, shapes: Sequence[tuple[int, ...]], optimize: str = "auto-hq"
    ) -> None:
        self.equation = equation
        self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        self.optimize = optimize
        path, info = oe.contract_path(equation, *self.shapes, shapes=True, optimize=optimize)
        self.path = path
        self.info = info
        self.flops = int(info.opt_cost)
        self.naive_flops = int(info.naive_cost)
        self.largest_intermediate = int(info.largest_intermediate)
        self._expr = oe.contract_expression(equation, *self.shapes, optimize=path)
        # the path as pairwise einsums over slots of a growing operand list: slot s < n is
        # operand s, slot n + t is the result of step t (plain python ints and no list
        # mutation, so that torch.compile can trace it)
        live = list(range(len(self.shapes)))
        steps = []
        for t, c in enumerate(info.contraction_list):
            slots = tuple(live.pop(p) for p in c[0])
            live.append(len(self.shapes) + t)
            steps.append((slots, c[2]))
        self.steps = tuple(steps)

    def __call__(self, *operands: Any) -> Any:
        """Contract ``operands`` (numpy arrays or torch tensors) along the planned path."""
        if len(operands) != len(self.shapes):
            raise ValueError(f"plan expects {len(self.shapes)} operands, got {len(operands)}")
        if B.is_torch(operands[0]):
            return self.run_torch(*operands)
        return self._expr(*operands)

    def run_torch(self, *operands: Any) -> Any:
        """Execute the path on torch tensors with one ``torch.einsum`` per pairwise step."""
        import torch

        ops = list(operands)
        for slots, eq in self.steps:
            ops.append(torch.einsum(eq, *[ops[s] for s in slots]))
        return ops[-1]

    def __repr__(self) -> str:
        return (
            f"ContractionPlan({self.equation!r}, flops={self.flops:,}, "
            f"largest_intermediate={self.largest_intermediate:,}, steps={len(self.steps)})"
        )


@lru_cache(maxsize=1024)
def _cached(equation: str, shapes: tuple, optimize: str) -> ContractionPlan:
    return ContractionPlan(equation, shapes, optimize)


def get_plan(
    equation: str, shapes: Sequence[Sequence[int]], optimize: str = "auto-hq"
) -> ContractionPlan:
    """The cached :class:`ContractionPlan` for ``equation`` over ``shapes``."""
    return _cached(equation, tuple(tuple(int(d) for d in s) for s in shapes), optimize)


def network_equation(
    nodes: Sequence[tn.Node],
    output_edges: Sequence[tn.Edge],
    extra_terms: Sequence[Sequence[tn.Edge | str]] = (),
) -> str:
    """The einsum equation of a tensornetwork graph: one symbol per edge.

    Args:
        nodes: the network's nodes; each contributes its edges in axis order.
        output_edges: dangling edges kept in the result, in order (others of size 1
            are summed away).
        extra_terms: further operands, each a list of edges of the network or of
            free labels (strings) shared between extra terms and the output.
    """
    symbols: dict[Any, str] = {}

    def sym(e: tn.Edge | str) -> str:
        key = e if isinstance(e, str) else id(e)
        return symbols.setdefault(key, oe.get_symbol(len(symbols)))

    terms = ["".join(sym(e) for e in node.edges) for node in nodes]
    terms += ["".join(sym(e) for e in term) for term in extra_terms]
    return ",".join(terms) + "->" + "".join(sym(e) for e in output_edges)


# ---------------------------------------------------------------- chains of n cores
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


def dense_plan(core_shapes: CoreShapes) -> ContractionPlan:
    """The cached plan of :func:`dense_equation` over cores of these shapes."""
    return get_plan(dense_equation(len(core_shapes)), core_shapes)


def apply_plan(core_shapes: CoreShapes, rows: int, in_shape: tuple[int, ...]) -> ContractionPlan:
    """The cached plan of :func:`apply_equation` for ``x`` of shape ``(rows, *in_shape)``."""
    return get_plan(apply_equation(len(core_shapes)), (*core_shapes, (rows, *in_shape)))


def gather_plan(core_shapes: CoreShapes, rows: int) -> ContractionPlan:
    """The cached plan of :func:`gather_equation` for ``rows`` selected rows: operand k
    is core k sliced at each row's input index, shape ``(rows, d_{k-1}, j_k, d_k)``."""
    shapes = tuple((rows, s[0], s[2], s[3]) for s in core_shapes)
    return get_plan(gather_equation(len(core_shapes)), shapes)
