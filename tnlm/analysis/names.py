"""Classifying transformer weight names into (layer index, module type).

Knows the parameter names of BERT (and MiniLM), ALBERT, DistilBERT, GPT-2, GPT-NeoX,
Falcon, GPT-J and Phi-2 (plus the common ``q_proj``/``k_proj``/... spelling)::

    encoder.layer.3.attention.self.query         -> (3, "Q")
    encoder.layer.3.attention.output.dense       -> (3, "O")
    encoder.layer.3.intermediate.dense           -> (3, "FFN-in")
    encoder.layer.3.output.dense                 -> (3, "FFN-out")
    distilbert.transformer.layer.2.ffn.lin1      -> (2, "FFN-in")
    albert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output -> (0, "FFN-out")
    transformer.h.5.attn.c_attn                  -> (5, "QKV")   # GPT-2's fused Q, K, V
    gpt_neox.layers.2.attention.query_key_value  -> (2, "QKV")   # GPT-NeoX, Falcon
    model.layers.1.self_attn.dense               -> (1, "O")     # Phi-2
    embeddings.word_embeddings / transformer.wte -> (None, "embedding")

A trailing ``.weight`` is ignored. ALBERT shares one layer across depth, so its
"layer" is the layer-group index.

Why by name: the names classified here are read from weight files (no model object),
and ``tnlm.analysis`` imports only ``tnlm.core``. With a model at hand, the block of a
module comes from its architecture (:func:`tnlm.integration.architectures.block_indices`);
the container names below cover the block stacks of every architecture there (a test
checks it), plus ``block``/``blocks`` of other models.
"""

from __future__ import annotations

import re

__all__ = ["MODULE_TYPES", "default_classifier"]

#: Module types in display order. ``QKV`` is a fused query/key/value projection (GPT-2's
#: ``c_attn``, Phi-3's ``qkv_proj``).
MODULE_TYPES: tuple[str, ...] = (
    *("embedding", "Q", "K", "V", "QKV", "O"),
    *("FFN-in", "FFN-out", "other"),
)

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block|albert_layer_groups)\.(\d+)(?:\.|$)")

_EMBEDDINGS = {
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "wte",
    "wpe",
    "embed_tokens",
    "embed_positions",
}

_BY_LAST = {
    "query": "Q",
    "q_lin": "Q",
    "q_proj": "Q",
    "key": "K",
    "k_lin": "K",
    "k_proj": "K",
    "value": "V",
    "v_lin": "V",
    "v_proj": "V",
    "c_attn": "QKV",
    "qkv_proj": "QKV",
    "query_key_value": "QKV",
    "out_lin": "O",
    "o_proj": "O",
    "out_proj": "O",
    "lin1": "FFN-in",
    "c_fc": "FFN-in",
    "fc1": "FFN-in",
    "fc_in": "FFN-in",
    "dense_h_to_4h": "FFN-in",
    "ffn": "FFN-in",
    "gate_proj": "FFN-in",
    "up_proj": "FFN-in",
    "gate_up_proj": "FFN-in",
    "lin2": "FFN-out",
    "fc2": "FFN-out",
    "fc_out": "FFN-out",
    "dense_4h_to_h": "FFN-out",
    "ffn_output": "FFN-out",
    "down_proj": "FFN-out",
}


def default_classifier(name: str) -> tuple[int | None, str]:
    """``(layer, module_type)`` of a weight name; ``layer`` is None outside the layer stack.

    ``module_type`` is one of :data:`MODULE_TYPES`; unknown names give ``"other"``, and so
    do attention and feed-forward names outside the layer stack (a classification head's
    ``classifier.out_proj`` is no attention output): only embeddings are typed there.
    """
    name = name.removesuffix(".weight")
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else None
    kind = _kind(name.split("."))
    return layer, kind if layer is not None or kind == "embedding" else "other"


def _kind(parts: list[str]) -> str:
    """The module type of a weight name's ``parts`` as if inside a block."""
    if any(p in _EMBEDDINGS for p in parts):
        return "embedding"
    last = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    if last in _BY_LAST:
        return _BY_LAST[last]
    if last == "c_proj":
        return {"attn": "O", "mlp": "FFN-out"}.get(parent, "other")
    if last == "dense":
        grand = parts[-3] if len(parts) > 2 else ""
        if parent in ("attention", "self_attn", "self_attention") or (
                parent == "output" and grand == "attention"):
            return "O"
        if parent == "intermediate":
            return "FFN-in"
        if parent == "output":
            return "FFN-out"
    return "other"
