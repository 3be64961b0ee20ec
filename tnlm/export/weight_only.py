"""Weight-only quantization of an exported graph: ONNX Runtime's ``MatMulNBits``.

:func:`quantize_weights` stores every ``MatMul`` weight of the graph as 8- or 4-bit
integers with one float scale per block of ``block_size`` consecutive input rows of a
column: each ``MatMul x @ W`` becomes ``MatMulNBits`` (ONNX Runtime's ``com.microsoft``
domain). How it multiplies is its ``accuracy_level``: ``COMPUTE_FLOAT`` (1) dequantizes
``W`` block by block and multiplies in float32; ``COMPUTE_INT8`` (4) also quantizes each
row of the activations to int8 per block of ``block_size`` entries, one scale each, and
sums in integers. Against :func:`~tnlm.export.quantize_int8` (dynamic quantization: one
int8 scale for a whole activation tensor) both keep far more of a decoder
(docs/export.md). The default is the fast one of each width on x86 CPUs (ONNX Runtime
1.32, SmolLM2 at 60 %, one thread, a cached step at batch 1): 8 bits with int8 compute
(13 ms, against 263 ms with float compute, which has no fast kernel at 8 bits), 4 bits
with float compute (13 ms; the float32 graph's step: 23 ms). ::

    W (K x N, float32)          codes: uint8 (N, ceil(K/b), b * bits / 8), zero point implicit
    x @ W  ──────────────►      scales: float32 (N, ceil(K/b))
                                MatMulNBits(x, codes, scales)        (float compute)

On a graph that keeps the MPO layers factorized (:func:`~tnlm.export.export_onnx`), each
factor is quantized alone (a factor with fewer rows than ``block_size`` is one
zero-padded block per column). A language-model head tied to the word embeddings reads
the table through a ``Transpose`` in the exported graph; that head is given its own
transposed copy of the table first, so it is quantized like every other weight (the
table itself is then read by the ``Gather`` alone). ``Gather`` tables stay float32, or
with ``embedding_bits=4`` the word-embedding table is stored as 4-bit codes
(:mod:`tnlm.export.table4`, as :func:`~tnlm.export.quantize_int8` does).
"""

from __future__ import annotations

import logging
import numbers
import os
from pathlib import Path
from typing import Any

from tnlm.export.onnx_graph import external_files, replace_onnx
from tnlm.export.quantize import BITS_KEY, is_quantized
from tnlm.export.staging import staging_dir

__all__ = ["quantize_weights", "WEIGHT_BITS", "WEIGHT_BLOCKS", "COMPUTE_FLOAT", "COMPUTE_INT8",
           "default_compute"]

#: the weight precisions :func:`quantize_weights` offers
WEIGHT_BITS = (8, 4)
#: the block sizes (input rows per scale) ONNX Runtime's quantizer implements; any other
#: size leaves every code zero without an error (ONNX Runtime 1.32)
WEIGHT_BLOCKS = (16, 32, 64, 128, 256)

#: ``MatMulNBits``' accuracy levels offered: multiply in float32, or in int8 with the
#: activations quantized per block
COMPUTE_FLOAT, COMPUTE_INT8 = 1, 4

def default_compute(bits: int) -> int:
    """The accuracy level :func:`quantize_weights` uses when given none: the fast kernel
    of each width on x86 (ONNX Runtime 1.32): :data:`COMPUTE_INT8` for 8 bits,
    :data:`COMPUTE_FLOAT` for 4."""
    return COMPUTE_INT8 if bits == 8 else COMPUTE_FLOAT


#: ONNX files larger than this are written with their tensors in a separate file
_PROTOBUF_LIMIT = 2**31 - 2**24


