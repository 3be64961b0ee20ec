"""Truncation policies: how many singular values a bond keeps.

Three criteria, each given for all bonds (a number) or per bond (a sequence of
``n_sites - 1`` values, bond k between sites k and k+1):

``max_bond``
    keep at most this many singular values (int >= 1).
``cutoff``
    drop singular values with ``s < cutoff * ||W||_F``, ``0 <= cutoff < 1``. The reference is the
    Frobenius norm of the *whole matrix* being truncated (every bond spectrum
    has Σ s² = ||W||_F², so the criterion means the same on every bond). This
    differs from tensornetwork's ``relative=True``, which is relative to s_max.
``max_error``
    ``0 <= max_error <= 1``; a number bounds the relative Frobenius error of the whole matrix,
    ``||W - W'||_F / ||W||_F <= max_error``: the squared budget is spent bond by
    bond, each bond allowed an equal share of what the earlier bonds left; a
    sequence bounds the discarded weight of each bond separately,
    ``sqrt(Σ_discarded s²) / ||W||_F <= max_error[k]``.

Given together, the criteria combine by keeping the fewest values any of them allows:
``max_bond`` and ``cutoff`` are limits, never raised to meet ``max_error``, so
``max_bond=2, max_error=0.01`` may leave an error far above 0.01 (the result's
``truncation_error`` reports the error reached). Every bond keeps at least one singular
value. Values out of range raise a
``ValueError`` naming the argument (e.g. ``cutoff=1.5``: every s_k <= ||W||_F, so a
cutoff >= 1 would discard everything).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tnlm.core.spectra import tail_sums

__all__ = ["TruncationPolicy", "POLICY_RANGES"]

_TINY = float(np.finfo(np.float64).tiny)

#: the allowed range of each float criterion: (low, high, high included)
POLICY_RANGES = {"cutoff": (0.0, 1.0, False), "max_error": (0.0, 1.0, True)}


def _per_bond(value, n_bonds: int, name: str, kind: type) -> list | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or (
        not isinstance(value, Sequence)
        and not np.isscalar(value)
        and not isinstance(value, np.ndarray)
    ):
        raise TypeError(
            f"{name} must be a number or a sequence of {n_bonds} numbers, "
            f"got {type(value).__name__}"
        )
    scalar = np.isscalar(value) or (isinstance(value, np.ndarray) and value.ndim == 0)
    if isinstance(value, np.ndarray) and value.ndim > 1:
        raise ValueError(f"{name} must be a number or a 1-D sequence of {n_bonds} numbers, "
                         f"got an array of shape {value.shape}")
    values = [value.item() if isinstance(value, np.ndarray) else value] if scalar else list(
        value)
    if not scalar and len(values) != n_bonds:
        raise ValueError(f"{name} must have one entry per bond ({n_bonds}), got {len(values)}")
    out = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} entries must be numbers, got {v!r}")
        if kind is int:
            if not float(v).is_integer():
                raise TypeError(f"{name} must be an int or a sequence of ints, got {v!r}")
            v = int(v)
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        else:
            try:
                v = float(v)
            except (TypeError, ValueError) as err:
                raise TypeError(f"{name} entries must be numbers, got {v!r}") from err
            lo, hi, closed = POLICY_RANGES.get(name, (0.0, math.inf, False))
            if not math.isfinite(v) or v < lo or v > hi or (v == hi and not closed):
                bound = f"{'<=' if closed else '<'} {hi:g}" if math.isfinite(hi) else ""
                raise ValueError(f"{name} must be finite and >= {lo:g}"
                                 f"{' and ' + bound if bound else ''}, got {v}")
        out.append(v)
    return out * n_bonds if scalar else out


@dataclass(frozen=True)
class TruncationPolicy:
    """Resolved per-bond truncation criteria; see the module docstring."""

    n_bonds: int
    max_bond: tuple | None = None
    cutoff: tuple | None = None
    max_error: float | tuple | None = None

    @staticmethod
    def check(max_bond=None, cutoff=None, max_error=None) -> None:
        """Check the types and ranges of the criteria without knowing the number of bonds
        (a sequence is checked entry by entry); raise ``TypeError``/``ValueError``."""
        for name, value, kind in (("max_bond", max_bond, int), ("cutoff", cutoff, float),
                                  ("max_error", max_error, float)):
            if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
                n = 1 if isinstance(value, np.ndarray) and value.ndim == 0 else len(value)
                if n:
                    _per_bond(value, n, name, kind)
            else:
                _per_bond(value, 1, name, kind)

    @classmethod
    def build(cls, n_bonds: int, max_bond=None, cutoff=None, max_error=None) -> TruncationPolicy:
        mb = _per_bond(max_bond, n_bonds, "max_bond", int)
        co = _per_bond(cutoff, n_bonds, "cutoff", float)
        if max_error is None or np.isscalar(max_error) or (
                isinstance(max_error, np.ndarray) and max_error.ndim == 0):
            me = None if max_error is None else _per_bond(max_error, 1, "max_error", float)[0]
        else:
            me = tuple(_per_bond(max_error, n_bonds, "max_error", float))
        return cls(
            n_bonds, None if mb is None else tuple(mb), None if co is None else tuple(co), me
        )

    @property
    def is_exact(self) -> bool:
        """True if no criterion is set (nothing can be discarded)."""
        if self.max_bond is not None and any(v is not None for v in self.max_bond):
            return False
        if self.cutoff is not None and any(self.cutoff):
            return False
        errors = self.max_error if isinstance(self.max_error, tuple) else (self.max_error,)
        return not any(errors)

    def rank(self, bond: int, s: np.ndarray, norm: float, spent_sq: float) -> int:
        """Number of singular values to keep at ``bond``.

        Args:
            bond: bond index (0-based).
            s: the bond's singular values, descending (numpy, float64).
            norm: ||W||_F of the matrix being truncated (the reference of all criteria).
            spent_sq: squared absolute error already discarded at earlier bonds.
        """
        sq = norm * norm
        if not math.isfinite(sq) or sq < _TINY and (norm > 0 or (len(s) and s[0] > 0)):
            # every criterion and the reported error are sums of squares: they would be
            # inf/NaN or 0, and bonds would be cut with a wrong reported error
            raise ValueError(f"cannot truncate a matrix with ||W||_F = {norm:.3g} in float64 "
                             f"(its square {'overflows' if sq else 'underflows'}); rescale W "
                             "first, e.g. W / W.abs().max()")
        k = len(s)
        if self.max_bond is not None and self.max_bond[bond] is not None:
            k = min(k, self.max_bond[bond])
        if self.cutoff is not None and self.cutoff[bond]:
            k = min(k, int(np.count_nonzero(s >= self.cutoff[bond] * norm)))
        if self.max_error is not None:
            if isinstance(self.max_error, tuple):
                budget_sq = (self.max_error[bond] or 0.0) ** 2 * norm**2
            else:
                remaining = self.n_bonds - bond
                budget_sq = max((self.max_error * norm) ** 2 - spent_sq, 0.0) / remaining
            tail = tail_sums(s)  # tail[r]: discarded weight if r values are kept
            k = min(k, int(np.argmax(tail <= budget_sq * (1 + 1e-12))))
        return max(k, 1)
