"""A 2-site MPO layer with its bond's gauge fixed: :class:`PivotedLinear`.

The storage form of a low-rank MPO layer (:mod:`tnlm.core.pivot`)::

    x (.., I) ──gather p──────────────┐
        └─────gather q── @ coef ──────+── z (.., r) ── @ right ── (+ bias) ── y (.., J)
                        (I-r, r)                        (r, J)

``r (I + J - r)`` parameters and multiply-adds per token instead of the 2-site layer's
``r (I + J)``, the same function (:func:`pivot_layers` converts exactly, up to float
rounding). ``coef`` and ``right`` train as any parameters; ``pivots`` and ``rest`` are
int64 buffers (in the state dict, so a checkpoint restores them; no pickle). In the named
sets of :mod:`tnlm.bridge.finetune` both tensors count as central tensors: they train in
``cores``, ``cores+linears`` and ``all``, not in the lightweight sets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tnlm.bridge.kinds import MATRIX_KINDS, dense_module
from tnlm.bridge.layer import ComputedWeightModule, MPOLinear, check_features
from tnlm.core.pivot import pivot_low_rank
from tnlm.core.validation import all_finite

__all__ = ["PivotedLinear", "pivot_layers", "is_low_rank_pair", "PIVOTED_LAYOUT"]

#: the ``layout`` a checkpoint records for a :class:`PivotedLinear`
PIVOTED_LAYOUT = "pivoted"


def is_low_rank_pair(layer: nn.Module) -> bool:
    """Whether ``layer`` is an :class:`MPOLinear` of the 2-site low-rank layout
    ``(1, I, 1, r), (r, 1, J, 1)`` with ``in_dim = I``, ``out_dim = J`` (no padding)."""
    if not isinstance(layer, MPOLinear) or layer.n_sites != 2:
        return False
    (a0, i0, j0, r), (r1, i1, j1, a1) = layer.core_shapes
    return (a0, j0, i1, a1) == (1, 1, 1, 1) and r == r1 and (i0, j1) == (
        layer.in_dim, layer.out_dim)


def _check_split(pivots: torch.Tensor, rest: torch.Tensor, in_dim: int) -> None:
    """``ValueError`` unless ``pivots`` and ``rest`` hold each index of ``range(in_dim)``
    once."""
    both = torch.cat([pivots.reshape(-1), rest.reshape(-1)]).cpu()
    if both.is_floating_point() or both.is_complex() or both.dtype == torch.bool:
        raise ValueError(f"pivots and rest must be integer index vectors, got {both.dtype}")
    both = both.to(torch.int64)
    if not torch.equal(torch.sort(both).values, torch.arange(in_dim)):
        bad = sorted(set(both.tolist()) ^ set(range(in_dim)))[:5]
        raise ValueError(f"pivots and rest must split range({in_dim}) (each index "
                         f"once); indices missing or out of range: {bad}"
                         + (" (and repeats)" if both.unique().numel() < both.numel()
                            else ""))


class PivotedLinear(ComputedWeightModule):
    """``y = (x[..., pivots] + x[..., rest] @ coef) @ right + bias``: a drop-in for the
    ``nn.Linear`` / ``Conv1D`` (``kind``) it compresses.

    :attr:`weight` is computed from ``coef`` and ``right`` and read-only, as an
    :class:`~tnlm.bridge.layer.MPOLinear`'s (:class:`~tnlm.bridge.layer.ComputedWeightModule`).

    Args:
        pivots: (r,) int64, rest: (I - r,) int64: a split of ``range(I)``.
        coef: (I - r, r); right: (r, J); bias: (J,) or None.
        kind: the module kind the layer replaces (:data:`tnlm.bridge.kinds.MATRIX_KINDS`),
            what :meth:`merge` gives back.

    Raises:
        TypeError: ``coef`` and ``right`` not of one floating-point dtype.
        ValueError: shapes that do not fit together, ``pivots``/``rest`` not a split
            of ``range(I)``, or NaN/Inf in ``coef`` or ``right``.
    """

    weight_write_hint = (
        "is computed from coef and right on every access, so writing to it would be silently "
        "lost: for a dense weight to edit, use layer.merge() (a plain nn.Linear / Conv1D "
        "with the same weight); to change the layer itself, write layer.coef and "
        "layer.right; for an independent, writable copy of the values, take "
        "layer.weight.detach().clone()")

    def __init__(self, pivots: torch.Tensor, rest: torch.Tensor, coef: torch.Tensor,
                 right: torch.Tensor, bias: torch.Tensor | None = None,
                 kind: str = "linear") -> None:
        super().__init__()
        if pivots.dim() != 1 or rest.dim() != 1 or pivots.numel() < 1:
            raise ValueError(f"pivots and rest must be 1-d index vectors, pivots not empty; got "
                             f"shapes {tuple(pivots.shape)} and {tuple(rest.shape)}")
        for name, t in (("pivots", pivots), ("rest", rest)):
            if t.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"{name} must be an integer tensor (int64), got {t.dtype}")
        r, n_rest = int(pivots.numel()), int(rest.numel())
        if right.dim() != 2 or right.shape[0] != r or tuple(coef.shape) != (n_rest, r):
            raise ValueError(f"coef must be ({n_rest}, {r}) and right ({r}, J), got "
                             f"{tuple(coef.shape)} and {tuple(right.shape)}")
        if not coef.dtype.is_floating_point or coef.dtype != right.dtype:
            raise TypeError(f"coef and right must have one floating-point dtype, got "
                            f"{coef.dtype} and {right.dtype}")
        for name, t in (("coef", coef), ("right", right)):
            if not t.is_meta and not all_finite(t):
                raise ValueError(f"{name} holds NaN or infinite values")
        I, J = r + n_rest, int(right.shape[1])
        if bias is not None and tuple(bias.shape) != (J,):
            raise ValueError(f"bias must be ({J},), got {tuple(bias.shape)}")
        if kind not in MATRIX_KINDS:
            raise ValueError(f"kind must be one of {MATRIX_KINDS}, got {kind!r}")
        self.kind = kind
        self.in_dim, self.out_dim = I, J
        self.truncation_error = 0.0
        self.register_buffer("pivots", pivots.to(torch.int64).clone())
        self.register_buffer("rest", rest.to(torch.int64).clone())
        self.coef = nn.Parameter(coef.detach().clone())
        self.right = nn.Parameter(right.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.check_indices()

    def check_indices(self) -> None:
        """Raise ``ValueError`` unless ``pivots`` and ``rest`` split ``range(in_dim)``, each
        index once (called on construction, on ``load_state_dict`` before anything is
        copied, and by the checkpoint reader after loading)."""
        if self.pivots.dtype != torch.int64 or self.rest.dtype != torch.int64:
            raise ValueError(f"pivots and rest must be int64, got {self.pivots.dtype} and "
                             f"{self.rest.dtype}")
        _check_split(self.pivots, self.rest, self.in_dim)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        """As ``nn.Module``'s, after checking that the loaded ``pivots`` and ``rest`` split
        ``range(in_dim)`` (``ValueError`` before anything is copied; shapes that differ
        from this layer's are left to ``nn.Module``'s own size check)."""
        pivots = state_dict.get(prefix + "pivots", self.pivots)
        rest = state_dict.get(prefix + "rest", self.rest)
        if isinstance(pivots, torch.Tensor) and isinstance(rest, torch.Tensor) and \
                pivots.shape == self.pivots.shape and rest.shape == self.rest.shape and \
                not pivots.is_meta and not rest.is_meta:
            try:
                _check_split(pivots, rest, self.in_dim)
            except ValueError as err:
                raise ValueError(f"state_dict for {prefix or 'the layer'!r}: {err}") from None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_mpo(cls, layer: MPOLinear) -> PivotedLinear:
        """The gauge-fixed form of a 2-site low-rank :class:`MPOLinear`
        (:func:`is_low_rank_pair`): the same function, in the layer's dtype and device;
        its ``truncation_error`` kept.

        Raises:
            TypeError: ``layer`` is not of that layout.
        """
        if not is_low_rank_pair(layer):
            raise TypeError(f"PivotedLinear.from_mpo needs a 2-site low-rank MPOLinear "
                            f"(cores (1, I, 1, r), (r, 1, J, 1)), got {type(layer).__name__}"
                            + (f" with cores {list(layer.core_shapes)}"
                               if isinstance(layer, MPOLinear) else ""))
        I, J, r = layer.in_dim, layer.out_dim, layer.core_shapes[0][3]
        c0, c1 = layer.cores[0], layer.cores[1]
        f = pivot_low_rank(c0.detach().reshape(I, r), c1.detach().reshape(r, J))
        dt, dev = c0.dtype, c0.device
        bias = getattr(layer, "bias", None)
        out = cls(f.pivots, f.rest, f.coef.to(dt), f.right.to(dt),
                  None if bias is None else bias.detach(), layer.kind).to(dev)
        out.truncation_error = float(layer.truncation_error)
        return out

    def structure(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild an empty shell (:meth:`from_structure`)."""
        return dict(kind=self.kind, layout=PIVOTED_LAYOUT, in_dim=self.in_dim,
                    out_dim=self.out_dim, rank=self.rank, bias=self.bias is not None,
                    truncation_error=float(self.truncation_error))

    @classmethod
    def from_structure(cls, spec: dict[str, Any], dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> PivotedLinear:
        """A layer of the shape ``spec`` (:meth:`structure`), zeros, pivots ``0..r-1``:
        ready for ``load_state_dict``."""
        I, J, r = int(spec["in_dim"]), int(spec["out_dim"]), int(spec["rank"])
        layer = cls(torch.arange(r), torch.arange(r, I), torch.zeros(I - r, r, dtype=dtype),
                    torch.zeros(r, J, dtype=dtype),
                    torch.zeros(J, dtype=dtype) if spec.get("bias") else None,
                    spec["kind"])
        layer.truncation_error = float(spec.get("truncation_error", 0.0))
        return layer.to(device) if device is not None else layer

    # ------------------------------------------------------------------ use
    @property
    def rank(self) -> int:
        return int(self.pivots.numel())

    @property
    def n_params(self) -> int:
        """Stored numbers of the matrix: ``r (I + J - r)`` (the bias not counted)."""
        return self.coef.numel() + self.right.numel()

    @property
    def in_features(self) -> int:
        return self.in_dim

    @property
    def out_features(self) -> int:
        return self.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., I) -> y (..., J) (under autocast in the matmuls' dtype, as nn.Linear).

        Raises:
            ValueError: the last dimension is not ``in_features``, or a 0-d input (no last
                dimension); the message names the input's shape.
        """
        check_features(x, self.in_dim)
        z = x.index_select(-1, self.pivots)
        if self.rest.numel():
            z = z + x.index_select(-1, self.rest) @ self.coef
        y = z @ self.right
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def basis(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """B (in, r): the identity at the pivot rows and ``coef`` at the others, so that
        ``x @ B = x[..., pivots] + x[..., rest] @ coef`` and ``W = B @ right`` (a new
        tensor, in ``dtype``, default ``coef``'s)."""
        dtype = self.coef.dtype if dtype is None else dtype
        B = self.coef.new_zeros(self.in_dim, self.rank, dtype=dtype)
        B[self.pivots] = torch.eye(self.rank, dtype=dtype, device=B.device)
        B[self.rest] = self.coef.to(dtype)
        return B

    @torch.no_grad()
    def singular_values(self) -> torch.Tensor:
        """W's r singular values (float64, descending), from an (I, r) QR and an r x J SVD
        (W itself is not formed)."""
        _, R = torch.linalg.qr(self.basis(torch.float64))
        return torch.linalg.svdvals(R @ self.right.double())

    def dense_matrix(self) -> torch.Tensor:
        """W (in, out), ``y = x @ W``."""
        W = self.right.new_zeros(self.in_dim, self.out_dim)
        W[self.pivots] = self.right
        if self.rest.numel():
            W[self.rest] = self.coef @ self.right
        return W

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight in ``nn.Linear`` layout (out_features, in_features) for every
        ``kind``, as :attr:`MPOLinear.weight <tnlm.bridge.layer.MPOLinear.weight>` (a
        ``Conv1D`` stores the transpose: :meth:`merge` gives the module with its own
        layout). Computed from ``coef`` and ``right`` at each access (differentiable);
        read-only: assigning it or writing into it in place raises
        :class:`~tnlm.bridge.computed.ReadOnlyWeightError`."""
        return self._computed_weight(self.dense_matrix().T)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The plain module of :attr:`kind` with the dense weight (exact up to rounding)."""
        return dense_module(self.kind, self.dense_matrix(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, "
                f"bias={self.bias is not None}, kind={self.kind!r}")


@torch.no_grad()
def pivot_layers(model: nn.Module, names: list[str] | None = None) -> dict[str, PivotedLinear]:
    """Replace, in place, every 2-site low-rank :class:`MPOLinear` of ``model``
    (:func:`is_low_rank_pair`; with ``names``, those only) by its :class:`PivotedLinear`:
    the same function in ``r (I + J - r)`` instead of ``r (I + J)`` numbers.

    A layer shared by several paths (tied or ALBERT-style weights) is converted once and
    stays shared (naming one of its paths converts it under all of them).

    Returns:
        ``name -> new layer`` (every path, as ``named_modules(remove_duplicate=False)``).

    Raises:
        TypeError: ``names`` is one str (not a list of names).
        ValueError: a name in ``names`` that is not such a layer of ``model``.
    """
    if isinstance(names, (str, bytes)):
        raise TypeError(f"names must be a list of module names, got one str {names!r}: wrap "
                        "it in a list")
    found = {n: m for n, m in model.named_modules(remove_duplicate=False)
             if n and is_low_rank_pair(m)}
    if names is not None:
        missing = [n for n in names if n not in found]
        if missing:
            raise ValueError(f"names must be 2-site low-rank MPOLinear layers of the model; "
                             f"not such layers: {missing[:5]}")
        chosen = {id(found[n]) for n in names}  # and every other path to those modules
        found = {n: m for n, m in found.items() if id(m) in chosen}
    out: dict[str, PivotedLinear] = {}
    made: dict[int, PivotedLinear] = {}
    for name, old in found.items():
        new = made.get(id(old))
        if new is None:
            new = made[id(old)] = PivotedLinear.from_mpo(old)
            new.train(old.training)
            # both tensors count as central (no auxiliary tensor): both take the central
            # core's flag, whichever site that was
            central = old.cores[old.central_index]
            for p_new, p_old in ((new.coef, central), (new.right, central),
                                 (new.bias, getattr(old, "bias", None))):
                if p_new is not None and p_old is not None:
                    p_new.requires_grad_(p_old.requires_grad)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        out[name] = new
    return out


def merged_module(m: nn.Module) -> nn.Module:
    """The plain module an MPO layer or :class:`PivotedLinear` computes (its ``merge()``),
    in the factorized layer's train/eval mode and with its flags: the weight trains if any
    core did, the bias as before (a new module's parameters would all train)."""
    new = m.merge()
    new.train(m.training)
    new.weight.requires_grad_(any(c.requires_grad for c in (
        (m.coef, m.right) if isinstance(m, PivotedLinear) else m.cores)))
    bias = getattr(m, "bias", None)
    if bias is not None:
        new.bias.requires_grad_(bias.requires_grad)
    return new
