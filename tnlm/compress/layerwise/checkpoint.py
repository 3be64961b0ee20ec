"""The per-block checkpoint of the layer-by-layer path: written after every block
(:func:`write_checkpoint`; ``state.json`` last, the file of record), fingerprinted against
the inputs it was written for (:func:`layerwise_fingerprint`), checked before any work
(:func:`check_checkpoint`), read back on a resume (:func:`load_hidden`,
:func:`restore_blocks`) and removed (:func:`remove_checkpoint`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnlm.compress import distributed as dist_
from tnlm.compress.layerwise.config import LayerwiseConfig
from tnlm.compress.layerwise.targets import targets_per_block
from tnlm.integration.architectures import blocks_of
from tnlm.integration.loading import config_fields

__all__ = ["CHECKPOINT_STATE", "check_checkpoint", "check_files", "layerwise_fingerprint",
           "load_hidden", "read_checkpoint_state", "refuse_other_inputs", "remove_checkpoint",
           "restore_blocks", "settings_of", "write_checkpoint"]

#: the checkpoint's file of record (written last, after the block and hidden-state files)
CHECKPOINT_STATE = "state.json"
_CHECKPOINT_FORMAT = "tnlm-layerwise-checkpoint"
#: 2: the model is fingerprinted by its architecture, parameter dtype and weights
_CHECKPOINT_VERSION = 2


def _block_file(d: Path, i: int) -> Path:
    return d / f"block_{i:05d}.safetensors"


def _hidden_file(d: Path, i: int, rank: int) -> Path:
    return d / f"hidden_{i:05d}_rank{rank}.safetensors"


#: :class:`LayerwiseConfig` fields a resume need not agree on: where the checkpoint is, and
#: the sequences the allocation was measured on (a checkpoint keeps the ranks it allocated)
_NOT_SETTINGS = ("checkpoint_dir", "sensitivity_sequences", "allocation_sequences")


def settings_of(config: LayerwiseConfig) -> dict[str, Any]:
    """Every :class:`LayerwiseConfig` field but :data:`_NOT_SETTINGS`, as JSON gives it
    back."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(config).items()
                                  if k not in _NOT_SETTINGS}))


def layerwise_fingerprint(model: nn.Module, sequences: torch.Tensor, config: LayerwiseConfig,
                          per_block: list[list[str]], world_size: int) -> dict[str, Any]:
    """What a checkpoint of :func:`compress_layerwise` must agree on to be resumed: the
    settings (every :class:`LayerwiseConfig` field but ``checkpoint_dir``,
    ``sensitivity_sequences`` and ``allocation_sequences``: the checkpoint keeps the ranks
    it allocated), a sha256 of
    the calibration sequences, the model (its class, its configuration's architecture
    fields — not where it was loaded from, the transformers version or the configured
    dtype —, the targets per block, its parameters' dtypes and a sha256 of its state
    dict's tensors, one pass over them) and the number of ranks (each rank keeps its own
    hidden states). Take it before the model is changed."""
    cfg = getattr(model, "config", None)
    arch = json.loads(json.dumps(config_fields(cfg), sort_keys=True, default=str)) \
        if cfg is not None else None
    weights = [x for k, t in model.state_dict().items() for x in (k, t)]
    return {"settings": settings_of(config),
            "sequences": f"{tuple(sequences.shape)} {dist_.digest([sequences])}",
            "model": {"class": type(model).__name__, "config": arch,
                      "targets": [list(b) for b in per_block],
                      "dtype": ", ".join(sorted({str(p.dtype) for p in model.parameters()})),
                      "weights": dist_.digest(weights)},
            "world_size": int(world_size)}


