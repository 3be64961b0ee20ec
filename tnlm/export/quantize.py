"""int8 weights for an exported graph: ONNX Runtime's dynamic quantization, and
optionally a 4-bit word-embedding table.

:func:`quantize_int8` stores every ``MatMul`` weight and ``Gather`` table of the graph
as int8 with a float scale (``QuantType.QInt8``; activations are quantized per batch
at run time). On a graph from :func:`~tnlm.export.export_onnx` that keeps the MPO
layers factorized, the factors themselves are quantized: a 2-site layer's ``A`` and
``B`` each become an int8 ``MatMulInteger`` operand. With ``embedding_bits=4`` the
word-embedding table (the ``Gather`` read at ``input_ids``) is stored with 4-bit
codes and a float16 scale and offset per row and block of columns instead
(:mod:`tnlm.export.table4`): for MiniLM that table is 30522 x 384, most of the bytes
left once the encoder is compressed.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from tnlm.export.onnx_graph import external_files, gauge_fixed_chains, replace_onnx
from tnlm.export.staging import staging_dir

__all__ = ["quantize_int8", "is_quantized", "EMBEDDING_BITS", "QUANTIZED_OPS", "BITS_KEY"]

#: the word-embedding precisions :func:`quantize_int8` offers
EMBEDDING_BITS = (8, 4)


#: the operators of a graph quantized already (ONNX Runtime's dynamic int8, weight-only)
QUANTIZED_OPS = frozenset({"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
                           "DynamicQuantizeLinear", "DequantizeLinear", "QLinearMatMul",
                           "QuantizeLinear", "MatMulIntegerToFloat", "QGemm", "QAttention",
                           "GatherBlockQuantized"})
#: the metadata key :func:`~tnlm.export.weight_only.quantize_weights` records its bits in
BITS_KEY = "tnlm.weight_bits"


def is_quantized(model: Any) -> bool:
    """Whether the ONNX ``model`` (a ``ModelProto``) is quantized already: an operator of
    :data:`QUANTIZED_OPS` or tnlm's record of weight-only bits."""
    return (any(p.key == BITS_KEY for p in model.metadata_props)
            or any(n.op_type in QUANTIZED_OPS for n in model.graph.node))


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, *,
                  per_channel: bool = True, reduce_range: bool | None = None,
                  embedding_bits: int = 8, block_size: int | None = None) -> int:
    """Write ``dst``: the ONNX file ``src`` with int8 weights (dynamic quantization of
    ``MatMul`` and ``Gather``); returns the size of ``dst`` in bytes. ``dst`` is written
    in a staging folder beside it (:func:`~tnlm.export.staging.staging_dir`, which first
    removes the ones killed writers left), then renamed.

    Args:
        src: an ONNX file (e.g. from :func:`~tnlm.export.export_onnx`).
        dst: the quantized file to write (its folder is created).
        per_channel: one scale per output column (the default) instead of per tensor.
            Measured on MiniLM (SST-2 dev cosine of the pooled embeddings to the dense
            float32 model, 300 sentences, docs/export.md), per column 7-bit / per tensor
            8-bit / per tensor 7-bit: dense 0.990 / 0.957 / 0.866; 50 % low rank (not
            healed, float32 0.709) 0.702 / 0.692 / 0.670; 50 % gauge-fixed (float32
            0.741) 0.731 / 0.079 / 0.693.
        reduce_range: 7-bit weights (ONNX Runtime's ``reduce_range``). ``None``
            (default): with ``per_channel``, and per tensor when ``src`` holds
            gauge-fixed layers' chains (its exporter's record,
            :func:`~tnlm.export.onnx_graph.gauge_fixed_chains`: their balanced factors
            at 8 bits per tensor encoded garbage, MiniLM at 50 %: cosine 0.079, at 7
            bits 0.693). ``False`` with ``per_channel=False`` on such a file warns. On
            x86 CPUs without VNNI (AVX2, e.g. this project's machine) ONNX Runtime
            multiplies uint8 activations by int8 weights in int16 pairs that saturate
            when both use their full range, which per-column scales make common:
            measured on a 12 x 64 low-rank factor, the relative error of per-column
            weights is 0.140 with 8 bits and 0.017 with 7 (per tensor: 0.020), and
            MiniLM at 50 % with per-column 8-bit factors encodes garbage (cosine -0.01
            to the dense model).
        embedding_bits: 8 (the word embeddings as int8 like every other table) or 4:
            the ``(vocab, width)`` word-embedding table stored as 4-bit codes, two per
            byte, with a float16 scale and offset per row and block of ``block_size``
            columns (``vocab * (width / 2 + 4 * width / block_size)`` bytes), decoded
            per gathered token by standard ONNX operators
            (:func:`tnlm.export.table4.gather_4bit`).
        block_size: columns per scale with ``embedding_bits=4`` (even, at most the table's
            width; default: 64, or the width where that is fewer; smaller blocks are more
            accurate and larger).

    Raises:
        ImportError: ``onnxruntime`` is missing (``pip install 'tnlm[export]'``).
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``src`` is quantized already (:func:`is_quantized`); ``dst`` is a
            folder; ``embedding_bits`` not 8 or 4, a bad ``block_size`` or one
            without ``embedding_bits=4``,
            ``per_channel`` or ``reduce_range`` not a bool, or
            ``embedding_bits=4`` on a graph without a float word-embedding ``Gather``
            at ``input_ids`` (e.g. an MPO embedding) or whose table is tied to another
            layer.
    """
    if isinstance(embedding_bits, bool) or not isinstance(embedding_bits, int) \
            or embedding_bits not in EMBEDDING_BITS:
        raise ValueError(f"embedding_bits must be one of {EMBEDDING_BITS}, got {embedding_bits!r}")
    if not isinstance(per_channel, bool):
        raise ValueError(f"per_channel must be a bool, got {per_channel!r}")
    if reduce_range is not None and not isinstance(reduce_range, bool):
        raise ValueError(f"reduce_range must be None or a bool, got {reduce_range!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size < 2 or block_size % 2):
        raise ValueError(f"block_size must be an even integer >= 2, got {block_size!r}")
    if block_size is not None and embedding_bits != 4:
        raise ValueError(f"block_size={block_size!r} applies with embedding_bits=4 only (the "
                         "columns sharing one scale of the 4-bit table); at 8 bits the table "
                         "is int8 like every other weight")
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise ImportError(f"quantize_int8 needs onnxruntime ({err}); "
                          "pip install 'tnlm[export]'") from err
    import onnx

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX file {src}")
    if dst.is_dir():
        raise ValueError(f"dst {dst} is a folder; expected the file to write")
    header = onnx.load(str(src), load_external_data=False)  # the graph, not its data
    if is_quantized(header):
        raise ValueError(f"{src} is quantized already; quantize the float32 export")
    chains = gauge_fixed_chains(header) or 0
    if reduce_range is None:
        reduce_range = bool(per_channel or chains)
    elif not reduce_range and not per_channel and chains:
        warnings.warn(f"quantize_int8: {src} holds {chains} gauge-fixed layers' chains; at 8 "
                      "bits per tensor they saturate ONNX Runtime's int8 sums on CPUs without "
                      "VNNI (MiniLM at 50 %: cosine 0.079 to the dense model, 0.693 at 7 bits): "
                      "leave reduce_range=None", stacklevel=2)
    dst.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run shape pre-processing, on every call
    try:
        with staging_dir(dst) as tmp:
            source, exclude = src, []
            if embedding_bits == 4:
                from tnlm.export.table4 import check_embedding_bits4, required_embedding_gathers

                model = onnx.load(str(src))
                exclude = required_embedding_gathers(model, src)  # names unnamed nodes
                # a tied table, a block wider than it: before the long quantization
                check_embedding_bits4(model, exclude, block_size)
                source = tmp / "named.onnx"
                onnx.save(model, str(source))
            staged = tmp / dst.name
            quantize_dynamic(str(source), str(staged), op_types_to_quantize=["MatMul", "Gather"],
                             per_channel=per_channel, weight_type=QuantType.QInt8,
                             reduce_range=bool(reduce_range), nodes_to_exclude=exclude)
            if exclude:
                from tnlm.export.table4 import gather_4bit

                model = onnx.load(str(staged))
                gather_4bit(model, exclude, block_size)
                onnx.checker.check_model(model)
                onnx.save(model, str(staged))
            replace_onnx(staged, dst, keep=[src, *external_files(src)])
    finally:
        root.setLevel(level)
    return dst.stat().st_size
