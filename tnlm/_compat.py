"""Compatibility fixes for tensornetwork 0.4.6 on current PyTorch.

tensornetwork's pytorch backend calls ``torch.qr`` (deprecated, warns and is
scheduled for removal), ``torch.svd`` (legacy API returning ``V`` instead of
``V^H``) and ``Tensor.symeig`` (removed in PyTorch 1.9+). This module routes
those calls through :mod:`torch.linalg`. It is applied once, on import of
:mod:`tnlm`, and is idempotent. Nothing else in tensornetwork is changed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["apply_tensornetwork_patches", "PATCHED"]

PATCHED = False


class _TorchLinalgShim:
    """Proxy for the ``torch`` module that replaces the legacy ``qr``/``svd``."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def qr(self, a: Any, some: bool = True) -> Any:  # legacy signature
        return self._torch.linalg.qr(a, mode="reduced" if some else "complete")

    def svd(self, a: Any, some: bool = True) -> Any:  # legacy: returns (U, S, V)
        u, s, vh = self._torch.linalg.svd(a, full_matrices=not some)
        return u, s, vh.mH


def apply_tensornetwork_patches() -> bool:
    """Patch tensornetwork's pytorch backend; return True if torch is available."""
    global PATCHED
    if PATCHED:
        return True
    try:
        import torch
        from tensornetwork.backends.pytorch import pytorch_backend
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    from tensornetwork.backends.pytorch import decompositions

    shim = _TorchLinalgShim(torch)
    cls = pytorch_backend.PyTorchBackend

    def svd(
        self: Any,
        tensor: Any,
        pivot_axis: int = -1,
        max_singular_values: Any = None,
        max_truncation_error: Any = None,
        relative: Any = False,
    ) -> Any:
        return decompositions.svd(
            shim, tensor, pivot_axis, max_singular_values, max_truncation_error, relative=relative
        )

    def qr(
        self: Any, tensor: Any, pivot_axis: int = -1, non_negative_diagonal: bool = False
    ) -> Any:
        return decompositions.qr(shim, tensor, pivot_axis, non_negative_diagonal)

    def rq(
        self: Any, tensor: Any, pivot_axis: int = -1, non_negative_diagonal: bool = False
    ) -> Any:
        return decompositions.rq(shim, tensor, pivot_axis, non_negative_diagonal)

    def eigh(self: Any, matrix: Any) -> Any:
        return torch.linalg.eigh(matrix)

    cls.svd, cls.qr, cls.rq, cls.eigh = svd, qr, rq, eigh
    PATCHED = True
    return True
