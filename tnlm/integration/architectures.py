"""Model architectures tnlm knows: where the block stack is, which linears to compress.

One entry per family of transformers ``model_type``; everything that depends on an
architecture's module names reads it here (default targets, the block stack, whether the
model is a causal LM, which modules form a block)::

    family   model types                     blocks (below base_model)  targets per block
    -------  ------------------------------  -------------------------  ----------------------
    bert     bert, roberta, xlm-roberta, ..  encoder.layer              query key value
                                                                        attention.output.dense
                                                                        intermediate.dense
                                                                        output.dense
    albert   albert (one shared layer)       encoder.albert_layer_groups query key value
                                                                        attention.dense ffn
                                                                        ffn_output
    llama    llama, mistral, qwen2/3, gemma  layers                     q/k/v/o_proj
             1-3, olmo 1-2, granite, smollm3,                           gate/up/down_proj
             stablelm, cohere, helium
    phi3     phi3 (fused projections)        layers                     qkv_proj o_proj
                                                                        gate_up_proj down_proj
    glm      glm (fused gate and up)         layers                     q/k/v/o_proj
                                                                        gate_up_proj down_proj
    phi      phi (Phi-1/2)                   layers                     q/k/v_proj
                                                                        self_attn.dense fc1 fc2
    starcod. starcoder2                      layers                     q/k/v/o_proj
                                                                        mlp.c_fc mlp.c_proj
    gpt_neox gpt_neox (Pythia; fused qkv,    layers                     attention.query_key_value
             parallel attention and MLP)                                attention.dense
                                                                        mlp.dense_h_to_4h
                                                                        mlp.dense_4h_to_h
    falcon   falcon (fused qkv, parallel)    h                          self_attention.
                                                                          query_key_value
                                                                        self_attention.dense
                                                                        mlp.dense_h_to_4h
                                                                        mlp.dense_4h_to_h
    gpt2     gpt2                            h                          attn.c_attn attn.c_proj
                                                                        mlp.c_fc mlp.c_proj
    gptj     gptj (parallel)                 h                          q/k/v_proj out_proj
                                                                        fc_in fc_out
    opt      opt                             decoder.layers             q/k/v_proj out_proj
                                                                        fc1 fc2

Every causal entry passes the invariants of ``tests/test_architectures_causal.py`` on a
tiny random-init model; a new entry adds its tiny config there.

Target patterns are :class:`tnlm.integration.MPOConfig` suffix patterns (``"q_proj"``
matches ``model.layers.3.self_attn.q_proj``). The LM head and the embeddings are never
default targets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from tnlm.integration.surgery import module_paths

__all__ = ["Architecture", "ARCHITECTURES", "architecture_of", "default_targets", "blocks_of",
           "find_blocks", "block_indices", "supported_model_types", "is_causal_type",
           "position_limit", "POSITION_TABLES"]


@dataclass(frozen=True)
class Architecture:
    """One architecture family.

    Attributes:
        name: the family's name (``"bert"``, ``"llama"``, ...).
        model_types: the transformers ``config.model_type`` values it covers.
        blocks: dotted path of the ``nn.ModuleList`` of blocks below ``model.base_model``.
        targets: suffix patterns of the linears compressed by default, in forward order
            within a block.
        causal: a decoder (causal LM): measured by perplexity, healed on next-token
            distributions.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    targets: tuple[str, ...]
    causal: bool


_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("bert", ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
                 "encoder.layer",
                 ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                  "output.dense"), causal=False),
    Architecture("distilbert", ("distilbert",), "transformer.layer",
                 ("q_lin", "k_lin", "v_lin", "out_lin", "ffn.lin1", "ffn.lin2"), causal=False),
    Architecture("albert", ("albert",), "encoder.albert_layer_groups",
                 ("query", "key", "value", "attention.dense", "ffn", "ffn_output"),
                 causal=False),
    Architecture("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                           "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "stablelm",
                           "cohere", "helium"),
                 "layers", _LLAMA_TARGETS, causal=True),
    Architecture("phi3", ("phi3",), "layers",
                 ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), causal=True),
    Architecture("glm", ("glm",), "layers",
                 ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
                 causal=True),
    Architecture("phi", ("phi",), "layers",
                 ("q_proj", "k_proj", "v_proj", "self_attn.dense", "fc1", "fc2"), causal=True),
    Architecture("starcoder2", ("starcoder2",), "layers",
                 ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.c_fc", "mlp.c_proj"),
                 causal=True),
    Architecture("gpt_neox", ("gpt_neox",), "layers",
                 ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                  "mlp.dense_4h_to_h"), causal=True),
    Architecture("falcon", ("falcon",), "h",
                 ("self_attention.query_key_value", "self_attention.dense",
                  "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), causal=True),
    Architecture("gpt2", ("gpt2",), "h",
                 ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), causal=True),
    Architecture("gptj", ("gptj",), "h",
                 ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"), causal=True),
    Architecture("opt", ("opt",), "decoder.layers",
                 ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), causal=True),
)}


