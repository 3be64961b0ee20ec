"""transformers integration: MPO replacement of model layers, merging, checkpoints.

Modules: ``model`` (:class:`MPOModel`, :func:`get_mpo_model`), ``surgery`` (modules put
in place and undone: ``Swap``, ``temporary``, ``set_module``, ``module_paths``), ``merge``
(factorized layers merged back into plain modules: ``merge_factorized``), ``io``
(the checkpoint format), ``checkpoint`` (reading a checkpoint onto a base model),
``peft`` (task heads, LoRA on MPO layers), ``config``, ``architectures``, ``loading``,
``report``, ``default_model``.
"""

from tnlm.integration.config import MPOConfig
from tnlm.integration.default_model import (
    default_model_path,
    load_default_model,
    load_default_weights,
    mean_pooled,
)
from tnlm.integration.io import load_tensors
from tnlm.integration.model import MPOModel, get_mpo_model
from tnlm.integration.peft import lora_config_for_mpo
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
    "lora_config_for_mpo",
    "mean_pooled",
    "report_totals",
]
