"""The checkpoint format of an MPO model: the only writer and reader of it.

A checkpoint folder holds two files::

    mpo_config.json                      format_version, config, modules (layer structures),
                                         weights (file name), sha256 (of that file)
    mpo_model-<sha12>.safetensors        the model's state dict (safetensors: no pickle)

Writing never loses the previous checkpoint: the weights go to a temporary file
(flushed to disk) renamed to a name derived from their SHA-256, then the config
naming them replaces the old config in one rename, and only then is the weights
file named by the *previous* config removed (nothing else in the folder is
touched: a user's ``mpo_model-best.safetensors`` stays). Only a name this writer
generates (``mpo_model-<12 hex digits>.safetensors``, or ``mpo_model.safetensors`` of
the first checkpoints) is ever removed: a config or journal edited to name any other
file (``notes.txt``, ``../outside.txt``) gets a warning and the file stays. Before the weights get
their final name, a journal ``.mpo_checkpoint.pending`` records the two weights
files this write owns (the new and the previous one); it is removed at the end.
A writer killed on the way leaves the journal, and the next writer removes
whichever of those two files the current config does not name: a crash leaves
no orphaned weights behind, and no write removes a file it does not own.
Reading verifies the SHA-256 and refuses a weights name that leaves the folder
(``..``, absolute paths, links).

Concurrent writers to one folder (e.g. two ranks of a DDP job) are serialized by
an exclusive ``fcntl.flock`` on ``<dir>/.mpo_checkpoint.lock``, held for the whole
write; readers (:meth:`~tnlm.integration.model.MPOModel.from_pretrained`,
:func:`load_tensors`) take a shared lock on it when it exists, so a reader never
sees the weights of a config removed under it. The lock file is left in place
(removing it would race with a writer that has just opened it). Once it holds the
lock, a writer removes the temporary files (``.weights.*.tmp``, a directory holding
the weights being written and any temporary file of the safetensors writer,
``.mpo_config.json.*.tmp``, ``.mpo_checkpoint.pending.*.tmp``) older than its lock
acquisition: they were left by a writer that crashed (no other writer can be
active while it holds the lock). Locks are advisory and need a POSIX local file
system; where ``fcntl`` is missing, writing works unlocked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from tnlm.bridge.kinds import ALL_KINDS, MATRIX_KINDS
from tnlm.bridge.pivoted import PIVOTED_LAYOUT
from tnlm.core.validation import MAX_SITES

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "MODULE_KINDS", "atomic_write",
           "sha256",
           "write_checkpoint", "read_meta", "verified_weights", "load_tensors", "read_header",
           "check_module_entry", "module_tensor_shapes", "LOCK_NAME", "JOURNAL_NAME", "locked",
           "reading", "remove_stale_temps", "recover"]

CONFIG_NAME = "mpo_config.json"
FORMAT_VERSION = 1
#: the module kinds a checkpoint may record (:mod:`tnlm.bridge.kinds`)
MODULE_KINDS = ALL_KINDS
_MODES = ("auto", "contract", "dense")
LOCK_NAME = ".mpo_checkpoint.lock"
JOURNAL_NAME = ".mpo_checkpoint.pending"
#: temporary files of a writer: the weights, and the config and journal written by
#: atomic_write
_TEMP_PATTERNS = (".weights.*.tmp", f".{CONFIG_NAME}.*.tmp", f".{JOURNAL_NAME}.*.tmp")
_MAX_SITES = MAX_SITES
#: the weights file names this writer produces (the first checkpoints used the plain
#: name): the only files it removes
WEIGHTS_NAME = re.compile(r"mpo_model(-[0-9a-f]{12})?\.safetensors")


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


def _fsync_dir(d: Path) -> None:
    """Flush a folder's entries (the renames in it) to disk, where the OS allows."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def locked(directory: str | os.PathLike) -> Iterator[float]:
    """Hold the exclusive writer lock of a checkpoint folder (created if needed);
    yields the time it was acquired."""
    path = Path(directory) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.time()
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def reading(directory: str | os.PathLike) -> Iterator[None]:
    """Hold a shared lock on a checkpoint folder while reading it (no writer can
    replace the checkpoint meanwhile); nothing is created, so read-only folders work."""
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (no locking writer ever wrote here) or not readable
        yield
        return
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | os.PathLike, before: float) -> list[Path]:
    """Remove the writers' temporary files (and the weights writer's temporary
    directories) in ``directory`` last modified before ``before`` (call it holding
    :func:`locked`); return what was removed."""
    removed = []
    for pattern in _TEMP_PATTERNS:
        for path in Path(directory).glob(pattern):
            with contextlib.suppress(OSError):
                if path.is_symlink() or path.stat().st_mtime >= before:
                    continue
                if path.is_file():
                    path.unlink()
                    removed.append(path)
                elif path.is_dir():
                    shutil.rmtree(path)
                    removed.append(path)
    return removed


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


