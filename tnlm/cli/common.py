"""What every command of the ``tnlm`` command line shares: its two errors, the output
folder made before any work, notices, the model folder and the checks of the numbers
both compress jobs take."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tnlm.export.replace import MODEL_FILES, recover_staged, replace_folder
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
    if not any((path / f).is_file() for f in TORCH_WEIGHTS):
        raise UserError(f"MODEL_DIR {path} holds no model weights (one of "
                        f"{', '.join(TORCH_WEIGHTS)}; a sharded model's index names its "
                        "shards)")
    return path


#: the weights ``AutoModel.from_pretrained`` reads in a folder, single or sharded (the
#: index names the shards)
TORCH_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


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
