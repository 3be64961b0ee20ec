"""One matmul for the projections that read the same activations.

A transformer's query, key and value projections (a Llama MLP's gate and up) read the
same hidden states. Exported as they are, ONNX Runtime runs one GEMM per projection;
for a factorized layer ``x @ A @ B`` that is one thin GEMM ``x @ A`` (``hidden x r``) per
projection, which runs at a lower FLOP rate than one wide GEMM. :func:`fuse_shared_matmuls`
rewrites an ONNX file so that every group of ``MatMul`` nodes that multiply the same
tensor by constant 2-D weights with the same number of rows becomes one ``MatMul`` by the
weights side by side and a ``Split`` of its last axis::

    x ──MatMul(A_q)──▶ q          x ──MatMul([A_q | A_k | A_v])──Split──▶ q, k, v
    x ──MatMul(A_k)──▶ k    ⟶
    x ──MatMul(A_v)──▶ v

The products are the same numbers (each output column is the same dot product; float32
summation order inside a GEMM may differ, about 1e-7 relative); the file stores the same
weights. It works on dense and factorized graphs alike, so a benchmark can fuse both.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tnlm.export.staging import save_graph_replacing

__all__ = ["fuse_shared_matmuls"]


def fuse_shared_matmuls(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                        min_group: int = 2) -> int:
    """Fuse the ``MatMul`` nodes of the ONNX file ``path`` that share their first input.

    Args:
        path: an ONNX file (weights inside it, not in external data).
        out: where to write the result (default: ``path`` itself, rewritten through a
            temporary file in its folder, then renamed).
        min_group: the fewest nodes a group needs to be fused (>= 2).

    Returns:
        the number of ``MatMul`` nodes removed (a group of k nodes removes k - 1).

    A weight that is also a graph input or output, or that a subgraph (If, Loop) reads,
    is left as it is.

    Raises:
        ValueError: ``min_group`` below 2, a file whose weights lie in external data, or a
            file below opset 13 (whose ``Split`` takes its sizes as an attribute).
    """
    import onnx
    from onnx import helper, numpy_helper

    if isinstance(min_group, bool) or not isinstance(min_group, int) or min_group < 2:
        raise ValueError(f"min_group must be an int >= 2, got {min_group!r}")
    path = Path(path)
    # the graph alone first: loading the data clears each tensor's external_data entries
    # (the check could never fire; the file was rewritten self-contained, its .data left)
    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL or t.external_data
           for t in model.graph.initializer):
        raise ValueError(f"path: {path} keeps its weights in external data; "
                         "fuse_shared_matmuls needs them inside the file")
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")),
                 0)
    if opset < 13:
        raise ValueError(f"path: {path} is opset {opset}; fuse_shared_matmuls writes the "
                         "Split of opset 13 and later (its sizes as an input)")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            uses[name] += 1
    for name in _outside_names(graph):  # such a weight must stay where it is
        uses[name] += 2
    groups: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if len(w.dims) != 2 or uses[w.name] != 1:  # a weight used elsewhere stays
            continue
        groups[(node.input[0], int(w.dims[0]), int(w.data_type))].append(i)
    fused: dict[int, list[Any]] = {}  # first node's index -> the nodes replacing the group
    removed: set[int] = set()
    dropped: set[str] = set()
    for (x, _, _), idx in groups.items():
        if len(idx) < min_group:
            continue
        nodes = [graph.node[i] for i in idx]
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        name = f"fused_{nodes[0].name or nodes[0].output[0]}_{len(nodes)}"
        w_name = _unique(f"{name}.weight", inits)
        inits[w_name] = numpy_helper.from_array(
            np.ascontiguousarray(np.concatenate(weights, axis=1)), w_name)
        graph.initializer.append(inits[w_name])
        s_name = _unique(f"{name}.split", inits)
        inits[s_name] = numpy_helper.from_array(
            np.asarray([w.shape[1] for w in weights], dtype=np.int64), s_name)
        graph.initializer.append(inits[s_name])
        y = f"{name}.out"
        fused[idx[0]] = [
            helper.make_node("MatMul", [x, w_name], [y], name=f"{name}.matmul"),
            helper.make_node("Split", [y, s_name], [n.output[0] for n in nodes], axis=-1,
                             name=f"{name}.split")]
        removed.update(idx)
        dropped.update(n.input[1] for n in nodes)
    new_nodes = []
    for i, node in enumerate(graph.node):
        if i in fused:
            new_nodes.extend(fused[i])
        elif i not in removed:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _save(model, path, out)
    return len(removed) - len(fused)


def _outside_names(graph: Any) -> set[str]:
    """The graph's input and output names and every name a subgraph's nodes read."""
    names = {v.name for v in graph.input} | {v.name for v in graph.output}
    stack = [a.g for n in graph.node for a in n.attribute if a.HasField("g")]
    stack += [g for n in graph.node for a in n.attribute for g in a.graphs]
    while stack:
        g = stack.pop()
        for node in g.node:
            names.update(node.input)
            stack += [a.g for a in node.attribute if a.HasField("g")]
            stack += [sub for a in node.attribute for sub in a.graphs]
    return names


def _unique(name: str, taken: dict[str, Any]) -> str:
    out, k = name, 1
    while out in taken:
        out, k = f"{name}.{k}", k + 1
    return out


def _save(model: Any, path: Path, out: str | os.PathLike | None) -> None:
    target = Path(out) if out is not None else path
    target.parent.mkdir(parents=True, exist_ok=True)
    save_graph_replacing(model, target)
