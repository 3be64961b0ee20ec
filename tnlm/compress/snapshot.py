"""A copy of parameter values to go back to: healing's best state, kept off the heap.

Healing keeps the trained parameters of its best step so that a run that blows up can be
restored (:func:`tnlm.compress.causal.heal_causal`). Kept in memory that copy is as large
as everything healing trains (SmolLM2-135M at a 60 % budget: 64M parameters, 256 MB,
about a tenth of the healing stage's peak). :class:`ParameterSnapshot` keeps it in one
file of a temporary directory instead (``where="disk"``), written tensor by tensor from
the parameters' own memory (no copy of the set is built, not even while writing; only a
non-contiguous or non-CPU tensor passes through a copy of itself) to a temporary name
and then renamed over the previous snapshot, so that a write that fails half-way leaves
the last complete snapshot in place. The file holds raw bytes in the
parameters' order, shapes and dtypes known to the snapshot object: nothing is
deserialized but bytes into the parameters' storage, and the directory goes with the
object (:meth:`close`, or the ``with`` block).

The file's bytes stay out of the process's resident set; they live where the temporary
folder does (``$TMPDIR``, else the system's; on a tmpfs that is RAM again) and pass
through the page cache, which the kernel may reclaim. A write that fails (a full disk)
warns once and keeps the snapshot in memory from then on, so that every rank of a
distributed run keeps the same step. ``where="memory"`` keeps the copy beside the
parameters from the start (the former behaviour). Parameters on another device than the
CPU are written through a CPU copy, one tensor at a time.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

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
        where: ``"disk"`` (one file in a temporary directory, under ``directory`` or the
            temporary folder, ``$TMPDIR``) or ``"memory"`` (clones beside the
            parameters).
        directory: where the temporary directory is made (``"disk"`` only); it must exist.

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
        self._dir: tempfile.TemporaryDirectory | None = None
        if where == "disk":
            if directory is not None and not Path(directory).is_dir():
                raise ValueError(f"directory must be an existing folder, got {directory!r}")
            self._dir = tempfile.TemporaryDirectory(prefix="tnlm-snapshot-", dir=directory)
            self.path = Path(self._dir.name) / "snapshot.bin"

    @property
    def nbytes(self) -> int:
        """Bytes of one copy of the parameters."""
        return sum(p.numel() * p.element_size() for p in self.params)

    def take(self) -> None:
        """Keep the parameters' current values (replacing the previous snapshot). On
        disk, a failed write (``OSError``) warns and keeps this and later snapshots in
        memory instead.

        Raises:
            ValueError: the snapshot was closed.
        """
        if self.closed:
            raise ValueError("the snapshot was closed")
        if self.where == "disk":
            part = self.path.with_suffix(".part")
            try:
                with open(part, "wb") as f:
                    for p in self.params:
                        f.write(memoryview(_bytes_of(p.detach().cpu()).numpy()))
                os.replace(part, self.path)
            except OSError as err:
                warnings.warn(f"could not write the parameter snapshot to {part} ({err}); "
                              f"keeping it in memory instead ({self.nbytes / 2**20:.0f} MiB)",
                              stacklevel=2)
                self._drop_dir()
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
            ValueError: nothing was taken yet, the snapshot was closed, or its file is not
                the size of the parameters.
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
            size = self.path.stat().st_size
            if size != self.nbytes:
                raise ValueError(f"the snapshot file {self.path} holds {size} bytes, the "
                                 f"parameters {self.nbytes}")
            with open(self.path, "rb") as f:
                for p in self.params:
                    n = p.numel() * p.element_size()
                    if p.device.type == "cpu" and p.is_contiguous():  # into its storage
                        got = f.readinto(memoryview(
                            p.detach().view(-1).view(torch.uint8).numpy()))
                    else:  # through a CPU copy
                        buf = torch.empty(n, dtype=torch.uint8)
                        got = f.readinto(memoryview(buf.numpy()))
                        p.copy_(buf.view(p.dtype).reshape(p.shape))
                    if got != n:
                        raise ValueError(f"the snapshot file {self.path} ended early")

    def close(self) -> None:
        """Remove the file and its directory, or drop the copies; idempotent. A closed
        snapshot refuses :meth:`take` and :meth:`restore`."""
        self.closed = True
        self._copies = None
        self._drop_dir()

    def _drop_dir(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> ParameterSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