def _short(v: Any, n: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def _differences(saved: dict[str, Any], now: dict[str, Any], where: str = "") -> list[str]:
    """What differs between two fingerprints, by dotted field name."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        key = f"{where}{k}"
        if a == b:
            continue
        if key == "model.weights":
            out.append("the model's weights differ")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, key + ".")
        else:
            out.append(f"{key}: {_short(a)} in the checkpoint, {_short(b)} now")
    return out


def _tensors(items: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with storage of its own (safetensors refuses shared)."""
    seen: set[int] = set()
    out = {}
    for k, t in items.items():
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def write_checkpoint(directory: str | os.PathLike, index: int, state: dict[str, Any],
                     block: nn.Module, xs: list[torch.Tensor] | None,
                     xt: list[torch.Tensor] | None, *, rank: int | None = None,
                     distributed: bool | None = None) -> None:
    """Record that block ``index`` is finished.

    Each rank writes its hidden states for the next block (``xs.k`` student, ``xt.k``
    teacher, (b, T, hidden) per batch k) to ``hidden_<index>_rank<r>.safetensors``
    (``xs`` None: none, after the last block); after all ranks have, rank 0 writes the
    block's state dict (MPO cores, biases, norms) to ``block_<index>.safetensors`` and
    then ``state.json`` (``state`` plus ``last_block``), the file of record: a crash at
    any point leaves the previous checkpoint whole. Every file is written to a temporary
    file and renamed over its name; hidden states two blocks old are removed (after the
    last block, all of them).

    ``rank`` and ``distributed`` are the ones :func:`compress_layerwise` runs with
    (default: those of the initialized process group). With ``distributed`` every rank
    calls this, collectively (a barrier); without, the caller is rank 0 alone and no
    other rank is waited for."""
    from safetensors.torch import save_file

    from tnlm.integration.io import atomic_write

    if distributed is None:
        distributed = dist_.is_distributed()
    if rank is None:
        rank = dist_.world()[0] if distributed else 0
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if xs is not None:
        hidden = _tensors({**{f"xs.{k}": x for k, x in enumerate(xs)},
                           **{f"xt.{k}": x for k, x in enumerate(xt or [])}})
        atomic_write(_hidden_file(d, index, rank), lambda p: save_file(hidden, str(p)))
    if distributed:
        dist_.barrier("the checkpoint's hidden states")
    if rank == 0:
        weights = _tensors(dict(block.state_dict()))
        atomic_write(_block_file(d, index), lambda p: save_file(weights, str(p)))
        text = json.dumps({**state, "format": _CHECKPOINT_FORMAT,
                           "version": _CHECKPOINT_VERSION, "last_block": int(index)},
                          indent=1, sort_keys=True)
        atomic_write(d / CHECKPOINT_STATE, lambda p: p.write_text(text))
    _hidden_file(d, index - 2, rank).unlink(missing_ok=True)  # state.json is at index-1 or on
    if xs is None:  # the last block: no resume reads hidden states any more
        if distributed:
            dist_.barrier("the checkpoint's state")
        _hidden_file(d, index - 1, rank).unlink(missing_ok=True)


def read_checkpoint_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``state.json`` of a :func:`compress_layerwise` checkpoint, or None if there is
    none. Raises ``ValueError`` (naming the file) for a file that is not such a checkpoint,
    one of another version, or one missing a field a resume reads (or of the wrong type:
    ``fingerprint``, ``allocated``, ``ranks``, ``errors``, ``structures``,
    ``block_errors``, ``params_before``, ``params_after``)."""
    path = Path(directory) / CHECKPOINT_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable layer-by-layer checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a layer-by-layer compression checkpoint")
    if state.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: layer-by-layer checkpoint version {state.get('version')!r}; "
                         f"this tnlm reads version {_CHECKPOINT_VERSION} only (start again "
                         "without resume, or resume with the tnlm that wrote it)")
    if not isinstance(state.get("last_block"), int) or state["last_block"] < 0:
        raise ValueError(f"{path}: no valid last_block ({state.get('last_block')!r})")
    for key, types, what in _STATE_FIELDS:
        if key not in state:
            raise ValueError(f"{path}: the layer-by-layer checkpoint has no {key!r} (an "
                             f"edited or truncated state; start again without resume)")
        v = state[key]
        if not isinstance(v, types) or isinstance(v, bool):
            raise ValueError(f"{path}: {key!r} must be {what}, got {_short(v)}")
    return state


#: what a resume reads from ``state.json`` besides ``last_block``: key, types, in words
_STATE_FIELDS = (("fingerprint", dict, "a dict"),
                 ("allocated", (dict, type(None)), "a dict or null"),
                 ("ranks", dict, "a dict"), ("errors", dict, "a dict"),
                 ("structures", dict, "a dict"), ("block_errors", list, "a list"),
                 ("params_before", int, "an int"), ("params_after", int, "an int"))


def check_files(d: Path, state: dict[str, Any], n_blocks: int, ranks: list[int]) -> None:
    """Raise ``ValueError`` unless checkpoint ``d`` (its ``state``) fits a model of
    ``n_blocks`` blocks and holds the finished blocks' files and, before the last block,
    the hidden states of each of ``ranks``."""
    last = int(state["last_block"])
    if last >= n_blocks:
        raise ValueError(f"checkpoint {d}: block {last} is finished but the model has "
                         f"{n_blocks} blocks")
    missing = [_block_file(d, i).name for i in range(last + 1) if not _block_file(d, i).is_file()]
    if missing:
        raise ValueError(f"checkpoint {d}: {', '.join(missing)} missing")
    if last == n_blocks - 1:
        return
    for rank in ranks:
        path = _hidden_file(d, last, rank)
        if not path.is_file():
            raise ValueError(f"checkpoint {d}: {path.name} is missing (rank {rank}'s hidden "
                             f"states after block {last})")


def refuse_other_inputs(d: Path, state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every difference unless checkpoint ``d`` (its ``state``)
    was written for ``fingerprint`` (:func:`layerwise_fingerprint`)."""
    saved = state.get("fingerprint", {})
    if isinstance(saved.get("settings"), dict):  # written before these settings
        saved = {**saved, "settings": {"output_error": "total", "pivoted": False, **{
            k: v for k, v in saved["settings"].items() if k not in _NOT_SETTINGS}}}
    diff = _differences(saved, fingerprint)
    if diff:
        raise ValueError(f"cannot resume from {d}: it was written for other inputs; "
                         + "; ".join(diff))


def check_checkpoint(directory: str | os.PathLike, model: nn.Module, sequences: torch.Tensor,
                     config: LayerwiseConfig, world_size: int = 1) -> dict[str, Any]:
    """The state (``state.json``) of the checkpoint in ``directory`` after checking that
    ``compress_layerwise(model, sequences, config, resume=True)`` on ``world_size`` ranks
    can continue from it, without changing anything: the checks that call makes before it
    touches the model (format version; the fingerprint of the settings, the sequences, the
    model and the world size, :func:`layerwise_fingerprint`; the finished blocks' files
    and every rank's hidden states), but not the hidden states' shapes. Take it on the
    unchanged model. One pass over the model's weights (their sha256).

    Raises:
        FileNotFoundError: ``directory`` holds no checkpoint.
        ValueError: a checkpoint of another format or version, for other inputs (every
            difference named, as :func:`compress_layerwise` names them) or with files
            missing.
    """
    d = Path(directory)
    state = read_checkpoint_state(d)
    if state is None:
        raise FileNotFoundError(f"no layer-by-layer checkpoint in {d} (no {CHECKPOINT_STATE})")
    blocks = blocks_of(model)
    per_block = targets_per_block(model, blocks, config)
    refuse_other_inputs(d, state, layerwise_fingerprint(model, sequences, config, per_block,
                                                         world_size))
    check_files(d, state, len(blocks), list(range(world_size)))
    return state


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """Remove a :func:`write_checkpoint` checkpoint: its ``state.json`` first (so what is
    left is never taken for a checkpoint), then its block and hidden-state files and the
    temporary files of interrupted writes; then ``directory`` itself if that left it
    empty (other files are kept)."""
    d = Path(directory)
    if not d.is_dir():
        return
    (d / CHECKPOINT_STATE).unlink(missing_ok=True)
    for pattern in ("block_*.safetensors", "hidden_*_rank*.safetensors",
                    f".{CHECKPOINT_STATE}.*.tmp", ".block_*.safetensors.*.tmp",
                    ".hidden_*_rank*.safetensors.*.tmp"):
        for f in d.glob(pattern):
            f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        d.rmdir()


def load_hidden(d: Path, state: dict[str, Any], data: list[tuple], rank: int,
                 n_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This rank's ``(xs, xt)`` for the block after checkpoint ``d``'s last one (none after
    the last block), checked against the captured inputs ``data``, and a check that the
    finished blocks' files are there: everything a resume reads but the block files'
    contents, before the model is touched. Raises ``ValueError`` naming what is wrong."""
    from safetensors.torch import load_file

    check_files(d, state, n_blocks, [rank])
    last = int(state["last_block"])
    if last == n_blocks - 1:
        return [], []
    path = _hidden_file(d, last, rank)
    hidden = load_file(str(path))
    n = len(data)
    bad = (len(hidden) != 2 * n
           or any(f"{a}.{k}" not in hidden or hidden[f"{a}.{k}"].shape != data[k][0].shape
                  for a in ("xs", "xt") for k in range(n)))
    if bad:
        raise ValueError(f"checkpoint {d}: {path.name} does not hold this rank's {n} batches "
                         f"of hidden states of shapes "
                         f"{sorted({tuple(dd[0].shape) for dd in data})}")
    dev = [dd[0].device for dd in data]
    return ([hidden[f"xs.{k}"].to(dev[k]) for k in range(n)],
            [hidden[f"xt.{k}"].to(dev[k]) for k in range(n)])


def restore_blocks(d: Path, state: dict[str, Any], blocks: nn.ModuleList, prefix: str,
             swap: Any) -> None:
    """Put the finished blocks of checkpoint ``d`` into ``blocks`` through ``swap``: the
    MPO layers by ``swap.put``, and every other tensor the blocks' state dicts load into
    (norms, non-target linears, dense-kept targets) recorded first by ``swap.save_value``,
    so undoing ``swap`` gives the model back as it was."""
    from safetensors.torch import load_file

    from tnlm.bridge import MPOModule

    last = int(state["last_block"])
    structures = state["structures"]
    for i in range(last + 1):
        block = blocks[i]
        head = f"{prefix}.{i}."
        replaced = {name[len(head):]: struct for name, struct in structures.items()
                    if name.startswith(head)}
        for k, t in block.state_dict(keep_vars=True).items():
            if not any(k.startswith(r + ".") for r in replaced):
                swap.save_value(t)
        for name, struct in replaced.items():
            old = block.get_submodule(name)
            w = getattr(old, "weight", None)
            swap.put(head + name, MPOModule.from_structure(
                struct, dtype=w.dtype if w is not None else torch.float32,
                device=w.device if w is not None else None))
        block.load_state_dict(load_file(str(_block_file(d, i))), strict=True)
