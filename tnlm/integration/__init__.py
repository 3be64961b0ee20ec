"""transformers integration: the default model and MPO replacement of model layers."""

from tnlm.integration.default_model import default_model_path, load_default_weights

__all__ = ["default_model_path", "load_default_weights"]
