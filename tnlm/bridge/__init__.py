"""torch bridge: MPO cores as torch module parameters, and lightweight fine-tuning."""

from tnlm.bridge.finetune import (
    ParamReport,
    freeze_central,
    make_optimizer,
    mpo_modules,
    parameter_groups,
    parameter_report,
    train_auxiliary_only,
)
from tnlm.bridge.kinds import KINDS, dense_module, kind_of, weight_xw
from tnlm.bridge.layer import MPOEmbedding, MPOLinear, MPOModule, set_dense_cache

__all__ = [
    "KINDS",
    "MPOEmbedding",
    "MPOLinear",
    "MPOModule",
    "ParamReport",
    "dense_module",
    "freeze_central",
    "kind_of",
    "make_optimizer",
    "mpo_modules",
    "parameter_groups",
    "parameter_report",
    "set_dense_cache",
    "train_auxiliary_only",
    "weight_xw",
]
