"""Weight-only quantization of an exported graph: ONNX Runtime's ``MatMulNBits``.

:func:`quantize_weights` stores every ``MatMul`` weight of the graph as 8- or 4-bit
integers with one float scale per block of ``block_size`` consecutive input rows of a
column, and leaves the activations in float32: each ``MatMul x @ W`` becomes
``MatMulNBits`` (ONNX Runtime's ``com.microsoft`` domain), which dequantizes ``W`` block
by block and multiplies in float. Against :func:`~tnlm.export.quantize_int8` (dynamic
quantization: the activations are quantized too, per batch at run time, and the
products are integer sums) it keeps more of the model: on a decoder the activations'
dynamic range is what int8 loses (SmolLM2-135M: 4 of 50 greedy answers identical to the
float model's with dynamic int8, docs/export.md). ::

    W (K x N, float32)                 codes (N, K/b, b) int8/uint4, scales (N, K/b)
    x @ W  ──────────────────────►     MatMulNBits(x, codes, scales)   (float compute)

On a graph that keeps the MPO layers factorized (:func:`~tnlm.export.export_onnx`), each
factor is quantized alone (a factor with fewer rows than ``block_size`` is one
zero-padded block per column). ``Gather`` tables (the word embeddings) stay float32,
or with ``embedding_bits=4`` the word-embedding table is stored as 4-bit codes
(:mod:`tnlm.export.table4`, as :func:`~tnlm.export.quantize_int8` does).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

__all__ = ["quantize_weights", "WEIGHT_BITS"]

#: the weight precisions :func:`quantize_weights` offers
WEIGHT_BITS = (8, 4)

#: ONNX files larger than this are written with their tensors in a separate file
_PROTOBUF_LIMIT = 2**31 - 2**24


def quantize_weights(src: str | os.PathLike, dst: str | os.PathLike, *, bits: int = 8,
                     block_size: int = 32, symmetric: bool = True,
                     embedding_bits: int | None = None, embedding_block: int = 64) -> int:
    """Write ``dst``: the ONNX file ``src`` with every constant ``MatMul`` weight stored
    in ``bits`` bits (``MatMulNBits``); returns the size of ``dst`` in bytes (with its
    external data file, if it needs one: ``dst`` + ``".data"``). Written in a temporary
    folder beside ``dst``, then renamed.

    Args:
        src: an ONNX file (:func:`~tnlm.export.export_onnx`,
            :func:`~tnlm.export.export_onnx_decoder`).
        dst: the file to write (its folder is created).
        bits: 8 or 4 (:data:`WEIGHT_BITS`).
        block_size: input rows per scale, a power of two >= 16; each column of a
            ``K x N`` weight has ``ceil(K / block_size)`` scales (smaller blocks: more
            accurate, a few more bytes: 4 bytes a block of float32 scale, plus a zero
            point with ``symmetric=False``).
        symmetric: codes centred on zero with no zero point (default), or an offset per
            block (``False``: one more code level of range, more bytes).
        embedding_bits: None (the word-embedding table stays float32) or 4: stored as
            4-bit codes with a float16 scale and offset per row and block of
            ``embedding_block`` columns (:func:`tnlm.export.table4.gather_4bit`).
        embedding_block: columns per scale with ``embedding_bits=4`` (even).

    Raises:
        ImportError: ``onnxruntime`` is missing (``pip install 'tnlm[export]'``).
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``bits`` not in :data:`WEIGHT_BITS`, a bad ``block_size``, a graph
            with no ``MatMul`` of a constant weight to quantize, or ``embedding_bits=4``
            on a graph without a float word-embedding ``Gather`` at ``input_ids`` or whose
            table another node reads too (a tied language-model head).
    """
    if isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise ValueError(f"bits must be one of {WEIGHT_BITS}, got {bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (input rows per scale), "
                         f"got {block_size!r}")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be a bool, got {symmetric!r}")
    if embedding_bits not in (None, 4) or isinstance(embedding_bits, bool):
        raise ValueError(f"embedding_bits must be None (float32 table) or 4, got "
                         f"{embedding_bits!r}")
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as mq
    except ImportError as err:
        raise ImportError(f"quantize_weights needs onnxruntime ({err}); "
                          "pip install 'tnlm[export]'") from err
    import onnx

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX file {src}")
    model = onnx.load(str(src))
    tables: list[str] = []
    if embedding_bits == 4:
        from tnlm.export.table4 import embedding_gathers

        if isinstance(embedding_block, bool) or not isinstance(embedding_block, int) \
                or embedding_block < 2 or embedding_block % 2:
            raise ValueError(f"embedding_block must be an even integer >= 2, got "
                             f"{embedding_block!r}")
        tables = embedding_gathers(model)  # names unnamed nodes
        if not tables:
            raise ValueError(f"embedding_bits=4: {src} has no Gather of a float32 table at "
                             "the graph input 'input_ids' to store in 4 bits")
    props = {p.key: p.value for p in model.metadata_props}
    config = mq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                             bits=bits, op_types_to_quantize=("MatMul",))
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

        gather_4bit(out, tables, embedding_block)
    del out.metadata_props[:]  # the source's records (e.g. tnlm.gauge_fixed_chains) kept
    for key, value in props.items():
        out.metadata_props.add(key=key, value=value)
    out.metadata_props.add(key="tnlm.weight_bits", value=str(bits))
    weights = sum(t.ByteSize() for t in out.graph.initializer)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        staged = Path(tmp) / dst.name
        external = weights > _PROTOBUF_LIMIT
        onnx.save(out, str(staged), save_as_external_data=external,
                  location=f"{dst.name}.data" if external else None)
        if external:
            os.replace(Path(tmp) / f"{dst.name}.data", dst.parent / f"{dst.name}.data")
        os.replace(staged, dst)
    size = dst.stat().st_size
    data = dst.parent / f"{dst.name}.data"
    return size + (data.stat().st_size if external and data.is_file() else 0)
