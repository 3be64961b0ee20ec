"""4-bit embedding tables in an ONNX graph: packed codes gathered per token.

A table ``E`` (rows, width) is cut along its width into blocks of ``block_size``
columns; each block of each row keeps a float16 ``scale`` and ``offset`` (its minimum)
and 16 levels: ``E[v, c] ~ q[v, c] * scale[v, b] + offset[v, b]`` with ``q`` in 0..15
and ``b = c // block_size`` (asymmetric min/max quantization). Two codes share a byte:
the low nibble holds column ``c`` and the high nibble column ``c + padded / 2`` (so
unpacking is one ``Concat``, no interleave).

:func:`gather_4bit` replaces a ``Gather`` of a float table by standard ONNX operators
(opset >= 13): ``Gather`` of the packed rows, of their scales and offsets, then
``Cast``/``Floor`` arithmetic to split the nibbles, ``Mul`` and ``Add`` per block. Only
the gathered rows are decoded; the float table is never built. (ONNX's ``Gather``
refuses an ``int4`` tensor, and ``DequantizeLinear`` of the whole table before the
``Gather`` would decode all rows at every run; ONNX Runtime's contrib operator
``GatherBlockQuantized`` does the same job fused, but only ONNX Runtime runs it.)

:func:`embedding_gathers` finds the word-embedding lookups of an exported graph: the
``Gather`` nodes reading a float initializer with the graph input ``input_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Table4", "quantize_table_4bit", "dequantize_table_4bit", "embedding_gathers",
           "required_embedding_gathers",
           "check_embedding_bits4", "check_gather_4bit", "gather_4bit", "table4_bytes"]

#: levels of a 4-bit code
_LEVELS = 15
#: the graph input whose lookups are the word embeddings
_IDS = "input_ids"


@dataclass(frozen=True)
class Table4:
    """A table stored with 4-bit codes.

    Attributes:
        packed: uint8 ``(rows, padded // 2)``; low nibble column ``c``, high nibble
            column ``c + padded // 2``, ``padded = blocks * block_size``.
        scale: ``(rows, blocks)`` float16 (float32 when a value exceeds float16's range).
        offset: ``(rows, blocks)``, same dtype as ``scale``: each block's minimum.
        width: the table's width before padding to whole blocks.
        block_size: columns per block.
    """

    packed: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    width: int
    block_size: int

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays."""
        return int(self.packed.nbytes + self.scale.nbytes + self.offset.nbytes)


def _check_block(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even integer >= 2, got {block_size!r}")
    return int(block_size)


#: columns per scale when none is asked for (fewer for a narrower table)
DEFAULT_BLOCK = 64


def table_block(width: int, block_size: int | None = None) -> int:
    """The block of a table ``width`` columns wide: ``block_size`` (checked: even, >= 2,
    no wider than the table rounded up to even, where a wider block only adds padding),
    or by default :data:`DEFAULT_BLOCK`, or the table's width rounded up to even where
    that is fewer."""
    widest = int(width) + int(width) % 2
    if block_size is None:
        return min(DEFAULT_BLOCK, widest)
    block = _check_block(block_size)
    if block > widest:
        raise ValueError(f"block_size {block} is wider than the table ({width} columns); "
                         f"give at most {widest}")
    return block


def table4_bytes(rows: int, width: int, block_size: int, scale_bytes: int = 2) -> int:
    """Bytes of a :class:`Table4` of a ``(rows, width)`` table: ``rows * padded / 2``
    codes plus two ``(rows, blocks)`` arrays of ``scale_bytes`` each."""
    block = _check_block(block_size)
    blocks = -(-int(width) // block)
    return int(rows) * (blocks * block // 2 + 2 * blocks * int(scale_bytes))


def quantize_table_4bit(table: np.ndarray, block_size: int | None = None) -> Table4:
    """4-bit codes of ``table`` (rows, width), per row and block of ``block_size``
    columns: ``scale = (max - min) / 15``, ``offset = min`` (both rounded to float16
    first, the codes computed from the rounded values), ``q = round((E - offset) /
    scale)`` clipped to 0..15. A width that is not a multiple of ``block_size`` is
    padded by repeating each row's last value (the range is unchanged).

    Raises:
        ValueError: ``table`` is not a 2-D float array with finite values, or
            ``block_size`` is not an even integer >= 2 or is wider than the table (its
            width, rounded up to even; default: :func:`table_block`'s).
    """
    if block_size is not None:
        _check_block(block_size)
    table = np.asarray(table)
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating) or table.size == 0:
        raise ValueError(f"table must be a non-empty 2-D float array, got shape "
                         f"{table.shape} and dtype {table.dtype}")
    if not np.isfinite(table).all():
        raise ValueError("table holds inf or nan values")
    rows, width = table.shape
    block = table_block(width, block_size)
    blocks = -(-width // block)
    padded = blocks * block
    x = table.astype(np.float64)
    if padded != width:
        x = np.pad(x, ((0, 0), (0, padded - width)), mode="edge")
    x = x.reshape(rows, blocks, block)
    lo, hi = x.min(-1), x.max(-1)
    dtype = np.float16 if max(np.abs(lo).max(), np.abs(hi).max()) < 6e4 else np.float32
    offset = lo.astype(dtype)
    span = (hi - offset.astype(np.float64)) / _LEVELS
    scale = span.astype(dtype)
    scale[~(scale > 0)] = 1  # a constant block (or one below float16's resolution)
    s = scale.astype(np.float64)[..., None]
    o = offset.astype(np.float64)[..., None]
    q = np.clip(np.rint((x - o) / s), 0, _LEVELS).astype(np.uint8).reshape(rows, padded)
    half = padded // 2
    packed = (q[:, :half] | (q[:, half:] << 4)).astype(np.uint8)
    return Table4(packed, scale, offset, width, block)


def dequantize_table_4bit(t: Table4) -> np.ndarray:
    """The float32 table ``(rows, width)`` that :func:`gather_4bit`'s graph gathers from:
    ``q * scale + offset`` in float32."""
    rows = t.packed.shape[0]
    q = np.concatenate([t.packed & 15, t.packed >> 4], axis=1).astype(np.float32)
    blocks = t.scale.shape[1]
    y = q.reshape(rows, blocks, t.block_size) * t.scale.astype(np.float32)[..., None] \
        + t.offset.astype(np.float32)[..., None]
    return y.reshape(rows, blocks * t.block_size)[:, : t.width]


def embedding_gathers(model: Any) -> list[str]:
    """Names of the ``Gather`` nodes of ``model`` (an ``onnx.ModelProto``) that read a
    2-D float32 initializer at the graph input ``input_ids`` (the word embeddings); nodes
    without a name are given one (``gather_4bit_{k}``)."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    names = []
    for k, node in enumerate(model.graph.node):
        if node.op_type != "Gather" or len(node.input) != 2 or node.input[1] != _IDS \
                or _IDS not in inputs:
            continue
        t = inits.get(node.input[0])
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2 or _axis(node) != 0:
            continue
        if not node.name:
            node.name = f"gather_4bit_{k}"
        names.append(node.name)
    return names


def required_embedding_gathers(model: Any, src: Any) -> list[str]:
    """:func:`embedding_gathers` of ``model`` (read from the file ``src``), or
    ``ValueError`` when it has none: what ``embedding_bits=4`` stores in 4 bits."""
    names = embedding_gathers(model)
    if not names:
        raise ValueError(f"embedding_bits=4: {src} has no Gather of a float32 table at the "
                         "graph input 'input_ids' to store in 4 bits")
    return names


def _axis(node: Any) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "axis"), 0)


def _opset(model: Any) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_gather_4bit(model: Any, nodes: Sequence[str], block_size: int | None = None
                      ) -> None:
    """Every check of :func:`gather_4bit` (the same ``ValueError``), nothing changed: for a
    caller that checks before a long quantization of the rest of the graph."""
    from onnx import TensorProto

    if block_size is not None:
        _check_block(block_size)
    graph = model.graph
    if _opset(model) < 13:
        raise ValueError(f"model: opset {_opset(model)}; the 4-bit gather needs opset >= 13")
    by_name = {n.name: n for n in graph.node if n.name}
    inits = {t.name: t for t in graph.initializer}
    for name in nodes:
        node = by_name.get(name)
        if node is None or node.op_type != "Gather" or _axis(node) != 0:
            raise ValueError(f"nodes: {name!r} is not a Gather node on axis 0 of the graph")
        table_name = node.input[0]
        if table_name not in inits or len(inits[table_name].dims) != 2 \
                or inits[table_name].data_type != TensorProto.FLOAT:
            raise ValueError(f"nodes: Gather {name!r} does not read a 2-D float32 initializer")
        users = [n.name or n.op_type for n in graph.node if table_name in n.input and n is not node]
        if users:
            raise ValueError(f"nodes: the table {table_name!r} of Gather {name!r} is also read "
                             f"by {users[:3]} (tied weights); it cannot be stored in 4 bits alone")
        table_block(int(inits[table_name].dims[1]), block_size)


def check_embedding_bits4(model: Any, nodes: Sequence[str], block_size: int | None = None
                          ) -> None:
    """:func:`check_gather_4bit` for a caller's ``embedding_bits=4``: the same checks, the
    error named ``embedding_bits=4: ...`` (not by the ``nodes`` / ``model`` arguments of
    :func:`gather_4bit`, which the caller never passed)."""
    try:
        check_gather_4bit(model, nodes, block_size)
    except ValueError as err:
        msg = str(err).removeprefix("nodes: ").removeprefix("model: ")
        raise ValueError(f"embedding_bits=4: {msg}") from None


def gather_4bit(model: Any, nodes: Sequence[str],
                block_size: int | None = None) -> dict[str, Table4]:
    """Rewrite ``model`` (an ``onnx.ModelProto``, in place): each ``Gather`` node named in
    ``nodes`` reads its table as a :class:`Table4` instead (initializers
    ``{table}.q4``, ``{table}.q4_scale``, ``{table}.q4_offset``; the float table is
    removed). The node's output keeps its name, shape ``(*ids.shape, width)`` and
    dtype float32. Returns ``{table name: Table4}``.

    Raises:
        ValueError: a name in ``nodes`` is not a ``Gather`` on axis 0 of a 2-D float32
            initializer; that table is also read by another node (e.g. tied to an
            output layer); the graph's opset is below 13; a bad ``block_size``.
    """
    from onnx import TensorProto, helper, numpy_helper

    check_gather_4bit(model, nodes, block_size)
    graph = model.graph
    by_name = {n.name: n for n in graph.node if n.name}
    inits = {t.name: t for t in graph.initializer}
    out: dict[str, Table4] = {}
    for name in nodes:
        node = by_name[name]
        table_name, ids = node.input[0], node.input[1]
        table = numpy_helper.to_array(inits[table_name])
        t = quantize_table_4bit(table, block_size)
        block = t.block_size
        out[table_name] = t
        graph.initializer.remove(inits.pop(table_name))
        p = f"{table_name}.q4"
        blocks, padded = t.scale.shape[1], t.scale.shape[1] * block
        consts = {
            p: t.packed, f"{p}_scale": t.scale, f"{p}_offset": t.offset,
            f"{p}_sixteenth": np.array(1 / 16, np.float32),
            f"{p}_sixteen": np.array(16, np.float32),
            f"{p}_blocks": np.array([blocks, block], np.int64),
            f"{p}_width": np.array([padded], np.int64), f"{p}_last": np.array([-1], np.int64),
        }
        if padded != t.width:
            consts[f"{p}_start"] = np.array([0], np.int64)
            consts[f"{p}_stop"] = np.array([t.width], np.int64)
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        v = f"{p}/"  # value names
        final = node.output[0]
        new = [
            helper.make_node("Gather", [p, ids], [v + "codes"], name=f"{name}_q4"),
            helper.make_node("Cast", [v + "codes"], [v + "f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [v + "f", f"{p}_sixteenth"], [v + "f16"]),
            helper.make_node("Floor", [v + "f16"], [v + "high"]),
            helper.make_node("Mul", [v + "high", f"{p}_sixteen"], [v + "high16"]),
            helper.make_node("Sub", [v + "f", v + "high16"], [v + "low"]),
            helper.make_node("Concat", [v + "low", v + "high"], [v + "q"], axis=-1),
            helper.make_node("Shape", [ids], [v + "ids_shape"]),
            helper.make_node("Concat", [v + "ids_shape", f"{p}_blocks"], [v + "block_shape"],
                             axis=0),
            helper.make_node("Reshape", [v + "q", v + "block_shape"], [v + "qb"]),
            helper.make_node("Gather", [f"{p}_scale", ids], [v + "s"]),
            helper.make_node("Cast", [v + "s"], [v + "sf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [v + "sf", f"{p}_last"], [v + "su"]),
            helper.make_node("Gather", [f"{p}_offset", ids], [v + "o"]),
            helper.make_node("Cast", [v + "o"], [v + "of"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [v + "of", f"{p}_last"], [v + "ou"]),
            helper.make_node("Mul", [v + "qb", v + "su"], [v + "scaled"]),
            helper.make_node("Add", [v + "scaled", v + "ou"], [v + "yb"]),
            helper.make_node("Concat", [v + "ids_shape", f"{p}_width"], [v + "row_shape"],
                             axis=0),
        ]
        if padded == t.width:
            new.append(helper.make_node("Reshape", [v + "yb", v + "row_shape"], [final]))
        else:
            new += [helper.make_node("Reshape", [v + "yb", v + "row_shape"], [v + "y"]),
                    helper.make_node("Slice", [v + "y", f"{p}_start", f"{p}_stop",
                                               f"{p}_last"], [final])]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for k, n in enumerate(new):
            graph.node.insert(at + k, n)
    return out
