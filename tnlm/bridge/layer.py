"""torch modules whose parameters are MPO cores: :class:`MPOLinear`, :class:`MPOEmbedding`.

Their ``weight`` is a read-only tensor computed from the cores
(:class:`~tnlm.bridge.computed.ComputedWeight`).

The cores are an ``nn.ParameterList`` named ``cores`` (state_dict keys
``cores.0 .. cores.{n-1}``), each ``T_k[d_{k-1}, i_k, j_k, d_k]`` in the
convention of :mod:`tnlm.core.mpo` (``y = x @ W``; a Linear's W is ``weight.T``).

The paper's lightweight fine-tuning freezes the central tensor and trains the
auxiliary ones: :meth:`MPOModule.freeze_central`.

Speed (see ``docs/benchmarks.md``):

* **dense cache** (``cache_dense=True``, the default): the dense path keeps the W it
  rebuilt (one ``in_dim x out_dim`` tensor per layer and compute dtype: the memory of
  the dense layer it replaces) together with a copy of the cores it was built from
  (as large as the cores), and reuses W while every core is bitwise equal to that copy.
  The check compares values, not version counters or storages, which some writes leave
  alone (fused optimizer steps such as ``AdamW(fused=True)``, transformers' default;
  writes through ``.data``): it reads each core once, a small fraction of the cost of
  rebuilding W. ``set_cores``, ``retruncate`` and ``.to()`` clear the cache,
  as :meth:`MPOModule.invalidate_cache` does. W is reused only where autograd does not
  need the graph through the cores: under ``torch.no_grad()`` /
  ``torch.inference_mode()``, or when every core is frozen. Not under ``torch.compile``
  (the traced graph rebuilds W).
* **plans resolved when the cores are set** (:class:`~tnlm.core.plan.ChainPlans`,
  :class:`~tnlm.bridge.cost.ForwardCost`): a forward pass chooses its mode and path by
  arithmetic on the row count; no path search per batch length, no cache lookup, no
  graph break under ``torch.compile``.
* **low-rank layouts** ``(1, I, 1, r), (r, 1, J, 1)`` run as ``(x @ A) @ B`` whenever
  ``r (I + J) < I J`` (size-1 legs are dropped from the einsum equations).
* **training on the dense path** (a core needs a gradient): the chain is cut around the
  central tensor into three blocks ``L · C · R`` (:class:`~tnlm.core.plan.BlockPlan`) and an
  autograd function (:mod:`tnlm.bridge.training`) builds W by GEMMs once per call, keeps it
  for the input gradient, and gives each block that needs one its gradient by projecting
  the weight gradient ``G = dy^T x`` (or, when cheaper, contracting x and dy with the other
  blocks), in the order :class:`~tnlm.bridge.cost.TrainCost` plans cheapest; frozen cores
  get none, and a product of frozen blocks is cached like W. Gradients equal autograd's
  through the chain (``block_train = False``, also used under ``torch.compile`` and
  ``torch.func``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from math import prod
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tnlm.bridge import cost, kinds, training
from tnlm.bridge.computed import (
    WEIGHT_WRITE_HINT,
    ComputedWeight,
    ReadOnlyWeightError,
    snapshot,
    unchanged,
)
from tnlm.core.mpo import MPO, central_site
from tnlm.core.plan import BlockPlan, ChainPlans, chain_plans, check_chain, dense_plan
from tnlm.core.spec import DecompositionSpec, apply_gauge
from tnlm.core.validation import check_matrix, check_positive_int, check_shape, check_size

__all__ = ["ComputedWeight", "ComputedWeightModule", "MPODtypeError", "MPOModule", "MPOLinear",
           "MPOEmbedding", "ReadOnlyWeightError", "check_features", "set_dense_cache",
           "invalidate_caches"]

_compiling = torch.compiler.is_compiling
#: whether a torch.func transform (grad, vmap, jacrev, ...) is running: the training path's
#: autograd.Function does not support them, the chain's einsums do
_transforming = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
#: index dtypes ``nn.Embedding`` accepts (Long, Int)
_INDEX_DTYPES = (torch.int64, torch.int32)
#: the half-precision dtypes a layer may hold (an :class:`MPO` holds float32/float64 only)
_HALF = (torch.float16, torch.bfloat16)


class MPODtypeError(RuntimeError, TypeError):
    """An input dtype an MPO layer does not accept (where ``nn.Linear`` / ``nn.Embedding``
    raise ``RuntimeError``); also a ``TypeError``, as the input's type is wrong."""


def _autocast_eligible(dtype: torch.dtype) -> bool:
    """Whether autocast casts a tensor of ``dtype`` to its lower precision (floating
    point but not float64: torch's rule for the ops it autocasts, ``linear`` among them)."""
    return dtype.is_floating_point and dtype != torch.float64


def _linear_dtype(layer: nn.Module, x_dtype: torch.dtype, param_dtype: torch.dtype,
                  device_type: str) -> torch.dtype:
    """The dtype a linear map computes in, by ``nn.Linear``'s rules, or :class:`MPODtypeError`.

    Outside autocast the input must have the parameters' dtype (no silent cast). Under
    ``torch.autocast`` on ``device_type`` the input and the parameters are each cast to
    the autocast dtype when eligible (floating point, not float64) and must then agree,
    as ``nn.Linear`` does (float64 inputs or parameters are not cast, so a float64 layer
    with a float32 input raises there too).
    """
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        low = torch.get_autocast_dtype(device_type)
        x_dt = low if _autocast_eligible(x_dtype) else x_dtype
        p_dt = low if _autocast_eligible(param_dtype) else param_dtype
    else:
        x_dt, p_dt = x_dtype, param_dtype
    if x_dt == p_dt:
        return p_dt
    what = f"{type(layer).__name__} (kind {getattr(layer, 'kind', '?')!r})"
    context = (f" under torch.autocast({device_type!r}, dtype={low}) (which casts neither "
               "float64 nor non-floating tensors)") if autocast else ""
    raise MPODtypeError(
        f"{what}: input dtype {x_dtype} does not match the parameter dtype {param_dtype}"
        f"{context}; like nn.Linear, an MPO layer does not cast its input: call "
        f".to({param_dtype}) on the input, or .to({x_dtype}) on the module")


