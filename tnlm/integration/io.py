"""The checkpoint format of an MPO model: the only writer and reader of it.

A checkpoint folder holds two files::

    mpo_config.json                      format_version, config, modules (layer structures),
                                         weights (file name), sha256 (of that file)
    mpo_model-<sha12>.safetensors        the model's state dict (safetensors: no pickle)

Writing never loses the previous checkpoint: the weights go to a temporary file
(flushed to disk) renamed to a name derived from their SHA-256, then the config
naming them replaces the old config in one rename, and only then is the weights
file named by the *previous* config removed (nothing else in the folder is
touched). Reading verifies the SHA-256 and refuses a weights name that leaves the
folder (``..``, absolute paths, links).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "atomic_write", "sha256", "write_checkpoint",
           "read_meta", "verified_weights", "load_tensors"]

CONFIG_NAME = "mpo_config.json"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, flush it to
    disk, then rename it over ``path``. On any failure the temporary file is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        Path(tmp).chmod(0o644)
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``mpo_config.json`` of a checkpoint folder, format version checked.

    Raises:
        FileNotFoundError: no config in ``directory``.
        ValueError: invalid JSON, unsupported version, or missing entries.
    """
    d = Path(directory)
    cfg = d / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {d}")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{cfg}: unsupported format_version {version!r} "
                         f"(expected {FORMAT_VERSION})")
    for key in ("weights", "sha256", "modules", "config"):
        if key not in meta:
            raise ValueError(f"{cfg} has no {key!r} entry")
    return meta


def _weights_path(d: Path, name: Any) -> Path:
    """The weights file named by the config, confined to the folder ``d``."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"{d / CONFIG_NAME}: weights entry {name!r} must be a plain file name "
                         "inside the checkpoint folder")
    path = d / name
    if path.is_symlink():
        raise ValueError(f"weights file {path} is a symbolic link; refusing to follow it")
    return path


def verified_weights(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """The weights file of a checkpoint after checking it against the recorded SHA-256.

    Raises:
        FileNotFoundError: the weights file is missing.
        ValueError: its hash differs (truncated, corrupted or modified), or its name
            leaves the folder.
    """
    d = Path(directory)
    weights = _weights_path(d, meta["weights"])
    if not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} is missing")
    if sha256(weights) != meta["sha256"]:
        raise ValueError(f"{weights} does not match the SHA-256 recorded in {CONFIG_NAME} "
                         "(the file is truncated, corrupted or was modified); refusing to load")
    return weights


def load_tensors(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, tensors)`` of a checkpoint, hash verified; tensors as numpy arrays."""
    from safetensors.numpy import load_file

    meta = read_meta(directory)
    return meta, load_file(str(verified_weights(directory, meta)))


def write_checkpoint(directory: str | os.PathLike, meta: dict[str, Any],
                     model: nn.Module) -> Path:
    """Write ``model``'s state (safetensors) and ``meta`` (plus weights name, hash and
    format version) as a checkpoint in ``directory``; see the module docstring."""
    from safetensors.torch import save_model

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, format_version=FORMAT_VERSION)
    json.dumps(meta)  # fail before touching the folder if anything is not serializable
    try:
        previous = read_meta(d).get("weights")
    except (FileNotFoundError, ValueError):
        previous = None
    fd, tmp_name = tempfile.mkstemp(dir=d, prefix=".weights.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_model(model, str(tmp))
        _fsync(tmp)
        digest = sha256(tmp)
        weights = d / f"mpo_model-{digest[:12]}.safetensors"
        tmp.chmod(0o644)
        os.replace(tmp, weights)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta.update(weights=weights.name, sha256=digest)
    atomic_write(d / CONFIG_NAME,
                 lambda t: t.write_text(json.dumps(meta, indent=1, sort_keys=True)))
    if isinstance(previous, str) and previous != weights.name:
        # a previous config that named a path outside the folder: leave that path alone
        with contextlib.suppress(ValueError):
            _weights_path(d, previous).unlink(missing_ok=True)
    return d
