"""Matplotlib figures of profiles (matplotlib is imported only when a plot is made).

Every function draws into ``ax`` when given, otherwise into a new
:class:`matplotlib.figure.Figure` (no pyplot, no GUI backend, never ``show()``),
and returns the Figure; save it with ``fig.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tnlm.analysis.profile import Profile, mpo_profile, reference_for
from tnlm.core import MPO

__all__ = ["plot_entropy_heatmap", "plot_entropy_profile", "plot_error_vs_params", "plot_spectra"]


def _as_profile(obj: MPO | Profile, arg: str) -> Profile:
    if isinstance(obj, MPO):
        return mpo_profile(obj)
    if isinstance(obj, dict) and "spectra" in obj and "entropies" in obj:
        return obj
    raise TypeError(f"{arg} must be an MPO or a profile dict, got {type(obj).__name__}")


def _axes(ax: Any, figsize: tuple[float, float] = (6.0, 4.0)) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def plot_spectra(mpo_or_profile: MPO | Profile, ax: Any = None) -> Any:
    """One line per bond: ``s_i / ||W||_F`` against the index i (log y). Zeros are not drawn."""
    prof = _as_profile(mpo_or_profile, "mpo_or_profile")
    fig, ax = _axes(ax)
    norm = prof["norm"] or 1.0
    for k, s in enumerate(prof["spectra"]):
        s = np.asarray(s, dtype=np.float64)  # lists too (a profile read back from JSON)
        y = np.where(s > 0, s / norm, np.nan)
        ax.plot(np.arange(1, len(s) + 1), y, label=f"bond {k} (D={len(s)})")
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel(r"$s_i / \|W\|_F$")
    ax.set_title(f"bond spectra{': ' + prof['name'] if prof['name'] else ''}")
    if prof["spectra"]:
        ax.legend(fontsize="small")
    return fig


def plot_entropy_profile(
    profile_or_mpo: MPO | Profile, reference: MPO | Profile | str | None = None, ax: Any = None
) -> Any:
    """Von Neumann entropy (natural log) per bond.

    Lines: the matrix's entropies; the maximum ``ln D`` of each bond (dashed);
    and, if ``reference`` is given, the reference's entropies. ``reference="random"``
    computes :func:`~tnlm.analysis.profile.reference_for` (a Gaussian matrix of
    the same shapes and norm).
    """
    prof = _as_profile(profile_or_mpo, "profile_or_mpo")
    if isinstance(reference, str):
        if reference != "random":
            raise ValueError(f"reference must be an MPO, a profile or 'random', got {reference!r}")
        reference = reference_for(prof)
    fig, ax = _axes(ax)
    bonds = np.arange(len(prof["entropies"]))
    ax.plot(bonds, prof["entropies"], "o-", label=prof["name"] or "matrix")
    ax.plot(bonds, prof["max_entropies"], "k--", lw=1, label=r"max $\ln D$")
    if reference is not None:
        ref = _as_profile(reference, "reference")
        ax.plot(
            np.arange(len(ref["entropies"])),
            ref["entropies"],
            "s:",
            label=ref["name"] or "reference",
        )
    ax.set_xticks(bonds)
    ax.set_xlabel("bond k (between sites k and k+1)")
    ax.set_ylabel("entanglement entropy S (nats)")
    ax.legend(fontsize="small")
    return fig


def plot_entropy_heatmap(model_profile: dict[str, Any], value: str = "entropy") -> Any:
    """Layer x module-type heatmap of a :func:`~tnlm.analysis.profile.model_profile` grid.

    ``value`` is ``"entropy"`` (mean central-bond entropy, nats) or
    ``"normalized_entropy"`` (divided by ln D). Empty cells are blank. The Figure
    has two axes: the heatmap and its colorbar.
    """
    if value not in ("entropy", "normalized_entropy"):
        raise ValueError(f"value must be 'entropy' or 'normalized_entropy', got {value!r}")
    from matplotlib.figure import Figure

    grid = np.asarray(model_profile[value], dtype=float)
    layers, types = model_profile["layers"], model_profile["types"]
    fig = Figure(figsize=(2.5 + 0.9 * len(types), 1.5 + 0.4 * len(layers)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), ["global" if lay is None else str(lay) for lay in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    lo, hi = im.get_clim()
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            dark = hi > lo and (v - lo) / (hi - lo) < 0.5
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize="small",
                color="w" if dark else "k",
            )
    fig.colorbar(im, ax=ax, label="S (nats)" if value == "entropy" else "S / ln D")
    return fig


def plot_error_vs_params(rows: Iterable[Mapping[str, Any]], ax: Any = None) -> Any:
    """Two lines from :func:`~tnlm.analysis.profile.error_vs_params` rows: MPO
    (``mpo_error`` vs ``params``) and low-rank SVD (``svd_error`` vs ``svd_params``).

    ``rows`` may be any iterable of rows (it is read once)."""
    if isinstance(rows, (Mapping, str, bytes)):
        raise TypeError(f"rows must be a list of error_vs_params rows, got a "
                        f"{type(rows).__name__} (wrap a single row in a list)")
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty")
    keys = ("params", "mpo_error", "svd_params", "svd_error")
    for k, r in enumerate(rows):
        if not isinstance(r, Mapping) or any(key not in r for key in keys):
            raise TypeError(f"rows[{k}] must be an error_vs_params row (a dict with keys "
                            f"{', '.join(keys)}), got {type(r).__name__}")
    fig, ax = _axes(ax)
    ax.plot([r["params"] for r in rows], [r["mpo_error"] for r in rows], "o-", label="MPO")
    ax.plot([r["svd_params"] for r in rows], [r["svd_error"] for r in rows], "s--", label="SVD")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(r"relative error $\|W - W'\|_F / \|W\|_F$")
    ax.legend()
    return fig
