"""tnlm: compress and fine-tune pre-trained language models with Matrix Product Operators.

Layers, from the bottom: ``tnlm.core`` (the MPO tensor network), ``tnlm.bridge``
(torch modules whose parameters are MPO cores), ``tnlm.integration``
(transformers models and checkpoints), ``tnlm.compress`` (squeezing and
compression), ``tnlm.analysis`` and ``tnlm.cli``.

The transformers-level names (``MPOConfig``, ``get_mpo_model``, ``MPOModel``,
``DimensionSqueezer``, and ``compress_encoder`` with its defaults ``EncoderRecipe``: what
``tnlm compress`` does to an encoder) are importable from here; they load on first use.
"""

from importlib import import_module
from typing import Any

from tnlm.bridge import (
    MPODtypeError,
    MPOEmbedding,
    MPOLinear,
    MPOModule,
    ParamReport,
    ReadOnlyWeightError,
    freeze_central,
    make_optimizer,
    parameter_groups,
    parameter_report,
    train_auxiliary_only,
)
from tnlm.core import MPO, ContractionPlan, TruncationPolicy, factorize, padded_dim
from tnlm.core.spec import DecompositionSpec

__version__ = "0.2.0"

#: names loaded lazily from the upper layers (they import transformers)
_LAZY = {
    "MPOConfig": "tnlm.integration",
    "MPOModel": "tnlm.integration",
    "get_mpo_model": "tnlm.integration",
    "DimensionSqueezer": "tnlm.compress",
    "EncoderRecipe": "tnlm.compress",
    "compress_encoder": "tnlm.compress",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tnlm' has no attribute {name!r}")


__all__ = [
    "MPO",
    "ContractionPlan",
    "DecompositionSpec",
    "DimensionSqueezer",
    "EncoderRecipe",
    "MPOConfig",
    "MPODtypeError",
    "MPOEmbedding",
    "MPOLinear",
    "MPOModel",
    "MPOModule",
    "ParamReport",
    "ReadOnlyWeightError",
    "TruncationPolicy",
    "compress_encoder",
    "factorize",
    "freeze_central",
    "get_mpo_model",
    "make_optimizer",
    "padded_dim",
    "parameter_groups",
    "parameter_report",
    "train_auxiliary_only",
]
