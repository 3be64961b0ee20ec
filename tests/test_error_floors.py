"""Reported errors are computed from the discarded part, not as a difference of two large
numbers: an exact decomposition reports an error at rounding level (issue 20, item 1).

Tolerances follow from the formulas' conditioning: a quantity computed from ``D = W - W'``
in float64 is accurate to a few ``eps · sqrt(n)`` relative to what it measures.
"""

from __future__ import annotations

import math

import pytest
import torch

from tnlm.compress.calibration import InputStats
from tnlm.compress.data_aware import WhitenedLayer, output_error

EPS = torch.finfo(torch.float64).eps


def _inputs(seed: int, n: int, tokens: int, decay: float) -> torch.Tensor:
    """``tokens x n`` inputs whose Gram has eigenvalues spread over ``10**decay``
    (rotated, so the Gram is dense), rank-deficient when ``tokens < n``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    X = X @ torch.diag(torch.logspace(0, decay, n, dtype=torch.float64))
    return X @ torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _direct(X_s, X_t, W, Wa) -> float:
    return float(torch.linalg.norm(X_s @ Wa - X_t @ W) / torch.linalg.norm(X_t @ W))


CASES = [  # (n inputs, J outputs, tokens, log10 of the Gram's eigenvalue spread)
    (8, 5, 40, -2), (16, 32, 48, -6), (48, 5, 24, -4),  # rank-deficient Gram
    (48, 96, 150, -12), (96, 40, 300, -3), (96, 192, 60, -8),
]


@pytest.mark.parametrize("ridge", [1e-6, 0.0])
@pytest.mark.parametrize("n,J,tokens,decay", CASES)
def test_exact_whitened_mpo_reports_a_rounding_level_error(n, J, tokens, decay, ridge):
    X = _inputs(n + J + tokens, n, tokens, decay)
    W = torch.randn(n, J, generator=torch.Generator().manual_seed(n * J), dtype=torch.float64)
    wl = WhitenedLayer(W, InputStats(X.T @ X, tokens), ridge)
    for out_shape in (None, (J,)) if J % 2 else (None, (2, J // 2)):
        mpo = wl.mpo(min(n, J), out_shape=out_shape)  # untruncated
        Wa = mpo.to_matrix()
        direct = _direct(X, X, W, Wa)
        # the expanded form tr(W'GW') - 2tr(W'GW) + tr(WGW) had a floor near 1e-8 here
        assert mpo.truncation_error <= 1e-12
        assert abs(mpo.truncation_error - direct) <= 20 * EPS * math.sqrt(n * J)
        assert abs(output_error(W, Wa, wl.stats) - direct) <= 20 * EPS * math.sqrt(n * J)


def test_a_tiny_output_error_is_measured_not_rounded_away():
    """W' = W + D with ||X D|| / ||X W|| ~ 1e-11: the reported error agrees with the
    direct one to a relative ~1e-6 (the expanded form could only say 0 or ~1e-8)."""
    X = _inputs(1, 32, 100, -3)
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 24, generator=g, dtype=torch.float64)
    for scale in (1e-6, 1e-9, 1e-11):
        Wa = W + scale * torch.randn(32, 24, generator=g, dtype=torch.float64)
        direct = _direct(X, X, W, Wa)
        assert 1e-13 < direct < 1e-4
        assert abs(output_error(W, Wa, InputStats(X.T @ X, 100)) - direct) <= 1e-6 * direct


def _cross_stats(X_s, X_t) -> InputStats:
    return InputStats(X_s.T @ X_s, X_s.shape[0], cross=X_s.T @ X_t, ref_gram=X_t.T @ X_t)


@pytest.mark.parametrize("n,J,tokens,noise", [(12, 10, 80, 1e-2), (48, 20, 150, 1e-5),
                                              (32, 64, 20, 1e-3)])
def test_cross_statistics_error_matches_the_direct_residual(n, J, tokens, noise):
    """X_s (a compressed model's inputs) vs X_t (the reference's): the reported error is
    ||X_s W' - X_t W|| / ||X_t W||, within the stacked Gram's conditioning bound."""
    X_t = _inputs(n, n, tokens, -3)
    g = torch.Generator().manual_seed(tokens)
    X_s = X_t + noise * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    W = torch.randn(n, J, generator=g, dtype=torch.float64)
    stats = _cross_stats(X_s, X_t)
    wl = WhitenedLayer(W, stats, 0.0)
    G_stack = torch.cat([X_s, X_t], 1).T @ torch.cat([X_s, X_t], 1)
    ref = float(torch.linalg.norm(X_t @ W)) ** 2
    for rank in range(1, min(n, J) + 1, max(1, min(n, J) // 4)):
        mpo = wl.mpo(rank)
        Wa = mpo.to_matrix()
        direct = _direct(X_s, X_t, W, Wa)
        # factorization backward error ~ n eps ||G_stack|| on err² = D^T G_stack D,
        # D = [W'; -W]; an error e of err² moves err by at most min(sqrt(e), e / (2 err))
        e = 10 * (2 * n) * EPS * float(torch.linalg.matrix_norm(G_stack, 2)) * (
            float(Wa.square().sum() + W.square().sum())) / ref
        tol = min(math.sqrt(e), e / (2 * direct))
        assert abs(mpo.truncation_error - direct) <= tol
        assert abs(output_error(W, Wa, stats) - direct) <= tol
    # at full rank what remains is the least-squares residual of X_t W on X_s
    lstsq = torch.linalg.lstsq(X_s, X_t @ W).solution
    assert abs(wl.mpo(min(n, J)).truncation_error - _direct(X_s, X_t, W, lstsq)) <= 1e-9


def test_identical_cross_statistics_give_the_plain_rounding_level_error():
    """Reference inputs equal to the layer's (the first block of a sequential pass):
    the cross route is the plain one, so an exact MPO reports a rounding-level error."""
    X = _inputs(3, 24, 100, -2)
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    wl = WhitenedLayer(W, _cross_stats(X, X), 0.0)
    mpo = wl.mpo(16)
    assert mpo.truncation_error <= 1e-12
    assert abs(mpo.truncation_error - _direct(X, X, W, mpo.to_matrix())) <= 20 * EPS * 24
