"""What every command of the ``tnlm`` command line shares: its two errors, the output
folder made before any work, notices, the model folder and the checks of the numbers
both compress jobs take."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tnlm.integration.io import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["UserError", "HealingDiverged", "model_path", "make_out", "remove_empty", "note",
           "replace_folder", "recover_staged", "MODEL_FILES", "text_error",
           "check_budget_and_healing", "launched", "encoder_only_defaults"]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line."""


def model_path(model_dir: str | None) -> Path:
    from tnlm.integration import default_model_path

    path = Path(model_dir) if model_dir else default_model_path()
    if not (path / "config.json").is_file():
        raise UserError(f"MODEL_DIR {path} is not a transformers model folder (no config.json)")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise UserError(f"MODEL_DIR {path} holds no model.safetensors")
    return path


class HealingDiverged(Exception):
    """Healing blew up: reported in one line, exit status 1."""


def make_out(out: str | None, own: Sequence[str] | None = None
             ) -> tuple[Path | None, list[Path]]:
    """The output folder, created (with its parents) and a probe file written and removed
    there, before any work (``os.access`` says yes to root even where writing fails);
    returns it and the folders this created, innermost last.

    With ``own`` (the names a job of this command leaves there while it runs), an existing
    folder must be empty, hold an earlier tnlm model (its ``mpo_config.json``) or only
    those names, hidden files and tnlm's weights (``mpo_model-<hash>.safetensors``, which a
    save killed before its config leaves): a model written into another folder (a model folder,
    a project) would overwrite its ``config.json``, ``README.md`` and tokenizer and be
    mistaken for the dense model beside it."""
    if not out:
        return None, []
    d = Path(out)
    for said in recover_staged(d):
        note(said)
    if own is not None and d.is_dir() and not (d / CONFIG_NAME).is_file():
        # a save killed before its config was written leaves tnlm's weights alone
        others = sorted(p.name for p in d.iterdir()
                        if p.name not in own and not p.name.startswith(".")
                        and not WEIGHTS_NAME.fullmatch(p.name))
        if others:
            shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
            raise UserError(f"--out {d} holds other files ({shown}) and no earlier tnlm "
                            "model: writing the model there would overwrite them; give a "
                            "new or empty folder")
    missing = []
    p = d
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise UserError(f"--out {d}: {p} is a file, not a folder")
    created: list[Path] = []
    try:
        for m in reversed(missing):
            m.mkdir()
            created.append(m)
        probe = d / f".tnlm-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        remove_empty(created)
        raise UserError(f"--out {d} cannot be written: {err.strerror or err}") from None
    return d, created


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders (innermost last) that are still empty; keep the others."""
    for f in reversed(folders):
        try:
            f.rmdir()
        except OSError:
            return


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


#: a dense model's weights as transformers writes them (``tnlm export --format hf``):
#: ``model.safetensors``, its shards ``model-00001-of-00002.safetensors`` and their index
_DENSE_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


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
                or WEIGHTS_NAME.fullmatch(name) or _DENSE_WEIGHTS.fullmatch(name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_staged(out: Path) -> list[str]:
    """Tidy what a :func:`replace_folder` killed by a signal (SIGKILL, power loss) left
    beside ``out``, for processes no longer running: a partial new model is removed; an
    earlier folder renamed aside is put back where ``out`` is missing (with the hidden
    files already moved into the new one), else removed (the new model was in place).
    Returns one notice a thing done."""
    real = Path(out).resolve()
    said: list[str] = []
    if not real.parent.is_dir():
        return said
    stale: dict[str, list[Path]] = {k: [] for k in _STAGED}
    for p in real.parent.iterdir():
        for kind in _STAGED:
            prefix = f".{real.name}.{kind}-"
            if p.is_dir() and p.name.startswith(prefix):
                pid = p.name[len(prefix):].split("-")[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    stale[kind].append(p)
    for old in sorted(stale["old"]):
        if not real.exists():
            partial = old.parent / old.name.replace(".old-", ".partial-", 1)
            if partial.is_dir():  # hidden files moved into it go back
                for q in partial.iterdir():
                    if q.name.startswith(".") and not (old / q.name).exists():
                        os.rename(q, old / q.name)
            os.rename(old, real)
            said.append(f"--out {out}: the earlier folder, set aside by a save that was "
                        f"killed, was put back ({old.name})")
        else:
            shutil.rmtree(old, ignore_errors=True)
            said.append(f"--out {out}: removed {old.name}, the earlier folder a killed save "
                        "had already replaced")
    for partial in sorted(stale["partial"]):
        shutil.rmtree(partial, ignore_errors=True)
        said.append(f"--out {out}: removed {partial.name}, a model a killed save had not "
                    "finished writing")
    return said


def replace_folder(out: Path, write: Callable[[Path], object],
                   drop: Sequence[str] = ()) -> None:
    """Write a model to the folder ``out`` (made by :func:`make_out`) so that it holds
    either what it held or the whole new model, never a mix.

    ``write(folder)`` fills a new folder beside ``out``, which then takes ``out``'s place;
    only then is the earlier folder removed with an earlier model's files
    (:data:`MODEL_FILES`, the weights an earlier run wrote: ``mpo_model-<hash>.safetensors``,
    the file its ``mpo_config.json`` names, ``model*.safetensors``) and the run's own
    folders ``drop`` (a checkpoint to resume); everything else there, the user's own files
    and hidden files (``.git``, notes, results, other ``.safetensors`` such as
    ``mpo_model-best.safetensors``), is carried over. If ``write`` fails or is interrupted, the new
    folder is removed and ``out`` is as it was (killed by a signal: :func:`recover_staged`
    tidies up at the next run's :func:`make_out`). A folder that cannot be renamed (a
    mount point, the working folder or one above it) or whose parent cannot be written
    to is written in place, as before."""
    real = out.resolve()
    cwd = Path.cwd().resolve()
    tag = f"{os.getpid()}-{os.urandom(4).hex()}"
    tmp, old = (real.parent / f".{real.name}.{kind}-{tag}" for kind in ("partial", "old"))
    if os.path.ismount(real) or real == cwd or real in cwd.parents:
        write(out)  # cannot be renamed: in place
        return
    try:
        tmp.mkdir()
    except OSError:  # its parent cannot be written to: in place
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
        write(out)  # out cannot be renamed (busy, in a sticky folder): in place
        return
    moved: list[str] = []
    weights = _old_weights(old)
    try:
        for p in sorted(old.iterdir()):
            if _carried(p.name, drop, weights) and not (tmp / p.name).exists():
                os.rename(p, tmp / p.name)
                moved.append(p.name)
        os.rename(tmp, real)
    except BaseException:
        if tmp.is_dir():  # not yet in place: put the earlier folder back
            for name in moved:
                os.rename(tmp / name, old / name)
            os.rename(old, real)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def text_error(err: Exception) -> UserError:
    """The one-line error for a ``--text`` file that could not be read (``read_sentences``
    / ``encoder_text``), naming ``--text-column`` when the column was the problem."""
    flag = "--text-column" if str(err).startswith("column ") else "--text"
    return UserError(f"{flag}: {err}")


def note(message: str) -> None:
    """A notice the user must see (on stderr, even with --quiet or --json)."""
    print(f"tnlm: {message}", file=sys.stderr)


def check_budget_and_healing(budget: float, heal_steps: int, lr: float) -> None:
    """The checks both compress paths (encoder, causal LM) make of their shared numbers."""
    import math

    from tnlm.core.budget import check_fraction

    try:
        check_fraction("--budget", budget)
    except (TypeError, ValueError) as err:
        raise UserError(str(err)) from None
    if heal_steps < 0:
        raise UserError(f"--heal-steps must be >= 0, got {heal_steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {lr}")


def launched() -> tuple[int, int]:
    """``(rank, world_size)`` torchrun (or another launcher) gave this process."""
    from tnlm.compress.distributed import launched_world

    try:
        return launched_world()
    except ValueError as err:
        raise UserError(str(err)) from None


def encoder_only_defaults() -> dict[str, object]:
    """The flags of ``tnlm compress`` that apply to encoders only, with the parser's
    defaults: what they hold when not given (``None``, or ``False`` for a switch; the
    encoder's job then takes :class:`~tnlm.compress.encoder.EncoderRecipe`'s). A causal
    LM's job refuses any other value: a flag given, even at the encoder's default value."""
    return {"--sick": None, "--with-default-text": False, "--heal-train": None,
            "--teacher-bf16": None, "--reconstruct-steps": None, "--calibration": None}
