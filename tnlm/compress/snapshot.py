"""A copy of parameter values to go back to: healing's best state, kept off the heap.

Healing keeps the trained parameters of its best step so that a run that blows up can be
restored (:func:`tnlm.compress.decoder.heal.heal_causal`). Kept in memory that copy is as large
as everything healing trains (SmolLM2-135M at a 60 % budget: 64M parameters, 256 MB,
about a tenth of the healing stage's peak). :class:`ParameterSnapshot` keeps it in one
unnamed temporary file instead (``where="disk"``), written tensor by tensor from the
parameters' own memory (no copy of the set is built, not even while writing; only a
non-contiguous or non-CPU tensor passes through a copy of itself). The file holds raw
bytes in the parameters' order, shapes and dtypes known to the snapshot object: nothing
is deserialized but bytes into the parameters' storage.

The file has no name from the start (``tempfile.TemporaryFile``: on Linux and other
POSIX systems ``O_TMPFILE`` or unlinked on creation; on Windows a file deleted when
closed), so its space goes back to the file system when the snapshot is closed or its
process ends in any way, also when it is killed by a signal: an interrupted run leaves
nothing in the temporary folder. (A named file in a temporary
directory, the former layout, stayed behind whenever a run was killed: 243 MiB each for
SmolLM2 at 60 %.)

The file's bytes stay out of the process's resident set; they live where the temporary
folder does (``$TMPDIR``, else the system's; on a tmpfs that is RAM again) and pass
through the page cache, which the kernel may reclaim. A write that fails (a full disk)
warns once and keeps this and every later snapshot in memory, so that every rank of a
distributed run keeps the same step; a :meth:`~ParameterSnapshot.take` that fails
altogether leaves no snapshot to restore (``restore`` then refuses) rather than a part
of one. ``where="memory"`` keeps the copy beside the parameters from the start (the
former behaviour). Parameters on another device than the CPU are written through a CPU
copy, one tensor at a time.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch

__all__ = ["ParameterSnapshot", "SNAPSHOT_PLACES"]

#: where a :class:`ParameterSnapshot` may keep its copy
SNAPSHOT_PLACES = ("disk", "memory")


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of ``t``'s values (a contiguous copy only if ``t`` is not)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class ParameterSnapshot:
    """The values of ``params`` at the last :meth:`take`, put back by :meth:`restore`.

    Args:
        params: the tensors whose values are kept; their shapes, dtypes, devices and
            order must not change while the snapshot lives.
        where: ``"disk"`` (one unnamed file in ``directory`` or the temporary folder,
            ``$TMPDIR``; nothing of it outlives the process) or ``"memory"`` (clones
            beside the parameters).
        directory: where the file is made (``"disk"`` only); it must exist.

    Raises:
        ValueError: ``where`` is not one of :data:`SNAPSHOT_PLACES`, an entry of
            ``params`` is not a tensor (or, on disk, holds no values: the ``meta``
            device), or ``directory`` is not an existing folder.
    """

    def __init__(self, params: Sequence[torch.Tensor], where: str = "disk",
                 directory: str | os.PathLike | None = None) -> None:
        if where not in SNAPSHOT_PLACES:
            raise ValueError(f"where must be one of {', '.join(map(repr, SNAPSHOT_PLACES))}, "
                             f"got {where!r}")
        self.params = list(params)
        for i, p in enumerate(self.params):
            if not torch.is_tensor(p):
                raise ValueError(f"params[{i}] must be a tensor, got {type(p).__name__}")
            if where == "disk" and p.device.type == "meta":
                raise ValueError(f"params[{i}] is on the meta device: no values to write; "
                                 "use where='memory'")
        self.where = where
        self.taken = False
        self.closed = False
        self._copies: list[torch.Tensor] | None = None
        self._file: IO[bytes] | None = None
        if where == "disk":
            if directory is not None and not Path(directory).is_dir():
                raise ValueError(f"directory must be an existing folder, got {directory!r}")
            # the file lives as long as the object: closed by close() or with the process
            self._file = tempfile.TemporaryFile(  # noqa: SIM115
                prefix="tnlm-snapshot-", dir=directory)

    @property
    def nbytes(self) -> int:
        """Bytes of one copy of the parameters."""
        return sum(p.numel() * p.element_size() for p in self.params)

    @property
    def file_bytes(self) -> int | None:
        """Bytes in the snapshot's file (``None`` when it keeps no file)."""
        return None if self._file is None else os.fstat(self._file.fileno()).st_size

    def take(self) -> None:
        """Keep the parameters' current values (replacing the previous snapshot). On
        disk, a failed write (``OSError``) warns and keeps this and later snapshots in
        memory instead.

        Raises:
            ValueError: the snapshot was closed.
        """
        if self.closed:
            raise ValueError("the snapshot was closed")
        self.taken = False  # until this take is complete: never restore a part of one
        if self.where == "disk":
            try:
                _write(self._file, self.params)
            except OSError as err:
                warnings.warn(f"could not write the parameter snapshot ({err}); keeping it "
                              f"in memory instead ({self.nbytes / 2**20:.0f} MiB)",
                              stacklevel=2)
                self._drop_file()
                self.where = "memory"
        if self.where == "memory":
            with torch.no_grad():
                if self._copies is None:
                    self._copies = [p.detach().clone() for p in self.params]
                else:
                    for c, p in zip(self._copies, self.params):
                        c.copy_(p)
        self.taken = True

    def restore(self) -> None:
        """Put the kept values back into the parameters (in place).

        Raises:
            ValueError: nothing was taken yet (or the last take failed), the snapshot was
                closed, or its file is not the size of the parameters.
        """
        if self.closed:
            raise ValueError("the snapshot was closed")
        if not self.taken:
            raise ValueError("no snapshot was taken")
        with torch.no_grad():
            if self.where == "memory":
                for c, p in zip(self._copies or [], self.params):
                    p.copy_(c)
                return
            f = self._file
            assert f is not None
            size = self.file_bytes
            if size != self.nbytes:
                raise ValueError(f"the snapshot file holds {size} bytes, the parameters "
                                 f"{self.nbytes}")
            f.seek(0)
            for p in self.params:
                n = p.numel() * p.element_size()
                if p.device.type == "cpu" and p.is_contiguous():  # into its storage
                    got = f.readinto(memoryview(p.detach().view(-1).view(torch.uint8).numpy()))
                else:  # through a CPU copy
                    buf = torch.empty(n, dtype=torch.uint8)
                    got = f.readinto(memoryview(buf.numpy()))
                    p.copy_(buf.view(p.dtype).reshape(p.shape))
                if got != n:
                    raise ValueError("the snapshot file ended early")

    def close(self) -> None:
        """Close (and so free) the file, or drop the copies; idempotent. A closed snapshot
        refuses :meth:`take` and :meth:`restore`."""
        self.closed = True
        self._copies = None
        self._drop_file()

    def _drop_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):  # bytes buffered for a full disk: dropped
                f.close()

    def __enter__(self) -> ParameterSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write(f: IO[bytes], params: Sequence[torch.Tensor]) -> None:
    """Overwrite ``f`` with the raw bytes of ``params``, in order, and cut it there."""
    f.seek(0)
    for p in params:
        f.write(memoryview(_bytes_of(p.detach().cpu()).numpy()))
    f.truncate()
    f.flush()
