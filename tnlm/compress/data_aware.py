"""Data-aware truncation: MPOs that minimise a layer's output error, not its weight error.

For ``y = x @ W`` on calibration inputs X with Gram ``G = Xᵀ X = L Lᵀ`` (Cholesky),
``||X (W - W')||_F = ||Lᵀ W - Lᵀ W'||_F``: truncating the *whitened* matrix
``M = Lᵀ W`` optimally in Frobenius norm minimises the output error (SVD-LLM).
With inputs ``X_s`` from an already-compressed model and a reference ``X_t``, the
target becomes ``||X_s W' - X_t W||``, minimised through ``M = L_s⁻¹ C W``
(``C = X_sᵀ X_t``), the same formula when ``X_s = X_t``.

The whitening mixes all input legs, so it is undone on one site only: the layout
puts every input leg on site 0 and the output legs on sites 1..n-1::

        i (= I)
        |
      [T0]--d0--[T1]--d1--[T2]
                  |         |
                  j1        j2         (j1 · j2 = J)

With two sites this is exactly low-rank SVD (``T0 = A``, ``T1 = B``); more output
sites compress the output side further. The MPO of ``M`` is truncated in
canonical form by :meth:`MPO.truncate`/``from_matrix``, so its reported error is
exact; then ``T0 <- L⁻ᵀ T0`` undoes the whitening. The returned MPO's
``truncation_error`` is the relative output error on the calibration set,
``||X_s W' - X_t W||_F / ||X_t W||_F``, recomputed exactly from G and C.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tnlm.bridge import MPOLinear, kind_of
from tnlm.compress.calibration import InputStats
from tnlm.core import MPO
from tnlm.core.spec import apply_gauge
from tnlm.core.spectra import tail_sums
from tnlm.core.validation import all_finite, check_number, check_positive_int, check_size

__all__ = ["whitening_factor", "output_error", "WhitenedLayer", "io_layout"]

#: half-precision layer dtypes: their stored cores are rounded, which adds output error
_HALF = (torch.float16, torch.bfloat16)


def _shifted_cholesky(gram: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """``(L, σ)`` with ``L Lᵀ = G + σ I`` (float64), ``σ = λ · tr(G)/n``; λ starts at
    ``ridge`` and is raised ×10 (from 1e-12 when ``ridge`` is 0) until the Cholesky
    factorization succeeds."""
    G = gram.to(torch.float64)
    n = G.shape[0]
    if G.shape != (n, n):
        raise ValueError(f"gram must be square, got shape {tuple(G.shape)}")
    scale = float(torch.trace(G)) / n
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("gram must be a finite, nonzero positive semi-definite matrix")
    lam = check_number(ridge, "ridge")
    eye = torch.eye(n, dtype=G.dtype)
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(G + lam * scale * eye)
        if int(info) == 0:
            return L, lam * scale
        lam = lam * 10 if lam > 0 else 1e-12  # ridge 0: escalate from a tiny one
    raise ValueError(f"gram is not positive semi-definite (Cholesky failed with ridge "
                     f"{lam / 10:.0e}·tr/n)")


def whitening_factor(gram: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Lower-triangular L with ``L Lᵀ = G + λ I``, float64; ``λ = ridge · tr(G)/n``,
    raised ×10 (from 1e-12 when ``ridge`` is 0) until the Cholesky factorization succeeds
    (rank-deficient calibration).

    Raises:
        TypeError: ``ridge`` not a real number (a bool or a string included).
        ValueError: ``ridge`` negative or not finite; ``gram`` not square, with a
            non-finite or non-positive trace, or not positive semi-definite.
    """
    return _shifted_cholesky(gram, ridge)[0]


