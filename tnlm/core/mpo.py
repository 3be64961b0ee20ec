"""The Matrix Product Operator: a chain of tensornetwork Nodes.

Convention (used everywhere in tnlm): the MPO of a matrix W of shape (I, J) is
the map ``y = x @ W``, ``x[..., I] -> y[..., J]``; a torch ``nn.Linear`` is
decomposed from ``linear.weight.T``. ``in_shape`` factors I, ``out_shape``
factors J, and site k carries the legs (in_shape[k], out_shape[k])::

           in_0        in_1              in_{n-1}
            |           |                   |
    left --[T_0]--b_0--[T_1]--b_1-- ... --[T_{n-1}]-- right
            |           |                   |
           out_0       out_1             out_{n-1}

Each core is ``T_k[d_{k-1}, i_k, j_k, d_k]`` with axis names
``("left", "in", "out", "right")``; ``d_0 = d_n = 1``. Bond k (0-based) joins
site k and site k+1; ``bond_dims[k] = d_{k+1}`` in the paper's 1-based notation.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from math import prod
from typing import Any

import numpy as np
import tensornetwork as tn

from tnlm.core import backend as B
from tnlm.core import sweeps
from tnlm.core.factorize import check_padding, factorize, padded_dim
from tnlm.core.plan import ContractionPlan, get_plan, network_equation
from tnlm.core.policy import TruncationPolicy
from tnlm.core.spectra import central_bond, spectrum_entropy
from tnlm.core.table import format_table
from tnlm.core.validation import (
    check_core,
    check_matrix,
    check_number,
    check_positive_int,
    check_shape,
    check_site_index,
)

Tensor = B.Tensor

__all__ = ["MPO", "central_site", "combined_error"]

AXES = ("left", "in", "out", "right")
#: the gauges an MPO records (None: unknown)
GAUGES = (None, "canonical", "symmetric")


#: padded MPOs of at most this many logical entries (I J) are measured on their logical
#: block (:meth:`MPO.norm`, :meth:`MPO.truncate`): 16.8M entries, 134 MB in float64
DENSE_CHECK = 1 << 24


def _eps(dtype: Any) -> float:
    name = str(dtype).removeprefix("torch.")
    return float(np.finfo(np.float32 if name == "float32" else np.float64).eps)


def _dtype_name(dtype: Any) -> str:
    """The name (``"float32"``, ...) of a numpy dtype, torch dtype or dtype name, or a
    ``TypeError`` naming ``dtype``."""
    if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str):
        dtype = dtype.removeprefix("torch.")
    if dtype is None:  # np.dtype(None) would be float64
        raise TypeError("dtype must be a numpy dtype, a torch dtype or a dtype name such as "
                        "'float32' (float32 or float64), got None")
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise TypeError(f"dtype must be a numpy dtype, a torch dtype or a dtype name such "
                        f"as 'float32' (float32 or float64), got {dtype!r}") from None


def combined_error(p: float, e: float) -> float:
    """An upper bound of ||W0 - W2||_F / ||W0||_F when W1 is a canonical-form truncation of
    W0 with relative error ``p`` (W1 = Π W0, Π an orthogonal projector, as
    :meth:`MPO.from_matrix` and :meth:`MPO.truncate` cut) and W2 = Π' W1 a further cut of W1
    with relative error ``e`` = ||W1 - W2|| / ||W1|| (Π' an orthogonal projector, as the
    guard of :meth:`MPO.symmetric_gauge` cuts).

    With N = ||W0||: ||W1|| = sqrt(1 - p²) N, ||W0 - W1|| = p N is orthogonal to W1 and
    ||W0 - W2||² = p² N² + e² ||W1||² + 2 <(I - Π) W0, W1 - W2>; the cross term is at most
    2 p N ||(I - Π)(W1 - W2)||, and (I - Π)(W1 - W2) = -(I - Π) W2 is at most
    min(||W1 - W2||, ||W2||) = min(e, sqrt(1 - e²)) ||W1||. Hence the bound
    sqrt(p² + (1 - p²) e² + 2 p sqrt(1 - p²) min(e, sqrt(1 - e²))), exact when p or e is
    0 and never above the triangle inequality's p + sqrt(1 - p²) e.
    """
    p, e = max(float(p), 0.0), min(max(float(e), 0.0), 1.0)
    if p == 0.0 or e == 0.0:
        return p + e
    if p >= 1.0:  # not a projection's error: only ||W1|| <= (1 + p) N is known
        return p + (1.0 + p) * e
    q = (1.0 - p * p) ** 0.5
    cross = 2.0 * p * q * min(e, (1.0 - e * e) ** 0.5)
    return (p * p + q * q * e * e + cross) ** 0.5


def central_site(site_params: Sequence[int]) -> int:
    """The central tensor of a chain with these per-site parameter counts.

    The middle site for odd n; for even n, the one of the two middle sites with
    more parameters (the left one on a tie).
    """
    n = len(site_params)
    if n % 2:
        return n // 2
    left, right = n // 2 - 1, n // 2
    return right if site_params[right] > site_params[left] else left


class MPO:
    """A matrix W (I, J) as a chain of n tensornetwork Nodes ``T_k[d_{k-1}, i_k, j_k, d_k]``.

    Build one with :meth:`from_matrix`; the constructor takes ready cores.
    Instances are immutable: :meth:`canonicalize`, :meth:`truncate` and
    :meth:`symmetric_gauge` return new MPOs.

    Args:
        cores: n arrays (numpy or torch, one backend and dtype) of shape
            (d_{k-1}, i_k, j_k, d_k), d_0 = d_n = 1, neighbouring bonds equal.
        in_dim, out_dim: the logical matrix shape when the site shapes were
            zero-padded (defaults: prod(in_shape), prod(out_shape)).
        center: the orthogonality center, if the chain is in mixed-canonical form.
        gauge: ``"canonical"``, ``"symmetric"`` or ``None`` (unknown).
        truncation_error: relative Frobenius error ||W - W'||_F / ||W||_F with
            respect to the matrix this MPO was decomposed or truncated from (a finite
            number >= 0).
        discarded: per bond, the absolute weight sqrt(Σ s²) that the decomposition or
            truncation cut there (not relative; divide by ||W||_F for that): ``None`` or
            exactly n-1 finite numbers >= 0.

    Raises:
        TypeError: cores of mixed backends or dtypes, or not float32/float64 (half
            precision included: a torch layer may hold half-precision cores, an MPO
            does not); a non-numeric ``truncation_error`` or ``discarded`` entry.
        ValueError: shapes or bonds that do not chain, NaN/infinite cores, a negative or
            non-finite ``truncation_error`` or ``discarded`` entry, or ``discarded`` not
            of length n-1.
    """

    def __init__(
        self,
        cores: Sequence[Tensor],
        *,
        in_dim: int | None = None,
        out_dim: int | None = None,
        center: int | None = None,
        gauge: str | None = None,
        truncation_error: float = 0.0,
        discarded: Sequence[float] | None = None,
    ) -> None:
        cores = list(cores)
        if not cores:
            raise ValueError("cores must hold at least one tensor")
        backend = B.backend_of(cores[0])
        for k, c in enumerate(cores):
            if B.backend_of(c) != backend:
                raise TypeError(
                    f"cores[{k}] is on backend {B.backend_of(c)}, cores[0] on {backend}"
                )
            if len(c.shape) != 4:
                raise ValueError(
                    f"cores[{k}] must be 4-D (d_left, i, j, d_right), got shape {tuple(c.shape)}"
                )
            if c.dtype != cores[0].dtype:
                raise TypeError(f"cores[{k}] has dtype {c.dtype}, cores[0] has {cores[0].dtype}")
            check_core(c, k)
        if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
            raise ValueError(
                "boundary bonds must have dimension 1: cores[0].shape[0] and "
                f"cores[-1].shape[3] are {cores[0].shape[0]}, {cores[-1].shape[3]}"
            )
        for k in range(len(cores) - 1):
            if cores[k].shape[3] != cores[k + 1].shape[0]:
                raise ValueError(
                    f"bond {k}: cores[{k}].shape[3]={cores[k].shape[3]} != "
                    f"cores[{k + 1}].shape[0]={cores[k + 1].shape[0]}"
                )
        self._backend = backend
        self._nodes = [
            tn.Node(c, name=f"T{k}", axis_names=list(AXES), backend=backend)
            for k, c in enumerate(cores)
        ]
        for k in range(len(cores) - 1):
            tn.connect(self._nodes[k]["right"], self._nodes[k + 1]["left"], name=f"bond{k}")
        self.in_shape: tuple[int, ...] = tuple(int(c.shape[1]) for c in cores)
        self.out_shape: tuple[int, ...] = tuple(int(c.shape[2]) for c in cores)
        for name, dim in (("in_dim", in_dim), ("out_dim", out_dim)):
            if dim is not None and (isinstance(dim, (bool, np.bool_))
                                    or not isinstance(dim, (int, np.integer))):
                raise TypeError(f"{name} must be an int or None, got {dim!r}")
        if gauge not in GAUGES:
            raise ValueError(f"gauge must be one of {GAUGES}, got {gauge!r}")
        if center is not None:
            center = check_site_index(center, len(cores), "center")
        self.in_dim = prod(self.in_shape) if in_dim is None else int(in_dim)
        self.out_dim = prod(self.out_shape) if out_dim is None else int(out_dim)
        if not 0 < self.in_dim <= prod(self.in_shape) or not 0 < self.out_dim <= prod(
            self.out_shape
        ):
            raise ValueError(
                f"in_dim/out_dim ({self.in_dim}, {self.out_dim}) must be positive and "
                f"at most the site products ({prod(self.in_shape)}, "
                f"{prod(self.out_shape)})"
            )
        self.center = center
        self.gauge = gauge
        self.truncation_error = check_number(truncation_error, "truncation_error")
        if discarded is not None:
            if isinstance(discarded, (str, bytes)) or not isinstance(
                discarded, (Sequence, np.ndarray)
            ):
                raise TypeError(f"discarded must be None or a sequence of numbers, got "
                                f"{type(discarded).__name__}")
            if len(discarded) != len(cores) - 1:
                raise ValueError(f"discarded must have one entry per bond ({len(cores) - 1}), "
                                 f"got {len(discarded)}")
            discarded = tuple(check_number(d, f"discarded[{k}]")
                              for k, d in enumerate(discarded))
        self.discarded = discarded
        self._spectra: list[np.ndarray] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_matrix(
        cls,
        W: Any,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        n_sites: int | None = None,
        *,
        max_bond: int | Sequence[int] | None = None,
        cutoff: float | Sequence[float] | None = 0.0,
        max_error: float | Sequence[float] | None = None,
        pad: bool = False,
        backend: str | None = None,
        method: str = "auto",
    ) -> MPO:
        """Decompose W (I, J) by successive SVDs (TT-SVD) into an MPO.

        Args:
            W: dense matrix (numpy array or torch tensor), shape (I, J), float32/64.
            in_shape: factors of I, one per site; default ``factorize(I, n_sites)``.
            out_shape: factors of J; default ``factorize(J, n_sites)``.
            n_sites: number of sites when both shapes are omitted (default 5); given
                beside a shape, it must equal that shape's length.
            max_bond, cutoff, max_error: truncation policies (see
                :mod:`tnlm.core.policy`); all ``None``/0 gives the exact MPO.
            pad: allow zero-padding I or J up to the product of the site shape
                (or, with shapes omitted, to :func:`padded_dim`). The padded rows or
                columns are sliced off by :meth:`to_matrix` and :meth:`apply`.
            backend: ``"numpy"`` or ``"pytorch"``; default: that of W.
            method: ``"svd"`` (successive SVDs, bond spectra cached), ``"qr"``
                (successive Householder QRs: exact only, several times faster, the
                same left-canonical form up to a unitary per bond; spectra are
                computed when first asked for) or ``"auto"`` (QR when nothing is
                truncated, SVD otherwise).

        Returns:
            An MPO left-canonical with center n-1 (the paper's layout: all sites but
            the last are isometries); ``truncation_error`` is the exact relative error.
        """
        W = check_matrix(W, "W")
        if not isinstance(pad, bool):
            raise TypeError(f"pad must be a bool, got {pad!r}")
        if backend is not None:
            W = B.convert(W, backend)
        I, J = (int(d) for d in W.shape)
        asked = None if n_sites is None else check_positive_int(n_sites, "n_sites")
        if in_shape is None and out_shape is None:
            n_sites = 5 if asked is None else asked
        else:
            which = "in_shape" if in_shape is not None else "out_shape"
            n_sites = len(check_shape(in_shape if in_shape is not None else out_shape, which))
            if asked is not None and asked != n_sites:
                raise ValueError(f"n_sites={asked} disagrees with {which}, which has "
                                 f"{n_sites} sites; give one of them")
        in_shape = cls._resolve_shape(in_shape, I, n_sites, pad, "in_shape", "I")
        out_shape = cls._resolve_shape(out_shape, J, n_sites, pad, "out_shape", "J")
        if len(in_shape) != len(out_shape):
            raise ValueError(
                f"in_shape {in_shape} and out_shape {out_shape} must have the same number of sites"
            )
        if prod(in_shape) != I or prod(out_shape) != J:
            W = cls._pad(W, prod(in_shape), prod(out_shape))
        policy = TruncationPolicy.build(len(in_shape) - 1, max_bond, cutoff, max_error)
        # ||W||_F: the reference of cutoff/max_error; an exact sweep never reads it
        norm = 1.0 if policy.is_exact else float(np.linalg.norm(B.to_numpy(W).astype(np.float64)))
        if method == "auto":
            method = "qr" if policy.is_exact else "svd"
        result = sweeps.tt_svd(W, in_shape, out_shape, policy, norm, method)
        err = (sum(result.discarded_sq) ** 0.5 / norm) if norm > 0 else 0.0
        mpo = cls(
            result.cores,
            in_dim=I,
            out_dim=J,
            center=len(in_shape) - 1,
            gauge="canonical",
            truncation_error=err,
            discarded=[d**0.5 for d in result.discarded_sq],
        )
        if policy.is_exact and method == "svd":
            mpo._spectra = result.spectra
        return mpo

    @staticmethod
    def _resolve_shape(
        shape, dim: int, n_sites: int, pad: bool, name: str, dim_name: str
    ) -> tuple[int, ...]:
        if shape is None:
            try:
                return factorize(dim, n_sites, name=dim_name)
            except ValueError:
                if not pad:
                    raise
                return factorize(padded_dim(dim, n_sites), n_sites, name=f"padded {dim_name}")
        shape = check_shape(shape, name)
        if len(shape) != n_sites:
            raise ValueError(f"{name} has {len(shape)} sites, expected {n_sites}")
        p = prod(shape)
        if p != dim and not (pad and p > dim):
            hint = "; pass pad=True to zero-pad" if p > dim else ""
            raise ValueError(f"{name}={shape} has product {p}, but {dim_name}={dim}{hint}")
        check_padding(shape, dim, name=name, dim_name=dim_name)
        return shape

    @staticmethod
    def _pad(W: Tensor, I: int, J: int) -> Tensor:
        if B.is_torch(W):
            import torch

            return torch.nn.functional.pad(W, (0, J - W.shape[1], 0, I - W.shape[0]))
        return np.pad(W, ((0, I - W.shape[0]), (0, J - W.shape[1])))

    def _replace(self, cores: Sequence[Tensor], **kw: Any) -> MPO:
        args = dict(
            in_dim=self.in_dim, out_dim=self.out_dim, center=None, gauge=None, truncation_error=0.0
        )
        args.update(kw)
        return MPO(cores, **args)

    # ------------------------------------------------------------------ structure
    @property
    def nodes(self) -> list[tn.Node]:
        """The tensornetwork Nodes, connected by bond edges ``bond0 .. bond{n-2}``."""
        return list(self._nodes)

    @property
    def cores(self) -> list[Tensor]:
        """The core tensors ``T_k[d_{k-1}, i_k, j_k, d_k]``."""
        return [node.tensor for node in self._nodes]

    @property
    def backend(self) -> str:
        """``"numpy"`` or ``"pytorch"``."""
        return self._backend

    @property
    def dtype(self) -> Any:
        return self._nodes[0].tensor.dtype

    @property
    def n_sites(self) -> int:
        return len(self._nodes)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical matrix shape (I, J)."""
        return (self.in_dim, self.out_dim)

    @property
    def padded(self) -> bool:
        """True if the site shapes cover more than (I, J) (zero-padded)."""
        return (prod(self.in_shape), prod(self.out_shape)) != self.shape

    @property
    def bond_dims(self) -> tuple[int, ...]:
        """Internal bond dimensions, n-1 of them (bond k joins sites k and k+1)."""
        return tuple(int(c.shape[3]) for c in self.cores[:-1])

    @property
    def site_params(self) -> tuple[int, ...]:
        """Number of entries of each core."""
        return tuple(int(prod(c.shape)) for c in self.cores)

    @property
    def num_params(self) -> int:
        return sum(self.site_params)

    @property
    def dense_params(self) -> int:
        """I·J, the size of the dense matrix."""
        return self.in_dim * self.out_dim

    @property
    def compression_ratio(self) -> float:
        """dense_params / num_params (> 1 means the MPO is smaller than W)."""
        return self.dense_params / self.num_params

    @property
    def central_index(self) -> int:
        """The central tensor: the middle site for odd n; for even n, the one of the two
        middle sites with more parameters (the left one on a tie)."""
        return central_site(self.site_params)

    @property
    def central_bond(self) -> int:
        """The bond used as "the central bond": of the bonds touching the central tensor,
        the one with the larger bond dimension, the left one on a tie
        (:func:`tnlm.core.spectra.central_bond`). ``ValueError`` for a single site."""
        return central_bond(self.bond_dims, self.central_index)

    @property
    def auxiliary_indices(self) -> tuple[int, ...]:
        """All sites except the central one."""
        return tuple(k for k in range(self.n_sites) if k != self.central_index)

    # ------------------------------------------------------------------ contraction
    def dense_plan(self) -> ContractionPlan:
        """The planned contraction of all cores to W[i_1..i_n, j_1..j_n]."""
        nodes = self._nodes
        out = [n["in"] for n in nodes] + [n["out"] for n in nodes]
        eq = network_equation(nodes, out)
        return get_plan(eq, [tuple(c.shape) for c in self.cores])

    def apply_plan(self, batch: int = 1) -> ContractionPlan:
        """The planned contraction ``x[b, i_1..i_n] · MPO -> y[b, j_1..j_n]`` for ``batch`` rows
        (its costs are those of ``batch`` rows; it runs for any row count)."""
        nodes = self._nodes
        eq = network_equation(
            nodes,
            ["batch"] + [n["out"] for n in nodes],
            extra_terms=[["batch"] + [n["in"] for n in nodes]],
        )
        shapes = [tuple(c.shape) for c in self.cores] + [(batch, *self.in_shape)]
        rows = eq.split("->")[0].split(",")[-1][0]  # x's first index: the rows
        return get_plan(eq, shapes, rows=rows)

    def to_matrix(self) -> Tensor:
        """The dense matrix W of shape (I, J) (padding sliced off), on this MPO's backend."""
        W = self.dense_plan()(*self.cores).reshape(prod(self.in_shape), prod(self.out_shape))
        return W[: self.in_dim, : self.out_dim] if self.padded else W

    def apply(self, x: Tensor) -> Tensor:
        """``y = x @ W`` for x of shape (..., I) along the planned path; y has shape (..., J)
        (x without rows, e.g. (0, I), gives an empty (..., J) result)."""
        if B.backend_of(x) != self.backend:
            raise TypeError(f"x is a {B.backend_of(x)} array but the MPO is on {self.backend}")
        if x.ndim < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"x must have shape (..., {self.in_dim}), got {tuple(x.shape)}")
        if self.backend == "pytorch" and x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype}, the MPO's cores {self.dtype}: cast one "
                            "to the other")
        lead = tuple(x.shape[:-1])
        xb = x.reshape(-1, self.in_dim)
        pad_in = prod(self.in_shape) - self.in_dim
        if pad_in:
            xb = self._pad(xb, xb.shape[0], prod(self.in_shape))
        xb = xb.reshape(xb.shape[0], *self.in_shape)
        y = self.apply_plan(xb.shape[0])(*self.cores, xb).reshape(xb.shape[0],
                                                                   prod(self.out_shape))
        return y[:, : self.out_dim].reshape(*lead, self.out_dim)

    def norm(self) -> float:
        """||W||_F of the logical (I, J) matrix: from the cores (no dense contraction), or
        for a zero-padded MPO of at most :data:`DENSE_CHECK` entries from
        :meth:`to_matrix` (its padding may hold weight, e.g. after training, which the
        chain's own norm counts; above that size the chain's norm, an upper bound)."""
        if self._measured_on_block():
            return float(np.linalg.norm(self._block64()))
        return self._chain_norm()

    def _measured_on_block(self) -> bool:
        return self.padded and self.in_dim * self.out_dim <= DENSE_CHECK

    def _block64(self) -> np.ndarray:
        return B.to_numpy(self.to_matrix()).astype(np.float64)

    def _chain_norm(self) -> float:
        """The Frobenius norm of the whole (padded) chain, from the cores."""
        core = sweeps.left_orthogonalize(self.cores, self.n_sites - 1)[-1]
        return float(np.linalg.norm(B.to_numpy(core).astype(np.float64)))

    # ------------------------------------------------------------------ gauges
    def canonicalize(self, center: int) -> MPO:
        """Mixed-canonical form by QR sweeps: sites < center left-isometries, > center
        right-isometries. The matrix is unchanged (to rounding)."""
        center = check_site_index(center, self.n_sites, "center")
        cores = sweeps.canonicalize(self.cores, center)
        out = self._replace(
            cores, center=center, gauge="canonical", truncation_error=self.truncation_error
        )
        out._spectra = self._spectra
        return out

    def is_canonical(self, center: int, tol: float | None = None) -> bool:
        """Check the isometry conditions around ``center`` (default tol: 1e-10 in float64,
        1e-5 in float32)."""
        center = check_site_index(center, self.n_sites, "center")
        if tol is None:
            tol = 1e-10 if _eps(self.dtype) < 1e-10 else 1e-5
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got {tol!r}")
        return sweeps.is_canonical(self.cores, center, tol)

    def symmetric_gauge(self, rtol: float | None = None) -> MPO:
        """The paper's symmetric gauge: each bond's √Λ on both neighbouring sites.

        Singular values below ``rtol · s_max`` of their bond (default: 100·eps of
        the dtype) are removed before inverting. ``truncation_error`` is relative to the
        matrix this MPO's own ``truncation_error`` refers to (W0, e.g. the matrix
        :meth:`from_matrix` decomposed): with nothing cut it is unchanged, after an
        exact MPO it is the guard's measured cut, and when both this MPO's earlier
        truncation (p) and the guard's cut (e, relative to this MPO) are nonzero it is
        the upper bound :func:`combined_error` of ||W0 - W'||_F / ||W0||_F (the two errors
        are not orthogonal in general, so no exact figure exists without W0).
        """
        if rtol is None:
            rtol = 100 * _eps(self.dtype)
        if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 <= rtol < 1:
            raise ValueError(f"rtol must be a number in [0, 1) (relative to each bond's "
                             f"largest singular value), got {rtol!r}")
        cores, spectra, cut_sq = sweeps.symmetric_gauge(self.cores, rtol)
        # ||W||_F before the guard's cut: what is kept plus what was cut (orthogonal parts)
        norm = (float(np.sum(spectra[0] ** 2)) + cut_sq) ** 0.5 if spectra \
            else self._chain_norm()
        err = (cut_sq**0.5 / norm) if norm > 0 else 0.0
        out = self._replace(
            cores, gauge="symmetric",
            truncation_error=combined_error(self.truncation_error, err),
        )
        # a cut at a bond changes the spectra the sweep recorded before it (to its right):
        # kept only when nothing was cut, else measured again when read
        out._spectra = spectra if cut_sq == 0 else None
        return out

    # ------------------------------------------------------------------ truncation
    def truncate(
        self,
        max_bond: int | Sequence[int] | None = None,
        cutoff: float | Sequence[float] | None = None,
        max_error: float | Sequence[float] | None = None,
    ) -> MPO:
        """A truncated copy; ``truncation_error`` is ||W - W'||_F / ||W||_F with W this MPO.

        The chain is right-canonicalized and swept left to right; every bond is cut
        in canonical form, so the reported error equals the measured one (to
        rounding). Policies as in :mod:`tnlm.core.policy` (``cutoff`` is relative to
        ||W||_F; a number ``max_error`` bounds the whole matrix's relative error).

        For a zero-padded MPO of at most :data:`DENSE_CHECK` entries, W is the logical
        (I, J) block: ``cutoff`` and ``max_error`` are relative to its norm, and
        ``truncation_error`` is its measured relative error (a dense contraction of both
        matrices). The cuts are made on the padded chain, whose discarded weight bounds
        the logical block's error from above, so ``max_error`` holds for W even when the
        padding holds weight (a trained padded layer). Larger padded MPOs are measured
        on the padded chain (relative to its norm: with weight in the padding, the
        logical block's relative error may exceed it). ``discarded`` is the padded
        chain's.
        """
        policy = TruncationPolicy.build(max(self.n_sites - 1, 0), max_bond, cutoff, max_error)
        if self.n_sites == 1:
            return self._replace(self.cores, truncation_error=0.0)
        block = self._block64() if self._measured_on_block() else None
        norm = float(np.linalg.norm(block)) if block is not None else self._chain_norm()
        result = sweeps.truncate(self.cores, policy, norm)
        cut_sq = sum(result.discarded_sq)
        if block is not None and cut_sq > 0 and norm > 0:
            diff = block - self._replace(result.cores)._block64()
            err = float(np.linalg.norm(diff)) / norm
        else:
            err = (cut_sq**0.5 / norm) if norm > 0 else 0.0
        return self._replace(
            result.cores,
            center=self.n_sites - 1,
            gauge="canonical",
            truncation_error=err,
            discarded=[d**0.5 for d in result.discarded_sq],
        )

    # ------------------------------------------------------------------ entanglement
    def bond_spectra(self) -> list[np.ndarray]:
        """Singular values of every bond (float64, descending; of the whole padded chain, see
        :meth:`singular_values`); cached."""
        if self._spectra is None:
            self._spectra = sweeps.bond_spectra(self.cores)[0] if self.n_sites > 1 else []
        return [s.copy() for s in self._spectra]

    def singular_values(self, bond: int) -> np.ndarray:
        """Spectrum of bond ``bond``: the singular values of W unfolded as
        (sites 0..bond) x (sites bond+1..n-1), whatever the gauge.

        For a zero-padded MPO, W is the whole padded chain (prod(in_shape),
        prod(out_shape)), not the logical (I, J) block that :meth:`norm` measures: equal
        while the padding holds zeros (as :meth:`from_matrix` leaves it), different once it
        holds weight (a trained padded layer)."""
        bond = check_site_index(bond, self.n_sites - 1, "bond") if self.n_sites > 1 else None
        if bond is None:
            raise ValueError("a single-site MPO has no bonds")
        return self.bond_spectra()[bond]

    def entanglement_entropy(
        self, bond: int | None = None, alpha: float = 1.0
    ) -> float | np.ndarray:
        """Entropy of bond ``bond`` with p = s²/Σs² (natural log): von Neumann for
        alpha=1, Rényi otherwise; ``bond=None`` gives all n-1 bonds as an array. The
        spectra are those of :meth:`singular_values` (for a zero-padded MPO, of the whole
        padded chain)."""
        if bond is None:
            return np.array([spectrum_entropy(s, alpha) for s in self.bond_spectra()])
        return spectrum_entropy(self.singular_values(bond), alpha)

    def central_entropy(self, alpha: float = 1.0) -> float:
        """Entropy of :attr:`central_bond` (see :meth:`entanglement_entropy`)."""
        return self.entanglement_entropy(self.central_bond, alpha)

    # ------------------------------------------------------------------ conversion
    def to_backend(self, backend: str) -> MPO:
        """The same MPO with cores on ``backend`` (``"numpy"`` or ``"pytorch"``)."""
        B.get_backend(backend)
        out = self._replace(
            [B.convert(c, backend) for c in self.cores],
            center=self.center,
            gauge=self.gauge,
            truncation_error=self.truncation_error,
            discarded=self.discarded,
        )
        out._spectra = self._spectra
        return out

    def astype(self, dtype: Any) -> MPO:
        """The same MPO with cores cast to ``dtype``: float32 or float64, given as a numpy
        dtype, a torch dtype or a name (``"float32"``), whatever the backend (a torch dtype
        casts a numpy MPO to the numpy dtype of that name, and vice versa).

        Raises:
            TypeError: ``dtype`` is not a dtype, or a dtype other than float32 / float64
                (half precision included); the message names ``dtype``.
        """
        name = _dtype_name(dtype)
        if name not in ("float32", "float64"):
            half = " (half precision: keep float32 cores; a torch layer may hold half " \
                "precision)" if name in ("float16", "bfloat16") else ""
            raise TypeError(f"dtype={dtype!r} would give cores[0] has dtype {name}; an MPO "
                            f"holds real float32 or float64 cores{half}")
        if self.backend == "pytorch":
            import torch

            cores = [c.to(getattr(torch, name)) for c in self.cores]
        else:
            cores = [c.astype(name) for c in self.cores]
        out = self._replace(
            cores,
            center=self.center,
            gauge=self.gauge,
            truncation_error=self.truncation_error,
            discarded=self.discarded,
        )
        out._spectra = self._spectra
        return out

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        return (
            f"MPO(shape={self.shape}, in_shape={self.in_shape}, out_shape={self.out_shape}, "
            f"bond_dims={self.bond_dims}, params={self.num_params:,}, "
            f"compression={self.compression_ratio:.2f}x, backend={self.backend}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, gauge={self.gauge}"
            + (f", center={self.center}" if self.center is not None else "")
            + (f", truncation_error={self.truncation_error:.3g}" if self.truncation_error else "")
            + ")"
        )

    def summary(self) -> str:
        """A plain-text table of sites: legs, core shape, parameters, role, and bond entropies."""
        entropies = self.entanglement_entropy() if self.n_sites > 1 else np.array([])
        rows = [("site", "i x j", "core shape", "params", "role", "S(bond right)")]
        for k, c in enumerate(self.cores):
            role = "central" if k == self.central_index else "auxiliary"
            ent = f"{entropies[k]:.3f}" if k < len(entropies) else "-"
            rows.append(
                (
                    str(k),
                    f"{self.in_shape[k]} x {self.out_shape[k]}",
                    "x".join(map(str, c.shape)),
                    f"{self.site_params[k]:,}",
                    role,
                    ent,
                )
            )
        lines = format_table(rows)
        lines.append(
            f"W {self.in_dim} x {self.out_dim}: {self.dense_params:,} dense, "
            f"{self.num_params:,} in the MPO ({self.compression_ratio:.2f}x), "
            f"central tensor holds {self.site_params[self.central_index] / self.num_params:.1%}"
        )
        return "\n".join(lines)
