"""The module kinds an MPO can replace, and which way each stores its weight.

tnlm's convention is ``y = x @ W`` with W of shape (in, out). Each kind knows
how to read W from a module of its type and how to build a plain module of its
type back from W, so that merging returns what was decomposed:

=============  ==============================  ==================  ===============
kind           module type                     stored weight       W (in, out)
=============  ==============================  ==================  ===============
``linear``     ``torch.nn.Linear``             (out, in)           ``weight.T``
``conv1d``     ``transformers...Conv1D``       (in, out)           ``weight``
``embedding``  ``torch.nn.Embedding``          (vocab, dim)        ``weight``
=============  ==============================  ==================  ===============

This is the only module that knows these orientations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Kind", "KINDS", "ALL_KINDS", "MATRIX_KINDS", "kind_of", "get_kind", "describe_kinds",
           "weight_xw", "dense_module", "own_forward_error"]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


@dataclass(frozen=True)
class Kind:
    """One supported module kind.

    Attributes:
        name: ``"linear"``, ``"conv1d"`` or ``"embedding"``.
        module_type: returns the torch class (or ``None`` when unavailable).
        transposed: True when the stored weight is W.T (``nn.Linear``).
        build: ``build(in_dim, out_dim, bias, extras, device, dtype)`` -> an empty module.
        label: how messages name the module type (``"nn.Linear"``, ``"Conv1D"``, ...).
    """

    name: str
    module_type: Callable[[], type | None]
    transposed: bool
    build: Callable[..., nn.Module]
    label: str = ""

    def matches(self, module: nn.Module) -> bool:
        t = self.module_type()
        return t is not None and isinstance(module, t)


def _build_linear(in_dim, out_dim, bias, extras, device, dtype) -> nn.Module:
    return nn.Linear(in_dim, out_dim, bias=bias, device=device, dtype=dtype)


def _build_conv1d(in_dim, out_dim, bias, extras, device, dtype) -> nn.Module:
    m = _conv1d_type()(out_dim, in_dim).to(device=device, dtype=dtype)
    if not bias:
        m.bias = None
    return m


def _build_embedding(in_dim, out_dim, bias, extras, device, dtype) -> nn.Module:
    return nn.Embedding(in_dim, out_dim, device=device, dtype=dtype, **extras)


KINDS: dict[str, Kind] = {
    "linear": Kind("linear", lambda: nn.Linear, True, _build_linear, "nn.Linear"),
    "conv1d": Kind("conv1d", _conv1d_type, False, _build_conv1d, "Conv1D"),
    "embedding": Kind("embedding", lambda: nn.Embedding, False, _build_embedding, "nn.Embedding"),
}

#: every kind name, in the order of :data:`KINDS`
ALL_KINDS: tuple[str, ...] = tuple(KINDS)
#: the kinds whose weight is a linear map applied to activations (not a lookup table)
MATRIX_KINDS: tuple[str, ...] = ("linear", "conv1d")

#: nn.Embedding options kept through decomposition and merging
EMBEDDING_EXTRAS = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


def kind_of(module: nn.Module) -> str | None:
    """The kind name of ``module``, or ``None`` if no MPO can replace it."""
    for kind in KINDS.values():
        if kind.matches(module):
            return kind.name
    return None


#: subclasses whose own ``forward`` computes the plain product all the same (checked in
#: their source): FalconLinear is ``input @ weight.T + bias``
PLAIN_SUBCLASSES = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})


def own_forward_error(module: nn.Module, name: str) -> str | None:
    """Why ``module`` (called ``name`` in messages) cannot be replaced by an MPO layer
    although :func:`kind_of` recognises it, or ``None`` when it can: a subclass of its
    kind's type with a ``forward`` of its own (Gemma's ``ScaledWordEmbedding`` multiplies
    the rows by ``embed_scale``; OPT's learned positions take ``position_ids`` and add an
    offset). An MPO layer computes the plain lookup / product, so the replacement would
    silently compute something else."""
    kind = kind_of(module)
    if kind is None:
        return None
    base, cls = KINDS[kind].module_type(), type(module)
    if cls.forward is base.forward or f"{cls.__module__}.{cls.__qualname__}" in PLAIN_SUBCLASSES:
        return None
    return (f"module {name!r} is a {type(module).__name__}, a subclass of "
            f"{KINDS[kind].label} with a forward of its own; an MPO layer computes only the "
            f"plain {KINDS[kind].label}, so the model would silently compute something else")


def get_kind(name: str) -> Kind:
    """The :class:`Kind` called ``name``; ``ValueError`` for an unknown name."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"kind must be one of {ALL_KINDS}, got {name!r}") from None


def describe_kinds(kinds: tuple[str, ...] = ALL_KINDS) -> str:
    """The module types of ``kinds`` for a message: ``"nn.Linear, Conv1D or nn.Embedding"``
    (``MATRIX_KINDS``: ``"nn.Linear or Conv1D"``)."""
    labels = [get_kind(k).label for k in kinds]
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} or {labels[-1]}"


def weight_xw(module: nn.Module) -> torch.Tensor:
    """W (in, out) of ``module`` in the ``y = x @ W`` convention (a detached view)."""
    name = kind_of(module)
    if name is None:
        raise TypeError(f"module must be one of {ALL_KINDS}, got {type(module).__name__}")
    w = module.weight.detach()
    return w.T if KINDS[name].transposed else w


def extras_of(module: nn.Module) -> dict[str, Any]:
    """Options of ``module`` besides its weight and bias that a merge must restore."""
    if kind_of(module) == "embedding":
        return {k: getattr(module, k) for k in EMBEDDING_EXTRAS}
    return {}


@torch.no_grad()
def dense_module(kind: str, W: torch.Tensor, bias: torch.Tensor | None,
                 extras: dict[str, Any] | None = None) -> nn.Module:
    """A plain module of ``kind`` computing ``x @ W (+ bias)`` (W in, out).

    Raises:
        ValueError: an unknown ``kind``; ``W`` not 2-D; a ``bias`` not of shape
            ``(out,)``, or any bias for ``"embedding"`` (a table has none).
    """
    k = get_kind(kind)
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D matrix (in, out), got shape {tuple(W.shape)}")
    in_dim, out_dim = int(W.shape[0]), int(W.shape[1])
    if bias is not None:
        if k.name == "embedding":
            raise ValueError("bias must be None for kind 'embedding' (nn.Embedding has no "
                             "bias)")
        if tuple(bias.shape) != (out_dim,):
            raise ValueError(f"bias must have shape ({out_dim},) for W of shape "
                             f"{tuple(W.shape)}, got {tuple(bias.shape)}")
    m = k.build(in_dim, out_dim, bias is not None, dict(extras or {}), W.device, W.dtype)
    m.weight.copy_(W.T if k.transposed else W)
    if bias is not None:
        m.bias.copy_(bias)
    return m
