"""The folder an ONNX writer stages its output in, and what a killed writer left of one.

:func:`export_onnx`, :func:`export_onnx_decoder`, :func:`quantize_int8` and
:func:`quantize_weights` write the graph (and its external data, which can be gigabytes)
in a hidden folder beside the destination, then rename it into place (the same
filesystem, so the rename is atomic). The folder is removed when the writer returns or
raises; a writer that is killed (``SIGKILL``, the OOM killer, a power loss) cannot remove
it. So the folder's name says whose it is, ``.<name>.tnlm-staging.<pid>.<8 hex digits>``
(``<name>`` the destination's file name, ``<pid>`` the writer's process id), and
:func:`staging_dir` first removes, in the destination's folder, every folder of exactly
that form for the same ``<name>`` whose process is not running on this machine. A
running process's folder (a concurrent export) is kept, as is everything whose name does
not match exactly, and a symbolic link is neither followed nor removed. A process id
that the system has since given to another running process keeps its folder until that
process ends. On Windows (where ``os.kill`` cannot test a process without signalling it)
nothing is removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["STAGING_TAG", "staging_dir", "remove_stale_staging", "staging_pattern",
           "save_graph_replacing", "writer_running", "stale_entries", "on_windows"]

#: the part of a staging folder's name that says it is tnlm's
STAGING_TAG = "tnlm-staging"


def staging_pattern(name: str) -> re.Pattern[str]:
    """The names of the staging folders of a destination file named ``name``; group 1
    is the writer's process id."""
    return re.compile(rf"\.{re.escape(name)}\.{STAGING_TAG}\.([1-9][0-9]*)\.[0-9a-f]{{8}}")


def on_windows() -> bool:
    """Whether this is Windows, where ``os.kill`` ends a process instead of testing it."""
    return os.name == "nt"


def writer_running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one of another user's counts; on
    Windows, where ``os.kill`` would end the process instead of testing it, every one
    counts as running, so nothing of it is removed)."""
    if pid == os.getpid() or on_windows():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # not ours to signal (PermissionError), or not testable: kept
    return True


def stale_entries(folder: str | os.PathLike, pattern: re.Pattern[str]) -> list[os.DirEntry]:
    """The entries of ``folder`` whose whole name matches ``pattern`` (group 1: the
    writer's process id) and whose writer no longer runs (:func:`writer_running`); none
    when ``folder`` cannot be read."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is not None and not writer_running(int(match.group(1))):
            stale.append(entry)
    return stale


def remove_stale_staging(dst: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of the destination ``dst`` (in its folder) whose writer
    no longer runs (:mod:`tnlm.export.staging`); return what was removed. A folder that
    cannot be removed (permissions, a race with another remover) is left without a word."""
    dst = Path(dst)
    removed = []
    for entry in stale_entries(dst.parent, staging_pattern(dst.name)):
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def staging_dir(dst: Path, mode: int = 0o700) -> Iterator[Path]:
    """A new, empty staging folder for the destination ``dst``, beside it (its folder
    must exist), removed on exit unless it was renamed away; the stale staging folders of
    ``dst`` removed first (:func:`remove_stale_staging`). ``mode``: the folder's (the
    umask applies), 0o777 for a folder that is renamed into place as the user's own."""
    remove_stale_staging(dst)
    prefix = f".{dst.name}.{STAGING_TAG}.{os.getpid()}."
    while True:
        tmp = dst.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            tmp.mkdir(mode=mode)
            break
        except FileExistsError:
            continue
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_graph_replacing(model: Any, path: str | os.PathLike) -> None:
    """Write the ONNX ``model`` (its weights inside the file) over ``path``: to a name of
    this call's own beside it (``.NAME.PID.HEX.tmp``: two writers of one file never share
    it), then renamed over ``path``; on failure the temporary file is removed and
    ``path`` is as it was. Such files of writers no longer running (killed) are removed
    first."""
    import onnx

    path = Path(path)
    # a killed earlier write's temporary file (its process no longer runs) is removed
    stale = re.compile(rf"\.{re.escape(path.name)}\.([1-9][0-9]*)\.[0-9a-f]{{8}}\.tmp")
    for entry in stale_entries(path.parent, stale):
        with contextlib.suppress(OSError):
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
