"""Entanglement profiles of weight matrices, and MPO-vs-SVD error curves.

All quantities refer to the *exact* (untruncated) MPO of a matrix W of shape
(I, J) in the tnlm convention ``y = x @ W`` (decompose ``linear.weight.T``):

* bond k joins sites k and k+1; its spectrum ``s_k`` (float64, descending) is the
  singular values of W unfolded as (sites 0..k) x (sites k+1..n-1), so
  ``Σ s_k² = ||W||_F²`` for every k;
* the entropy of bond k is von Neumann with natural log, ``-Σ p ln p`` with
  ``p = s_k² / Σ s_k²`` (scale free); its maximum is ``ln len(s_k)``;
* relative errors and discarded weights are divided by ``||W||_F``.

A profile is a plain dict (see :func:`mpo_profile` for its keys), so it can be
stored with json/pickle after converting the spectra arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from math import log
from typing import Any

import numpy as np

from tnlm.analysis.names import MODULE_TYPES, default_classifier
from tnlm.core import MPO
from tnlm.core.backend import to_numpy
from tnlm.core.spectra import tail_sums
from tnlm.core.validation import check_matrix, check_number, check_positive_int

__all__ = [
    "discarded_weight_curve",
    "error_vs_params",
    "matrix_profile",
    "model_profile",
    "model_profile_from_mpos",
    "mpo_profile",
    "nonfinite_reason",
    "random_reference",
    "reference_for",
]

Profile = dict[str, Any]


def _as_float64(W: Any, name: str = "W") -> np.ndarray:
    return to_numpy(check_matrix(W, name)).astype(np.float64)


def nonfinite_reason(*arrays: Any) -> str | None:
    """What is not finite in ``arrays`` (numpy arrays or torch tensors, e.g. a weight or
    the cores of an MPO), which cannot be profiled then: ``"3 NaN and 1 inf of 256
    entries"``; ``None`` when every entry is finite (or not a number: other checks
    report those)."""
    nan = inf = total = 0
    for a in arrays:
        if hasattr(a, "dtype") and str(a.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            a = a.float()
        x = to_numpy(a)
        if not np.issubdtype(x.dtype, np.number):
            continue
        if x.dtype.kind == "f" and x.dtype.itemsize < 4:  # numpy float16
            x = x.astype(np.float32)
        total += x.size
        nan += int(np.isnan(x).sum())
        inf += int(np.isinf(x).sum())
    if not nan and not inf:
        return None
    parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
    return f"{' and '.join(p for p in parts if p)} of {total} entries"


def _skipped_summary(skipped: Sequence[tuple[str, str]], n: int = 5) -> str:
    """``"a: reason; b: reason and 3 more"`` (one line)."""
    head = "; ".join(f"{name}: {why}" for name, why in skipped[:n])
    return head + (f" and {len(skipped) - n} more" if len(skipped) > n else "")


def mpo_profile(mpo: MPO, name: str | None = None) -> Profile:
    """The profile of the matrix an MPO represents (spectra computed in any gauge).

    Keys (n = number of sites, bonds 0..n-2):

    ``name``, ``shape`` (I, J), ``in_shape``, ``out_shape``, ``n_sites``, ``padded``;
    ``bond_dims`` (the MPO's bond dimensions); ``spectra`` (n-1 float64 arrays,
    descending); ``entropies`` (n-1 floats, von Neumann, natural log);
    ``max_entropies`` (``ln len(s_k)``, the entropy of a flat spectrum of that
    length); ``norm`` (||W||_F); ``central_index``; ``central_bond``
    (:attr:`MPO.central_bond <tnlm.core.mpo.MPO.central_bond>`) and
    ``central_entropy`` (its entropy); ``num_params``
    (entries of the MPO); ``dense_params`` (I·J); ``central_fraction``
    (parameters of the central tensor / ``num_params``).
    """
    spectra = mpo.bond_spectra() if mpo.n_sites > 1 else []
    entropies = [float(e) for e in mpo.entanglement_entropy()] if spectra else []
    norm = float(np.linalg.norm(spectra[0])) if spectra else mpo.norm()
    cb = mpo.central_bond if spectra else None
    return {
        "name": name,
        "shape": mpo.shape,
        "in_shape": mpo.in_shape,
        "out_shape": mpo.out_shape,
        "n_sites": mpo.n_sites,
        "padded": mpo.padded,
        "bond_dims": mpo.bond_dims,
        "spectra": spectra,
        "entropies": entropies,
        "max_entropies": [log(len(s)) if len(s) else 0.0 for s in spectra],
        "norm": norm,
        "central_index": mpo.central_index,
        "central_bond": cb,
        "central_entropy": entropies[cb] if cb is not None else 0.0,
        "num_params": mpo.num_params,
        "dense_params": mpo.dense_params,
        "central_fraction": mpo.site_params[mpo.central_index] / mpo.num_params,
    }


def matrix_profile(
    W: Any,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
    n_sites: int | None = None,
    name: str | None = None,
    *,
    pad: bool = False,
) -> Profile:
    """Profile of W (I, J): the exact MPO's bond dims, spectra and entropies.

    W (numpy or torch, any float dtype) is decomposed in float64 by successive
    SVDs; shapes default to ``factorize(I, n_sites)`` / ``factorize(J, n_sites)``
    (``n_sites`` 5 unless given; given beside a shape, it must match it)
    (``pad=True`` zero-pads dimensions that do not factorize, e.g. a 30522 vocab;
    the profile is then that of the padded matrix). See :func:`mpo_profile` for
    the keys. The spectra of W and of W.T coincide when the site shapes are
    swapped with it (as the defaults are), so the orientation does not matter.
    """
    mpo = MPO.from_matrix(_as_float64(W), in_shape, out_shape, n_sites, pad=pad, method="svd")
    return mpo_profile(mpo, name)


def random_reference(
    shape: Sequence[int],
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
    seed: int = 0,
    *,
    norm: float = 1.0,
    n_sites: int | None = None,
    pad: bool = False,
) -> Profile:
    """The profile of a Gaussian random matrix of ``shape`` (I, J) scaled to ``||G||_F = norm``.

    The physicist's reference: a random matrix is close to maximally entangled at
    every bond, so a trained weight whose entropies fall below this curve has
    structure an MPO can exploit. Use ``norm`` = the weight's Frobenius norm so
    that the spectra are comparable too (entropies do not depend on it).
    """
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, np.ndarray)):
        raise TypeError(f"shape must be a pair of ints (I, J), got {shape!r}")
    if len(shape) != 2:
        raise ValueError(f"shape must be (I, J), got {tuple(shape)}")
    I, J = (check_positive_int(d, f"shape[{k}]") for k, d in enumerate(shape))
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int >= 0, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed}")
    norm = check_number(norm, "norm", positive=True)
    G = np.random.default_rng(seed).standard_normal((I, J))
    G *= norm / np.linalg.norm(G)
    return matrix_profile(G, in_shape, out_shape, n_sites, name="random reference", pad=pad)


def reference_for(profile: Profile, seed: int = 0) -> Profile:
    """:func:`random_reference` with the shape, site shapes and norm of ``profile``."""
    return random_reference(
        profile["shape"],
        profile["in_shape"],
        profile["out_shape"],
        seed,
        norm=profile["norm"] or 1.0,
        pad=profile["padded"],
    )


def discarded_weight_curve(mpo: MPO, bond: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Relative discarded weight at one bond as a function of the kept bond dimension.

    Returns ``(chi, eps)``, both of length D = ``len(mpo.singular_values(bond))``:
    ``chi = 1..D`` and ``eps[chi-1] = sqrt(Σ_{i >= chi} s_i²) / ||W||_F``, where s is
    the bond's spectrum and W the matrix this MPO represents. ``eps`` is
    non-increasing and ``eps[-1] == 0``. It is the exact relative error of cutting
    that bond alone to chi (Eckart-Young for that unfolding) and a lower bound for
    any MPO with bond dimension chi there.

    Args:
        bond: bond index (0..n-2); default :attr:`MPO.central_bond
            <tnlm.core.mpo.MPO.central_bond>`.
    """
    if bond is None:
        bond = mpo.central_bond
    s = mpo.singular_values(bond)
    total = float((s**2).sum())
    tail = tail_sums(s)  # tail[r] = Σ_{i >= r} s_i²
    eps = np.sqrt(tail[1:] / total) if total > 0 else np.zeros(len(s))
    return np.arange(1, len(s) + 1), eps


