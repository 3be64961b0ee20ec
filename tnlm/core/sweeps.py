"""QR and SVD sweeps along an MPO chain.

These functions work on a plain list of cores ``T_k[d_{k-1}, i_k, j_k, d_k]``
(numpy arrays or torch tensors, d_0 = d_n = 1) and return new lists; the
:class:`~tnlm.core.mpo.MPO` class wraps them. Diagram of a mixed-canonical form
with center c (``>`` left-isometry, ``<`` right-isometry, ``●`` center)::

        i_0   i_1       i_c       i_{n-1}
         |     |         |          |
        [>]---[>]-- ... [●]-- ... -[<]
         |     |         |          |
        j_0   j_1       j_c       j_{n-1}

Left-isometry: core reshaped to (d_{k-1}·i·j, d_k) has orthonormal columns.
Right-isometry: core reshaped to (d_{k-1}, i·j·d_k) has orthonormal rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tnlm.core import backend as B
from tnlm.core.policy import TruncationPolicy
from tnlm.core.spectra import tail_sums
from tnlm.core.validation import check_site_index

Tensor = B.Tensor

__all__ = [
    "left_orthogonalize",
    "right_orthogonalize",
    "canonicalize",
    "is_canonical",
    "bond_spectra",
    "symmetric_gauge",
    "tt_svd",
    "truncate",
    "SweepResult",
]


def _left_matrix(core: Tensor) -> Tensor:
    d0, i, j, d1 = core.shape
    return core.reshape(d0 * i * j, d1)


def _right_matrix(core: Tensor) -> Tensor:
    d0, i, j, d1 = core.shape
    return core.reshape(d0, i * j * d1)


def _absorb_right(mat: Tensor, core: Tensor) -> Tensor:
    """``mat[a, b] · core[b, i, j, c]`` -> core'[a, i, j, c]."""
    d0, i, j, d1 = core.shape
    return (mat @ core.reshape(d0, i * j * d1)).reshape(mat.shape[0], i, j, d1)


def _absorb_left(core: Tensor, mat: Tensor) -> Tensor:
    """``core[a, i, j, b] · mat[b, c]`` -> core'[a, i, j, c]."""
    d0, i, j, d1 = core.shape
    return (core.reshape(d0 * i * j, d1) @ mat).reshape(d0, i, j, mat.shape[1])


def _to_np64(s: Tensor) -> np.ndarray:
    return B.to_numpy(s).astype(np.float64)


def left_orthogonalize(cores: list[Tensor], upto: int) -> list[Tensor]:
    """QR sweep making sites ``0 .. upto-1`` left-isometries; the weight moves to ``upto``."""
    cores = list(cores)
    upto = check_site_index(upto, len(cores), "upto", negative=False)
    for k in range(upto):
        d0, i, j, _ = cores[k].shape
        q, r = B.qr(_left_matrix(cores[k]))
        cores[k] = q.reshape(d0, i, j, q.shape[1])
        cores[k + 1] = _absorb_right(r, cores[k + 1])
    return cores


def right_orthogonalize(cores: list[Tensor], downto: int) -> list[Tensor]:
    """RQ sweep making sites ``downto+1 .. n-1`` right-isometries; weight moves to ``downto``."""
    cores = list(cores)
    downto = check_site_index(downto, len(cores), "downto", negative=False)
    for k in range(len(cores) - 1, downto, -1):
        _, i, j, d1 = cores[k].shape
        r, q = B.rq(_right_matrix(cores[k]))
        cores[k] = q.reshape(q.shape[0], i, j, d1)
        cores[k - 1] = _absorb_left(cores[k - 1], r)
    return cores


def canonicalize(cores: list[Tensor], center: int) -> list[Tensor]:
    """Mixed-canonical form with orthogonality center ``center`` (the matrix is unchanged).

    A reduced QR of site k's (d_{k-1}·i_k·j_k, d_k) unfolding gives a bond of
    min(d_{k-1}·i_k·j_k, d_k), so an over-sized bond can shrink; the represented
    matrix stays the same to rounding.
    """
    cores = list(cores)
    center = check_site_index(center, len(cores), "center", negative=False)
    return right_orthogonalize(left_orthogonalize(cores, center), center)


