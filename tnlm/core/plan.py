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

:class:`ChainPlans` (:func:`chain_plans`) is what the torch modules hold: every plan of
one chain resolved once for its core shapes, size-1 legs dropped, the paths of
``x · cores`` independent of the row count (a few candidates whose FLOPs are linear in
the rows), so that a forward pass runs no search and no cache lookup.

:class:`BlockPlan` (:func:`block_plan`) is what a module trains with on its dense path: the
chain cut around one site into three blocks ``L · C · R`` (W is a 3-site chain of them), the
FLOPs of every product of the blocks, of ``W``, of projecting the weight gradient onto the
blocks, and the planned alternative of contracting ``x`` and ``dy`` with the blocks directly
(:class:`RowPaths`), from which :mod:`tnlm.bridge.cost` picks the cheapest order per call.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from functools import lru_cache
from math import prod
from typing import Any

import opt_einsum as oe
import tensornetwork as tn

from tnlm.core import backend as B
from tnlm.core.validation import check_positive_int, check_site_index, check_size

__all__ = [
    "ContractionPlan",
    "EINSUM_LETTERS",
    "torch_step",
    "get_plan",
    "network_equation",
    "dense_equation",
    "apply_equation",
    "gather_equation",
    "dense_plan",
    "apply_plan",
    "gather_plan",
    "ChainPath",
    "ChainPlans",
    "chain_plans",
    "check_chain",
    "ROW_HINTS",
    "RowPaths",
    "BlockPlan",
    "block_plan",
]

#: core shapes of a chain, one ``(d_{k-1}, i_k, j_k, d_k)`` per site
CoreShapes = tuple[tuple[int, ...], ...]


def _check_shapes(shapes: Sequence[Sequence[int]], name: str) -> tuple[tuple[int, ...], ...]:
    """Operand shapes as tuples of ints >= 0 (:func:`check_size`, naming ``name[k][a]``)."""
    return tuple(tuple(check_size(d, f"{name}[{k}][{a}]") for a, d in enumerate(s))
                 for k, s in enumerate(shapes))


def check_chain(core_shapes: Sequence[Sequence[int]], name: str = "core_shapes") -> CoreShapes:
    """Core shapes that form a chain ``T_k[d_{k-1}, i_k, j_k, d_k]``, as tuples of ints.

    Raises:
        TypeError: a size is not an int (``bool`` and float refused).
        ValueError: no core, a shape that is not 4-d, a size < 1, a boundary bond other
            than 1, or a left bond unequal to the right bond of the core before it; the
            message names ``name[k]`` and what was expected.
    """
    shapes = tuple(tuple(s) for s in core_shapes)
    if not shapes:
        raise ValueError(f"{name} must hold at least one core shape, got none")
    for k, s in enumerate(shapes):
        if len(s) != 4:
            raise ValueError(f"{name}[{k}] must be 4-d (d_left, i, j, d_right), got shape {s}")
    shapes = tuple(tuple(check_positive_int(d, f"{name}[{k}][{a}]") for a, d in enumerate(s))
                   for k, s in enumerate(shapes))
    if shapes[0][0] != 1:
        raise ValueError(f"{name}[0] has left bond {shapes[0][0]} (shape {shapes[0]}); the "
                         "boundary bond must be 1")
    if shapes[-1][3] != 1:
        raise ValueError(f"{name}[{len(shapes) - 1}] has right bond {shapes[-1][3]} (shape "
                         f"{shapes[-1]}); the boundary bond must be 1")
    for k in range(1, len(shapes)):
        if shapes[k][0] != shapes[k - 1][3]:
            raise ValueError(f"{name}[{k}] has left bond {shapes[k][0]} (shape {shapes[k]}); "
                             f"expected {shapes[k - 1][3]}, the right bond of {name}[{k - 1}] "
                             f"(shape {shapes[k - 1]})")
    return shapes


