"""torch bridge: MPO cores as torch module parameters, and lightweight fine-tuning."""

from tnlm.bridge.finetune import (
    TRAIN_SETS,
    ParamReport,
    freeze_central,
    make_optimizer,
    mpo_modules,
    parameter_groups,
    parameter_report,
    select_parameters,
    set_trainable,
    train_auxiliary_only,
)
from tnlm.bridge.kinds import (
    ALL_KINDS,
    KINDS,
    MATRIX_KINDS,
    dense_module,
    describe_kinds,
    kind_of,
    weight_xw,
)
from tnlm.bridge.layer import (
    ComputedWeight,
    MPODtypeError,
    MPOEmbedding,
    MPOLinear,
    MPOModule,
    ReadOnlyWeightError,
    invalidate_caches,
    set_dense_cache,
)
from tnlm.bridge.pivoted import PivotedLinear, pivot_layers

__all__ = [
    "ALL_KINDS",
    "KINDS",
    "MATRIX_KINDS",
    "TRAIN_SETS",
    "ComputedWeight",
    "MPODtypeError",
    "MPOEmbedding",
    "MPOLinear",
    "MPOModule",
    "ParamReport",
    "PivotedLinear",
    "ReadOnlyWeightError",
    "dense_module",
    "describe_kinds",
    "freeze_central",
    "kind_of",
    "make_optimizer",
    "mpo_modules",
    "parameter_groups",
    "parameter_report",
    "pivot_layers",
    "select_parameters",
    "set_dense_cache",
    "invalidate_caches",
    "set_trainable",
    "train_auxiliary_only",
    "weight_xw",
]