def is_canonical(cores: list[Tensor], center: int, tol: float) -> bool:
    """True if sites < center are left- and sites > center right-isometries (to ``tol``)."""
    cores = list(cores)
    center = check_site_index(center, len(cores), "center", negative=False)
    for k, core in enumerate(cores):
        if k == center:
            continue
        m = B.to_numpy(_left_matrix(core) if k < center else _right_matrix(core)).astype(np.float64)
        gram = m.T @ m if k < center else m @ m.T
        if not np.allclose(gram, np.eye(gram.shape[0]), atol=tol, rtol=0):
            return False
    return True


def bond_spectra(cores: list[Tensor]) -> tuple[list[np.ndarray], list[Tensor]]:
    """Singular values of every bond, and the right-canonical cores (center 0) it leaves.

    Bond k's spectrum is that of the matrix unfolded as (sites 0..k) x (sites k+1..n-1),
    whatever the gauge of the input: a left-canonical sweep is followed by a
    right-to-left SVD sweep.
    """
    n = len(cores)
    cores = left_orthogonalize(cores, n - 1)
    spectra: list[np.ndarray] = [np.empty(0)] * (n - 1)
    for k in range(n - 1, 0, -1):
        _, i, j, d1 = cores[k].shape
        u, s, vh = B.svd(_right_matrix(cores[k]))
        cores[k] = vh.reshape(vh.shape[0], i, j, d1)
        cores[k - 1] = _absorb_left(cores[k - 1], u * s[None, :])
        spectra[k - 1] = _to_np64(s)
    return spectra, cores


def symmetric_gauge(
    cores: list[Tensor], rtol: float
) -> tuple[list[Tensor], list[np.ndarray], float]:
    """The paper's symmetric gauge: bond k's √Λ_k is split onto both of its sites.

    ``T'_k = diag(√Λ_{k-1}) · B_k · diag(1/√Λ_k)`` from the right-canonical B_k, so
    the contraction of sites 0..k is ``U_k √Λ_k`` and that of sites k+1.. is
    ``√Λ_k V_k^T`` for the SVD ``U_k Λ_k V_k^T`` of the bond-k unfolding.

    Guard: singular values ``s < rtol · s_max`` of a bond are removed before
    inverting (rank-deficient bonds shrink). Returns the cores, the bond spectra
    and the squared absolute weight that guard discarded.
    """
    n = len(cores)
    cores = left_orthogonalize(cores, n - 1)
    spectra: list[np.ndarray] = [np.empty(0)] * (n - 1)
    sqrt_s: list[Tensor] = [None] * (n - 1)
    discarded_sq = 0.0
    for k in range(n - 1, 0, -1):
        _, i, j, d1 = cores[k].shape
        u, s, vh = B.svd(_right_matrix(cores[k]))
        s64 = _to_np64(s)
        # keep s > rtol * s_max and s > 0 (at least one value, so a zero matrix stays valid)
        keep = max(1, int(np.count_nonzero((s64 > rtol * s64[0]) & (s64 > 0))))
        discarded_sq += float(tail_sums(s64)[keep])
        u, s, vh = u[:, :keep], s[:keep], vh[:keep]
        cores[k] = vh.reshape(keep, i, j, d1)
        cores[k - 1] = _absorb_left(cores[k - 1], u * s[None, :])
        spectra[k - 1] = s64[:keep]
        # a zero singular value (zero matrix) gets weight 1 on both sides: 0 * 1 / 1 = 0
        sqrt_s[k - 1] = (s + (s == 0)) ** 0.5
    for k in range(n - 1):
        # bond k joins site k (gets 1/√Λ on its right) and site k+1 (gets √Λ on its left)
        cores[k] = cores[k] / sqrt_s[k][None, None, None, :]
        cores[k + 1] = cores[k + 1] * sqrt_s[k][:, None, None, None]
    return cores, spectra, discarded_sq


