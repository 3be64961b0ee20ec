"""Budgets for a whole model: from a fraction of the targeted parameters to bond caps."""

from __future__ import annotations

from typing import Any

from torch import nn

from tnlm.bridge import kind_of, weight_xw
from tnlm.core.budget import uniform_max_bond
from tnlm.integration import MPOConfig

__all__ = ["uniform_overrides"]


def uniform_overrides(model: nn.Module, config: MPOConfig, fraction: float) -> dict[str, Any]:
    """Per target module of ``model``: ``{"max_bond": chi}``, the largest uniform bond cap
    keeping at most ``fraction`` of that module's dense parameters, for the site shapes
    ``config`` gives it. Use as ``MPOConfig(overrides=...)``.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    out = {}
    for name, m in model.named_modules():
        if name and kind_of(m) is not None and config.is_target(name):
            I, J = weight_xw(m).shape
            spec, _ = config.spec_for(name, I, J)
            ins, outs = spec.site_shapes(I, J)
            out[name] = {"max_bond": uniform_max_bond(ins, outs, fraction, dense_params=I * J)}
    return out