def read_header(weights: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, from its header (no tensor is read).

    Raises:
        ValueError: the file is not a valid safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            names = f.keys()
            return {k: tuple(int(d) for d in f.get_slice(k).get_shape()) for k in names}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                         ) from err


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_module_entry(name: str, entry: Any) -> dict[str, Any]:
    """Check one ``modules`` entry of a checkpoint config (a layer structure, as
    ``MPOModule.structure`` writes it) for internal consistency: kind, positive dims,
    core shapes ``[d_{k-1}, i_k, j_k, d_k]`` with ``d_0 = d_n = 1`` and equal
    neighbouring bonds, ``in_dim``/``out_dim`` within the site products, bias flag,
    padding index and mode. Returns the entry with defaults filled in.

    Raises:
        ValueError: naming the module and the entry that is wrong.
    """
    where = f"{CONFIG_NAME}: modules[{name!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
    if "layout" in entry:
        return _check_pivoted_entry(where, entry)
    for key in ("kind", "in_dim", "out_dim", "core_shapes"):
        if key not in entry:
            raise ValueError(f"{where} has no {key!r} entry")
    kind = entry["kind"]
    if kind not in MODULE_KINDS:
        raise ValueError(f"{where}: kind must be one of {MODULE_KINDS}, got {kind!r}")
    for key in ("in_dim", "out_dim"):
        if not _is_int(entry[key]) or entry[key] < 1:
            raise ValueError(f"{where}: {key} must be an int >= 1, got {entry[key]!r}")
    shapes = entry["core_shapes"]
    if not isinstance(shapes, list) or not 1 <= len(shapes) <= _MAX_SITES:
        raise ValueError(f"{where}: core_shapes must be a list of 1 to {_MAX_SITES} shapes")
    for k, s in enumerate(shapes):
        if not isinstance(s, list) or len(s) != 4 or not all(_is_int(d) and d >= 1 for d in s):
            raise ValueError(f"{where}: core_shapes[{k}] must be 4 ints >= 1 "
                             f"(left, in, out, right), got {s!r}")
    if shapes[0][0] != 1 or shapes[-1][3] != 1:
        raise ValueError(f"{where}: the outer bonds of core_shapes must be 1, got "
                         f"{shapes[0][0]} and {shapes[-1][3]}")
    for k in range(len(shapes) - 1):
        if shapes[k][3] != shapes[k + 1][0]:
            raise ValueError(f"{where}: core_shapes[{k}] ends with bond {shapes[k][3]} but "
                             f"core_shapes[{k + 1}] starts with {shapes[k + 1][0]}")
    in_prod = out_prod = 1
    for s in shapes:
        in_prod, out_prod = in_prod * s[1], out_prod * s[2]
    if entry["in_dim"] > in_prod or entry["out_dim"] > out_prod:
        raise ValueError(f"{where}: in_dim, out_dim = {entry['in_dim']}, {entry['out_dim']} "
                         f"exceed the site products {in_prod}, {out_prod} of core_shapes")
    out = dict(entry)
    out.setdefault("bias", False)
    out.setdefault("padding_idx", None)
    out.setdefault("mode", "auto")
    out.setdefault("truncation_error", 0.0)
    if not isinstance(out["bias"], bool) or (kind == "embedding" and out["bias"]):
        raise ValueError(f"{where}: bias must be true or false (false for an embedding), "
                         f"got {out['bias']!r}")
    pad = out["padding_idx"]
    if pad is not None and (not _is_int(pad) or not -entry["in_dim"] <= pad < entry["in_dim"]):
        raise ValueError(f"{where}: padding_idx must be null or an index below in_dim, "
                         f"got {pad!r}")
    if out["mode"] not in _MODES:
        raise ValueError(f"{where}: mode must be one of {_MODES}, got {out['mode']!r}")
    err = out["truncation_error"]
    if isinstance(err, bool) or not isinstance(err, (int, float)) or not 0 <= err < float("inf"):
        raise ValueError(f"{where}: truncation_error must be a finite number >= 0, got {err!r}")
    return out