def _check_max_bonds(max_bonds: Sequence[int]) -> list[int]:
    if isinstance(max_bonds, (str, bytes)) or not isinstance(max_bonds, (Sequence, np.ndarray)):
        raise TypeError(f"max_bonds must be a sequence of ints, got {type(max_bonds).__name__}")
    if len(max_bonds) == 0:
        raise ValueError("max_bonds must hold at least one bond dimension")
    return [check_positive_int(m, f"max_bonds[{k}]") for k, m in enumerate(max_bonds)]


def error_vs_params(
    W: Any,
    in_shape: Sequence[int] | None,
    out_shape: Sequence[int] | None,
    max_bonds: Sequence[int],
    *,
    n_sites: int | None = None,
) -> list[dict[str, Any]]:
    """MPO truncation vs the best low-rank SVD at (at most) the same parameter count.

    For each ``max_bond`` the exact MPO of W is truncated to that bond dimension on
    every bond. Row keys: ``max_bond``; ``bond_dims`` and ``params`` of the
    truncated MPO; ``mpo_error`` = measured ``||W - W_mpo||_F / ||W||_F`` (dense);
    ``svd_rank`` r = ``min(params // (I + J), min(I, J))``; ``svd_params`` =
    r·(I + J) (U_r and S_r V_r^T stored); ``svd_error`` =
    ``sqrt(Σ_{i >= r} σ_i²) / ||W||_F``, the Eckart-Young optimum (1.0 for r = 0).
    """
    W = _as_float64(W)
    max_bonds = _check_max_bonds(max_bonds)
    I, J = W.shape
    norm = float(np.linalg.norm(W))
    sigma = np.linalg.svd(W, compute_uv=False)
    tail = tail_sums(sigma)
    exact = MPO.from_matrix(W, in_shape, out_shape, n_sites, method="svd")
    rows = []
    for mb in max_bonds:
        mpo = exact.truncate(max_bond=mb)
        diff = float(np.linalg.norm(W - mpo.to_matrix()))
        r = min(mpo.num_params // (I + J), min(I, J))
        rows.append(
            {
                "max_bond": mb,
                "bond_dims": mpo.bond_dims,
                "params": mpo.num_params,
                "mpo_error": diff / norm if norm > 0 else 0.0,
                "svd_rank": r,
                "svd_params": r * (I + J),
                "svd_error": float(np.sqrt(tail[r])) / norm if norm > 0 else 0.0,
            }
        )
    return rows


def _check_classify(classify: Any) -> None:
    if not callable(classify):
        raise TypeError(f"classify must be a function name -> (layer, module_type), got "
                        f"{classify!r}")


def _classified(value: Any, name: str) -> tuple[int | None, str]:
    """``value`` (what the classifier gave for ``name``) as ``(layer, module_type)``: a
    layer index (an int, not a bool; or None) and a str, or a ``TypeError`` naming
    ``name`` (a str layer such as ``"10"`` would sort before ``"2"`` in the grids)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"classify({name!r}) must return (layer, module_type), got {value!r}")
    layer, mtype = value
    if layer is not None and (isinstance(layer, (bool, np.bool_))
                              or not isinstance(layer, (int, np.integer))):
        raise TypeError(f"classify({name!r}) gave layer {layer!r}: expected an int layer "
                        f"index or None")
    if not isinstance(mtype, str):
        raise TypeError(f"classify({name!r}) gave module_type {mtype!r}: expected a str")
    return (None if layer is None else int(layer)), mtype


def model_profile(
    named_weights: Mapping[str, Any],
    classify: Callable[[str], tuple[int | None, str]] = default_classifier,
    *,
    n_sites: int = 5,
    pad: bool = True,
) -> dict[str, Any]:
    """Profiles of many weight matrices, grouped by layer and module type.

    Args:
        named_weights: name -> matrix, e.g. ``{"encoder.layer.0.attention.self.query": W}``
            or a whole state dict: entries that are not 2-D are skipped, a trailing
            ``.weight`` is ignored by the classifier. Orientation does not matter
            (see :func:`matrix_profile`).
        classify: name -> ``(layer or None, module_type)``; default
            :func:`~tnlm.analysis.names.default_classifier`.
        n_sites, pad: passed to :func:`matrix_profile` (padding on by default so
            vocabularies such as 30522 can be profiled).

    Returns:
        A dict with ``rows`` (one :func:`mpo_profile` dict per matrix, plus
        ``layer`` and ``type``), ``skipped`` (``(name, reason)`` for 2-D matrices that
        could not be decomposed: NaN or inf entries (:func:`nonfinite_reason`), ...;
        the caller decides how to tell the user), ``layers`` (row labels of the grids: None first if
        any matrix lies outside the layer stack, then the layer indices ascending),
        ``types`` (the module types present, in :data:`MODULE_TYPES` order, then
        unknown ones), ``entropy`` (array ``(len(layers), len(types))``: mean
        central-bond entropy of the matrices in that cell, NaN where empty) and
        ``normalized_entropy`` (the same for ``central_entropy / ln len(s)`` at the
        central bond, in [0, 1]).
    """
    if not isinstance(named_weights, Mapping):
        raise TypeError(f"named_weights must be a mapping, got {type(named_weights).__name__}")
    _check_classify(classify)
    if not named_weights:
        raise ValueError("named_weights is empty")
    rows, skipped = [], []
    for name, W in named_weights.items():
        if getattr(W, "ndim", None) != 2:
            continue
        layer, mtype = _classified(classify(name), name)
        reason = nonfinite_reason(W)
        if reason is not None:
            skipped.append((name, f"contains {reason}"))
            continue
        try:
            row = matrix_profile(W, n_sites=n_sites, name=name, pad=pad)
        except ValueError as err:
            skipped.append((name, str(err)))
            continue
        row.update(layer=layer, type=mtype)
        rows.append(row)
    if not rows:
        why = f"; skipped {_skipped_summary(skipped)}" if skipped else ""
        raise ValueError(f"named_weights holds no 2-D matrix that could be profiled{why}")
    return {**model_profile_from_rows(rows, classify), "skipped": skipped}


def model_profile_from_mpos(
    named_mpos: Mapping[str, MPO | Sequence[Any]],
    classify: Callable[[str], tuple[int | None, str]] = default_classifier,
) -> dict[str, Any]:
    """:func:`model_profile` of ready MPOs (e.g. those of a saved model): one
    :func:`mpo_profile` row per MPO, skipping (into ``skipped``, ``(name, reason)``) the
    MPOs whose bond spectra cannot be computed, and the entries given as their raw cores
    (a sequence of arrays, e.g. a saved layer's cores that no :class:`MPO` holds because
    they hold NaN or inf; a finite list of cores is an error of the caller).

    Raises:
        ValueError: ``named_mpos`` is empty, or every MPO was skipped (the message
            names them and why).
    """
    if not isinstance(named_mpos, Mapping):
        raise TypeError(f"named_mpos must be a mapping, got {type(named_mpos).__name__}")
    _check_classify(classify)
    if not named_mpos:
        raise ValueError("named_mpos is empty")
    rows, skipped = [], []
    for name, mpo in named_mpos.items():
        reason = nonfinite_reason(*(mpo.cores if isinstance(mpo, MPO) else mpo))
        if reason is not None:
            skipped.append((name, f"its MPO cores hold {reason}"))
            continue
        if not isinstance(mpo, MPO):
            raise TypeError(f"named_mpos[{name!r}]: finite cores must come as an MPO")
        try:
            rows.append(mpo_profile(mpo, name=name))
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as err:
            # (torch's LinAlgError is a RuntimeError)
            skipped.append((name, f"{type(err).__name__}: {err}"))
    if not rows:
        raise ValueError(f"no MPO could be profiled; skipped {_skipped_summary(skipped)}")
    return {**model_profile_from_rows(rows, classify), "skipped": skipped}


def model_profile_from_rows(
    rows: Sequence[Profile],
    classify: Callable[[str], tuple[int | None, str]] = default_classifier,
) -> dict[str, Any]:
    """The layer x type grids of :func:`model_profile` from ready profiles (e.g. of the
    MPOs of a saved model, :func:`mpo_profile`); rows without ``layer``/``type`` are
    classified by name. Returns the same keys as :func:`model_profile`."""
    _check_classify(classify)
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty")
    for r in rows:
        if "layer" not in r or "type" not in r:
            name = r.get("name") or ""
            r["layer"], r["type"] = _classified(classify(name), name)
        else:
            r["layer"], r["type"] = _classified((r["layer"], r["type"]), r.get("name") or "")
    ints = sorted({r["layer"] for r in rows if r["layer"] is not None})
    layers = ([None] if any(r["layer"] is None for r in rows) else []) + ints
    present = {r["type"] for r in rows}
    types = [t for t in MODULE_TYPES if t in present] + sorted(present - set(MODULE_TYPES))
    grids = {}
    for key in ("entropy", "normalized_entropy"):
        sums = np.zeros((len(layers), len(types)))
        counts = np.zeros_like(sums)
        for r in rows:
            cb = r["central_bond"]
            value = r["central_entropy"]
            if key == "normalized_entropy":
                top = r["max_entropies"][cb] if cb is not None else 0.0
                value = value / top if top > 0 else 0.0
            i, j = layers.index(r["layer"]), types.index(r["type"])
            sums[i, j] += value
            counts[i, j] += 1
        grids[key] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return {"rows": rows, "skipped": [], "layers": layers, "types": types, **grids}