def _torch_cores(mpo: MPO, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """The cores of ``mpo`` as torch tensors (optionally cast to ``dtype``)."""
    cores = [c if isinstance(c, torch.Tensor) else torch.as_tensor(np.asarray(c))
             for c in mpo.cores]
    return cores if dtype is None else [c.to(dtype) for c in cores]


def _check_cast_error(max_error: Any, stored: float, decomposed_error: float,
                      dtype: torch.dtype, *, what: str = "the float64 decomposition",
                      way_out: str = "decompose a float32 copy of the module (module.float()) "
                                     "and keep the layer in float32") -> None:
    """For float16/bfloat16 cores: ``ValueError`` if a number ``max_error`` holds for the
    cut made in higher precision (``what``, error ``decomposed_error``) but not for the
    stored cores (error ``stored``, measured after the cast to ``dtype``): the cast broke
    the bound. Float32/float64 cores report their measured error and are not checked."""
    bound = max_error
    if dtype not in _HALF or bound is None or np.ndim(bound) != 0:  # per bond: not checked
        return
    bound = float(bound)
    stored = float(stored)
    slack = 1e-12  # float64 rounding of the measurement itself
    if stored <= bound + slack or decomposed_error > bound + slack:
        return
    step = 10.0 ** (math.floor(math.log10(stored)) - 1)
    enough = math.ceil(stored / step) * step  # stored, rounded up to two digits
    raise ValueError(
        f"max_error={bound:g} is not met by the stored {dtype} cores: their relative error is "
        f"{stored:.3g} ({what}'s is {decomposed_error:.3g}; rounding the cores "
        f"to {dtype} added the rest); pass max_error >= {enough:.2g}, or {way_out}")


def _check_cores(cores: Sequence[torch.Tensor]) -> None:
    """Validate torch cores as :class:`MPO` does (4-D, chained bonds, one float dtype, finite
    values); half-precision cores, which a layer may hold but an MPO may not, are checked
    as float32 copies."""
    cores = [c.detach() for c in cores]
    for k, c in enumerate(cores[1:], 1):
        if c.dtype != cores[0].dtype:
            raise TypeError(f"cores[{k}] has dtype {c.dtype}, cores[0] has {cores[0].dtype}")
    if cores and cores[0].dtype in _HALF:
        cores = [c.float() for c in cores]
    MPO(cores)


def _contract64(cores: Sequence[torch.Tensor], in_dim: int, out_dim: int) -> torch.Tensor:
    """W (in_dim, out_dim) of ``cores``, contracted in float64 (padding sliced off)."""
    shapes = tuple(tuple(int(d) for d in c.shape) for c in cores)
    W = dense_plan(shapes).run_torch(*[c.detach().to(torch.float64) for c in cores])
    W = W.reshape(prod(s[1] for s in shapes), prod(s[2] for s in shapes))
    return W[:in_dim, :out_dim]


def _sites_for(in_shape: Any, out_shape: Any, n_sites: Any) -> int:
    """The ``n_sites`` of a :class:`DecompositionSpec` for these arguments of
    ``from_linear`` / ``from_embedding``: ``n_sites`` (default 5) when both shapes are
    omitted; beside a shape, ``ValueError`` unless it equals that shape's length (as
    :meth:`MPO.from_matrix`)."""
    asked = None if n_sites is None else check_positive_int(n_sites, "n_sites")
    if in_shape is None and out_shape is None:
        return 5 if asked is None else asked
    which = "in_shape" if in_shape is not None else "out_shape"
    n = len(check_shape(in_shape if in_shape is not None else out_shape, which))
    if asked is not None and asked != n:
        raise ValueError(f"n_sites={asked} disagrees with {which}, which has {n} sites; "
                         "give one of them")
    return n


def _check_mode(mode: str) -> str:
    if mode not in cost.MODES:
        raise ValueError(f"mode must be one of {cost.MODES}, got {mode!r}")
    return mode


class ComputedWeightModule(nn.Module):
    """A module whose ``weight`` is computed from its parameters (a property), read-only.

    ``layer.weight = ...`` raises :class:`ReadOnlyWeightError` (``nn.Module`` would raise a
    bare ``KeyError`` for a ``Parameter``, or hide the property behind an attribute), and
    :meth:`_computed_weight` wraps the computed tensor as a :class:`ComputedWeight`, so
    in-place writes into it raise too instead of being silently lost. The base of
    :class:`MPOModule` and of :class:`~tnlm.bridge.pivoted.PivotedLinear`.
    """

    #: the end of the message of :class:`ReadOnlyWeightError` for ``layer.weight = ...``
    weight_write_hint = WEIGHT_WRITE_HINT

    def __setattr__(self, name: str, value: Any) -> None:
        """As ``nn.Module``'s, but ``layer.weight = ...`` raises
        :class:`ReadOnlyWeightError` (the weight is computed from the parameters)."""
        if name == "weight":
            raise ReadOnlyWeightError(f"cannot assign {type(self).__name__}.weight: it "
                                      + self.weight_write_hint)
        super().__setattr__(name, value)

    def _computed_weight(self, W: torch.Tensor) -> ComputedWeight:
        """``W`` as the read-only :class:`ComputedWeight` (autograd through the parameters
        kept)."""
        return W.as_subclass(ComputedWeight)


def check_features(x: Any, in_dim: int) -> None:
    """``ValueError`` unless ``x`` (a layer's input) has a last dimension of size ``in_dim``:
    the message names the input's shape (a 0-d tensor has no last dimension)."""
    if x.dim() == 0:
        raise ValueError(f"input must have a last dimension of size in_features={in_dim} "
                         f"({in_dim} features, shape (..., {in_dim})), got a 0-d tensor "
                         "(shape ())")
    if x.shape[-1] != in_dim:
        raise ValueError(f"input must have last dimension in_features={in_dim} ({in_dim} "
                         f"features), got shape {tuple(x.shape)}")


class MPOModule(ComputedWeightModule):
    """Common part of the MPO layers: cores as parameters, shapes, freezing, merging.

    Args:
        cores: n tensors ``T_k[d_{k-1}, i_k, j_k, d_k]`` (d_0 = d_n = 1).
        in_dim, out_dim: the logical matrix shape (I, J) (<= the site products when padded):
            ints >= 1 or ``None`` (the site products).
        mode: ``"auto"``, ``"contract"`` or ``"dense"`` (see :mod:`tnlm.bridge.cost`).
        cache_dense: (a bool) reuse the W built by the dense path while no core changed
            (see the module docstring; memory: one ``in_dim x out_dim`` tensor per compute
            dtype).

    Raises:
        TypeError: ``in_dim``/``out_dim`` not an int (``bool``, float and str refused),
            ``cache_dense`` not a bool, cores of a non-floating or mixed dtype.
        ValueError: cores that do not chain or hold NaN/Inf, dims that do not fit the
            site shapes, an unknown ``mode``.
    """

    def __init__(self, cores: Sequence[torch.Tensor], in_dim: int | None = None,
                 out_dim: int | None = None, mode: str = "auto",
                 cache_dense: bool = True) -> None:
        super().__init__()
        in_name, out_name = self._DIM_NAMES
        in_dim = None if in_dim is None else check_positive_int(in_dim, in_name)
        out_dim = None if out_dim is None else check_positive_int(out_dim, out_name)
        if not isinstance(cache_dense, bool):
            raise TypeError(f"cache_dense must be a bool, got {cache_dense!r}")
        cores = [c if isinstance(c, torch.Tensor) else torch.as_tensor(c) for c in cores]
        _check_cores(cores)  # shapes, bonds and dtypes
        self.cores = nn.ParameterList(
            [nn.Parameter(c.detach().clone().contiguous()) for c in cores])
        self.in_shape = tuple(int(c.shape[1]) for c in cores)
        self.out_shape = tuple(int(c.shape[2]) for c in cores)
        self.in_dim = prod(self.in_shape) if in_dim is None else in_dim
        self.out_dim = prod(self.out_shape) if out_dim is None else out_dim
        fits = 0 < self.in_dim <= prod(self.in_shape) and 0 < self.out_dim <= prod(self.out_shape)
        if not fits:
            raise ValueError(f"in_dim, out_dim = {self.in_dim}, {self.out_dim} must be positive "
                             f"and fit the site shapes {self.in_shape} x {self.out_shape}")
        self.mode = _check_mode(mode)
        self.cache_dense = cache_dense
        self.last_mode: str | None = None
        self.truncation_error = 0.0
        #: compute dtype -> (copies of the cores W was built from, W)
        self._dense_cache: dict[torch.dtype, tuple[tuple, torch.Tensor]] = {}
        #: products of frozen blocks kept by the training path, ``(dtype, "cr" | "lc")`` ->
        #: (copies of the cores used, product)
        self._block_cache: dict[tuple, tuple[tuple, torch.Tensor]] = {}
        self._resolve()

    #: the module kind this layer replaces (see :mod:`tnlm.bridge.kinds`); merging
    #: returns a plain module of that kind
    kind = "linear"

    #: how errors name the constructor's ``in_dim`` and ``out_dim`` arguments
    _DIM_NAMES = ("in_dim", "out_dim")

    #: train the dense path of an :class:`MPOLinear` through the three-block autograd
    #: function (:mod:`tnlm.bridge.training`: the rebuild and the cores' gradients as planned
    #: GEMMs, see :mod:`tnlm.bridge.cost`); ``False`` (per layer or on the class) runs
    #: autograd through the chain's einsums instead: the same gradients, slower (kept as
    #: the reference)
    block_train = True

    # ------------------------------------------------------------------ building
    @staticmethod
    def from_module(module: nn.Module, spec: DecompositionSpec | None = None,
                    mode: str = "auto") -> MPOModule:
        """The MPO layer replacing ``module`` (``nn.Linear``, transformers' ``Conv1D`` or
        ``nn.Embedding``), decomposed by ``spec`` (default: :class:`DecompositionSpec()`).

        The decomposition runs in float64; the cores are cast to the module's dtype
        and ``truncation_error`` is the relative Frobenius error of the cores actually
        stored (after that cast, contracted in float64) against the module's weight:
        for a float16 / bfloat16 module it includes the rounding of the cores (about
        1e-3 even for an untruncated decomposition), not only what truncation dropped.

        A number ``spec.max_error`` is a promise about the stored cores: when the float64
        decomposition meets it but the cores rounded to the module's dtype do not, this
        raises ``ValueError`` (it does not warn and return a layer breaking the bound).
        A per-bond ``max_error`` sequence bounds each bond's discarded weight, which
        rounding does not change; it is not checked.

        Raises:
            TypeError: ``module`` is not a supported kind, or ``spec`` not a spec.
            ValueError: an unknown ``mode`` (checked before decomposing), unsupported
                ``nn.Embedding`` options, a spec that does not fit
                the weight, or ``max_error`` broken by the cast to the module's dtype
                (the message gives the error reached and the way out: a larger
                ``max_error``, or decomposing a float32 copy of the module).
        """
        kind = kinds.kind_of(module)
        if kind is None:
            raise TypeError("module must be an nn.Linear, transformers Conv1D or nn.Embedding, "
                            f"got {type(module).__name__}")
        spec = DecompositionSpec() if spec is None else spec
        if not isinstance(spec, DecompositionSpec):
            raise TypeError(f"spec must be a DecompositionSpec, got {type(spec).__name__}")
        _check_mode(mode)  # before the decomposition, not after it
        W = kinds.weight_xw(module)
        mpo = spec.decompose(W.to(torch.float64))
        dtype, device = module.weight.dtype, module.weight.device
        if kind == "embedding":
            extras = kinds.extras_of(module)
            # each option against its own default (max_norm=2.0 is not norm_type's 2.0;
            # norm_type means nothing without max_norm)
            unsupported = {k: extras[k] for k in ("max_norm", "scale_grad_by_freq", "sparse")
                           if (extras[k] is not None if k == "max_norm" else bool(extras[k]))}
            if unsupported:
                raise ValueError(f"nn.Embedding options {unsupported} are not supported by "
                                 "MPOEmbedding; build the embedding without them")
            layer = MPOEmbedding.from_mpo(mpo, extras["padding_idx"], mode, dtype=dtype)
        else:
            layer = MPOLinear.from_mpo(mpo, module.bias, mode, dtype=dtype, kind=kind)
        layer.truncation_error = layer.measured_error(W)
        _check_cast_error(spec.max_error, layer.truncation_error, mpo.truncation_error, dtype)
        return layer.to(device)

    @torch.no_grad()
    def measured_error(self, W: torch.Tensor) -> float:
        """||W - W(cores)||_F / ||W||_F of the stored cores against W (in, out), in float64.

        Raises:
            TypeError: ``W`` is not a real torch tensor.
            ValueError: ``W`` is not of shape ``(in_dim, out_dim)`` (an ``nn.Linear``
                stores its weight as (out, in): pass ``linear.weight.T``), or holds NaN/Inf.
        """
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"W must be a torch tensor (in_dim, out_dim), got {type(W).__name__}")
        if tuple(W.shape) != (self.in_dim, self.out_dim):
            raise ValueError(
                f"W must have shape (in_dim, out_dim) = ({self.in_dim}, {self.out_dim}), got "
                f"{tuple(W.shape)}; for an nn.Linear pass linear.weight.T (nn.Linear stores "
                "its weight as (out_features, in_features))")
        W = W.detach()
        W = check_matrix(W.to(torch.float64) if W.is_floating_point() else W, "W")
        approx = _contract64(list(self.cores), self.in_dim, self.out_dim).to(W.device)
        norm = float(torch.linalg.norm(W))
        return float(torch.linalg.norm(W - approx)) / norm if norm > 0 else 0.0

    # ------------------------------------------------------------------ description
    def structure(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild an empty shell of this layer
        (:meth:`from_structure`): kind, dims, core shapes, bias, options."""
        return dict(kind=self.kind, in_dim=self.in_dim, out_dim=self.out_dim,
                    core_shapes=[list(s) for s in self.core_shapes],
                    bias=getattr(self, "bias", None) is not None,
                    padding_idx=getattr(self, "padding_idx", None), mode=self.mode,
                    truncation_error=float(self.truncation_error))

    @staticmethod
    def from_structure(spec: dict[str, Any], dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> MPOModule:
        """An MPO layer of the shape ``spec`` (from :meth:`structure`) with zero cores,
        ready for ``load_state_dict``."""
        kind = kinds.get_kind(spec["kind"]).name
        cores = [torch.zeros(s, dtype=dtype) for s in spec["core_shapes"]]
        if kind == "embedding":
            layer = MPOEmbedding(cores, spec["in_dim"], spec["out_dim"], spec.get("padding_idx"),
                                 spec.get("mode", "auto"))
        else:
            bias = torch.zeros(spec["out_dim"], dtype=dtype) if spec["bias"] else None
            layer = MPOLinear(cores, bias, spec["in_dim"], spec["out_dim"],
                              spec.get("mode", "auto"), kind=kind)
        layer.truncation_error = float(spec.get("truncation_error", 0.0))
        return layer.to(device) if device is not None else layer

    def merge(self) -> nn.Module:
        """A plain module of :attr:`kind` with the dense weight (exact up to the rounding
        of the contraction)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ structure
    @property
    def n_sites(self) -> int:
        return len(self.cores)

    @property
    def core_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(d) for d in c.shape) for c in self.cores)

    @property
    def bond_dims(self) -> tuple[int, ...]:
        return tuple(s[3] for s in self.core_shapes[:-1])

    @property
    def central_index(self) -> int:
        """The central tensor (middle site; see :func:`tnlm.core.mpo.central_site`)."""
        return central_site([prod(s) for s in self.core_shapes])

    @property
    def auxiliary_indices(self) -> tuple[int, ...]:
        return tuple(k for k in range(self.n_sites) if k != self.central_index)

    def central_parameters(self) -> list[nn.Parameter]:
        return [self.cores[self.central_index]]

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return [self.cores[k] for k in self.auxiliary_indices]

    @property
    def num_central_params(self) -> int:
        return sum(p.numel() for p in self.central_parameters())

    @property
    def num_auxiliary_params(self) -> int:
        return sum(p.numel() for p in self.auxiliary_parameters())

    # ------------------------------------------------------------------ fine-tuning
    def freeze_central(self) -> MPOModule:
        """Freeze the central tensor (``requires_grad=False``); other parameters unchanged."""
        for p in self.central_parameters():
            p.requires_grad_(False)
        return self

    def train_auxiliary_only(self) -> MPOModule:
        """The paper's lightweight fine-tuning: central tensor frozen, auxiliary tensors
        (and the bias, if any) trainable."""
        for p in self.parameters():
            p.requires_grad_(True)
        return self.freeze_central()

    def unfreeze(self) -> MPOModule:
        for p in self.parameters():
            p.requires_grad_(True)
        return self

    # ------------------------------------------------------------------ plans and cache
    def _resolve(self) -> None:
        """Resolve the plans and the mode costs for the current core shapes (when the cores
        are set; a forward pass only checks the shapes) and drop the dense cache."""
        shapes = self.core_shapes
        self._plans: ChainPlans = chain_plans(shapes)
        self._cost: cost.ForwardCost = cost.forward_cost(shapes, self.in_dim, self.out_dim)
        centre = central_site([prod(s) for s in shapes])
        self._train: cost.TrainCost = cost.train_cost(shapes, centre)
        self._blocks: BlockPlan = self._train.blocks
        self.invalidate_cache()

    def _params(self) -> tuple[nn.Parameter, ...]:
        """The cores, checked against the resolved plans (re-resolved if a core was
        replaced by one of another shape: ``ValueError`` naming ``cores[k]`` unless the
        shapes still form a chain with the layer's site shapes, as :meth:`set_cores`)."""
        ps = tuple(self._modules["cores"]._parameters.values())
        if tuple([p.shape for p in ps]) != self._plans.core_shapes:
            self._check_sites(check_chain([p.shape for p in ps], "cores"))
            self._resolve()
        return ps

    def _check_sites(self, shapes: Sequence[Sequence[int]]) -> None:
        """``ValueError`` unless chained core ``shapes`` keep the layer's sites: as many
        cores as ``in_shape`` has sites, core ``k``'s legs ``(i, j)`` equal to site ``k`` of
        ``in_shape`` / ``out_shape`` (the message names ``cores[k]``)."""
        if len(shapes) != len(self.in_shape):
            raise ValueError(f"cores must have {len(self.in_shape)} sites (the layer's "
                             f"in_shape {self.in_shape}), got {len(shapes)}")
        for k, s in enumerate(shapes):
            if (s[1], s[2]) != (self.in_shape[k], self.out_shape[k]):
                raise ValueError(
                    f"cores must keep the layer's site shapes: cores[{k}] has site legs "
                    f"(i, j) = {(s[1], s[2])} (shape {tuple(s)}); expected "
                    f"{(self.in_shape[k], self.out_shape[k])}, site {k} of its in_shape "
                    f"{self.in_shape} and out_shape {self.out_shape}")

    def invalidate_cache(self) -> None:
        """Drop the cached dense W and the cached products of frozen blocks (frees their
        memory; never needed for correctness: a cache hit checks the cores' values)."""
        self._dense_cache.clear()
        self._block_cache.clear()

    def _may_cache(self, cores: Sequence[nn.Parameter]) -> bool:
        """Whether this call may reuse a cached W: caching on, not traced, and autograd
        needs no graph through the cores (grad mode off, or every core frozen)."""
        if not self.cache_dense:
            return False
        if torch.is_grad_enabled() and any(c.requires_grad for c in cores):
            return False
        return not _compiling()

    def _build_dense(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dense_matrix(dtype)

    def _cached_dense(self, dtype: torch.dtype, cores: Sequence[nn.Parameter]) -> torch.Tensor:
        """:meth:`dense_matrix` in ``dtype``, rebuilt unless every core is bitwise what the
        cached W was built from (detached)."""
        hit = self._dense_cache.get(dtype)
        if hit is not None and unchanged(hit[0], cores):
            return hit[1]
        self._dense_cache.pop(dtype, None)
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, reusable anywhere
            W = self._build_dense(dtype)
        self._dense_cache[dtype] = (snapshot(cores), W)
        return W

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        self.invalidate_cache()  # .to(), .half(), .cuda(), ...: new storages and dtypes
        return super()._apply(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # pickling and deepcopy leave the caches behind
        state["_dense_cache"] = {}
        state["_block_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_block_cache", {})  # pickles of layers from before the block cache
        super().__setstate__(state)
        if "_train" not in self.__dict__:
            self._resolve()

    # ------------------------------------------------------------------ contraction
    def _compute_dtype(self, x: torch.Tensor | None = None) -> torch.dtype:
        device = self.cores[0].device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.cores[0].dtype

    def _cores_as(self, dtype: torch.dtype) -> list[torch.Tensor]:
        return [c if c.dtype == dtype else c.to(dtype) for c in self.cores]

    def dense_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W of shape (in_dim, out_dim), contracted along the planned path (differentiable;
        never cached)."""
        self._params()
        plans = self._plans
        cores = self._cores_as(dtype or self.cores[0].dtype)
        W = plans.dense.run_torch(*[c.reshape(v) for c, v in zip(cores, plans.core_views)])
        W = W.reshape(prod(self.in_shape), prod(self.out_shape))
        return W[: self.in_dim, : self.out_dim]

    def choose_mode(self, rows: int, rebuild: bool | None = None) -> tuple[str, int, int]:
        """``(mode, contract_flops, dense_flops)`` that ``mode="auto"`` uses for ``rows`` rows.

        ``rebuild``: whether the dense path pays the rebuild of W; default: as a forward
        pass would now (not when it may reuse a cached W, see :meth:`_may_cache`).
        """
        rows = check_size(rows, "rows")
        cores = self._params()
        if rebuild is None:
            rebuild = not self._may_cache(cores)
        return self._cost.flops(rows, rebuild)

    def to_mpo(self) -> MPO:
        """The core :class:`~tnlm.core.mpo.MPO` of the current (trained) cores, detached
        (half-precision cores are upcast to float32, which the factorizations need)."""
        cores = [c.detach().clone() for c in self.cores]
        if cores[0].dtype in _HALF:
            cores = [c.float() for c in cores]
        return MPO(cores, in_dim=self.in_dim, out_dim=self.out_dim)

    @torch.no_grad()
    def set_cores(self, cores: Sequence[torch.Tensor]) -> None:
        """Replace the cores (shapes may change, e.g. after truncation); keeps requires_grad
        of each site's parameter. Optimizers holding the old parameters must be rebuilt."""
        flags = [p.requires_grad for p in self.cores]
        _check_cores(cores)
        self._check_sites([tuple(int(d) for d in c.shape) for c in cores])
        old_central = self.central_index
        device, dtype = self.cores[0].device, self.cores[0].dtype
        self.cores = nn.ParameterList(
            [nn.Parameter(c.detach().to(device=device, dtype=dtype).clone().contiguous(),
                          requires_grad=f) for c, f in zip(cores, flags)])
        self._resolve()
        new_central = self.central_index
        if new_central != old_central:  # the role moved (even n): the flags move with it
            a, b = self.cores[old_central], self.cores[new_central]
            a_flag, b_flag = a.requires_grad, b.requires_grad
            a.requires_grad_(b_flag)
            b.requires_grad_(a_flag)

    @torch.no_grad()
    def retruncate(self, max_bond: Any = None, cutoff: Any = None, max_error: Any = None, *,
                   gauge: str = "symmetric") -> float:
        """Truncate the current cores in canonical form and put them back in ``gauge``.

        Policies as in :meth:`MPO.truncate` (relative to the current W). Returns the
        relative error of this cut, ``||W - W'||_F / ||W||_F`` (exact) for the layer's
        W (in_dim, out_dim) and the cores as stored: for a zero-padded layer, measured on
        W itself, not on the padded matrix the policies see; for float16 / bfloat16
        cores (cut in float32, then rounded back), including that rounding, as
        :meth:`from_module` does. ``truncation_error`` is not changed (the caller knows
        the reference). Optimizers holding the old parameters must be rebuilt.

        Raises:
            ValueError: a number ``max_error`` that the float32 cut meets but the cores
                rounded to half precision break (the layer is left unchanged).
        """
        dtype = self.cores[0].dtype
        padded = math.prod(self.in_shape) != self.in_dim or \
            math.prod(self.out_shape) != self.out_dim
        measure = padded or dtype in _HALF
        before = _contract64(list(self.cores), self.in_dim, self.out_dim) if measure else None
        mpo = self.to_mpo().to_backend("pytorch").truncate(max_bond, cutoff, max_error)
        mpo = apply_gauge(mpo, gauge)
        cores = [c.to(dtype) for c in mpo.cores]  # as set_cores will store them
        if before is None:
            err = float(mpo.truncation_error)
        else:
            after = _contract64(cores, self.in_dim, self.out_dim)
            norm = float(torch.linalg.norm(before))
            err = float(torch.linalg.norm(before - after)) / norm if norm else 0.0
            _check_cast_error(max_error, err, float(mpo.truncation_error), dtype,
                              what="the float32 cut",
                              way_out="convert the layer to float32 first (layer.float())")
        self.set_cores(cores)
        return err

    def extra_repr(self) -> str:
        return (f"in={self.in_dim}, out={self.out_dim}, in_shape={self.in_shape}, "
                f"out_shape={self.out_shape}, bond_dims={self.bond_dims}, "
                f"central={self.central_index}, mode={self.mode}"
                + ("" if self.cache_dense else ", cache_dense=False"))


class MPOLinear(MPOModule):
    """A drop-in for ``nn.Linear`` whose weight is an MPO: ``y = x @ W + b``, W (in, out).

    Build with :meth:`from_linear` or :meth:`from_mpo`. Untruncated, its output
    equals the original layer's to float32 rounding.
    """

    _DIM_NAMES = ("in_features", "out_features")

    def __init__(self, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None,
                 in_features: int | None = None, out_features: int | None = None,
                 mode: str = "auto", kind: str = "linear", cache_dense: bool = True) -> None:
        super().__init__(cores, in_features, out_features, mode, cache_dense)
        if kind not in kinds.MATRIX_KINDS:
            raise ValueError(f"kind must be one of {kinds.MATRIX_KINDS}, got {kind!r}")
        self.kind = kind
        if bias is not None:
            bias = torch.as_tensor(bias)
            if bias.shape != (self.out_dim,):
                raise ValueError(f"bias must have shape ({self.out_dim},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone().to(self.cores[0].dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def in_features(self) -> int:
        return self.in_dim

    @property
    def out_features(self) -> int:
        return self.out_dim

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight in ``nn.Linear`` layout (out_features, in_features), computed
        from the cores at each access (differentiable). Read-only: assigning it or
        writing into it in place raises :class:`ReadOnlyWeightError` (see
        :class:`ComputedWeight`); use :meth:`merge` for a dense module to edit."""
        return self._computed_weight(self.dense_matrix().T)

    @classmethod
    def from_mpo(cls, mpo: MPO, bias: Any = None, mode: str = "auto",
                 dtype: torch.dtype | None = None, kind: str = "linear") -> MPOLinear:
        """A layer computing ``x @ W(mpo) + bias``; cores taken as they are (no re-gauging).
        ``kind`` is what :meth:`merge` returns: ``"linear"`` or ``"conv1d"``.

        ``truncation_error`` is ``mpo.truncation_error`` (this does not know the matrix the
        MPO came from, so a cast to ``dtype`` is not counted; :meth:`MPOModule.from_module`
        measures the stored cores, and :meth:`MPOModule.measured_error` does so for any W)."""
        layer = cls(_torch_cores(mpo, dtype), bias, mpo.in_dim, mpo.out_dim, mode, kind)
        layer.truncation_error = mpo.truncation_error
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_shape: Sequence[int] | None = None,
                    out_shape: Sequence[int] | None = None, n_sites: int | None = None, *,
                    max_bond: Any = None, cutoff: Any = None, max_error: Any = None,
                    gauge: str = "symmetric", mode: str = "auto", pad: bool = False
                    ) -> MPOLinear:
        """Decompose ``linear.weight.T`` (in, out) into an MPO layer: shorthand for
        :meth:`MPOModule.from_module` with a :class:`~tnlm.core.spec.DecompositionSpec`
        of these arguments (shapes factor in/out features; policies as in
        :meth:`tnlm.MPO.from_matrix`; ``gauge`` as in :func:`~tnlm.core.spec.apply_gauge`).
        ``n_sites``: the number of sites when both shapes are omitted (default 5); given
        beside a shape, it must equal that shape's length (``ValueError`` otherwise, as
        :meth:`tnlm.MPO.from_matrix`).

        For a float16 / bfloat16 ``linear``, ``truncation_error`` includes the rounding of
        the stored cores, and a ``max_error`` the rounded cores break raises ``ValueError``
        (see :meth:`MPOModule.from_module`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        n_sites = _sites_for(in_shape, out_shape, n_sites)
        spec = DecompositionSpec(in_shape, out_shape, n_sites, max_bond, cutoff, max_error,
                                 pad, gauge)
        return MPOModule.from_module(linear, spec, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W + b`` for ``x`` of shape ``(..., in_features)``, with ``nn.Linear``'s
        dtype rules: outside autocast ``x`` must have the parameters' dtype; under
        ``torch.autocast`` the output has the dtype ``nn.Linear``'s would have.

        Raises:
            MPODtypeError: (a ``RuntimeError``, as ``nn.Linear``'s, and a ``TypeError``)
                the input's dtype does not fit the parameters' (float64, integer, bool or
                complex input to float32 cores, ...); the message names both dtypes.
            ValueError: the last dimension is not ``in_features``, or a 0-d input (no
                last dimension); the message names the input's shape.
        """
        check_features(x, self.in_dim)
        cores = self._params()
        lead = x.shape[:-1]
        rows = prod(lead)
        cached = self._may_cache(cores)
        mode, path = self.mode, None
        if mode == "auto":
            mode, path = self._cost.choose(max(rows, 1), rebuild=not cached)
        elif mode == "contract":
            path = self._cost.contract_path(max(rows, 1))
        if self.last_mode != mode:
            self.last_mode = mode
        dtype = _linear_dtype(self, x.dtype, cores[0].dtype, cores[0].device.type)
        if x.dtype != dtype:  # autocast: the input's cast, as nn.Linear's
            x = x.to(dtype)
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if mode == "dense":
            if not cached and self.block_train and torch.is_grad_enabled() and \
                    any(c.requires_grad for c in cores) and not _compiling() and \
                    not _transforming():
                return self._train_dense(x, cores, dtype, bias, lead, rows)
            W = self._cached_dense(dtype, cores) if cached else self.dense_matrix(dtype)
            return F.linear(x, W.T, bias)
        plans = self._plans
        if plans.low_rank:  # (x @ A) @ B + b: two GEMMs, no einsum, any leading dims
            A = cores[0] if cores[0].dtype == dtype else cores[0].to(dtype)
            B = cores[1] if cores[1].dtype == dtype else cores[1].to(dtype)
            A = A.reshape(plans.in_size, -1)[: self.in_dim]
            B = B.reshape(-1, plans.out_size)[:, : self.out_dim]
            return F.linear(torch.matmul(x, A), B.T, bias)
        if rows == 0:
            y = x.new_zeros(*lead, self.out_dim)
            return y if bias is None else y + bias
        xb = x.reshape(rows, self.in_dim)
        if self.in_dim != plans.in_size:
            xb = F.pad(xb, (0, plans.in_size - self.in_dim))
        ops = [(c if c.dtype == dtype else c.to(dtype)).reshape(v)
               for c, v in zip(cores, plans.core_views)]
        ops.append(xb.reshape(rows, *plans.x_view))
        y = path.plan.run_torch(*ops)
        if self.out_dim != plans.out_size:
            y = y.reshape(rows, plans.out_size)[:, : self.out_dim]
        y = y.reshape(*lead, self.out_dim)
        return y if bias is None else y + bias

    def _train_dense(self, x: torch.Tensor, cores: Sequence[nn.Parameter], dtype: torch.dtype,
                     bias: torch.Tensor | None, lead: tuple, rows: int) -> torch.Tensor:
        """The dense path when a core needs a gradient: :func:`~tnlm.bridge.training.block_linear`
        on the blocks ``L · C · R`` around the central site, in the order and gradient route
        :class:`~tnlm.bridge.cost.TrainCost` finds cheapest for this call; a product of
        frozen blocks (``L·C`` or ``C·R``) is cached while its cores do not change."""
        bp = self._blocks
        c = bp.centre
        ops = [t if t.dtype == dtype else t.to(dtype) for t in cores]
        need_l = any(t.requires_grad for t in cores[:c])
        need_c = cores[c].requires_grad
        need_r = any(t.requires_grad for t in cores[c + 1:])
        xb = x.reshape(rows, self.in_dim)
        frozen = None
        if self.cache_dense and not need_c and not (need_l and need_r):
            frozen = "lc" if not need_l else "cr"
        strategy = self._train.choose(rows, xb.requires_grad, need_l, need_c, need_r, frozen)
        L, R = training.left_block(bp, ops), training.right_block(bp, ops)
        product = None
        if frozen is not None and strategy.order == frozen:
            product = self._frozen_product(frozen, dtype, cores, L, ops[c], R)
        y = training.block_linear(xb, L, ops[c], R, bias, product, bp, strategy, self.in_dim,
                                  self.out_dim)
        return y.reshape(*lead, self.out_dim)

    def _frozen_product(self, which: str, dtype: torch.dtype, cores: Sequence[nn.Parameter],
                        L: torch.Tensor, C: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``L·C`` (``which="lc"``) or ``C·R`` of frozen cores, rebuilt only when one of them
        changed (checked as the dense cache: against copies of the cores used)."""
        c = self._blocks.centre
        used = cores[: c + 1] if which == "lc" else cores[c:]
        hit = self._block_cache.get((dtype, which))
        if hit is not None and unchanged(hit[0], used):
            return hit[1]
        self._block_cache.pop((dtype, which), None)
        with torch.no_grad():
            product = training.block_product(self._blocks, which, L.detach(), C.detach(),
                                             R.detach())
        self._block_cache[(dtype, which)] = (snapshot(used), product)
        return product

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Merge back into a plain ``nn.Linear`` (whatever :attr:`kind`; see :meth:`merge`)."""
        return kinds.dense_module("linear", self.dense_matrix(), self.bias)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Merge back into the kind this layer replaced (``nn.Linear`` or ``Conv1D``)."""
        return kinds.dense_module(self.kind, self.dense_matrix(), self.bias)


class MPOEmbedding(MPOModule):
    """A drop-in for ``nn.Embedding`` whose table E (num_embeddings, embedding_dim) is an MPO.

    Lookups gather each token's row from the cores without densifying the table
    when that is cheaper (``mode="contract"``; :meth:`choose_mode` compares the
    planned FLOPs). As with ``nn.Embedding``, tokens equal to ``padding_idx`` send
    no gradient (in both modes); but that row is a contraction of shared cores, so
    training other rows can still change it. Lookups ignore autocast (fp32 out
    for fp32 cores), as ``nn.Embedding`` does.

    In eval (no grad, or frozen cores) with ``cache_dense`` (default) and ``mode`` auto
    or dense, a lookup is ``F.embedding`` on the cached table: as fast as
    ``nn.Embedding``, at the memory of its table. Under ``torch.compile`` the ids are
    not range-checked (``F.embedding`` checks them in eager) and the gather path
    contracts every id (no de-duplication, whose output size depends on the data).
    """

    _DIM_NAMES = ("num_embeddings", "embedding_dim")

    def __init__(self, cores: Sequence[torch.Tensor], num_embeddings: int | None = None,
                 embedding_dim: int | None = None, padding_idx: int | None = None,
                 mode: str = "auto", cache_dense: bool = True) -> None:
        super().__init__(cores, num_embeddings, embedding_dim, mode, cache_dense)
        self.kind = "embedding"
        n = self.in_dim
        if padding_idx is not None:  # as nn.Embedding: an int in [-n, n), stored >= 0
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)) \
                    or not -n <= padding_idx < n:
                raise ValueError(f"padding_idx must be None or an int in [-{n}, {n}) "
                                 f"(num_embeddings {n}), got {padding_idx!r}")
            padding_idx = int(padding_idx) % n
        self.padding_idx = padding_idx
        strides = np.cumprod((1,) + self.in_shape[::-1][:-1])[::-1]
        self.register_buffer("_strides", torch.as_tensor(strides.copy()), persistent=False)
        self.register_buffer("_radix", torch.as_tensor(self.in_shape), persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self.in_dim

    @property
    def embedding_dim(self) -> int:
        return self.out_dim

    @property
    def weight(self) -> torch.Tensor:
        """The dense table (num_embeddings, embedding_dim), computed from the cores at each
        access. Read-only as :attr:`MPOLinear.weight`."""
        return self._computed_weight(self.dense_matrix())

    @classmethod
    def from_mpo(cls, mpo: MPO, padding_idx: int | None = None, mode: str = "auto",
                 dtype: torch.dtype | None = None) -> MPOEmbedding:
        """A table ``W(mpo)``; cores taken as they are. ``truncation_error`` is
        ``mpo.truncation_error`` (a cast to ``dtype`` is not counted; see
        :meth:`MPOLinear.from_mpo`)."""
        layer = cls(_torch_cores(mpo, dtype), mpo.in_dim, mpo.out_dim, padding_idx, mode)
        layer.truncation_error = mpo.truncation_error
        return layer

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, in_shape: Sequence[int] | None = None,
                       out_shape: Sequence[int] | None = None, n_sites: int | None = None, *,
                       max_bond: Any = None, cutoff: Any = None, max_error: Any = None,
                       gauge: str = "symmetric", mode: str = "auto", pad: bool = True
                       ) -> MPOEmbedding:
        """Decompose ``embedding.weight`` (vocab, dim); the vocabulary is zero-padded to a
        factorizable size by default (``pad=True``, e.g. 30522 -> 30720). ``n_sites`` as in
        :meth:`MPOLinear.from_linear`. Shorthand for
        :meth:`MPOModule.from_module` (half precision: ``truncation_error`` includes the
        rounding of the stored cores; a ``max_error`` they break raises ``ValueError``)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        n_sites = _sites_for(in_shape, out_shape, n_sites)
        spec = DecompositionSpec(in_shape, out_shape, n_sites, max_bond, cutoff, max_error,
                                 pad, gauge)
        return MPOModule.from_module(embedding, spec, mode)

    #: The gather path runs many small batched matmuls: measured ~10x fewer FLOP/s than
    #: the dense rebuild's large GEMMs on MiniLM's table (benchmarks/bench_layers.py).
    GATHER_EFFICIENCY = 8.0

    def choose_mode(self, rows: int, rebuild: bool | None = None) -> tuple[str, int, int]:
        """``(mode, gather_flops, dense_flops)`` for ``rows`` distinct token ids: per-token
        chain contractions vs rebuilding E. The gather FLOPs are weighted by
        :attr:`GATHER_EFFICIENCY` before comparing. ``rebuild``: whether the dense path
        pays the rebuild (default: as a forward pass would now; a cached table costs 0)."""
        return self._choose_mode(check_size(rows, "rows"), rebuild)

    def _choose_mode(self, rows: int, rebuild: bool | None) -> tuple[str, int, int]:
        cores = self._params()
        if rebuild is None:
            rebuild = not self._may_cache(cores)
        gather = self._plans.gather_row_flops * rows
        dense = self._cost.rebuild_flops if rebuild else 0
        mode = "contract" if gather * self.GATHER_EFFICIENCY < dense else "dense"
        return mode, gather, dense

    def _build_dense(self, dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(self.cores[0].device.type, enabled=False):
            return self.dense_matrix(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of the table for integer token ids ``ids`` (any shape): output
        ``(*ids.shape, embedding_dim)`` in the cores' dtype (autocast is ignored).

        Raises:
            MPODtypeError: ``ids`` is not int64 or int32 (``nn.Embedding`` accepts only
                those and raises ``RuntimeError`` otherwise; so does this, the error
                being also a ``TypeError``).
            IndexError: an id out of ``[0, num_embeddings)``.
        """
        if ids.dtype not in _INDEX_DTYPES:
            raise MPODtypeError(
                f"MPOEmbedding: input must hold integer token ids of dtype torch.int64 or "
                f"torch.int32, as for nn.Embedding, got dtype {ids.dtype}; call .long() on "
                "the input")
        cores = self._params()
        if self.mode != "contract" and self._may_cache(cores):
            # eval: a plain lookup in the cached table
            if self.last_mode != "dense":
                self.last_mode = "dense"
            table = self._cached_dense(cores[0].dtype, cores)
            try:
                return F.embedding(ids, table, self.padding_idx)
            except IndexError:
                self._check_range(ids)
                raise
        with torch.autocast(cores[0].device.type, enabled=False):
            return self._lookup(ids, cores)

    def _check_range(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.in_dim):
            raise IndexError(f"token ids must be in [0, {self.in_dim}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def _lookup(self, ids: torch.Tensor, cores: Sequence[nn.Parameter]) -> torch.Tensor:
        compiling = _compiling()
        if not compiling:
            self._check_range(ids)
        flat = ids.reshape(-1).long()
        if compiling:  # no data-dependent shapes in a traced graph: every id is contracted
            uniq, inverse, rows = flat, None, flat.shape[0]
        else:
            uniq, inverse = torch.unique(flat, return_inverse=True)
            rows = int(uniq.numel())
        mode = self.mode if self.mode != "auto" else self._choose_mode(max(rows, 1), True)[0]
        if self.last_mode != mode:
            self.last_mode = mode
        dtype = cores[0].dtype  # like nn.Embedding, lookups ignore autocast
        if mode == "dense":
            return F.embedding(ids, self.dense_matrix(dtype), self.padding_idx)
        if rows == 0:
            return cores[0].new_zeros(*ids.shape, self.out_dim)
        # each distinct id's row: its mixed-radix digits select one in-slice per core
        # (an embedding lookup in the core's (i, d j d') unfolding: index_select's backward
        # corrupted the heap under torch.compile/inductor 2.13 in a batched einsum chain)
        digits = (uniq[:, None] // self._strides) % self._radix
        slices = [F.embedding(digits[:, k], c.transpose(0, 1).reshape(c.shape[1], -1))
                  .reshape(rows, c.shape[0], c.shape[2], c.shape[3])
                  for k, c in enumerate(cores)]
        y = self._plans.gather.run_torch(*slices)
        y = y.reshape(rows, self._plans.out_size)
        y = (y if inverse is None else y[inverse])[:, : self.out_dim]
        y = y.reshape(*ids.shape, self.out_dim)
        if self.padding_idx is not None:
            # as F.embedding does for the dense path: padding tokens send no gradient
            pad = (ids == self.padding_idx).unsqueeze(-1)
            y = torch.where(pad, y.detach(), y)
        return y

    @torch.no_grad()
    def to_embedding(self) -> nn.Embedding:
        """Merge back into a plain ``nn.Embedding``."""
        return kinds.dense_module("embedding", self.dense_matrix(), None,
                                  {"padding_idx": self.padding_idx})

    merge = to_embedding


def invalidate_caches(model: nn.Module) -> int:
    """Free the cached dense W (and cached products) of every MPO layer in ``model``
    (:meth:`MPOModule.invalidate_cache`), leaving caching on; returns the number of
    layers. Before training, the caches an evaluation left are the memory of the dense
    layers the MPO layers replaced, and stale after the first step."""
    n = 0
    for m in model.modules():
        if isinstance(m, MPOModule):
            m.invalidate_cache()
            n += 1
    return n


def set_dense_cache(model: nn.Module, enabled: bool) -> int:
    """Turn the dense-W cache of every MPO layer in ``model`` on or off (off also frees
    the cached tensors); returns the number of layers changed. ``TypeError`` unless
    ``enabled`` is a bool."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, MPOModule):
            m.cache_dense = enabled
            if not enabled:
                m.invalidate_cache()
            n += 1
    return n
