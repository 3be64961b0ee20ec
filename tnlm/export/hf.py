"""A plain transformers folder of a compressed model: loads without tnlm, dense weights.

:func:`export_hf` merges every MPO layer back into a dense weight
(:meth:`~tnlm.integration.MPOModel.merge_and_unload`, on a deep copy) and saves the
model with ``save_pretrained``: ``AutoModel.from_pretrained(folder)`` works anywhere.
The folder is as large as the dense model: merging gives up the compression (the
outputs are the compressed model's, up to float32 rounding).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from tnlm.export.factorized import factorized_params
from tnlm.export.folder import is_checkpoint
from tnlm.integration import MPOModel
from tnlm.integration.io import CONFIG_NAME, WEIGHTS_NAME

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
        ``{"folder", "bytes" (of the weights written: ``model.safetensors``, or the shards
        its index names), "params" (dense), "mpo_params" (of the compressed model),
        "message"}``.

    Raises:
        ValueError: ``folder`` holds a tnlm checkpoint (``mpo_config.json`` or
            ``mpo_model-*.safetensors``, e.g. :func:`~tnlm.export.save_self_contained`'s):
            the dense model beside it would make two models in one folder
            (:func:`~tnlm.export.load_compressed` loading the MPO one,
            ``AutoModel.from_pretrained`` the dense one). Refused before anything is
            written.
    """
    d = Path(folder)
    _check_no_checkpoint(d)
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
    size = sum(p.stat().st_size for p in _weight_files(d))
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


def _check_no_checkpoint(folder: Path) -> None:
    """``ValueError`` naming ``folder`` and the files when it holds a tnlm checkpoint
    (``mpo_config.json`` or ``mpo_model-*.safetensors``), which a dense export must not
    be written beside."""
    if not folder.is_dir():
        return
    names = sorted(p.name for p in folder.iterdir() if WEIGHTS_NAME.fullmatch(p.name))
    if is_checkpoint(folder):
        names.insert(0, CONFIG_NAME)
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ValueError(f"export_hf: {folder} holds a tnlm checkpoint ({shown}): the dense "
                         "model written beside it would leave two models in one folder "
                         "(load_compressed loading the MPO one, AutoModel.from_pretrained the "
                         "dense one); give a new or empty folder")


def _weight_files(folder: Path) -> list[Path]:
    """The weight files ``save_pretrained`` wrote in ``folder``: the shards that
    ``model.safetensors.index.json`` names when they are all there, else
    ``model.safetensors`` (none if neither)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                                .values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = []
        files = [folder / str(n) for n in shards]
        if files and all(f.is_file() for f in files):
            return files
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []
