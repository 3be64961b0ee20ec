"""tnlm: compress and fine-tune pre-trained language models with Matrix Product Operators."""

from tnlm.core import MPO, ContractionPlan, TruncationPolicy, factorize, padded_dim

__version__ = "0.1.0"

__all__ = ["MPO", "ContractionPlan", "TruncationPolicy", "factorize", "padded_dim"]