class ContractionPlan:
    """A planned contraction ``equation`` over operands of fixed ``shapes``.

    ``optimize`` is an opt_einsum optimizer name (the path is searched) or an explicit
    path (a sequence of index tuples, as in :attr:`path`; nothing is searched). The
    steps of a path do not depend on the operand sizes, so a plan may be executed on
    operands whose sizes differ from ``shapes`` in the row index ``rows`` (the one index
    symbol of ``equation`` a plan is reused over, e.g. for another row count); run on
    torch tensors, every other leg must have its planned size (torch would broadcast a
    leg of size 1 where numpy refuses it).

    Raises:
        TypeError: a size of ``shapes`` is not an int (``bool`` and float refused).
        ValueError: a negative size.

    Attributes:
        equation: the einsum equation, e.g. ``"ab,bc->ac"``.
        shapes: operand shapes the path was planned for.
        path: opt_einsum's pairwise contraction order (a tuple of index tuples).
        flops: planned FLOP count (multiply and add counted separately).
        naive_flops: FLOPs of contracting everything in one einsum, no path.
        largest_intermediate: number of elements of the largest intermediate tensor.
        step_flops: FLOPs of each pairwise step (they sum to ``flops``).
        torch_steps: the steps as :meth:`run_torch` runs them, ``(slots, equation, squeeze,
            unsqueeze)`` (:func:`torch_step`: relabelled to the letters ``torch.einsum``
            accepts, so any chain of up to :data:`~tnlm.core.validation.MAX_SITES` sites
            runs on torch as on numpy).
        step_blas: opt_einsum's BLAS class of each step (``"GEMM"`` when it is one matrix
            product of reshaped operands, else ``"TDOT"``, ``"GEMV/EINSUM"``, ... or False).
    """

    def __init__(
        self, equation: str, shapes: Sequence[tuple[int, ...]],
        optimize: str | Sequence[Sequence[int]] = "auto-hq", rows: str | None = None,
    ) -> None:
        self.equation = equation
        self.shapes = _check_shapes(shapes, "shapes")
        self.optimize = optimize
        self.rows = rows
        # per operand, (rank, the (axis, size) pairs fixed by the plan: all but the row index)
        terms = equation.split("->")[0].split(",")
        self._fixed = tuple((len(s), tuple((a, d) for a, (ch, d) in enumerate(zip(t, s))
                                           if ch != rows))
                            for t, s in zip(terms, self.shapes))
        opt = optimize if isinstance(optimize, str) else [tuple(p) for p in optimize]
        path, info = oe.contract_path(equation, *self.shapes, shapes=True, optimize=opt)
        self.path = tuple(tuple(int(i) for i in p) for p in path)
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
        sizes = index_sizes(equation, self.shapes)
        # what torch runs per step: the step relabelled to [a-zA-Z] (torch.einsum accepts
        # nothing else, and a chain of 17+ sites has more symbols than that)
        self.torch_steps = tuple((slots, *torch_step(eq, sizes, rows))
                                 for slots, eq in self.steps)
        # most chains (16 sites or fewer) run their own equations: the plain loop then
        self._relabelled = any(eq != t[1] for (_, eq), t in zip(self.steps, self.torch_steps))
        self.step_flops = tuple(step_flops(c[2], bool(c[1]), sizes)
                                for c in info.contraction_list)
        self.step_blas = tuple(c[4] for c in info.contraction_list)

    def __call__(self, *operands: Any) -> Any:
        """Contract ``operands`` (numpy arrays or torch tensors) along the planned path."""
        if len(operands) != len(self.shapes):
            raise ValueError(f"plan expects {len(self.shapes)} operands, got {len(operands)}")
        if B.is_torch(operands[0]):
            return self.run_torch(*operands)
        return self._expr(*operands)

    def run_torch(self, *operands: Any) -> Any:
        """Execute the path on torch tensors with one ``torch.einsum`` per pairwise step.

        Raises:
            ValueError: an operand's rank, or the size of a leg other than the row index
                ``rows``, differs from the planned shape (shapes only, no tensor operation).
        """
        import torch

        for k, (op, (rank, fixed)) in enumerate(zip(operands, self._fixed)):
            shape = op.shape
            if len(shape) != rank or any(shape[a] != d for a, d in fixed):
                raise ValueError(
                    f"operand {k} has shape {tuple(shape)}, but the plan of {self.equation!r} "
                    f"was made for {self.shapes[k]}" + (
                        "" if self.rows is None else f" (any size in the row index {self.rows!r})"))
        ops = list(operands)
        if not self._relabelled:
            for slots, eq in self.steps:
                ops.append(torch.einsum(eq, *[ops[s] for s in slots]))
            return ops[-1]
        for slots, eq, squeeze, unsqueeze in self.torch_steps:
            args = [ops[s] if not axes else ops[s].squeeze(axes)
                    for s, axes in zip(slots, squeeze)]
            out = torch.einsum(eq, *args)
            for a in unsqueeze:
                out = out.unsqueeze(a)
            ops.append(out)
        return ops[-1]

    def __repr__(self) -> str:
        return (
            f"ContractionPlan({self.equation!r}, flops={self.flops:,}, "
            f"largest_intermediate={self.largest_intermediate:,}, steps={len(self.steps)})"
        )


