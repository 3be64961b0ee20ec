"""Array backends: the tensornetwork backend objects behind every MPO.

An MPO's cores are numpy arrays (tensornetwork backend ``"numpy"``) or torch
tensors (backend ``"pytorch"``). Linear algebra (SVD, QR) goes through the
tensornetwork backend object so both behave the same; this module is the only
place that knows which concrete array library is in use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensornetwork as tn

from tnlm._compat import apply_tensornetwork_patches

apply_tensornetwork_patches()

Tensor = Any
BACKENDS = ("numpy", "pytorch")

__all__ = [
    "BACKENDS",
    "Tensor",
    "backend_of",
    "get_backend",
    "svd",
    "qr",
    "rq",
    "to_numpy",
    "convert",
    "is_torch",
]


def is_torch(x: Any) -> bool:
    """True if ``x`` is a ``torch.Tensor`` (without importing torch eagerly)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def backend_of(x: Any) -> str:
    """Name of the tensornetwork backend that holds ``x``: ``"numpy"`` or ``"pytorch"``."""
    return "pytorch" if is_torch(x) else "numpy"


def get_backend(name: str) -> Any:
    """The tensornetwork backend object for ``name`` (``"numpy"`` or ``"pytorch"``)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return tn.backends.backend_factory.get_backend(name)


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a 2-D array: ``matrix == u @ diag(s) @ vh``, s descending."""
    be = get_backend(backend_of(matrix))
    u, s, vh, _ = be.svd(matrix, pivot_axis=1)
    return u, s, vh


def qr(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of a 2-D array: ``matrix == q @ r`` with orthonormal columns in q."""
    be = get_backend(backend_of(matrix))
    return be.qr(matrix, pivot_axis=1)


def rq(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced RQ of a 2-D array: ``matrix == r @ q`` with orthonormal rows in q."""
    be = get_backend(backend_of(matrix))
    return be.rq(matrix, pivot_axis=1)


def to_numpy(x: Tensor) -> np.ndarray:
    """A numpy copy (or view) of ``x``, detached from any autograd graph."""
    if is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def convert(x: Tensor, backend: str, like: Tensor | None = None) -> Tensor:
    """``x`` as an array of ``backend``; with ``like``, also its dtype and device."""
    if backend == "pytorch":
        import torch

        if not is_torch(x):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if like is not None and is_torch(like):
            x = x.to(dtype=like.dtype, device=like.device)
        return x
    if backend == "numpy":
        out = to_numpy(x)
        if like is not None:
            out = out.astype(
                to_numpy(like[..., :0]).dtype if is_torch(like) else like.dtype, copy=False
            )
        return out
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
