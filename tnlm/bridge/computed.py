"""The ``weight`` an MPO layer computes from its cores, read-only: :class:`ComputedWeight`.

An MPO layer's ``weight`` is contracted from its cores on every access; a write into it
would be silently lost, so :class:`ComputedWeight` refuses writes
(:class:`ReadOnlyWeightError`) on itself and on every tensor sharing its storage.
:func:`snapshot` and :func:`unchanged` are the bitwise check behind the layers' dense
cache (a cached product is reused while its cores hold the same bits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["ComputedWeight", "ReadOnlyWeightError", "WEIGHT_WRITE_HINT", "snapshot",
           "unchanged"]


class ReadOnlyWeightError(RuntimeError, AttributeError):
    """A write to the ``weight`` an MPO layer computes from its cores (it would be lost).

    A ``RuntimeError`` (as torch's errors for forbidden in-place writes) and an
    ``AttributeError`` (as Python's for assigning a read-only property)."""


WEIGHT_WRITE_HINT = (
    "is computed from the MPO cores on every access, so writing to it would be silently lost: "
    "for a dense weight to edit, use layer.merge() (a plain nn.Linear / Conv1D / nn.Embedding "
    "with the same weight) and, to get an MPO back, re-create it from that module "
    "(MPOLinear.from_linear, MPOEmbedding.from_embedding, MPOModule.from_module); to change "
    "the MPO itself, write its cores (layer.cores, layer.set_cores); for an independent, "
    "writable copy of the values (e.g. nn.Parameter(...)), take layer.weight.detach().clone()")

#: in-place dunder methods of torch.Tensor (``w += 1``, ``w[:] = 0``, ...)
_INPLACE_DUNDERS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
                            "and", "or", "xor", "lshift", "rshift")) | {"__setitem__"}
#: methods ending in "_" that do not write the values
_HARMLESS = frozenset({"requires_grad_", "retain_grad_", "share_memory_"})


#: integer dtypes by element size, to compare floating-point tensors bit for bit
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def snapshot(cores: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Detached copies of ``cores`` (what a cached product was built from)."""
    with torch.inference_mode(False), torch.no_grad():
        return tuple(c.detach().clone() for c in cores)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same bits (so NaNs match and ``-0.0 != 0.0``)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    bits = _BITS.get(a.element_size())
    if bits is None or a.is_complex():
        return torch.equal(a, b)
    a, b = a.detach().view(bits), b.detach().view(bits)
    if a.device.type == "cpu":  # numpy's comparison reads memory several times faster
        return bool(np.array_equal(a.numpy(), b.numpy()))
    return torch.equal(a, b)


def unchanged(snapshot: Sequence[torch.Tensor], cores: Sequence[torch.Tensor]) -> bool:
    """Whether every core still equals its copy in ``snapshot`` (O(core parameters))."""
    return len(snapshot) == len(cores) and all(_same_bits(c, s) for c, s in zip(cores, snapshot))


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (meta, fake, ...)
        return None


class ComputedWeight(torch.Tensor):
    """The ``weight`` of an MPO layer: a tensor computed from the cores, read-only.

    In-place operations (``copy_``, ``w[:] = ...``, ``w += ...``, ``nn.init.*_``,
    ``out=w``) and ``w.data = ...`` raise :class:`ReadOnlyWeightError`, on it and on the
    tensors sharing its storage (``w.data``, ``w.detach()``, views such as ``w.T`` or
    ``w[0]``, ``w.detach().numpy()``), which are read-only too. Anything else works as
    on a plain tensor (and returns plain tensors): reading, ``F.linear(x, w)``, autograd
    through the cores.
    """

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        owner = getattr(getattr(func, "__self__", None), "__name__", "")
        out = kwargs.get("out")
        outs = out if isinstance(out, (tuple, list)) else (out,)
        inplace = name in _INPLACE_DUNDERS or (
            name.endswith("_") and not name.startswith("_") and name not in _HARMLESS)
        # the tensor written in place: self of a method, or the first argument of a
        # function such as nn.init.normal_(tensor=...)
        target = args[0] if args else next(iter(kwargs.values()), None)
        writes = ((inplace and isinstance(target, ComputedWeight))
                  or (name == "__set__" and owner == "data")
                  or any(isinstance(o, ComputedWeight) for o in outs))
        if writes:
            what = f"{owner}.{name}" if name == "__set__" else name
            raise ReadOnlyWeightError(f"cannot write into an MPO layer's .weight ({what}): it "
                                      + WEIGHT_WRITE_HINT)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if name == "numpy" and isinstance(result, np.ndarray) and any(
                isinstance(a, ComputedWeight) for a in args):
            result.setflags(write=False)  # a view of the weight: read-only like the others
            return result
        ptrs = {_storage_ptr(a) for a in args if isinstance(a, ComputedWeight)} - {None}
        if not ptrs:
            return result
        return _wrap_aliases(result, ptrs)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # np.asarray(w) and np.array(w, copy=False): torch's __array__ calls numpy() with
        # the subclass switched off; the view it gives shares the weight's storage, so it
        # is read-only like every other alias (a copy asked for stays writable)
        if self.requires_grad:
            return torch.Tensor.__array__(self, dtype)  # torch's own error
        arr = self._plain().numpy()
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            return arr.astype(dtype)  # a new array
        if copy:
            return arr.copy()
        arr.setflags(write=False)
        return arr

    def _plain(self) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # saved (torch.save, pickle) as a plain tensor: loads with weights_only=True
        return self._plain().detach().clone().__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict[int, Any]) -> torch.Tensor:
        # a copy owns its storage, so it is a plain, writable tensor
        with torch._C.DisableTorchFunctionSubclass():
            out = self._plain().clone()
        memo[id(self)] = out
        return out


def _wrap_aliases(result: Any, ptrs: set[int]) -> Any:
    """``result`` with every tensor sharing a storage in ``ptrs`` made a
    :class:`ComputedWeight` (read-only), the others plain."""
    if isinstance(result, torch.Tensor):
        if _storage_ptr(result) in ptrs:
            return result if isinstance(result, ComputedWeight) else result.as_subclass(
                ComputedWeight)
        return result
    if isinstance(result, (tuple, list)):
        return type(result)(_wrap_aliases(r, ptrs) for r in result)
    return result