def _check_pivoted_entry(where: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A gauge-fixed low-rank layer's entry (``PivotedLinear.structure``): layout,
    matrix kind, dims, a rank in ``1 .. min(in_dim, out_dim)``, bias flag."""
    if entry["layout"] != PIVOTED_LAYOUT:
        raise ValueError(f"{where}: layout must be {PIVOTED_LAYOUT!r} (or absent: cores), got "
                         f"{entry['layout']!r}")
    for key in ("kind", "in_dim", "out_dim", "rank"):
        if key not in entry:
            raise ValueError(f"{where} has no {key!r} entry")
    if entry["kind"] not in MATRIX_KINDS:
        raise ValueError(f"{where}: kind must be one of {MATRIX_KINDS} for layout "
                         f"{PIVOTED_LAYOUT!r}, got {entry['kind']!r}")
    for key in ("in_dim", "out_dim"):
        if not _is_int(entry[key]) or entry[key] < 1:
            raise ValueError(f"{where}: {key} must be an int >= 1, got {entry[key]!r}")
    top = min(entry["in_dim"], entry["out_dim"])
    if not _is_int(entry["rank"]) or not 1 <= entry["rank"] <= top:
        raise ValueError(f"{where}: rank must be an int in 1..{top}, got {entry['rank']!r}")
    out = dict(entry)
    out.setdefault("bias", False)
    out.setdefault("truncation_error", 0.0)
    if not isinstance(out["bias"], bool):
        raise ValueError(f"{where}: bias must be true or false, got {out['bias']!r}")
    err = out["truncation_error"]
    if isinstance(err, bool) or not isinstance(err, (int, float)) or not 0 <= err < float("inf"):
        raise ValueError(f"{where}: truncation_error must be a finite number >= 0, got {err!r}")
    return out


def module_tensor_shapes(entry: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict names (relative to the module) and shapes of the layer an entry
    describes: ``cores.0 .. cores.{n-1}`` and, with a bias, ``bias``; for a gauge-fixed
    layer (``layout`` "pivoted") ``pivots`` (r,), ``rest`` (I - r,), ``coef`` (I - r, r),
    ``right`` (r, J) and the bias."""
    if entry.get("layout") == PIVOTED_LAYOUT:
        I, J, r = entry["in_dim"], entry["out_dim"], entry["rank"]
        shapes = {"pivots": (r,), "rest": (I - r,), "coef": (I - r, r), "right": (r, J)}
        if entry.get("bias"):
            shapes["bias"] = (J,)
        return shapes
    shapes = {f"cores.{k}": tuple(s) for k, s in enumerate(entry["core_shapes"])}
    if entry.get("bias"):
        shapes["bias"] = (entry["out_dim"],)
    return shapes


def load_tensors(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, tensors)`` of a checkpoint, hash verified; tensors as numpy arrays, in
    their stored dtype but bfloat16, which numpy lacks: float32 (exact).

    Raises:
        FileNotFoundError: no config or weights in ``directory``.
        ValueError: what :func:`read_meta` and :func:`verified_weights` refuse.
    """
    import torch
    from safetensors.torch import load_file  # read through torch: numpy has no bfloat16

    with reading(directory):
        meta = read_meta(directory)
        tensors = load_file(str(verified_weights(directory, meta)))
    return meta, {k: (t.float() if t.dtype == torch.bfloat16 else t).numpy()
                  for k, t in tensors.items()}


def write_checkpoint(directory: str | os.PathLike, meta: dict[str, Any],
                     model: nn.Module) -> Path:
    """Write ``model``'s state (safetensors) and ``meta`` (plus weights name, hash and
    format version) as a checkpoint in ``directory``; see the module docstring."""
    from safetensors.torch import save_model

    d = Path(directory)
    meta = dict(meta, format_version=FORMAT_VERSION)
    json.dumps(meta)  # fail before touching the folder if anything is not serializable
    d.mkdir(parents=True, exist_ok=True)
    with locked(d) as acquired:
        remove_stale_temps(d, acquired)
        _write_locked(d, meta, model, save_model)
    return d


def _current_weights(d: Path) -> Any:
    try:
        return read_meta(d).get("weights")
    except (FileNotFoundError, ValueError):
        return None


def _remove_owned(d: Path, name: Any, keep: Any) -> None:
    """Remove the weights file ``name`` (one this module wrote) unless it is ``keep``.
    Only a name of the form this writer generates (:data:`WEIGHTS_NAME`) is removed;
    any other (a config or journal edited to name a user's file or a path leaving the
    folder) is left alone with a warning."""
    if name is None or name == keep:
        return
    if not (isinstance(name, str) and WEIGHTS_NAME.fullmatch(name)):
        warnings.warn(f"{d}: the checkpoint's config or journal names {name!r} as a weights "
                      "file to replace, which is not a name this writer generates; the file "
                      "is left in place", stacklevel=3)
        return
    with contextlib.suppress(ValueError, OSError):
        _weights_path(d, name).unlink(missing_ok=True)


def recover(directory: str | os.PathLike) -> None:
    """Finish the write a crashed writer left (call it holding :func:`locked`): of the
    two weights files its journal lists, remove the one the current config does not
    name; then remove the journal."""
    d = Path(directory)
    journal = d / JOURNAL_NAME
    if not journal.is_file():
        return
    try:
        owned = json.loads(journal.read_text())
    except (OSError, ValueError):
        owned = {}
    if isinstance(owned, dict):
        current = _current_weights(d)
        if current is not None:  # with no readable config, keep everything
            for key in ("new", "previous"):
                _remove_owned(d, owned.get(key), current)
    journal.unlink(missing_ok=True)


def _write_locked(d: Path, meta: dict[str, Any], model: nn.Module,
                  save_model: Callable[..., None]) -> None:
    recover(d)
    previous = _current_weights(d)
    # a directory of its own: a writer that makes its own temporary file beside its target
    # (safetensors >= 0.5 writes ".tmpXXXXXX" then renames it) leaves nothing unknown in
    # the folder when killed; a later writer removes the whole directory as stale
    tmp_dir = Path(tempfile.mkdtemp(dir=d, prefix=".weights.", suffix=".tmp"))
    tmp = tmp_dir / "weights.safetensors"
    try:
        save_model(model, str(tmp))
        _fsync(tmp)
        digest = sha256(tmp)
        weights = d / f"mpo_model-{digest[:12]}.safetensors"
        tmp.chmod(0o644)
        journal = json.dumps({"new": weights.name, "previous": previous})
        atomic_write(d / JOURNAL_NAME, lambda t: t.write_text(journal))
        os.replace(tmp, weights)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    meta.update(weights=weights.name, sha256=digest)
    try:
        atomic_write(d / CONFIG_NAME,
                     lambda t: t.write_text(json.dumps(meta, indent=1, sort_keys=True)))
    except BaseException:  # the config still names the previous weights: drop the new ones
        _remove_owned(d, weights.name, previous)
        (d / JOURNAL_NAME).unlink(missing_ok=True)
        raise
    _fsync_dir(d)
    # a previous config that named a path outside the folder: that path is left alone
    _remove_owned(d, previous, weights.name)
    (d / JOURNAL_NAME).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# lightweight task checkpoints and checkpoints written through a state dict (issue 12)
#
# A lightweight (task) checkpoint is the same two files, written by write_tensors: the
# weights file holds only what the task changed (trainable tensors, and any tensor that
# differs from what the base model rebuilds), and mpo_config.json has one more entry,
# "lightweight": {"rebuilt": {state key: tensor_sha256}, "base_model_name_or_path": ...},
# the SHA-256 of every tensor the loader takes from the base model or rebuilds by
# decomposing it with the saved config (central cores, frozen auxiliary cores, biases,
# embeddings, LayerNorms, ...), and "sketches": {core's state key: [norm, 4 projections]}
# (checkpoint.core_sketch) of the rebuilt cores. Loading verifies each of them: a core
# whose bits differ is accepted when its sketch agrees to SKETCH_RTOL of norm/sqrt(numel) (the
# same base decomposed with other float rounding: another thread count or BLAS).
# ---------------------------------------------------------------------------------------

#: key of the state-dict entry of an MPO model that describes it (config and layer
#: structures as JSON bytes): what makes a state dict saved by others (e.g.
#: ``transformers.Trainer``) readable as a checkpoint; ``nn.Module``'s "extra state"
STATE_META_KEY = "_extra_state"
#: the file ``transformers.Trainer`` writes a state dict to
STATE_DICT_NAME = "model.safetensors"
_STATE_MARK = "tnlm.MPOModel"


def tensor_sha256(t: Any) -> str:
    """Hex SHA-256 of a tensor: its dtype, shape and bytes (what "bit-identical" means)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    h = hashlib.sha256(f"{t.dtype}|{list(t.shape)}|".encode())
    flat = t.contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_tensors(directory: str | os.PathLike, meta: dict[str, Any],
                  tensors: dict[str, Any]) -> Path:
    """:func:`write_checkpoint` for a dict of tensors (e.g. the trainable tensors of a
    lightweight checkpoint): the same file names, lock, journal, hashing and atomic
    renames. Tensors must not share memory."""
    from safetensors.torch import save_file

    d = Path(directory)
    meta = dict(meta, format_version=FORMAT_VERSION)
    json.dumps(meta)  # fail before touching the folder if anything is not serializable
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    d.mkdir(parents=True, exist_ok=True)
    with locked(d) as acquired:
        remove_stale_temps(d, acquired)
        _write_locked(d, meta, tensors, lambda t, path: save_file(t, path))
    return d