class _OutputMetric:
    """``||X_s W' - X_t W||_F²`` from the calibration Grams, computed on the difference.

    Expanding the square into ``tr(W'ᵀGW') - 2 tr(W'ᵀCW) + tr(WᵀG_tW)`` subtracts numbers
    of size ``||X W||²`` to get one of size ``||X (W - W')||²``: its rounding floor is
    ``eps · ||X W||²``, a relative error near ``sqrt(eps) ≈ 1e-8`` for an exact W'.
    Instead, with ``K Kᵀ = G + σ I`` (Cholesky, σ >= 0 a small shift when G is
    singular), ``||X D||² = ||Kᵀ D||² - σ ||D||²`` for ``D = W - W'``: both terms are
    O(||D||²), so an exact W' gives an error at rounding level of D itself.

    With cross statistics (``X_s ≠ X_t``) the same is done with the Gram of the stacked
    inputs ``[X_s, X_t]``, ``[[G, C], [Cᵀ, G_t]]``, and ``D = [W'; -W]``. Then D is
    not small, and the factorization's backward error (``~ n · eps · ||G||``) bounds
    the absolute error of err² by ``~ n · eps · ||G|| · ||D||²``: an inherent floor of
    Gram-based errors when ``X_s ≈ X_t``. When the cross statistics equal the Gram
    exactly (identical inputs), the first form is used.
    """

    def __init__(self, stats: InputStats, factor: tuple[torch.Tensor, float] | None = None
                 ) -> None:
        G = stats.gram.to(torch.float64)
        cross = stats.cross
        if cross is not None and torch.equal(cross.to(torch.float64), G) and (
                stats.ref_gram is not None and torch.equal(stats.ref_gram.to(torch.float64), G)):
            cross = None  # X_s = X_t: the plain output error
        self.stacked = cross is not None
        if self.stacked:
            if stats.ref_gram is None:
                raise ValueError("stats.cross is set but stats.ref_gram is not")
            C = cross.to(torch.float64)
            self.ref_gram = stats.ref_gram.to(torch.float64)
            G = torch.cat([torch.cat([G, C], 1), torch.cat([C.T, self.ref_gram], 1)], 0)
            factor = None
        else:
            self.ref_gram = G
        self.K, self.shift = factor if factor is not None else _shifted_cholesky(G, 0.0)

    def _sq(self, D: torch.Tensor) -> float:
        """``Dᵀ G D`` summed over columns, as ``||Kᵀ D||² - σ ||D||²`` (clamped at 0)."""
        return max(float(torch.sum((self.K.T @ D) ** 2)) - self.shift * float(torch.sum(D * D)),
                   0.0)

    def relative(self, W: torch.Tensor, W_approx: torch.Tensor) -> float:
        if not all_finite(W):  # its reference norm would be NaN or inf, reported as 0
            raise ValueError("W holds NaN or infinite values")
        W = W.to(torch.float64)
        Wa = W_approx.to(torch.float64)
        ref = float(torch.sum(W * (self.ref_gram @ W)))
        if not ref > 0:
            return 0.0
        D = torch.cat([Wa, -W], 0) if self.stacked else W - Wa
        return math.sqrt(self._sq(D) / ref)


def output_error(W: torch.Tensor, W_approx: torch.Tensor, stats: InputStats) -> float:
    """``||X_s W' - X_t W||_F / ||X_t W||_F`` on the calibration set, from the Grams.

    With ``stats.cross`` unset, ``X_s = X_t`` and this is ``||X (W - W')|| / ||X W||``,
    computed from ``D = W - W'`` directly (no cancellation: an exact ``W'`` reports an
    error at rounding level, ~1e-15 in float64). See :class:`_OutputMetric`.

    Raises:
        ValueError: ``W`` holds NaN or infinite values (a non-finite ``W_approx`` gives a
            NaN error).
    """
    return _OutputMetric(stats).relative(W, W_approx)


