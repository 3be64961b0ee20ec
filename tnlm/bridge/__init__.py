"""torch bridge: MPO cores as torch module parameters, and lightweight fine-tuning."""

from tnlm.bridge.finetune import (
    ParamReport,
    freeze_central,
    mpo_modules,
    parameter_groups,
    parameter_report,
    train_auxiliary_only,
)
from tnlm.bridge.layer import GAUGES, MPOEmbedding, MPOLinear, MPOModule, export_gauge

__all__ = [
    "GAUGES",
    "MPOEmbedding",
    "MPOLinear",
    "MPOModule",
    "ParamReport",
    "export_gauge",
    "freeze_central",
    "mpo_modules",
    "parameter_groups",
    "parameter_report",
    "train_auxiliary_only",
]