def meta_to_tensor(meta: dict[str, Any]) -> Any:
    """``meta`` (config and layer structures) as a uint8 tensor, for a state dict."""
    import torch

    data = json.dumps(dict(meta, format=_STATE_MARK, format_version=FORMAT_VERSION),
                      sort_keys=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def meta_from_tensor(t: Any, where: str) -> dict[str, Any]:
    """The meta a state dict carries (:func:`meta_to_tensor`), checked as
    :func:`read_meta` checks a config.

    Raises:
        ValueError: not a tnlm description, invalid JSON or an unsupported version.
    """
    import torch

    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{where}: {STATE_META_KEY!r} is not an MPO model description")
    try:
        meta = json.loads(bytes(t.cpu().numpy().tobytes()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: {STATE_META_KEY!r} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != _STATE_MARK:
        raise ValueError(f"{where}: {STATE_META_KEY!r} is not an MPO model description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: unsupported format_version {meta.get('format_version')!r} "
                         f"(expected {FORMAT_VERSION})")
    for key in ("modules", "config"):
        if key not in meta:
            raise ValueError(f"{where}: the MPO model description has no {key!r} entry")
    return meta


def read_state_dict_checkpoint(directory: str | os.PathLike,
                               prefix: str = "base_model.") -> tuple[dict[str, Any], Path]:
    """``(meta, weights)`` of a folder where a state dict of an MPO model was saved as
    ``model.safetensors`` (what ``transformers.Trainer.save_model`` and its checkpoints
    write for a model that is not a ``PreTrainedModel``). ``meta`` comes from the state
    dict's :data:`STATE_META_KEY` entry and records ``prefix`` (the tensors' names are
    those of the base model after it); there is no hash to verify (Trainer records none).

    Raises:
        FileNotFoundError: no ``model.safetensors`` in ``directory``.
        ValueError: the file is not readable or holds no MPO model description.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / STATE_DICT_NAME
    if not path.is_file() or path.is_symlink():
        raise FileNotFoundError(f"no {CONFIG_NAME} or {STATE_DICT_NAME} in {directory}")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if STATE_META_KEY not in names:
                raise ValueError(f"{path} holds no {STATE_META_KEY!r} entry: it is not the state "
                                 "dict of an MPOModel")
            meta = meta_from_tensor(f.get_tensor(STATE_META_KEY), str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                         ) from err
    meta["prefix"] = prefix
    return meta, path
