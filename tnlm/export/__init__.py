"""Shipping a compressed model: ONNX graphs that keep the MPO factors, self-contained
folders (with sentence-transformers files), dense transformers folders, int8 weights.

* :func:`export_onnx` — ONNX graph holding the cores (a 2-site layer is ``x @ A @ B``);
* :func:`export_onnx_decoder` — a causal LM's graph with its key/value cache in and out;
  :class:`OnnxCausalLM` runs it (greedy :meth:`~OnnxCausalLM.generate`);
* :func:`fuse_shared_matmuls` — one MatMul for the projections that read the same
  states (query/key/value);
* :func:`quantize_int8` — ONNX Runtime dynamic quantization of such a graph
  (``embedding_bits=4``: the word-embedding table with 4-bit codes,
  :mod:`tnlm.export.table4`);
* :func:`quantize_weights` — weight-only 8- or 4-bit MatMul weights with float
  activations (ONNX Runtime's ``MatMulNBits``);
* :func:`save_self_contained` / :func:`load_compressed` — a folder that rebuilds the
  compressed model alone; :func:`sentence_transformer` — its ``SentenceTransformer``;
* :func:`export_hf` — merged dense weights, loadable without tnlm (dense size);
* ``tnlm export DIR --format {onnx,hf,st} [--int8
  [--embedding-bits 4] | --weight-bits {8,4}] --out PATH`` (:mod:`tnlm.cli.export`)
  writes each of them.

Needs the ``export`` extra (onnx, onnxruntime, onnxscript, sentence-transformers) for
the ONNX and sentence-transformers parts; the rest needs only tnlm.
"""

from __future__ import annotations

from typing import Any

from tnlm.export.factorized import (
    FactorizedEmbedding,
    FactorizedLinear,
    factorized_copy,
    factorized_params,
)
from tnlm.export.folder import is_checkpoint, load_compressed, save_self_contained
from tnlm.export.fuse import fuse_shared_matmuls
from tnlm.export.hf import export_hf
from tnlm.export.onnx_decoder import OnnxCausalLM, export_onnx_decoder
from tnlm.export.onnx_graph import EXPORTER, ExportResult, OnnxEncoder, export_onnx, onnx_weights
from tnlm.export.quantize import quantize_int8
from tnlm.export.weight_only import quantize_weights

__all__ = ["export_onnx", "ExportResult", "OnnxEncoder", "onnx_weights", "EXPORTER",
           "export_onnx_decoder", "OnnxCausalLM",
           "quantize_int8", "quantize_weights", "fuse_shared_matmuls", "save_self_contained",
           "load_compressed", "is_checkpoint",
           "sentence_transformer", "export_hf", "FactorizedLinear", "FactorizedEmbedding",
           "factorized_copy", "factorized_params"]


def sentence_transformer(folder: Any, device: str = "cpu") -> Any:
    """The ``SentenceTransformer`` of a :func:`save_self_contained` folder (imports
    sentence-transformers; see :func:`tnlm.export.sentence.sentence_transformer`)."""
    from tnlm.export.sentence import sentence_transformer as build

    return build(folder, device=device)
