"""A plain transformers folder of a compressed model: loads without tnlm, dense weights.

:func:`export_hf` merges every MPO layer back into a dense weight
(:meth:`~tnlm.integration.MPOModel.merge_and_unload`, on a deep copy) and saves the
model with ``save_pretrained``: ``AutoModel.from_pretrained(folder)`` works anywhere.
The folder is as large as the dense model: merging gives up the compression (the
outputs are the compressed model's, up to float32 rounding).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from torch import nn

from tnlm.export.factorized import factorized_params
from tnlm.integration import MPOModel

__all__ = ["export_hf"]


def export_hf(model: nn.Module, folder: str | os.PathLike, tokenizer: Any = None, *,
              quiet: bool = False, shown_as: str | os.PathLike | None = None
              ) -> dict[str, Any]:
    """Save ``model`` (an :class:`~tnlm.integration.MPOModel`, or a plain transformers
    model) as a transformers folder with merged dense weights; ``model`` is unchanged.

    Writes ``config.json``, ``model.safetensors``, the tokenizer (if given) and a
    ``README.md`` stating the size, and prints one line saying it (unless ``quiet``).
    ``shown_as``: the folder the README and the message name (default ``folder``), for a
    folder written in one place and then moved.

    Returns:
        ``{"folder", "bytes" (of the weights), "params" (dense), "mpo_params" (of the
        compressed model), "message"}``.
    """
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    mpo_params = factorized_params(model)
    if isinstance(model, MPOModel):
        dense = copy.deepcopy(model).merge_and_unload()
    else:
        dense = copy.deepcopy(model)
    dense.eval()
    dense.save_pretrained(d, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    size = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    params = factorized_params(dense)
    shown = Path(shown_as) if shown_as is not None else d
    message = (f"{shown}: dense transformers folder, {size / 1e6:.1f} MB of weights ({params:,} "
               f"parameters); as big as the uncompressed model: merging the MPO layers gives "
               f"up the compression (the compressed model holds {mpo_params:,} parameters)")
    (d / "README.md").write_text(
        f"# {shown.name}\n\nA model compressed with tnlm, merged back to dense weights: loads "
        f"with `transformers.AutoModel.from_pretrained` alone, without tnlm.\n\n"
        f"Size: {size / 1e6:.1f} MB of weights, {params:,} parameters: as big as the "
        f"uncompressed dense model. The compression is given up by merging (the compressed "
        f"model held {mpo_params:,} parameters); for a small file, export the factorized "
        f"graph (`tnlm export DIR --format onnx`).\n")
    if not quiet:
        print(message)
    return dict(folder=d, bytes=size, params=params, mpo_params=mpo_params, message=message)
