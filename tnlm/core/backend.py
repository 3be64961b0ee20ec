"""Array backends: the tensornetwork backend objects behind every MPO.

An MPO's cores are numpy arrays (tensornetwork backend ``"numpy"``) or torch
tensors (backend ``"pytorch"``); this module is the only place that knows which
concrete array library is in use.

Dense factorizations (SVD, QR, RQ) go through a tensornetwork backend object.
By default (``linalg="pytorch"``) numpy arrays are factorized by the pytorch
backend on a zero-copy torch view and converted back: torch's LAPACK (MKL) ran
QR 2-3x and SVD up to 1.5x faster than numpy's OpenBLAS on the MiniLM shapes
(``benchmarks/bench_decompose.py``). ``set_linalg("native")`` uses each array's
own backend instead; both give the same factorization up to rounding and signs.
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
    "set_linalg",
    "get_linalg",
]

_LINALG = "pytorch"


def set_linalg(mode: str) -> None:
    """Choose the factorization route: ``"pytorch"`` (default) or ``"native"``."""
    global _LINALG
    if mode not in ("pytorch", "native"):
        raise ValueError(f"linalg mode must be 'pytorch' or 'native', got {mode!r}")
    _LINALG = mode


def get_linalg() -> str:
    """The current factorization route (see :func:`set_linalg`)."""
    return _LINALG


def _native(x: np.ndarray) -> np.ndarray:
    """``x`` contiguous in the machine's byte order (a big-endian ``'>f8'`` array is
    converted: torch refuses to view one)."""
    x = np.asarray(x)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return np.ascontiguousarray(x)


def _factorize(name: str, matrix: Tensor) -> tuple[Tensor, ...]:
    if _LINALG == "pytorch" and not is_torch(matrix):
        import torch

        be = get_backend("pytorch")
        out = getattr(be, name)(torch.from_numpy(_native(matrix)), pivot_axis=1)
        return tuple(t.numpy() for t in out)
    return getattr(get_backend(backend_of(matrix)), name)(matrix, pivot_axis=1)


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
    u, s, vh, _ = _factorize("svd", matrix)
    return u, s, vh


def qr(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of a 2-D array: ``matrix == q @ r`` with orthonormal columns in q."""
    return _factorize("qr", matrix)


def rq(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced RQ of a 2-D array: ``matrix == r @ q`` with orthonormal rows in q."""
    return _factorize("rq", matrix)


def to_numpy(x: Tensor) -> np.ndarray:
    """A numpy copy (or view) of ``x``, detached from any autograd graph."""
    if is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def convert(x: Tensor, backend: str, like: Tensor | None = None) -> Tensor:
    """``x`` as an array of ``backend``; with ``like`` (a torch tensor or a numpy array),
    also its dtype and device (a numpy array's device is the CPU). Numpy input in either
    byte order is accepted.

    Raises:
        ValueError: an unknown ``backend``.
    """
    if backend == "pytorch":
        import torch

        if not is_torch(x):
            x = torch.from_numpy(_native(x))
        if like is not None:
            if is_torch(like):
                x = x.to(dtype=like.dtype, device=like.device)
            else:
                dtype = torch.from_numpy(_native(np.empty(0, np.asarray(like).dtype))).dtype
                x = x.to(dtype=dtype, device="cpu")
        return x
    if backend == "numpy":
        out = to_numpy(x)
        if like is not None:
            out = out.astype(
                to_numpy(like[..., :0]).dtype if is_torch(like) else like.dtype, copy=False
            )
        return out
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
