"""The causal-LM job: compress a decoder LLM to a budget layer by layer, heal it on
next-token distributions, measure it by perplexity.

``job`` (:class:`CausalLMRecipe`, :func:`compress_causal_lm`: what ``tnlm compress`` does
to a causal LM) uses ``text`` (its calibration and healing text, data-free by default,
``sampling`` and ``prompts`` below it), ``heal`` (the healing loop) with ``kl`` (its loss)
and ``quality`` (perplexity, greedy answers). The layer-by-layer compression it runs is
:mod:`tnlm.compress.layerwise`, shared with encoders.
"""

from tnlm.compress.decoder.heal import CausalHealConfig, CausalHealResult, heal_causal
from tnlm.compress.decoder.job import CausalLMRecipe, compress_causal_lm
from tnlm.compress.decoder.quality import perplexity

__all__ = ["CausalHealConfig", "CausalHealResult", "CausalLMRecipe", "compress_causal_lm",
           "heal_causal", "perplexity"]
