"""Factorized layers merged back into the plain modules they compute.

:func:`merge_factorized` is the one merge: :meth:`MPOModel.merge_and_unload
<tnlm.integration.model.MPOModel.merge_and_unload>` calls it on its base model, and the
causal job's stages call it between cuts (the next cut starts from the healed weights)::

    MPOLinear / MPOEmbedding / PivotedLinear   ->   nn.Linear / Conv1D / nn.Embedding
           cores (trained, truncated)                weight = the cores contracted
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import MPOModule
from tnlm.bridge.pivoted import PivotedLinear, merged_module
from tnlm.integration.checkpoint import some_names
from tnlm.integration.surgery import Swap, module_paths


def factorized_modules(root: nn.Module) -> list[nn.Module]:
    """Every MPO module and gauge-fixed low-rank layer of ``root``, each once (a module held
    under several paths, e.g. a tied or ALBERT-style shared layer, is listed once), in the
    order of ``root.named_modules()``."""
    return [m for m in root.modules() if isinstance(m, (MPOModule, PivotedLinear))]


def merge_factorized(root: nn.Module, *, safe_merge: bool = False,
                     progressbar: bool = False) -> int:
    """Replace, in place, every MPO module and gauge-fixed low-rank layer of ``root`` by
    the plain module of the kind it replaced (``nn.Linear``, ``Conv1D``, ``nn.Embedding``)
    whose weight is contracted from its cores; the outputs are unchanged up to rounding
    (float32: ~1e-6 relative). Returns how many modules were merged.

    A module held under several paths is merged once and the one dense module is put
    under every path (it stays shared). Each dense module keeps its factorized module's
    train/eval mode; its weight trains if any core did, its bias as before (as PEFT's
    merge keeps the base layers' flags). All or nothing: if putting a module in place
    fails, every replacement is undone.

    Args:
        root: the model, changed in place.
        safe_merge: check every merged weight for NaN / inf before the first replacement;
            raise ``ValueError`` naming the modules (``root`` is then unchanged).
        progressbar: show a progress bar.

    Raises:
        ValueError: ``safe_merge`` and a merged weight holds NaN or inf.
    """
    paths = module_paths(root)
    merged: list[tuple[nn.Module, nn.Module]] = []
    with torch.no_grad():
        for m in tqdm(factorized_modules(root), desc="merge", disable=not progressbar,
                      leave=False):
            merged.append((m, merged_module(m)))
    if safe_merge:
        bad = [paths[id(m)][0] for m, new in merged
               if not all(bool(torch.isfinite(t).all()) for t in new.parameters())]
        if bad:
            raise ValueError(f"NaN or inf in the merged weights of {some_names(bad)}; nothing "
                             "was merged")
    with Swap(root) as swap:  # all or nothing
        for m, new in merged:
            for path in paths[id(m)]:
                swap.put(path, new)
    return len(merged)
