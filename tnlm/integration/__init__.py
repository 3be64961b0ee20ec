"""transformers integration: MPO replacement of model layers, merging, checkpoints."""

from tnlm.integration.config import MPOConfig
from tnlm.integration.default_model import (
    default_model_path,
    load_default_model,
    load_default_weights,
    mean_pooled,
)
from tnlm.integration.io import load_tensors
from tnlm.integration.model import MPOModel, get_mpo_model
from tnlm.integration.report import format_report, report_totals

__all__ = [
    "MPOConfig",
    "MPOModel",
    "default_model_path",
    "format_report",
    "get_mpo_model",
    "load_default_model",
    "load_default_weights",
    "load_tensors",
    "mean_pooled",
    "report_totals",
]
