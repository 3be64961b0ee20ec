"""Compression of models: the encoder job (:func:`compress_encoder`, its defaults in
:class:`EncoderRecipe`: what ``tnlm compress`` does to an encoder) and dimension squeezing;
below them calibration, data-aware truncation, budget allocation and distillation healing.
The causal-LM job is :mod:`tnlm.compress.decoder.job`."""

from tnlm.compress.encoder import EncoderRecipe, EncoderResult, compress_encoder
from tnlm.compress.squeeze import DimensionSqueezer, SqueezeResult, SqueezeStep

__all__ = ["DimensionSqueezer", "EncoderRecipe", "EncoderResult", "SqueezeResult",
           "SqueezeStep", "compress_encoder"]
