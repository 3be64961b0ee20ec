"""tnlm: compress and fine-tune pre-trained language models with Matrix Product Operators.

Layers, from the bottom: ``tnlm.core`` (the MPO tensor network), ``tnlm.bridge``
(torch modules whose parameters are MPO cores), ``tnlm.integration``
(transformers models), ``tnlm.analysis`` and ``tnlm.cli``.
"""

from tnlm.bridge import (
    MPOEmbedding,
    MPOLinear,
    MPOModule,
    ParamReport,
    freeze_central,
    parameter_groups,
    parameter_report,
    train_auxiliary_only,
)
from tnlm.core import MPO, ContractionPlan, TruncationPolicy, factorize, padded_dim

__version__ = "0.1.0"

__all__ = [
    "MPO",
    "ContractionPlan",
    "MPOEmbedding",
    "MPOLinear",
    "MPOModule",
    "ParamReport",
    "TruncationPolicy",
    "factorize",
    "freeze_central",
    "padded_dim",
    "parameter_groups",
    "parameter_report",
    "train_auxiliary_only",
]