def io_layout(out_shape: Sequence[int], in_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Site shapes with every input leg on site 0: ``(I, 1, .., 1) x (1, j1, .., jm)``."""
    out_shape = tuple(int(j) for j in out_shape)
    return (in_dim,) + (1,) * len(out_shape), (1,) + out_shape


@dataclass
class WhitenedLayer:
    """One layer's whitened matrix and its spectrum, ready to truncate at any rank.

    Args:
        W: the layer's weight (in, out) in the ``y = x @ W`` convention.
        stats: its calibration statistics.
        ridge: relative Cholesky regularisation (:func:`whitening_factor`).
        vectors: compute the whitened matrix's full thin SVD (not only its singular
            values), so that :meth:`truncated` gives any rank's weight without another
            decomposition.
    """

    W: torch.Tensor
    stats: InputStats
    ridge: float = 1e-6
    vectors: bool = False

    def __post_init__(self) -> None:
        self.W = self.W.detach().to(torch.float64)
        I, J = self.W.shape
        if self.stats.gram.shape != (I, I):
            raise ValueError(f"calibration gram has shape {tuple(self.stats.gram.shape)}, "
                             f"expected ({I}, {I}) for a weight of shape ({I}, {J})")
        self.L, self._shift = _shifted_cholesky(self.stats.gram, self.ridge)
        self._metric: _OutputMetric | None = None
        if self.stats.cross is None:
            self.M = self.L.T @ self.W
        else:
            self.M = torch.linalg.solve_triangular(self.L, self.stats.cross @ self.W, upper=False)
        self._svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if self.vectors:
            self._svd = torch.linalg.svd(self.M, full_matrices=False)

    @functools.cached_property
    def spectrum(self) -> np.ndarray:
        """The whitened matrix's singular values, descending (computed when first read:
        a layer built at a rank chosen elsewhere never needs them)."""
        if self._svd is not None:
            return self._svd[1].numpy()
        return torch.linalg.svdvals(self.M).numpy()

    @functools.cached_property
    def tails(self) -> np.ndarray:
        """``tails[r]``: the squared singular values a rank-``r`` truncation discards."""
        return tail_sums(self.spectrum)

    def truncated(self, rank: int) -> torch.Tensor:
        """The float64 weight (in, out) of the rank-``rank`` truncation, ``L^{-T} M_r``: the
        matrix :meth:`mpo` and :meth:`layer` represent (up to float rounding), without
        building them. Needs ``vectors=True``; a ``rank`` above the spectrum's length
        keeps all of it.

        Raises:
            TypeError: ``rank`` not an int.
            ValueError: ``rank`` below 1, or the layer made without ``vectors``.
        """
        rank = check_positive_int(rank, "rank")
        if self._svd is None:
            raise ValueError("truncated() needs the SVD's vectors: WhitenedLayer(..., "
                             "vectors=True)")
        U, S, Vh = self._svd
        r = min(rank, int(S.shape[0]))
        return torch.linalg.solve_triangular(self.L.T, (U[:, :r] * S[:r]) @ Vh[:r],
                                             upper=True)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.W.shape)

    def rank_error(self, rank: int) -> float:
        """Relative whitened error of keeping ``rank`` singular values (2-site layout):
        ``sqrt(Σ_{i>=rank} s_i² / Σ s_i²)``.

        Raises:
            TypeError: ``rank`` not an int.
            ValueError: ``rank`` negative.
        """
        rank = check_size(rank, "rank")
        total = float(self.tails[0])
        return math.sqrt(float(self.tails[min(rank, len(self.spectrum))]) / total) if total else 0.0

    def output_error(self, W_approx: torch.Tensor) -> float:
        """:func:`output_error` of ``W_approx`` against this layer's W (the Gram factored
        once per layer; without cross statistics the whitening factor is reused)."""
        if self._metric is None:
            self._metric = _OutputMetric(self.stats, None if self.stats.cross is not None
                                         else (self.L, self._shift))
        return self._metric.relative(self.W, W_approx)

    def mpo(self, rank: int, out_shape: Sequence[int] | None = None,
            max_bond: int | Sequence[int] | None = None) -> MPO:
        """The data-aware MPO: every input leg on site 0, bond 0 cut to ``rank``.

        Args:
            rank: dimension of bond 0 (the input/output cut; low-rank SVD's rank).
            out_shape: factors of J over the output sites (default ``(J,)``: two sites,
                exactly whitened low-rank SVD).
            max_bond: caps of the output-side bonds 1.. (an int or one int per bond).

        Returns:
            A float64 MPO of W' with ``truncation_error`` = relative calibration output
            error (:func:`output_error`).

        Raises:
            TypeError: ``rank`` or a ``max_bond`` entry not an int (a float, a bool or a
                string included), as :meth:`truncated`.
            ValueError: ``rank`` or a ``max_bond`` entry below 1; ``max_bond`` giving
                another number of bonds than the output sites have.
        """
        rank = check_positive_int(rank, "rank")
        I, J = self.shape
        out_shape = (J,) if out_shape is None else tuple(int(j) for j in out_shape)
        ins, outs = io_layout(out_shape, I)
        n_bonds = len(ins) - 1
        caps: list[int | None] = [rank]
        if max_bond is None:
            caps += [None] * (n_bonds - 1)
        elif isinstance(max_bond, Iterable) and not isinstance(max_bond, (str, bytes)):
            caps += [check_positive_int(b, f"max_bond[{k}]") for k, b in enumerate(max_bond)]
        else:  # one cap for every output-side bond (a string is refused here)
            caps += [check_positive_int(max_bond, "max_bond")] * (n_bonds - 1)
        if len(caps) != n_bonds:
            raise ValueError(f"max_bond must give {n_bonds - 1} output-side bonds, "
                             f"got {len(caps) - 1}")
        mpo = MPO.from_matrix(self.M, ins, outs, max_bond=caps)
        cores = list(mpo.cores)
        # undo the whitening on site 0's input leg: T0[1, I, 1, d] <- L^{-T} T0
        t0 = cores[0].reshape(I, -1)
        t0 = torch.linalg.solve_triangular(self.L.T, t0, upper=True)
        cores[0] = t0.reshape(1, I, 1, -1)
        out = MPO(cores)
        W_approx = out.to_matrix()
        out.truncation_error = self.output_error(W_approx)
        return out

    def layer(self, rank: int, like: nn.Module, gauge: str = "symmetric") -> MPOLinear:
        """The 2-site data-aware MPO layer of ``rank`` replacing ``like`` (its bias, dtype,
        device and kind kept); ``truncation_error`` = calibration output error of the
        cores as stored: for a float16 / bfloat16 ``like`` it includes their rounding to
        that dtype (as :meth:`MPOModule.from_module` does).

        Raises:
            TypeError: ``rank`` not an int (a float, a bool or a string included).
            ValueError: ``rank`` below 1.
        """
        mpo = self.mpo(rank)
        dtype = like.weight.dtype
        layer = MPOLinear.from_mpo(apply_gauge(mpo, gauge), like.bias, "auto",
                                   dtype=dtype, kind=kind_of(like))
        if dtype in _HALF:  # measured on the rounded cores, contracted in float64
            with torch.no_grad():
                stored = layer.dense_matrix(torch.float64).detach()
            layer.truncation_error = self.output_error(stored)
        else:
            layer.truncation_error = float(mpo.truncation_error)
        return layer.to(like.weight.device)