def is_causal_type(model_type: str | None) -> bool:
    """Whether ``model_type`` has an entry, and it is a causal LM's."""
    return any(model_type in a.model_types and a.causal for a in ARCHITECTURES.values())


#: the last name of a learned table of absolute positions (BERT, RoBERTa; GPT-2; OPT)
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(model: nn.Module) -> int | None:
    """The most tokens a sequence fed to ``model`` may hold: the rows of its learned table
    of absolute positions (an ``nn.Embedding`` named as in :data:`POSITION_TABLES`) less
    the rows the model skips (OPT's ``offset``; RoBERTa's positions start after its
    ``padding_idx``); ``None`` when it has none (rotary or relative positions, which
    compute at any length)."""
    limits = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            n = m.num_embeddings - int(getattr(m, "offset", 0) or 0)
            if m.padding_idx is not None:
                n -= m.padding_idx + 1
            limits.append(n)
    return min(limits) if limits else None


def supported_model_types() -> list[str]:
    """Every ``model_type`` with an entry, sorted."""
    return sorted(t for a in ARCHITECTURES.values() for t in a.model_types)


def _model_type(model_or_config: Any) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    if not isinstance(mt, str) or not mt:
        raise ValueError(f"model must be a transformers model or config with a model_type, "
                         f"got {type(model_or_config).__name__}")
    return mt


def architecture_of(model_or_config: Any) -> Architecture:
    """The entry for a transformers model (or its config).

    Raises:
        ValueError: the ``model_type`` has no entry (the message lists those that do).
    """
    mt = _model_type(model_or_config)
    for arch in ARCHITECTURES.values():
        if mt in arch.model_types:
            return arch
    raise ValueError(f"model_type {mt!r} has no architecture entry in tnlm; supported: "
                     f"{', '.join(supported_model_types())} (or pass target_modules and "
                     f"use a model whose blocks tnlm can find)")


def default_targets(model_or_config: Any) -> list[str]:
    """The default target patterns of a model's architecture (:func:`architecture_of`)."""
    return list(architecture_of(model_or_config).targets)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The block stack of a transformers model (with or without its task head).

    Raises:
        ValueError: unknown architecture, or the path does not lead to a ``ModuleList``.
    """
    arch = architecture_of(model)
    base = getattr(model, "base_model", model)
    node: Any = base
    for part in arch.blocks.split("."):
        node = getattr(node, part, None)
    if not isinstance(node, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no block stack at "
                         f"base_model.{arch.blocks} (architecture {arch.name!r})")
    return node


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The block stack of ``model``: :func:`blocks_of` when its ``model_type`` has an
    entry, else the longest ``nn.ModuleList`` of at least two modules of one type (a
    model tnlm has no entry for, whose targets the user named).

    Raises:
        ValueError: an entry whose path leads to no ``ModuleList``, or no entry and no
            such list.
    """
    try:
        arch = architecture_of(model)
    except ValueError:
        arch = None
    if arch is not None:
        return blocks_of(model)
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and \
                len({type(b) for b in m}) == 1 and (best is None or len(m) > len(best)):
            best = m
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of repeated blocks")
    return best


def block_indices(model: nn.Module, names: Iterable[str]) -> dict[str, int | None]:
    """Per module name (dotted, relative to ``model``) the index of the block of
    :func:`find_blocks` that holds it, ``None`` outside the stack (embeddings, heads) and
    for every name when ``model`` has no block stack."""
    names = list(names)
    try:
        blocks = find_blocks(model)
    except ValueError:
        return dict.fromkeys(names)
    paths = module_paths(model)
    index = {path: i for i, block in enumerate(blocks) for path in paths.get(id(block), ())}
    out: dict[str, int | None] = {}
    for name in names:
        parts = name.split(".")
        out[name] = next((index[p] for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1))
                          if p in index), None)
    return out