@dataclass
class SweepResult:
    """Cores of a decomposition or truncation sweep and what it discarded.

    ``spectra[k]`` are bond k's singular values as seen by the sweep (before
    truncating that bond); ``discarded_sq[k]`` the squared absolute weight cut there.
    The sweep leaves a left-canonical chain (center n-1), and the errors of the
    bonds are orthogonal, so ``||W - W'||_F² == Σ discarded_sq`` exactly.
    """

    cores: list[Tensor]
    spectra: list[np.ndarray]
    discarded_sq: list[float]


def tt_svd(
    tensor: Tensor,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    policy: TruncationPolicy,
    norm: float,
    method: str = "svd",
) -> SweepResult:
    """Successive SVDs (or QRs) of a dense matrix into cores T_k[d_{k-1}, i_k, j_k, d_k].

    Args:
        tensor: the matrix W, shape (prod(in_shape), prod(out_shape)).
        norm: ||W||_F, the reference of ``cutoff`` and ``max_error``.
        method: ``"svd"`` (spectra recorded, truncation possible) or ``"qr"``
            (exact only: Householder QR per bond, several times cheaper; the same
            left-canonical form up to a unitary on each bond; ``spectra`` is empty).
    """
    if method not in ("svd", "qr"):
        raise ValueError(f"method must be 'svd' or 'qr', got {method!r}")
    if method == "qr" and not policy.is_exact:
        raise ValueError(
            "method='qr' gives exact decompositions only; use method='svd' "
            "with max_bond, cutoff or max_error"
        )
    n = len(in_shape)
    # W[i_1..i_n, j_1..j_n] -> W[i_1, j_1, i_2, j_2, ...]
    perm = [ax for k in range(n) for ax in (k, n + k)]
    t = tensor.reshape(*in_shape, *out_shape)
    t = t.transpose(perm) if not B.is_torch(t) else t.permute(perm)
    rest = t.reshape(1, -1)
    cores: list[Tensor] = []
    spectra: list[np.ndarray] = []
    discarded: list[float] = []
    spent = 0.0
    for k in range(n - 1):
        d0 = rest.shape[0]
        ij = in_shape[k] * out_shape[k]
        if method == "qr":
            q, rest = B.qr(rest.reshape(d0 * ij, -1))
            cores.append(q.reshape(d0, in_shape[k], out_shape[k], q.shape[1]))
            discarded.append(0.0)
            continue
        u, s, vh = B.svd(rest.reshape(d0 * ij, -1))
        s64 = _to_np64(s)
        r = policy.rank(k, s64, norm, spent)
        cut = float(tail_sums(s64)[r])
        spent += cut
        cores.append(u[:, :r].reshape(d0, in_shape[k], out_shape[k], r))
        rest = s[:r, None] * vh[:r]
        spectra.append(s64)
        discarded.append(cut)
    cores.append(rest.reshape(rest.shape[0], in_shape[-1], out_shape[-1], 1))
    return SweepResult(cores, spectra, discarded)


def truncate(cores: list[Tensor], policy: TruncationPolicy, norm: float) -> SweepResult:
    """Truncate bonds in canonical form: right-canonicalize, then a left-to-right SVD sweep.

    At bond k the sites right of it are right-isometries and the sites left of it
    left-isometries, so the bond's singular values are the true Schmidt values of
    the current matrix and the cut weight is the true error it adds.
    """
    cores = right_orthogonalize(cores, 0)
    spectra, discarded, spent = [], [], 0.0
    for k in range(len(cores) - 1):
        d0, i, j, _ = cores[k].shape
        u, s, vh = B.svd(_left_matrix(cores[k]))
        s64 = _to_np64(s)
        r = policy.rank(k, s64, norm, spent)
        cut = float(tail_sums(s64)[r])
        spent += cut
        cores[k] = u[:, :r].reshape(d0, i, j, r)
        cores[k + 1] = _absorb_right(s[:r, None] * vh[:r], cores[k + 1])
        spectra.append(s64)
        discarded.append(cut)
    return SweepResult(cores, spectra, discarded)
