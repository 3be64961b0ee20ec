"""Compression of MPO models: dimension squeezing (and, built on the layers below,
calibration, data-aware truncation, budget allocation and distillation healing)."""

from tnlm.compress.squeeze import DimensionSqueezer, SqueezeResult, SqueezeStep

__all__ = ["DimensionSqueezer", "SqueezeResult", "SqueezeStep"]
