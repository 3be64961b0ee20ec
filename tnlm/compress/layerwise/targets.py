"""Which linears of which blocks a :class:`~tnlm.compress.layerwise.config.LayerwiseConfig`
targets, checked (with its budget) before any work, and how calibration batches are shared
over ranks."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from tnlm.bridge import kind_of, weight_xw
from tnlm.bridge.kinds import MATRIX_KINDS, describe_kinds
from tnlm.compress.allocate import smallest_fraction
from tnlm.compress.layerwise.config import LayerwiseConfig
from tnlm.integration.architectures import blocks_of
from tnlm.integration.config import MPOConfig

__all__ = ["check_targets_and_budget", "checked_targets", "shared_batches",
           "targets_per_block"]

def check_targets_and_budget(model: nn.Module,
                             config: LayerwiseConfig) -> dict[str, tuple[int, int]]:
    """The ``(in, out)`` shape of every linear ``config.target_modules`` matches in the
    model's blocks, after checking, without any work on the model, that the patterns
    match (each one of a list) and that ``config.budget`` can be met: at least the
    fraction kept with every targeted layer at rank 1 (the residual and spectrum
    allocations refuse less; a uniform rank would be floored at 1 and keep more than the
    budget asked for).

    Raises:
        ValueError: a pattern that matches no linear (as :func:`compress_layerwise`), or a
            budget below that smallest fraction (naming both).
    """
    return checked_targets(model, blocks_of(model), config)[1]


def checked_targets(model: nn.Module, blocks: nn.ModuleList, config: LayerwiseConfig
                     ) -> tuple[list[list[str]], dict[str, tuple[int, int]]]:
    """``(per block the targeted names, their shapes by full name)``, after the checks of
    :func:`check_targets_and_budget`."""
    per_block = targets_per_block(model, blocks, config)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    shapes = {}
    for i, names in enumerate(per_block):
        for n in names:
            W = weight_xw(blocks[i].get_submodule(n))
            shapes[f"{prefix}.{i}.{n}"] = (int(W.shape[0]), int(W.shape[1]))
    if config.budget < 1 and shapes:
        least = smallest_fraction(shapes, "uniform", pivoted=config.pivoted)
        if config.budget < least:
            raise ValueError(f"budget {config.budget:g} is below the smallest model of these "
                             f"{len(shapes)} layers: every one at rank 1 keeps {least:.4g} "
                             "of their parameters")
    return per_block, shapes


def shared_batches(n_sequences: int, batch_size: int, world: int,
                   fitting: bool) -> tuple[int, bool]:
    """``(batches, whether world ranks can share them)``: ``n_sequences`` calibration
    sequences in batches of ``batch_size``; every rank needs a batch, and block fitting
    (``fitting``) equal shares (a number of batches divisible by ``world``)."""
    n_batches = -(-n_sequences // batch_size)
    return n_batches, not (n_batches < world or (fitting and n_batches % world))


def targets_per_block(model: nn.Module, blocks: nn.ModuleList,
                       config: LayerwiseConfig) -> list[list[str]]:
    """Per block, the names (in the block) of its linears ``config.target_modules`` match.

    A pattern of a list matches a linear by its name in the model
    (``model.layers.3.mlp.down_proj``: suffix patterns as
    :class:`~tnlm.integration.config.MPOConfig` matches them, so ``down_proj``,
    ``mlp.down_proj`` and ``layers.3.mlp.down_proj`` all match it). A regular expression
    matches the names in the block (``mlp.down_proj``), as it always did, or, if it
    matches none of them, the names in the model.

    Raises:
        ValueError: a pattern of a list that matches no linear in the blocks (naming it,
            and the modules outside the blocks it matches: the layer-by-layer path
            compresses inside the blocks only), or a regular expression that matches none.
    """
    cfg = MPOConfig(target_modules=config.target_modules, gauge=config.gauge)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    linears = [(i, n, f"{prefix}.{i}.{n}" if prefix else f"{i}.{n}")
               for i, b in enumerate(blocks) for n, m in b.named_modules()
               if n and kind_of(m) in MATRIX_KINDS]
    regex = isinstance(config.target_modules, str)
    by_inner = regex and any(cfg.is_target(inner) for _, inner, _ in linears)

    def hit(pattern: Any, inner: str, full: str) -> bool:
        if regex:
            return cfg.is_target(inner if by_inner else full)
        return cfg.pattern_matches(pattern, full)

    patterns = [config.target_modules] if regex else list(config.target_modules)
    matched = {p: {k for k, (_, inner, full) in enumerate(linears) if hit(p, inner, full)}
               for p in patterns}
    for p in patterns:
        if matched[p]:
            continue
        outside = [n for n, _ in model.named_modules() if n and n != prefix
                   and not n.startswith(f"{prefix}.")
                   and (re.fullmatch(p, n) if regex else cfg.pattern_matches(p, n))]
        where = (f"; it matches {outside[:3]}, outside the blocks ({prefix}): the layer-by-layer "
                 "path compresses inside the blocks only") if outside else ""
        leaves = sorted({inner.rsplit(".", 1)[-1] for _, inner, _ in linears})
        raise ValueError(f"target_modules pattern {p!r} matches no "
                         f"{describe_kinds(MATRIX_KINDS)} in the blocks of "
                         f"{type(model).__name__}{where} (the blocks' linears: {leaves})")
    per_block: list[list[str]] = [[] for _ in blocks]
    chosen = set().union(*matched.values())
    for k, (i, inner, _) in enumerate(linears):
        if k in chosen:
            per_block[i].append(inner)
    return per_block
