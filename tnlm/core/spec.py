"""One decomposition recipe: how a matrix becomes an MPO.

A :class:`DecompositionSpec` gathers everything that decides the MPO of a
matrix W (I, J) in the ``y = x @ W`` convention: site shapes (or ``n_sites``
and zero-padding), the truncation policy and the gauge the cores are left in.
Layers (:mod:`tnlm.bridge`), model wrapping (:mod:`tnlm.integration`) and
compression (:mod:`tnlm.compress`) all decompose through :meth:`DecompositionSpec.decompose`::

    spec = DecompositionSpec(n_sites=5, max_bond=64, gauge="symmetric")
    mpo = spec.decompose(W)          # MPO.from_matrix, then apply_gauge

Gauges (the cores' starting point for fine-tuning; the matrix is the same):

``"central"``
    orthogonality center on the central tensor: the auxiliary tensors are
    isometries, the central one holds the norm;
``"symmetric"``
    the paper's gauge, each bond's √Λ on both neighbouring sites;
``"left"``
    left-canonical, as :meth:`MPO.from_matrix` returns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from math import prod
from typing import Any

from tnlm.core.factorize import check_padding, factorize, padded_dim
from tnlm.core.mpo import MPO
from tnlm.core.policy import TruncationPolicy
from tnlm.core.validation import check_n_sites, check_positive_int, check_shape

__all__ = ["GAUGES", "DecompositionSpec", "apply_gauge"]

GAUGES = ("central", "symmetric", "left")


def apply_gauge(mpo: MPO, gauge: str) -> MPO:
    """``mpo`` brought to ``gauge`` (one of :data:`GAUGES`); the matrix is unchanged."""
    if gauge == "central":
        return mpo.canonicalize(mpo.central_index)
    if gauge == "symmetric":
        return mpo.symmetric_gauge()
    if gauge == "left":
        return mpo
    raise ValueError(f"gauge must be one of {GAUGES}, got {gauge!r}")


@dataclass(frozen=True)
class DecompositionSpec:
    """How to decompose a matrix W (I, J) into an MPO.

    Attributes:
        in_shape: factors of I, one per site (default: ``factorize(I, n_sites)``).
        out_shape: factors of J (default: ``factorize(J, n_sites)``); given with
            ``in_shape``, of the same length (``ValueError`` otherwise).
        n_sites: number of sites when both shapes are omitted (with one shape given, the
            other has that shape's length).
        max_bond, cutoff, max_error: truncation policies (:mod:`tnlm.core.policy`;
            ``cutoff`` and ``max_error`` are relative to ||W||_F); all unset: exact.
        pad: zero-pad I or J when they do not factorize (e.g. a 30522 vocabulary).
        gauge: the gauge of the result, one of :data:`GAUGES`.
    """

    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    n_sites: int = 5
    max_bond: int | tuple[int, ...] | None = None
    cutoff: float | tuple[float, ...] | None = None
    max_error: float | tuple[float, ...] | None = None
    pad: bool = False
    gauge: str = "symmetric"

    def __post_init__(self) -> None:
        for name in ("in_shape", "out_shape"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_shape(value, name))
        if self.in_shape is not None and self.out_shape is not None and \
                len(self.in_shape) != len(self.out_shape):
            raise ValueError(f"in_shape {self.in_shape} and out_shape {self.out_shape} must "
                             "have the same number of sites")
        check_n_sites(self.n_sites, "n_sites")
        if self.gauge not in GAUGES:
            raise ValueError(f"gauge must be one of {GAUGES}, got {self.gauge!r}")
        for name in ("max_bond", "cutoff", "max_error"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.pad, bool):
            raise TypeError(f"pad must be a bool, got {self.pad!r}")
        n = len(self.in_shape or self.out_shape or ()) or self.n_sites
        # validates the policy values (types, ranges, per-bond lengths) before any work
        TruncationPolicy.build(max(n - 1, 1), self.max_bond, self.cutoff, self.max_error)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def with_options(self, **options: Any) -> DecompositionSpec:
        """A copy with some fields changed (unknown names raise ``ValueError``)."""
        unknown = set(options) - set(self.field_names())
        if unknown:
            raise ValueError(f"unknown decomposition options {sorted(unknown)}; "
                             f"allowed: {self.field_names()}")
        return replace(self, **options)

    def site_shapes(self, in_dim: int, out_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(in_shape, out_shape)`` that :meth:`decompose` uses for a matrix (in_dim, out_dim),
        without decomposing (given shapes, else ``factorize``, padded when allowed).

        Raises:
            ValueError: a given shape whose product is not the dimension (or, with
                ``pad``, is below it or pads it too much), or a dimension that does not
                factorize into ``n_sites`` factors without ``pad``.
        """
        in_dim = check_positive_int(in_dim, "in_dim")
        out_dim = check_positive_int(out_dim, "out_dim")
        n = len(self.in_shape or self.out_shape or ()) or self.n_sites

        def resolve(shape: tuple[int, ...] | None, dim: int, name: str) -> tuple[int, ...]:
            if shape is not None:
                label = "in_shape" if name == "I" else "out_shape"
                p = prod(shape)
                if p != dim and not (self.pad and p > dim):
                    hint = "; pass pad=True to zero-pad" if p > dim else ""
                    raise ValueError(f"{label}={shape} has product {p}, but {name}={dim}{hint}")
                if self.pad:  # the limit padded_dim applies to factorized shapes
                    check_padding(shape, dim, name=label, dim_name=name)
                return shape
            try:
                return factorize(dim, n, name=name)
            except ValueError:
                if not self.pad:
                    raise
                return factorize(padded_dim(dim, n), n, name=f"padded {name}")

        return resolve(self.in_shape, in_dim, "I"), resolve(self.out_shape, out_dim, "J")

    def decompose(self, W: Any) -> MPO:
        """The MPO of W (numpy array or torch tensor, (I, J)) in :attr:`gauge`.

        ``truncation_error`` of the result is ||W - W'||_F / ||W||_F (exact).

        Raises:
            ValueError: among others, explicit shapes that would pad a dimension more than
                :data:`~tnlm.core.factorize.MAX_PAD_FACTOR` times (checked before any
                allocation).
        """
        shape = getattr(W, "shape", None)
        if self.pad and shape is not None and len(shape) == 2:
            self.site_shapes(int(shape[0]), int(shape[1]))
        shaped = self.in_shape is not None or self.out_shape is not None
        mpo = MPO.from_matrix(W, self.in_shape, self.out_shape,
                              None if shaped else self.n_sites,
                              max_bond=_seq(self.max_bond), cutoff=_seq(self.cutoff),
                              max_error=_seq(self.max_error), pad=self.pad)
        return apply_gauge(mpo, self.gauge)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _seq(value: Any) -> Any:
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
