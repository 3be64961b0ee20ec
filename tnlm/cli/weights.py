"""The commands that read a model's weights: ``tnlm decompose`` (exact MPOs),
``tnlm inspect`` (bond dimensions and entanglement entropies) and ``tnlm report``
(figures, also of a saved MPO model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tnlm.cli.common import UserError, model_path

__all__ = ["cmd_decompose", "cmd_inspect", "cmd_report"]


#: ``tnlm report``'s sites of a dense weight when ``--n-sites`` is not given
N_SITES_DEFAULT = 5


def _check_n_sites(n_sites: int) -> None:
    """``--n-sites`` in 2..MAX_SITES, checked before any model is loaded: the commands
    here measure bonds (entropies, bond dimensions), which one site does not have."""
    from tnlm.core.validation import MAX_SITES, check_n_sites

    if isinstance(n_sites, int) and not isinstance(n_sites, bool) and n_sites < 2:
        raise UserError(f"--n-sites must be between 2 and {MAX_SITES} (a chain of one site "
                        f"has no bond to measure), got {n_sites}")
    try:
        check_n_sites(n_sites, "--n-sites")
    except (TypeError, ValueError) as err:
        raise UserError(str(err)) from None


def _load_matrices(model_dir: str | None, embeddings: bool = True) -> dict[str, np.ndarray]:
    """W (in, out) of every module an MPO can replace, in the ``y = x @ W`` convention."""
    import torch
    from transformers import AutoModel

    from tnlm.bridge import kind_of, weight_xw
    from tnlm.bridge.kinds import MATRIX_KINDS
    from tnlm.integration.loading import check_block_weights

    path = model_path(model_dir)
    # float32 whatever the stored dtype (bfloat16 has no numpy type)
    model, info = AutoModel.from_pretrained(str(path), dtype=torch.float32,
                                            output_loading_info=True)
    try:
        check_block_weights(path, info)
    except ValueError as err:
        raise UserError(str(err)) from None
    out = {}
    for name, m in model.named_modules():
        kind = kind_of(m)
        if name and kind is not None and (embeddings or kind in MATRIX_KINDS):
            out[name] = weight_xw(m).double().numpy()
    return out


def cmd_decompose(args: argparse.Namespace) -> int:
    """Decompose every 2-D weight exactly and print bond dimensions, errors and entropies.

    Raises:
        UserError: ``--n-sites`` not in 2..32 (before the model is loaded), no weights.
    """
    from tqdm.auto import tqdm

    from tnlm import MPO

    _check_n_sites(args.n_sites)
    mats = _load_matrices(args.model_dir)
    mats = {n: W for n, W in mats.items()
            if not n.endswith(("position_embeddings", "token_type_embeddings"))}
    if not mats:
        raise UserError("no linear or embedding weights found in the model")
    print(f"{'module':44s} {'I x J':>12s} {'in_shape':>18s} {'out_shape':>16s} "
          f"{'bond_dims':>22s} {'rel.err':>8s} {'S_central':>9s}")
    for name, W in tqdm(mats.items(), desc="decompose", leave=False, disable=args.quiet):
        mpo = MPO.from_matrix(W, n_sites=args.n_sites, pad=True)
        err = np.linalg.norm(mpo.to_matrix() - W) / np.linalg.norm(W)
        s = mpo.central_entropy()
        print(f"{name:44s} {str(W.shape):>12s} {str(mpo.in_shape):>18s} "
              f"{str(mpo.out_shape):>16s} {str(mpo.bond_dims):>22s} {err:8.1e} {s:9.3f}")
    return 0



def _weights_for_profile(model_dir: str | None, embeddings: bool = True) -> dict[str, np.ndarray]:
    """2-D weights (``y = x @ W``) without the position and token-type tables."""
    return {n: W for n, W in _load_matrices(model_dir, embeddings).items()
            if not n.endswith(("position_embeddings", "token_type_embeddings"))}


def cmd_inspect(args: argparse.Namespace) -> int:
    """Per-matrix table: shape, site shapes, bond dims, central-bond entropy vs random.

    Raises:
        UserError: ``--n-sites`` not in 2..32 (before the model is loaded).
    """
    from tqdm.auto import tqdm

    from tnlm.analysis import matrix_profile, reference_for

    _check_n_sites(args.n_sites)
    mats = _weights_for_profile(args.model_dir, args.embeddings)
    rows = []
    if not args.json:
        print(f"{'module':44s} {'I x J':>12s} {'bond_dims':>20s} {'S_central':>9s} "
              f"{'S_random':>8s} {'ln d_c':>6s} {'central %':>9s}")
    for name, W in tqdm(mats.items(), desc="profile", leave=False, disable=args.quiet):
        prof = matrix_profile(W, n_sites=args.n_sites, name=name, pad=True)
        ref = reference_for(prof) if args.reference else None
        d = prof["bond_dims"][prof["central_bond"]]  # the bond S_central is measured at
        row = dict(name=name, shape=list(W.shape), bond_dims=list(prof["bond_dims"]),
                   central_bond=prof["central_bond"], central_entropy=prof["central_entropy"],
                   random_central_entropy=ref["central_entropy"] if ref else None,
                   max_central_entropy=float(np.log(d)),
                   central_fraction=prof["central_fraction"])
        rows.append(row)
        if not args.json:
            s_ref = f"{ref['central_entropy']:8.3f}" if ref else f"{'-':>8s}"
            print(f"{name:44s} {str(tuple(W.shape)):>12s} {str(tuple(prof['bond_dims'])):>20s} "
                  f"{prof['central_entropy']:9.3f} {s_ref} {np.log(d):6.3f} "
                  f"{100 * prof['central_fraction']:8.1f}%")
    if args.json:
        import json

        print(json.dumps(rows, indent=1))
    return 0


def _saved_mpos(directory: Path) -> dict:
    """MPOs of a checkpoint written by ``MPOModel.save_pretrained`` (hash verified; read
    without the base model); a layer whose cores hold NaN or inf, which no MPO holds, as
    its list of cores (``model_profile_from_mpos`` names it)."""
    from tnlm import MPO
    from tnlm.analysis import nonfinite_reason
    from tnlm.integration import load_tensors

    meta, tensors = load_tensors(directory)
    out = {}
    for name, spec in meta["modules"].items():
        if spec.get("layout") == "pivoted":  # a gauge-fixed bond: the 2-site MPO it fixes
            I, J, r = spec["in_dim"], spec["out_dim"], spec["rank"]
            left = np.zeros((I, r))
            left[tensors[f"{name}.pivots"]] = np.eye(r)
            left[tensors[f"{name}.rest"]] = tensors[f"{name}.coef"]
            cores = [left.reshape(1, I, 1, r),
                     tensors[f"{name}.right"].astype(np.float64).reshape(r, 1, J, 1)]
        else:
            cores = [tensors[f"{name}.cores.{k}"].astype(np.float64)
                     for k in range(len(spec["core_shapes"]))]
        if nonfinite_reason(*cores) is None:
            out[name] = MPO(cores, in_dim=spec["in_dim"], out_dim=spec["out_dim"])
        else:  # no MPO holds them: the report names the layer and what its cores hold
            out[name] = cores
    return out


def cmd_report(args: argparse.Namespace) -> int:
    """Plots to files: entropy heat map (layer x module type), spectra, entropy profiles.

    Matrices that cannot be profiled (NaN or inf entries, ...) are left out of every
    figure, each named on stderr with the reason (``tnlm report: skipped NAME: REASON``);
    when none can be profiled the command fails, naming them.

    ``--n-sites`` (2..32, checked before anything is loaded) splits a model folder's
    dense weights (default 5); a saved MPO model keeps its layers' own sites, so any
    value given is refused for one. ``--out`` is created once the figures' data is
    ready (a failed report leaves no empty folder).

    Raises:
        UserError: a wrong ``--modules`` / ``--n-sites`` / ``--out``, a lightweight task
            checkpoint, no matrices to report on.
    """
    import matplotlib

    matplotlib.use("Agg")
    from tnlm.analysis import (
        model_profile,
        model_profile_from_mpos,
        plot_entropy_heatmap,
        plot_entropy_profile,
        plot_spectra,
        reference_for,
    )
    from tnlm.integration.io import CONFIG_NAME

    if args.modules < 1:
        raise UserError(f"--modules must be >= 1 (modules with their own figures), got "
                        f"{args.modules}")
    n_sites = N_SITES_DEFAULT if args.n_sites is None else args.n_sites
    _check_n_sites(n_sites)
    src = Path(args.directory) if args.directory else None
    if src is not None and (src / CONFIG_NAME).is_file():
        from tnlm.integration.io import read_meta

        light = read_meta(src).get("lightweight")
        if light:
            raise UserError(f"DIR {src} is a lightweight task checkpoint: its central cores are "
                            f"kept in its base model ({light.get('base_model_name_or_path')!r}), "
                            f"not in this folder; report on the compressed model's own folder")
        if args.n_sites is not None:
            raise UserError(f"--n-sites {args.n_sites} splits a model folder's dense weights; "
                            f"DIR {src} is a saved MPO model, whose layers keep their own "
                            "sites: leave --n-sites out")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; expected a folder for the figures")
    if src is not None and (src / CONFIG_NAME).is_file():
        profile = model_profile_from_mpos(_saved_mpos(src))
    else:
        profile = model_profile(_weights_for_profile(args.directory), n_sites=n_sites)
    rows = profile["rows"]
    skipped = profile.get("skipped", [])
    for name, reason in skipped:
        print(f"tnlm report: skipped {name}: {reason}", file=sys.stderr)
    if not rows:
        raise UserError("no matrices to report on")
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed report leaves no folder
    written = []
    fig = plot_entropy_heatmap(profile)
    fig.savefig(out / "entropy_heatmap.png", dpi=120)
    written.append("entropy_heatmap.png")
    for r in rows[: args.modules]:
        stem = r["name"].replace(".", "_")
        plot_spectra(r).savefig(out / f"spectra_{stem}.png", dpi=120)
        plot_entropy_profile(r, reference=reference_for(r)).savefig(
            out / f"entropy_{stem}.png", dpi=120)
        written += [f"spectra_{stem}.png", f"entropy_{stem}.png"]
    left_out = f" ({len(skipped)} matrices left out, named on stderr)" if skipped else ""
    print(f"wrote {len(written)} figures to {out}{left_out}: " + ", ".join(written))
    return 0
