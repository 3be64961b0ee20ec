"""Replacing a model folder whole: a new model is written beside the folder and takes
its place, so that the folder holds either what it held or the whole new model, never a
mix (an earlier model's files left beside the new one would change what it loads); the
user's own files in it are carried over. Used by ``tnlm compress --out`` and by the
library's savers (:func:`~tnlm.export.save_self_contained`,
:func:`~tnlm.export.export_hf`)."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from tnlm.export.staging import on_windows, stale_entries
from tnlm.integration.io import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["DENSE_WEIGHTS", "MODEL_FILES", "recover_staged", "replace_folder", "write_folder"]


#: tnlm's own hidden names in a model folder (the checkpoint's lock, journal and temporary
#: files, the write probe): not carried over by :func:`replace_folder`
_OWN_HIDDEN = (".mpo_", ".weights.", ".tnlm-")


#: the files and folders of a model folder (a tnlm model's, transformers' and
#: sentence-transformers'): an earlier model's are not carried over by
#: :func:`replace_folder` (they would change what the new folder loads)
MODEL_FILES = frozenset({
    CONFIG_NAME, "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "modules.json",
    "config_sentence_transformers.json", "sentence_bert_config.json", "README.md",
    "1_Pooling", "2_Normalize"})
#: the staging folders of :func:`replace_folder` beside ``out``: ``.NAME.partial-PID-HEX``
#: (the new model being written), ``.NAME.old-PID-HEX`` (the earlier folder, until the
#: new one is in place)
_STAGED = ("partial", "old")
#: in a staging folder: the names of the entries moved into it from the earlier folder
#: (one a line), written before the first is moved, so that :func:`recover_staged` puts
#: back every one of them, ``keep`` entries too, after a kill before the last rename
_MOVED = ".tnlm-moved"


#: the file names (``fnmatch`` patterns) of a transformers model's weights
#: (``save_pretrained`` of PyTorch, TensorFlow or Flax, single or sharded), which
#: ``AutoModel.from_pretrained`` loads; ``tnlm export --format hf`` writes the first three
DENSE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json",
                 "model-?????-of-?????.safetensors", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "pytorch_model-?????-of-?????.bin",
                 "tf_model.h5", "tf_model.h5.index.json", "flax_model.msgpack",
                 "flax_model.msgpack.index.json")


def is_dense_weights(name: str) -> bool:
    """Whether a file name is one of :data:`DENSE_WEIGHTS`."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in DENSE_WEIGHTS)


def _old_weights(folder: Path) -> str | None:
    """The weights file the ``mpo_config.json`` of ``folder`` names (a plain
    ``.safetensors`` file name), or None."""
    import json

    try:
        name = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get("weights")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    if isinstance(name, str) and name.endswith(".safetensors") and "/" not in name \
            and "\\" not in name:
        return name
    return None


def _carried(name: str, drop: Sequence[str], weights: str | None = None) -> bool:
    """Whether an entry of the earlier folder goes into the new one: the user's own
    files and hidden files (``.git``, notes, results, their own ``.safetensors`` such as
    ``mpo_model-best.safetensors``), not an earlier model's files, the weights an earlier
    run wrote (tnlm's ``mpo_model-<hash>.safetensors``, the file ``weights`` its
    ``mpo_config.json`` names, a dense export's ``model*.safetensors``), tnlm's own hidden
    files or the run's own folders ``drop``."""
    if name.startswith("."):
        return not name.startswith(_OWN_HIDDEN)
    return not (name in MODEL_FILES or name in drop or name == weights
                or WEIGHTS_NAME.fullmatch(name) or is_dense_weights(name))


def recover_staged(out: Path, label: str | None = None) -> list[str]:
    """Tidy what a :func:`replace_folder` killed by a signal (SIGKILL, power loss) left
    beside ``out``, for processes no longer running: a partial new model is removed; an
    earlier folder renamed aside is put back where the new model never took ``out``'s
    place (its partial folder is still there), with the user's entries already moved into
    that partial folder (the names it lists, and every entry that is not a model's): into
    a missing or empty ``out``; beside an ``out`` that holds other files since, both
    staged folders are kept and named, for the user to sort out. An earlier folder whose
    new model did take its place is removed. On Windows (where a writer cannot be tested
    without ending it) nothing is touched and the staged folders are named. Returns one
    notice a thing done, each starting with ``label`` (default ``--out OUT``)."""
    real = Path(out).resolve()
    label = f"--out {out}" if label is None else label
    said: list[str] = []
    if not real.parent.is_dir():
        return said
    patterns = {kind: re.compile(rf"\.{re.escape(real.name)}\.{kind}-([1-9][0-9]*)-[0-9a-f]{{8}}")
                for kind in _STAGED}
    if on_windows():
        with contextlib.suppress(OSError):
            for e in os.scandir(real.parent):
                if any(pat.fullmatch(e.name) for pat in patterns.values()):
                    said.append(f"{label}: {e.name} beside it is a folder a save staged; "
                                "if no save is running, it was killed: move back what you "
                                "need of it by hand")
        return said
    stale = {kind: [Path(e.path) for e in stale_entries(real.parent, pat)
                    if e.is_dir(follow_symlinks=False)] for kind, pat in patterns.items()}
    kept: set[Path] = set()
    for old in sorted(stale["old"]):
        partial = old.parent / old.name.replace(".old-", ".partial-", 1)
        if not partial.is_dir():  # the new model took out's place: the earlier one goes
            shutil.rmtree(old, ignore_errors=True)
            said.append(f"{label}: removed {old.name}, the earlier folder a killed save "
                        "had already replaced")
            continue
        if real.is_dir() and not real.is_symlink() and next(real.iterdir(), None) is None:
            real.rmdir()  # made again since (mkdir -p): empty, nothing lost
        if real.exists():
            kept |= {old, partial}
            said.append(f"{label}: a save was killed before its new model took the folder's "
                        f"place, and the folder holds other files since: the earlier folder "
                        f"is kept at {old.name} and the files the save had moved at "
                        f"{partial.name} (beside it); move back what you need by hand")
            continue
        listed = _moved_names(partial)  # the user's entries moved into it go back
        for q in partial.iterdir():
            if q.name != _MOVED and (q.name in listed or _carried(q.name, ())) \
                    and not (old / q.name).exists():
                os.rename(q, old / q.name)
        os.rename(old, real)
        said.append(f"{label}: the earlier folder, set aside by a save that was "
                    f"killed, was put back ({old.name})")
    for partial in sorted(stale["partial"]):
        if partial in kept:
            continue
        shutil.rmtree(partial, ignore_errors=True)
        said.append(f"{label}: removed {partial.name}, a model a killed save had not "
                    "finished writing")
    return said


