"""Input checks with errors that name the argument and what was expected."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from tnlm.core import backend as B

__all__ = ["MAX_SEED", "MAX_SITES", "all_finite", "check_core", "check_matrix", "check_seed",
           "check_shape", "check_site_index", "check_positive_int", "check_n_sites",
           "check_number", "check_size", "check_bool_fields", "FieldError", "field_errors"]

#: the most sites an MPO may have: numpy arrays hold at most 64 dimensions, and the dense
#: matrix of an n-site MPO is reshaped to (and from) 2n legs, one input and one output a
#: site (33 sites failed in ``from_matrix`` with numpy's "maximum supported dimension")
MAX_SITES = 32

_FLOATS = ("float32", "float64")


def check_matrix(w: Any, name: str = "W") -> Any:
    """Validate a dense matrix; return it as a float32/float64 numpy array or torch tensor.

    Integer input is converted to float64. A torch tensor is returned detached (what is
    decomposed from it carries no autograd graph back to it); an ``np.matrix`` or another
    ndarray subclass as a plain 2-D array. Raises ``TypeError`` for complex, boolean,
    half-precision or non-numeric input, ``ValueError`` for a non-2-D, empty or non-finite
    matrix, a numpy masked array with masked entries (the mask would be ignored: fill it,
    ``w.filled(...)``, or pass ``w.data``) and a tensor on the meta device (no values).
    """
    if B.is_torch(w):
        if w.is_meta:
            raise ValueError(f"{name} is a tensor on the meta device (shape "
                             f"{tuple(w.shape)}): it holds no values to decompose; "
                             "materialize it first (load the weights, or .to_empty(...) and "
                             "initialize)")
        w = w.detach()
        dtype = str(w.dtype).removeprefix("torch.")
        if w.is_complex():
            raise TypeError(f"{name} has complex dtype {dtype}; only real matrices are supported")
        if dtype == "bool":
            raise TypeError(f"{name} has dtype bool; expected a real floating-point matrix")
        if not w.is_floating_point():
            w = w.double()
        elif dtype not in _FLOATS:
            raise TypeError(
                f"{name} has dtype {dtype}; MPO decomposition needs float32 or "
                f"float64 (cast it with .float())"
            )
    else:
        if isinstance(w, np.ma.MaskedArray):
            if np.ma.is_masked(w):
                raise ValueError(
                    f"{name} is a numpy masked array with {int(np.ma.count_masked(w))} "
                    "masked entries: the decomposition would use the values under the "
                    f"mask; fill them ({name}.filled(0.0)) or pass {name}.data")
            w = np.ma.getdata(w)
        if isinstance(w, np.ndarray) and type(w) is not np.ndarray:
            w = np.asarray(w)  # np.matrix and other subclasses: a plain array
        if not isinstance(w, np.ndarray):
            try:
                w = np.asarray(w)
            except (ValueError, TypeError) as err:
                raise TypeError(
                    f"{name} must be a numpy array or torch tensor, got {type(w).__name__}"
                ) from err
        if np.iscomplexobj(w):
            raise TypeError(f"{name} has complex dtype {w.dtype}; only real matrices are supported")
        if w.dtype == bool or w.dtype.kind not in "iuf":
            raise TypeError(f"{name} has dtype {w.dtype}; expected a real floating-point matrix")
        if w.dtype.kind in "iu":
            w = w.astype(np.float64)
        elif w.dtype.name not in _FLOATS:
            raise TypeError(
                f"{name} has dtype {w.dtype}; MPO decomposition needs float32 or "
                f"float64 (cast it with .astype(np.float32))"
            )
    if w.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix (I, J), got shape {tuple(w.shape)}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(w.shape)}")
    if not all_finite(w):
        raise ValueError(f"{name} contains NaN or Inf")
    return w


def all_finite(w: Any) -> bool:
    """Whether every entry of a numpy array or torch tensor is finite."""
    return bool(w.isfinite().all()) if B.is_torch(w) else bool(np.isfinite(w).all())


def check_core(c: Any, k: int) -> None:
    """``TypeError`` unless ``cores[k]`` of an MPO holds float32 or float64 numbers (half
    precision is refused: the QR and SVD sweeps need float32 at least), ``ValueError`` if
    any is NaN or infinite (each names ``cores[k]``; a tensor on the meta device holds no
    values to check)."""
    dtype = str(c.dtype).removeprefix("torch.") if B.is_torch(c) else np.asarray(c).dtype.name
    if dtype not in _FLOATS:
        half = " (half precision: cast the cores to float32 first)" \
            if dtype in ("float16", "bfloat16") else ""
        raise TypeError(f"cores[{k}] has dtype {dtype}; an MPO holds real float32 or float64 "
                        f"cores (complex and half-precision cores are not supported){half}")
    if not (B.is_torch(c) and c.is_meta) and not all_finite(c):
        raise ValueError(f"cores[{k}] holds NaN or infinite values")


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1, or a ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_size(value: Any, name: str) -> int:
    """``value`` as an int >= 0 (a leg size, a row count, a rank that may keep nothing), or a
    ``TypeError`` (not an int: ``bool`` and float refused) / ``ValueError`` (negative)
    naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def check_number(value: Any, name: str, *, positive: bool = False) -> float:
    """``value`` as a finite float >= 0 (> 0 with ``positive``), or a ``TypeError`` (not a
    real number; ``bool`` and strings included) / ``ValueError`` (NaN, infinite, out of
    range) naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a number, got {value!r}")
    bound = "> 0" if positive else ">= 0"
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


class FieldError(ValueError):
    """A ``ValueError`` about one field of a config (a recipe's, a dataclass's): ``field``
    names it, so a caller that filled the field from an argument of its own (a command-line
    flag) names that argument instead of matching the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple:  # pickled (a worker's error): both arguments
        return type(self), (self.field, str(self))