def quantize_weights(src: str | os.PathLike, dst: str | os.PathLike, *, bits: int = 8,
                     block_size: int = 32, symmetric: bool = True,
                     embedding_bits: int | None = None, embedding_block: int | None = None,
                     compute: int | None = None) -> int:
    """Write ``dst``: the ONNX file ``src`` with every constant ``MatMul`` weight (a
    tied language-model head included) stored in ``bits`` bits (``MatMulNBits``);
    returns the size of ``dst`` in bytes (with the external data file it names, if it
    needs one: ``dst`` + ``".data"``, or ``<dst>.<8 hex digits>.data`` where that name was
    taken, :func:`~tnlm.export.onnx_graph.replace_onnx`). Written in a staging folder
    beside ``dst`` (:func:`~tnlm.export.staging.staging_dir`, which first removes the ones
    killed writers left), then renamed.

    Args:
        src: an ONNX file (:func:`~tnlm.export.export_onnx`,
            :func:`~tnlm.export.export_onnx_decoder`), not quantized already.
        dst: the file to write (its folder is created).
        bits: 8 or 4 (:data:`WEIGHT_BITS`).
        block_size: input rows per scale, one of :data:`WEIGHT_BLOCKS` (16 ... 256); each
            column of a ``K x N`` weight has ``ceil(K / block_size)`` scales (smaller
            blocks: more accurate, a few more bytes: 4 bytes a block of float32 scale,
            plus a zero point with ``symmetric=False``).
        symmetric: codes centred on zero with no zero point (default), or an offset per
            block (``False``: one more code level of range, more bytes).
        embedding_bits: None (the word-embedding table stays float32) or 4: stored as
            4-bit codes with a float16 scale and offset per row and block of
            ``embedding_block`` columns (:func:`tnlm.export.table4.gather_4bit`).
        embedding_block: columns per scale with ``embedding_bits=4`` (even, at most the
            table's width, checked before any quantization; default: 64, or the width
            where that is fewer).
        compute: ``MatMulNBits``' accuracy level, :data:`COMPUTE_FLOAT` or
            :data:`COMPUTE_INT8` (module docstring); None (default): int8 for 8 bits,
            float for 4 bits (the fast kernels on x86). Recorded in the file's metadata
            (``tnlm.weight_compute``).

    Raises:
        ImportError: ``onnxruntime`` is missing (``pip install 'tnlm[export]'``).
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``bits`` not in :data:`WEIGHT_BITS`, ``block_size`` not in
            :data:`WEIGHT_BLOCKS`, ``compute`` not None or one of the two ints, a bad
            ``embedding_block`` (also one wider than the table) or one without
            ``embedding_bits=4``, ``dst`` a folder, a
            graph already quantized
            or with no ``MatMul`` of a constant weight, or ``embedding_bits=4`` on a graph
            without a float word-embedding ``Gather`` at ``input_ids`` or whose table
            another node reads too. Nothing is written then.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in WEIGHT_BITS:
        raise ValueError(f"bits must be one of {WEIGHT_BITS}, got {bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) \
            or block_size not in WEIGHT_BLOCKS:
        raise ValueError(f"block_size must be one of {WEIGHT_BLOCKS} (input rows per scale), "
                         f"got {block_size!r}")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be a bool, got {symmetric!r}")
    # an int: 4.0 compared equal and was written as a float attribute, which ONNX Runtime
    # refuses when the file is loaded
    if compute is not None and (isinstance(compute, bool)
                                or not isinstance(compute, numbers.Integral)
                                or compute not in (COMPUTE_FLOAT, COMPUTE_INT8)):
        raise ValueError(f"compute must be None, {COMPUTE_FLOAT} (float32) or {COMPUTE_INT8} "
                         f"(int8), got {compute!r}")
    compute = default_compute(bits) if compute is None else int(compute)
    if embedding_bits not in (None, 4) or isinstance(embedding_bits, bool):
        raise ValueError(f"embedding_bits must be None (float32 table) or 4, got "
                         f"{embedding_bits!r}")
    if embedding_block is not None and embedding_bits != 4:
        raise ValueError(f"embedding_block={embedding_block!r} applies with embedding_bits=4 "
                         "only (the columns sharing one scale of the 4-bit table); without it "
                         "the table stays float32")
    if embedding_bits == 4 and embedding_block is not None and (
            isinstance(embedding_block, bool) or not isinstance(embedding_block, int)
            or embedding_block < 2 or embedding_block % 2):
        raise ValueError(f"embedding_block must be an even integer >= 2, got "
                         f"{embedding_block!r}")
    mq = _quantizer_module()
    import onnx

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX file {src}")
    if dst.is_dir():
        raise ValueError(f"dst {dst} is a folder; expected the file to write")
    source_data = external_files(src)
    model = onnx.load(str(src))
    if is_quantized(model):
        raise ValueError(f"{src} is quantized already; quantize the float32 export")
    props = {p.key: p.value for p in model.metadata_props}
    untie_transposed_weights(model)
    tables: list[str] = []
    if embedding_bits == 4:
        from tnlm.export.table4 import check_embedding_bits4, required_embedding_gathers

        tables = required_embedding_gathers(model, src)  # names unnamed nodes
        # a table read elsewhere too, a block wider than it: before the long quantization
        check_embedding_bits4(model, tables, embedding_block)
    config = mq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                             bits=bits, accuracy_level=compute,
                                             op_types_to_quantize=("MatMul",))
    log = logging.getLogger(mq.__name__)
    level = log.level
    log.setLevel(logging.WARNING)  # a line per node otherwise
    try:
        quantizer = mq.MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
    finally:
        log.setLevel(level)
    out = quantizer.model.model
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        raise ValueError(f"{src} has no MatMul of a constant weight to quantize")
    if tables:
        from tnlm.export.table4 import gather_4bit

        try:
            gather_4bit(out, tables, embedding_block)
        except ValueError as err:
            raise ValueError(f"embedding_bits=4: {err}") from None
    props[BITS_KEY] = str(bits)
    props["tnlm.weight_compute"] = "int8" if compute == COMPUTE_INT8 else "float32"
    del out.metadata_props[:]  # the source's records (e.g. tnlm.gauge_fixed_chains) kept
    for key, value in props.items():
        out.metadata_props.add(key=key, value=value)
    external = _weight_bytes(out) > _PROTOBUF_LIMIT
    dst.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(dst) as tmp:
        staged = tmp / dst.name
        onnx.save(out, str(staged), save_as_external_data=external,
                  location=f"{dst.name}.data" if external else None)
        # an earlier export's data file that nothing names any more goes (not the source's)
        replace_onnx(staged, dst, keep=[src, *source_data])
    # the data file replace_onnx named (another where <dst>.data was taken)
    return dst.stat().st_size + sum(f.stat().st_size for f in external_files(dst))


def untie_transposed_weights(model: Any) -> int:
    """Give each ``MatMul`` whose weight is ``Transpose(W)`` of a 2-D initializer ``W``
    (a language-model head tied to the word embeddings, as the exporter writes it) its
    own initializer ``W^T`` (named ``{W}.T``), so that the weight is a constant a
    quantizer can store; ``Transpose`` nodes left without a reader are removed. Changes
    ``model`` (an ``onnx.ModelProto``) in place; returns how many ``MatMul`` nodes now
    read such a copy. The outputs are unchanged (the same numbers, transposed once when
    written instead of at run time)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    moved = 0
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        t = producer.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        table = inits[t.input[0]]
        if len(table.dims) != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{table.name}.T"
        if name not in inits:
            inits[name] = numpy_helper.from_array(
                numpy_helper.to_array(table).T.copy(), name)
            graph.initializer.append(inits[name])
        node.input[1] = name
        moved += 1
    if moved:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Transpose"
                and not any(o in read for o in n.output)]
        for n in dead:
            graph.node.remove(n)
    return moved


def _weight_bytes(model: Any) -> int:
    """Bytes of the tensors of ``model``: its initializers and ``Constant`` values."""
    total = sum(t.ByteSize() for t in model.graph.initializer)
    for n in model.graph.node:
        if n.op_type == "Constant":
            total += sum(a.t.ByteSize() for a in n.attribute if a.HasField("t"))
    return total


def _quantizer_module() -> Any:
    """ONNX Runtime's ``matmul_nbits_quantizer``; importing it configures the root logger
    (``basicConfig(level=INFO)``), which is put back as it was."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as mq
    except ImportError as err:
        raise ImportError(f"quantize_weights needs onnxruntime ({err}); "
                          "pip install 'tnlm[export]'") from err
    finally:
        root.setLevel(level)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
    return mq