def _moved_names(partial: Path) -> set[str]:
    """The names :func:`replace_folder` listed in ``partial`` before moving them there."""
    try:
        text = (partial / _MOVED).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return set()
    return {line for line in text.splitlines() if line and "/" not in line}


def _clear_model_files(folder: Path, drop: Sequence[str], keep: Sequence[str] = ()) -> None:
    """Before a model is written in place: remove the entries of ``folder`` that
    :func:`replace_folder` would not carry over (an earlier model's files), keeping the
    user's, ``keep`` and the run's own folders ``drop``."""
    weights = _old_weights(folder)
    for p in sorted(folder.iterdir()):
        if p.name not in drop and p.name not in keep and not _carried(p.name, drop, weights):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def replace_folder(out: Path, write: Callable[[Path], object],
                   drop: Sequence[str] = (), keep: Sequence[str] = ()) -> None:
    """Write a model to the folder ``out`` (made by :func:`make_out`) so that it holds
    either what it held or the whole new model, never a mix.

    ``write(folder)`` fills a new folder beside ``out``, which then takes ``out``'s place;
    only then is the earlier folder removed with an earlier model's files
    (:data:`MODEL_FILES`, the weights an earlier run wrote: ``mpo_model-<hash>.safetensors``,
    the file its ``mpo_config.json`` names, ``model*.safetensors``) and the run's own
    folders ``drop`` (a checkpoint to resume); everything else there, the user's own files
    and hidden files (``.git``, notes, results, other ``.safetensors`` such as
    ``mpo_model-best.safetensors``) and the entries named in ``keep`` (model files that
    are the user's own: a caller's judgement), is carried over. If ``write`` fails or is
    interrupted, the new folder is removed and ``out`` is as it was (killed by a signal:
    :func:`recover_staged` tidies up at the next run's :func:`make_out`, or the next
    :func:`write_folder`). A
    folder that cannot be renamed (a mount point, the working folder or one above it) or
    whose parent cannot be written to is written in place, the earlier model's files
    removed first (the user's files and ``drop`` kept): never a mix, but an interrupted
    write there leaves neither model whole."""
    real = out.resolve()
    cwd = Path.cwd().resolve()
    tag = f"{os.getpid()}-{os.urandom(4).hex()}"
    tmp, old = (real.parent / f".{real.name}.{kind}-{tag}" for kind in ("partial", "old"))
    if os.path.ismount(real) or real == cwd or real in cwd.parents:
        _clear_model_files(out, drop, keep)
        write(out)  # cannot be renamed: in place
        return
    try:
        tmp.mkdir()
    except OSError:  # its parent cannot be written to: in place
        _clear_model_files(out, drop, keep)
        write(out)
        return
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(real, old)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, OSError):
            raise
        _clear_model_files(out, drop, keep)
        write(out)  # out cannot be renamed (busy, in a sticky folder): in place
        return
    moved: list[str] = []
    weights = _old_weights(old)
    try:
        carry = [p.name for p in sorted(old.iterdir())
                 if (_carried(p.name, drop, weights) or p.name in keep)
                 and not (tmp / p.name).exists()]
        (tmp / _MOVED).write_text("".join(f"{n}\n" for n in carry), encoding="utf-8")
        for name in carry:
            os.rename(old / name, tmp / name)
            moved.append(name)
        os.rename(tmp, real)
    except BaseException:
        if tmp.is_dir():  # not yet in place: put the earlier folder back
            for name in moved:
                os.rename(tmp / name, old / name)
            os.rename(old, real)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        (real / _MOVED).unlink()
    shutil.rmtree(old, ignore_errors=True)


def write_folder(folder: Path, write: Callable[[Path], object],
                 keep: Sequence[str] = ()) -> None:
    """``write(folder)`` into ``folder`` (created), for the library's savers: first what a
    killed earlier save left beside it is tidied (:func:`recover_staged`, each thing done
    in a warning); a new or empty folder (nothing to mix with: a caller's own staging
    folder, such as ``tnlm compress``'s) is written in place, and emptied again if
    ``write`` fails (so that a retry finds it empty); any other through
    :func:`replace_folder` (``keep``: its entries carried over although model files)."""
    for said in recover_staged(folder, label=str(folder)):
        warnings.warn(said, stacklevel=3)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if next(folder.iterdir(), None) is not None:
        replace_folder(folder, write, keep=keep)
        return
    try:
        write(folder)
    except BaseException:
        for p in list(folder.iterdir()):  # it was empty: everything here is the write's
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