@contextmanager
def field_errors(field: str) -> Iterator[None]:
    """Inside it, a ``ValueError`` that is not yet a :class:`FieldError` becomes one
    naming ``field`` (the same message; the original as its cause)."""
    try:
        yield
    except FieldError:
        raise
    except ValueError as err:
        raise FieldError(field, str(err)) from err


def check_bool_fields(obj: Any, *names: str) -> None:
    """``ValueError`` naming the first of ``names`` whose attribute of ``obj`` (a config's
    field) is not a ``bool``: ``"no"``, ``0`` or ``None`` would be taken by truth value."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, bool):
            raise FieldError(name, f"{name} must be a bool, got {value!r}")


def check_n_sites(value: Any, name: str = "n_sites") -> int:
    """``value`` as an int in ``1..MAX_SITES``, or a ``TypeError``/``ValueError`` naming
    ``name``."""
    n = check_positive_int(value, name)
    if n > MAX_SITES:
        raise ValueError(f"{name} must be at most {MAX_SITES}, got {n}")
    return n


def check_shape(shape: Any, name: str) -> tuple[int, ...]:
    """A site shape: a sequence of 1 to :data:`MAX_SITES` ints >= 1."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of ints, got {type(shape).__name__}")
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one site, got ()")
    if len(shape) > MAX_SITES:
        raise ValueError(f"{name} must have at most {MAX_SITES} sites, got {len(shape)}")
    return tuple(check_positive_int(d, f"{name}[{k}]") for k, d in enumerate(shape))


def check_site_index(index: Any, n: int, name: str, *, negative: bool = True) -> int:
    """An index in ``range(n)`` (negative indices count from the end; with
    ``negative=False`` they are refused: a sweep's ``-1`` would wrap around the chain)."""
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {index!r}")
    if not negative and not 0 <= index < n:
        raise ValueError(f"{name} must be a site of the {n}-site chain, in [0, {n}), "
                         f"got {index}")
    if not -n <= index < n:
        raise ValueError(f"{name} must be in [0, {n}), got {index}")
    return int(index) % n


#: the largest seed: seeds go through :func:`torch.manual_seed` (at most 2**64 - 1),
#: some after derivation (products with the step, taken modulo 2**64)
MAX_SEED = 2 ** 63 - 1


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` as a seed: an integer (a numpy one too, not a bool) in
    ``[0, MAX_SEED]``, returned as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            0 <= int(value) <= MAX_SEED):
        raise ValueError(f"{name} must be an int in [0, 2**63 - 1], got {value!r}")
    return int(value)
