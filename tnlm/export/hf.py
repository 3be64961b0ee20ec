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
from tnlm.export.folder import dense_weights, is_checkpoint
from tnlm.export.replace import write_folder
from tnlm.integration import MPOModel
from tnlm.integration.io import CONFIG_NAME, WEIGHTS_NAME
from tnlm.integration.merge import merge_factorized

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

    ``model`` may also be a plain model holding MPO or gauge-fixed layers (one
    compressed in place, :func:`~tnlm.compress.decoder.job.compress_causal_lm`): the copy's
    factorized layers are merged (:func:`~tnlm.integration.merge.merge_factorized`). The
    folder is written beside ``folder`` and renamed into place
    (:func:`~tnlm.export.replace.write_folder`): an earlier export there is replaced
    whole (none of its files stays), the user's own files are kept; a new or empty
    folder is written in place.

    Raises:
        ValueError: ``folder`` holds another model's dense weights (``model.safetensors``,
            ...) that no earlier ``export_hf`` wrote (a base model's own folder), or a
            tnlm checkpoint (``mpo_config.json`` or ``mpo_model-*.safetensors``, e.g.
            :func:`~tnlm.export.save_self_contained`'s): the dense model beside it would
            make two models in one folder (:func:`~tnlm.export.load_compressed` loading the MPO one,
            ``AutoModel.from_pretrained`` the dense one). Refused before anything is
            written.
    """
    d = Path(folder)
    _check_no_checkpoint(d)
    _check_no_other_dense_model(d)
    mpo_params = factorized_params(model)
    if isinstance(model, MPOModel):
        dense = copy.deepcopy(model).merge_and_unload()
    else:  # a model compressed in place (compress_causal_lm, compress_layerwise) too
        dense = copy.deepcopy(model)
        merge_factorized(dense)
    dense.eval()
    params = factorized_params(dense)
    shown = Path(shown_as) if shown_as is not None else d
    out: dict[str, Any] = {}

    def write(target: Path) -> None:
        dense.save_pretrained(target, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        size = sum(p.stat().st_size for p in _weight_files(target))
        out["message"] = (
            f"{shown}: dense transformers folder, {size / 1e6:.1f} MB of weights ({params:,} "
            f"parameters); as big as the uncompressed model: merging the MPO layers gives "
            f"up the compression (the compressed model holds {mpo_params:,} parameters)")
        (target / "README.md").write_text(
            f"# {shown.name}\n\n{_README_MARK}: loads with "
            f"`transformers.AutoModel.from_pretrained` alone, without tnlm.\n\n"
            f"Size: {size / 1e6:.1f} MB of weights, {params:,} parameters: as big as the "
            f"uncompressed dense model. The compression is given up by merging (the "
            f"compressed model held {mpo_params:,} parameters); for a small file, export the "
            f"factorized graph (`tnlm export DIR --format onnx`).\n")
        out["bytes"] = size

    # written beside the folder and renamed into place: an earlier export's files (a chat
    # template the tokenizer no longer has) never stay, and an interrupted export leaves
    # the folder as it was
    write_folder(d, write)
    if not quiet:
        print(out["message"])
    return dict(folder=d, bytes=out["bytes"], params=params, mpo_params=mpo_params,
                message=out["message"])


#: the first words of the README :func:`export_hf` writes: a folder holding dense weights
#: and this README is an earlier export (replaced); any other dense model is refused
_README_MARK = "A model compressed with tnlm, merged back to dense weights"


def _check_no_other_dense_model(folder: Path) -> None:
    """``ValueError`` when ``folder`` holds a dense model's weights that no earlier
    :func:`export_hf` wrote (the base model's own folder): replacing it would delete
    them."""
    if not folder.is_dir():
        return
    weights = dense_weights(folder)
    if not weights:
        return
    try:
        ours = _README_MARK in (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        shown = ", ".join(weights[:3]) + (", ..." if len(weights) > 3 else "")
        raise ValueError(f"export_hf: {folder} holds another model's weights ({shown}), "
                         "not an earlier export's: the export would replace them; give a "
                         "new or empty folder")


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