#: the index symbols ``torch.einsum`` accepts
EINSUM_LETTERS = string.ascii_letters


def torch_step(step_equation: str, sizes: dict[str, int], rows: str | None = None
               ) -> tuple[str, tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """One pairwise step of a plan as ``torch.einsum`` runs it: ``(equation, squeeze,
    unsqueeze)``.

    ``torch.einsum`` accepts only the 52 symbols ``[a-zA-Z]``, while the equations of
    :func:`network_equation` and the chain equations use opt_einsum's symbols, which run
    past them from the 53rd index on (an MPO of 17 or more sites). A step whose symbols are
    all letters is kept as it is; the others' indices are relabelled to letters in order
    of appearance; a step with more than 52 indices
    (possible with many legs of size 1, e.g. the last step of :meth:`MPO.to_matrix` of 26+
    sites) drops its legs of planned size 1 other than the row index ``rows``: operand k is
    squeezed at the axes ``squeeze[k]`` and the result unsqueezed at ``unsqueeze``
    (ascending positions of the step's output).

    Raises:
        ValueError: more than 52 indices of size > 1 in one step (an intermediate of at
            least 2**53 entries, which no memory holds).
    """
    inputs, output = step_equation.split("->")
    terms = inputs.split(",")
    used = list(dict.fromkeys("".join(terms) + output))
    if all(ch in EINSUM_LETTERS for ch in used):  # as it is (relabelled, torch ran slower)
        return step_equation, tuple(() for _ in terms), ()
    drop: set[str] = set()
    if len(used) > len(EINSUM_LETTERS):
        drop = {ch for ch in used if sizes.get(ch) == 1 and ch != rows}
    keep = [ch for ch in used if ch not in drop]
    if len(keep) > len(EINSUM_LETTERS):
        raise ValueError(f"a contraction step has {len(keep)} indices of size > 1; "
                         f"torch.einsum takes at most {len(EINSUM_LETTERS)}")
    letter = dict(zip(keep, EINSUM_LETTERS))
    squeeze = tuple(tuple(a for a, ch in enumerate(t) if ch in drop) for t in terms)
    unsqueeze = tuple(a for a, ch in enumerate(output) if ch in drop)
    eq = ",".join("".join(letter[ch] for ch in t if ch not in drop) for t in terms) + \
        "->" + "".join(letter[ch] for ch in output if ch not in drop)
    return eq, squeeze, unsqueeze


def index_sizes(equation: str, shapes: Sequence[tuple[int, ...]]) -> dict[str, int]:
    """The size of every index symbol of ``equation`` over operands of ``shapes``."""
    terms = equation.split("->")[0].split(",")
    return {ch: int(d) for term, shape in zip(terms, shapes) for ch, d in zip(term, shape)}


def step_flops(step_equation: str, inner: bool, sizes: dict[str, int]) -> int:
    """opt_einsum's FLOP count of one einsum step (``inner``: it sums an index away)."""
    inputs = step_equation.split("->")[0].split(",")
    return int(oe.helpers.flop_count(set("".join(inputs)), inner, len(inputs), sizes))


@lru_cache(maxsize=1024)
def _cached(equation: str, shapes: tuple, optimize: str | tuple,
            rows: str | None = None) -> ContractionPlan:
    return ContractionPlan(equation, shapes, optimize, rows)


def get_plan(
    equation: str, shapes: Sequence[Sequence[int]],
    optimize: str | Sequence[Sequence[int]] = "auto-hq", rows: str | None = None,
) -> ContractionPlan:
    """The cached :class:`ContractionPlan` for ``equation`` over ``shapes`` (``optimize``:
    an optimizer name, or an explicit path, which is not searched; ``rows``: the index
    symbol whose size may differ when the plan runs, see :class:`ContractionPlan`).

    Raises:
        TypeError: a size of ``shapes`` is not an int (``bool`` and float refused).
        ValueError: a negative size.
    """
    if not isinstance(optimize, str):
        optimize = tuple(tuple(int(i) for i in p) for p in optimize)
    return _cached(equation, _check_shapes(shapes, "shapes"), optimize, rows)


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


def row_bucket(rows: int) -> int:
    """The power of two >= ``rows`` (>= 1): row counts sharing a path search."""
    return 1 << max(int(rows) - 1, 0).bit_length()


def apply_plan(core_shapes: CoreShapes, rows: int, in_shape: tuple[int, ...]) -> ContractionPlan:
    """The plan of :func:`apply_equation` for ``x`` of shape ``(rows, *in_shape)``.

    The path is searched once per :func:`row_bucket` of ``rows`` (a power of two) and
    reused for every row count of the bucket; ``flops`` are those of ``rows`` rows. The plan
    runs for any row count (its row index is free, :class:`ContractionPlan`).

    Raises:
        TypeError / ValueError: ``rows`` or a size is not an int >= 0.
    """
    rows = check_size(rows, "rows")
    n = len(core_shapes)
    eq, b = apply_equation(n), _symbols(n)[3]
    path = get_plan(eq, (*core_shapes, (row_bucket(rows), *in_shape))).path
    return get_plan(eq, (*core_shapes, (rows, *in_shape)), path, rows=b)


def gather_plan(core_shapes: CoreShapes, rows: int) -> ContractionPlan:
    """The plan of :func:`gather_equation` for ``rows`` selected rows: operand k
    is core k sliced at each row's input index, shape ``(rows, d_{k-1}, j_k, d_k)``.

    Every operand carries the row index, so the best path does not depend on ``rows``:
    it is searched once (for one row) and reused; ``flops`` are those of ``rows`` rows.
    The plan runs for any row count (its row index is free, :class:`ContractionPlan`).

    Raises:
        TypeError / ValueError: ``rows`` is not an int >= 0, or ``core_shapes`` do not
            form a chain (:func:`check_chain`).
    """
    shapes, rows = check_chain(core_shapes), check_size(rows, "rows")
    n = len(shapes)
    eq, b = gather_equation(n), _symbols(n)[3]
    path = get_plan(eq, tuple((1, s[0], s[2], s[3]) for s in shapes)).path
    return get_plan(eq, tuple((rows, s[0], s[2], s[3]) for s in shapes), path, rows=b)


# ---------------------------------------------------------------- per-chain plans for modules
#: row counts the candidate paths of ``x · cores`` are searched for (:class:`ChainPlans`)
ROW_HINTS = (1, 16, 256, 4096, 65536)


class ChainPath:
    """One path of ``x · cores`` with its FLOPs as a function of the row count.

    The FLOPs of a fixed path are exactly linear in the rows: a step whose operands
    carry the row index costs ``rows`` times its per-row FLOPs, the others (cores
    merged with cores) a constant.

    Attributes:
        plan: the :class:`ContractionPlan` (planned for some row count; run it for any).
        step_cost: per step ``(constant_flops, per_row_flops, blas)``.
        const_flops, row_flops: the sums over steps: ``flops(rows) = const + row · rows``.
    """

    def __init__(self, plan: ContractionPlan, batch: str) -> None:
        self.plan = plan
        sizes = index_sizes(plan.equation, plan.shapes)
        rows = sizes[batch]
        costs = []
        for (_, eq), flops, blas in zip(plan.steps, plan.step_flops, plan.step_blas):
            per_row = batch in eq.split("->")[0]
            costs.append((0, flops // rows, blas) if per_row else (flops, 0, blas))
        self.step_cost = tuple(costs)
        self.const_flops = sum(c[0] for c in costs)
        self.row_flops = sum(c[1] for c in costs)

    def flops(self, rows: int) -> int:
        return self.const_flops + self.row_flops * int(rows)

    def __repr__(self) -> str:
        return (f"ChainPath(path={self.plan.path}, flops(rows)={self.const_flops:,} + "
                f"{self.row_flops:,}*rows)")


def _squeezed(terms: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> list[str]:
    return ["".join(ch for ch, d in zip(t, s) if d != 1) for t, s in zip(terms, shapes)]


class ChainPlans:
    """Every plan of one chain of cores ``T_k[d_{k-1}, i_k, j_k, d_k]``, resolved once.

    What a torch module holds so that its forward pass runs no path search and no
    cache lookup (and torch.compile traces nothing but tensor operations). Legs of
    size 1 (the boundary bonds, unit site dimensions as in the low-rank layout
    ``(1, I, 1, r), (r, 1, J, 1)``, unit bonds) are dropped from the dense and apply
    equations: operands are reshaped to :attr:`core_views` / :attr:`x_view` (views), so a
    low-rank layer runs as ``(x @ A) @ B``, two plain matrix products.

    Attributes:
        core_shapes, in_shape, out_shape: the chain; in_size, out_size: the products of
            in_shape and out_shape (W's padded shape).
        core_views: each core's shape without its size-1 legs.
        x_view: the input legs of size > 1 (``x`` is reshaped to ``(rows, *x_view)``).
        low_rank: the chain is ``(1, I, 1, r), (r, 1, J, 1)``: ``W = A @ B`` with
            ``A = T_0.reshape(I, r)``, ``B = T_1.reshape(r, J)`` (its apply path is
            ``(x @ A) @ B``, which a module may run as two matrix products directly).
        dense: plan of the cores (``core_views``) -> W over the output legs of size > 1
            (reshape to ``(prod(in_shape), prod(out_shape))``).
        apply: candidate :class:`ChainPath` s of ``x, cores -> y`` (distinct paths of the
            searches for :data:`ROW_HINTS` rows); :meth:`apply_path` picks one for any rows.
        gather: plan of :func:`gather_equation` (unsqueezed slices), planned for one row and
            valid for any row count; ``gather_row_flops`` its FLOPs per row.

    Raises:
        TypeError / ValueError: ``core_shapes`` do not form a chain (:func:`check_chain`).
    """

    def __init__(self, core_shapes: CoreShapes, optimize: str = "auto-hq") -> None:
        shapes = check_chain(core_shapes)
        n = len(shapes)
        self.core_shapes = shapes
        self.in_shape = tuple(s[1] for s in shapes)
        self.out_shape = tuple(s[2] for s in shapes)
        self.in_size, self.out_size = prod(self.in_shape), prod(self.out_shape)
        self.low_rank = n == 2 and shapes[0][0] == shapes[0][2] == shapes[1][1] == \
            shapes[1][3] == 1
        self.core_views = tuple(tuple(d for d in s if d != 1) for s in shapes)
        self.x_view = tuple(i for i in self.in_shape if i != 1)
        bonds, ins, outs, b = _symbols(n)
        terms = _squeezed([bonds[k] + ins[k] + outs[k] + bonds[k + 1] for k in range(n)], shapes)
        in_legs = "".join(_squeezed([ins[k] for k in range(n)], [(i,) for i in self.in_shape]))
        out_legs = "".join(_squeezed([outs[k] for k in range(n)], [(j,) for j in self.out_shape]))
        self.dense = get_plan(",".join(terms) + "->" + in_legs + out_legs, self.core_views,
                              optimize)
        apply_eq = ",".join(terms) + "," + b + in_legs + "->" + b + out_legs
        paths: dict[tuple, ChainPath] = {}
        for rows in ROW_HINTS:
            plan = get_plan(apply_eq, (*self.core_views, (rows, *self.x_view)), optimize, b)
            paths.setdefault(plan.path, ChainPath(plan, b))
        self.apply = tuple(paths.values())
        self.gather = gather_plan(shapes, 1)
        self.gather_row_flops = self.gather.flops

    def apply_path(self, rows: int) -> ChainPath:
        """The candidate path with the fewest FLOPs for ``rows`` rows."""
        return min(self.apply, key=lambda p: p.flops(rows))

    def __repr__(self) -> str:
        return (f"ChainPlans({self.core_shapes}, dense_flops={self.dense.flops:,}, "
                f"apply={list(self.apply)})")


@lru_cache(maxsize=256)
def _chain_plans(core_shapes: CoreShapes) -> ChainPlans:
    return ChainPlans(core_shapes)


def chain_plans(core_shapes: Sequence[Sequence[int]]) -> ChainPlans:
    """The cached :class:`ChainPlans` of cores of these shapes (call it when the cores are
    set, not in a forward pass).

    Raises:
        TypeError / ValueError: ``core_shapes`` do not form a chain (:func:`check_chain`).
    """
    return _chain_plans(check_chain(core_shapes))


# ---------------------------------------------------------------- three-block training plans
class RowPaths:
    """Candidate paths of one einsum whose operands carry a row index ``batch``: the paths
    opt_einsum finds for :data:`ROW_HINTS` rows, each with FLOPs linear in the rows
    (:class:`ChainPath`); :meth:`path` picks one for any row count by arithmetic.

    Args:
        equation: the einsum equation.
        shapes: a function ``rows -> operand shapes``.
        batch: the row symbol of ``equation``.
    """

    def __init__(self, equation: str, shapes: Any, batch: str,
                 optimize: str = "auto-hq") -> None:
        self.equation = equation
        paths: dict[tuple, ChainPath] = {}
        for rows in ROW_HINTS:
            plan = get_plan(equation, shapes(rows), optimize, batch)
            paths.setdefault(plan.path, ChainPath(plan, batch))
        self.paths = tuple(paths.values())

    def path(self, rows: int) -> ChainPath:
        """The candidate with the fewest FLOPs for ``rows`` rows."""
        return min(self.paths, key=lambda p: p.flops(rows))

    def flops(self, rows: int) -> int:
        return self.path(rows).flops(rows)


def _block_equation(shapes: CoreShapes, side: str) -> tuple[str, tuple[tuple[int, ...], ...]]:
    """Equation (and squeezed operand views) contracting a run of cores into one block:
    ``left`` -> ``L[i.., j.., d]`` (the bond to the right), ``right`` -> ``R[d, i.., j..]``."""
    n = len(shapes)
    bonds, ins, outs, _ = _symbols(n)
    terms = _squeezed([bonds[k] + ins[k] + outs[k] + bonds[k + 1] for k in range(n)], shapes)
    views = tuple(tuple(d for d in s if d != 1) for s in shapes)
    legs = "".join(ins[k] for k in range(n) if shapes[k][1] != 1) + \
        "".join(outs[k] for k in range(n) if shapes[k][2] != 1)
    if side == "left":
        out = legs + (bonds[n] if shapes[-1][3] != 1 else "")
    else:
        out = (bonds[0] if shapes[0][0] != 1 else "") + legs
    return ",".join(terms) + "->" + out, views


class BlockPlan:
    """A chain of cores cut around site ``centre`` into three blocks, for training.

    ``L[ai, aj, d] = T_0 ··· T_{c-1}`` (shape ``(Ai, Aj, D2)``; ``(1, 1, 1)`` when ``c = 0``),
    ``C = T_c`` (``(D2, Mi, Mj, D3)``) and ``R[e, pi, pj] = T_{c+1} ··· T_{n-1}``
    (``(D3, Pi, Pj)``), so that ``W[(ai mi pi), (aj mj pj)] = sum_{d,e} L C R`` (padded
    shape ``(in_size, out_size)``). With ``G = x^T dy`` (the weight gradient, ``2 rows I J``
    FLOPs) the blocks' gradients are projections of G: ``dL = G · CR``, ``dR = G · LC``,
    ``dC = L^T · G · R^T``; or, without forming G, contractions of ``x`` and ``dy`` with the
    other blocks (:attr:`env`, planned per row count).

    Attributes:
        centre: c; dims: ``(Ai, Aj, Mi, Mj, Pi, Pj, D2, D3)``.
        left, right: the plans contracting the cores left / right of c into L / R (None
            for no core or a single core, which is a reshape), with ``left_views`` /
            ``right_views`` the squeezed core views they take.
        flops: FLOPs of the block products: ``"cr"`` (C·R), ``"lc"`` (L·C), ``"w_cr"``
            (W = L·CR; also dL = G·CR and H = L^T·G), ``"w_lc"`` (W = LC·R; also dR = G·LC
            and K = G·R^T), ``"gemm_row"`` (``2 I J``: the forward GEMM, the input gradient and
            G per row), ``"blocks"`` (forming L and R).
        env: :class:`RowPaths` of the gradients without G: ``"l_cr"`` (x, dy, CR -> dL),
            ``"l"`` (x, dy, C, R -> dL), ``"r_lc"`` (x, dy, LC -> dR), ``"r"`` (x, dy, L, C
            -> dR), ``"c"`` (x, dy, L, R -> dC).

    Raises:
        TypeError / ValueError: ``core_shapes`` do not form a chain (:func:`check_chain`),
            or ``centre`` is not an int in ``[0, n)``.
    """

    ENV = {"l_cr": "naxp,nbzq,dxzpq->abd", "l": "naxp,nbzq,dxze,epq->abd",
           "r_lc": "naxp,nbzq,abxze->epq", "r": "naxp,nbzq,abd,dxze->epq",
           "c": "naxp,nbzq,abd,epq->dxze"}

    def __init__(self, core_shapes: CoreShapes, centre: int, optimize: str = "auto-hq") -> None:
        shapes = check_chain(core_shapes)
        n = len(shapes)
        c = check_site_index(centre, n, "centre", negative=False)
        self.core_shapes, self.centre = shapes, c
        Ai, Aj = prod(s[1] for s in shapes[:c]), prod(s[2] for s in shapes[:c])
        Pi, Pj = prod(s[1] for s in shapes[c + 1:]), prod(s[2] for s in shapes[c + 1:])
        D2, Mi, Mj, D3 = shapes[c]
        self.dims = (Ai, Aj, Mi, Mj, Pi, Pj, D2, D3)
        self.in_size, self.out_size = Ai * Mi * Pi, Aj * Mj * Pj
        self.left = self.right = None
        self.left_views = self.right_views = ()
        blocks = 0
        if c > 1:
            eq, self.left_views = _block_equation(shapes[:c], "left")
            self.left = get_plan(eq, self.left_views, optimize)
            blocks += self.left.flops
        if n - c - 1 > 1:
            eq, self.right_views = _block_equation(shapes[c + 1:], "right")
            self.right = get_plan(eq, self.right_views, optimize)
            blocks += self.right.flops
        u = 2 * self.in_size * self.out_size
        self.flops = {"cr": 2 * D2 * Mi * Mj * D3 * Pi * Pj, "lc": 2 * Ai * Aj * D2 * Mi * Mj * D3,
                      "w_cr": u * D2, "w_lc": u * D3, "gemm_row": u, "blocks": blocks}
        x, dy = (Ai, Mi, Pi), (Aj, Mj, Pj)
        ops = {"l_cr": [(D2, Mi, Mj, Pi, Pj)], "l": [(D2, Mi, Mj, D3), (D3, Pi, Pj)],
               "r_lc": [(Ai, Aj, Mi, Mj, D3)], "r": [(Ai, Aj, D2), (D2, Mi, Mj, D3)],
               "c": [(Ai, Aj, D2), (D3, Pi, Pj)]}
        self.env = {k: RowPaths(self.ENV[k], lambda rows, o=o: ((rows, *x), (rows, *dy), *o),
                                "n", optimize) for k, o in ops.items()}

    def __repr__(self) -> str:
        return (f"BlockPlan({self.core_shapes}, centre={self.centre}, dims={self.dims}, "
                f"flops={self.flops})")


@lru_cache(maxsize=256)
def _block_plan(core_shapes: CoreShapes, centre: int) -> BlockPlan:
    return BlockPlan(core_shapes, centre)


def block_plan(core_shapes: Sequence[Sequence[int]], centre: int) -> BlockPlan:
    """The cached :class:`BlockPlan` of cores of these shapes cut around ``centre`` (call it
    when the cores are set, not in a forward pass).

    Raises:
        TypeError / ValueError: as :class:`BlockPlan`.
    """
    shapes = check_chain(core_shapes)
    return _block_plan(shapes, check_site_index(centre, len(shapes), "centre", negative=False))
