"""Entanglement entropy of a bond spectrum."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["spectrum_entropy"]


def spectrum_entropy(s: np.ndarray, alpha: float = 1.0) -> float:
    """Entropy of singular values ``s`` with ``p = s² / Σ s²`` (natural log).

    ``alpha == 1``: von Neumann, ``-Σ p ln p``; otherwise Rényi,
    ``ln(Σ p^α) / (1 - α)``; ``alpha == inf``: min-entropy ``-ln max p``.
    """
    alpha = float(alpha)
    if not alpha > 0 or math.isnan(alpha):
        raise ValueError(f"alpha must be > 0, got {alpha}")
    w = np.asarray(s, dtype=np.float64) ** 2
    total = w.sum()
    if total <= 0:
        return 0.0
    p = w[w > 0] / total
    if alpha == 1.0:
        return float(-(p * np.log(p)).sum())
    if math.isinf(alpha):
        return float(-np.log(p.max()))
    return float(np.log((p**alpha).sum()) / (1.0 - alpha))
