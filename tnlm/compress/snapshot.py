"""A copy of parameter values to go back to: healing's best state, kept off the heap.

Healing keeps the trained parameters of its best step so that a run that blows up can be
restored (:func:`tnlm.compress.causal.heal_causal`). Kept in memory that copy is as large
as everything healing trains (SmolLM2-135M at a 60 % budget: 64M parameters, 256 MB,
about a tenth of the healing stage's peak). :class:`ParameterSnapshot` keeps it in one
file of a temporary directory instead (``where="disk"``), written tensor by tensor from
the parameters' own memory (no second copy is ever built, not even while writing) to a
temporary name and then renamed over the previous snapshot, so that a write that fails
half-way leaves the last complete snapshot in place. The file holds raw bytes in the
parameters' order, shapes and dtypes known to the snapshot object: nothing is
deserialized but bytes into the parameters' storage, and the directory goes with the
object (:meth:`close`, or the ``with`` block).

``where="memory"`` keeps the copy beside the parameters (the former behaviour, for a
machine without a writable temporary directory).
"""

from __future__ import annotations

import os
import tempfile
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
        params: the tensors (CPU) whose values are kept; their shapes, dtypes and order
            must not change while the snapshot lives.
        where: ``"disk"`` (one file in a temporary directory, under ``directory`` or the
            system's temporary folder) or ``"memory"`` (clones beside the parameters).
        directory: where the temporary directory is made (``"disk"`` only); it must exist.

    Raises:
        ValueError: ``where`` is not one of :data:`SNAPSHOT_PLACES`, a tensor is not on
            the CPU, or ``directory`` is not an existing folder.
    """

    def __init__(self, params: Sequence[torch.Tensor], where: str = "disk",
                 directory: str | os.PathLike | None = None) -> None:
        if where not in SNAPSHOT_PLACES:
            raise ValueError(f"where must be one of {', '.join(map(repr, SNAPSHOT_PLACES))}, "
                             f"got {where!r}")
        self.params = list(params)
        for i, p in enumerate(self.params):
            if not torch.is_tensor(p) or p.device.type != "cpu":
                raise ValueError(f"params[{i}] must be a CPU tensor, got "
                                 f"{getattr(p, 'device', type(p).__name__)}")
        self.where = where
        self.taken = False
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
        """Keep the parameters' current values (replacing the previous snapshot)."""
        if self.where == "memory":
            with torch.no_grad():
                if self._copies is None:
                    self._copies = [p.detach().clone() for p in self.params]
                else:
                    for c, p in zip(self._copies, self.params):
                        c.copy_(p)
        else:
            if self._dir is None:
                raise ValueError("the snapshot was closed")
            part = self.path.with_suffix(".part")
            with open(part, "wb") as f:
                for p in self.params:
                    f.write(memoryview(_bytes_of(p).numpy()))
            os.replace(part, self.path)
        self.taken = True

    def restore(self) -> None:
        """Put the kept values back into the parameters (in place).

        Raises:
            ValueError: nothing was taken yet, the snapshot was closed, or its file is not
                the size of the parameters.
        """
        if not self.taken:
            raise ValueError("no snapshot was taken")
        with torch.no_grad():
            if self.where == "memory":
                for c, p in zip(self._copies or [], self.params):
                    p.copy_(c)
                return
            if self._dir is None:
                raise ValueError("the snapshot was closed")
            size = self.path.stat().st_size
            if size != self.nbytes:
                raise ValueError(f"the snapshot file {self.path} holds {size} bytes, the "
                                 f"parameters {self.nbytes}")
            with open(self.path, "rb") as f:
                for p in self.params:
                    if p.is_contiguous():  # straight into the parameter's storage
                        f.readinto(memoryview(p.detach().view(-1).view(torch.uint8).numpy()))
                    else:  # through a copy
                        buf = torch.empty(p.numel() * p.element_size(), dtype=torch.uint8)
                        f.readinto(memoryview(buf.numpy()))
                        p.copy_(buf.view(p.dtype).reshape(p.shape))

    def close(self) -> None:
        """Remove the file and its directory, or drop the copies; idempotent."""
        self._copies = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> ParameterSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
