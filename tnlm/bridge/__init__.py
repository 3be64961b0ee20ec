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
from tnlm.bridge.layer import (
    ComputedWeight,
    MPODtypeError,
    MPOEmbedding,
    MPOLinear,
    MPOModule,
    ReadOnlyWeightError,
    set_dense_cache,
)

__all__ = [
    "KINDS",
    "ComputedWeight",
    "MPODtypeError",
    "MPOEmbedding",
    "MPOLinear",
    "MPOModule",
    "ParamReport",
    "ReadOnlyWeightError",
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
