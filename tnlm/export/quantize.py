"""int8 weights for an exported graph: ONNX Runtime's dynamic quantization.

:func:`quantize_int8` stores every ``MatMul`` weight and ``Gather`` table of the graph
as int8 with a float scale (``QuantType.QInt8``; activations are quantized per batch
at run time). On a graph from :func:`~tnlm.export.export_onnx` that keeps the MPO
layers factorized, the factors themselves are quantized: a 2-site layer's ``A`` and
``B`` each become an int8 ``MatMulInteger`` operand.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["quantize_int8"]


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, *,
                  per_channel: bool = False) -> int:
    """Write ``dst``: the ONNX file ``src`` with int8 weights (dynamic quantization of
    ``MatMul`` and ``Gather``); returns the size of ``dst`` in bytes.

    Args:
        src: an ONNX file (e.g. from :func:`~tnlm.export.export_onnx`).
        dst: the quantized file to write (its folder is created).
        per_channel: one scale per output column instead of per tensor.

    Raises:
        ImportError: ``onnxruntime`` is missing (``pip install 'tnlm[export]'``).
        FileNotFoundError: ``src`` does not exist.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise ImportError(f"quantize_int8 needs onnxruntime ({err}); "
                          "pip install 'tnlm[export]'") from err
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX file {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run shape pre-processing, on every call
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gather"],
                         per_channel=per_channel, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return dst.stat().st_size
