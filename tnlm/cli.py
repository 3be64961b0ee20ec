"""Command-line interface: ``tnlm <command> [MODEL_DIR] ...``.

Commands default to the embedded MiniLM when MODEL_DIR is omitted. User
mistakes print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["main"]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line."""


def _model_path(model_dir: str | None) -> Path:
    from tnlm.integration import default_model_path

    path = Path(model_dir) if model_dir else default_model_path()
    if not (path / "config.json").is_file():
        raise UserError(f"MODEL_DIR {path} is not a transformers model folder (no config.json)")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise UserError(f"MODEL_DIR {path} holds no model.safetensors")
    return path


def _load_matrices(model_dir: str | None, embeddings: bool = True) -> dict[str, np.ndarray]:
    """W (in, out) of every module an MPO can replace, in the ``y = x @ W`` convention."""
    from transformers import AutoModel

    from tnlm.bridge import kind_of, weight_xw

    model = AutoModel.from_pretrained(str(_model_path(model_dir)))
    out = {}
    for name, m in model.named_modules():
        kind = kind_of(m)
        if name and kind is not None and (embeddings or kind != "embedding"):
            out[name] = weight_xw(m).double().numpy()
    return out


def cmd_decompose(args: argparse.Namespace) -> int:
    """Decompose every 2-D weight exactly and print bond dimensions, errors and entropies."""
    from tqdm.auto import tqdm

    from tnlm import MPO

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


#: the 36 encoder linear layers of a BERT-style model (MiniLM, BERT)
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"]
COMMANDS = ("compress", "inspect", "report", "decompose")
HEAL_TRAIN_CHOICES = ("cores", "auxiliary", "all")  # = distill.TRAIN_CHOICES (tested)

#: SICK relatedness pairs, if the shared data folder sits beside the working directory
DEFAULT_SICK = Path("../shared/data/sick/trial.tsv")


def _check_out(out: str | None) -> Path | None:
    """The output folder, checked writable before any work."""
    if not out:
        return None
    d = Path(out)
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {d}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise UserError(f"--out {d}: {probe} is not writable")
    return d


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress a model's linear layers to a budget (data-aware MPOs, healed), report, save."""
    import json

    import torch
    from transformers import AutoModel, AutoTokenizer

    from tnlm.compress.distill import HealConfig
    from tnlm.compress.pipeline import CompressionConfig, compress_model
    from tnlm.compress.quality import embedding_cosine, sick_spearman
    from tnlm.compress.text import (
        DEFAULT_TEXT_SOURCE,
        compression_sizes,
        default_text,
        read_sentences,
        split_sentences,
    )
    from tnlm.integration import format_report, report_totals

    if not 0 < args.budget <= 1:
        raise UserError(f"--budget must be a fraction in (0, 1], got {args.budget}")
    if args.heal_steps < 0:
        raise UserError(f"--heal-steps must be >= 0, got {args.heal_steps}")
    out = _check_out(args.out)
    path = _model_path(args.model_dir)
    sick = Path(args.sick) if args.sick else None
    if sick is None and DEFAULT_SICK.is_file():
        sick = DEFAULT_SICK
    if sick is not None and not sick.is_file():
        raise UserError(f"--sick {sick} does not exist")
    torch.manual_seed(args.seed)
    def say(*parts: object) -> None:
        if not args.quiet:  # with --json, stdout carries the JSON only
            print(*parts, file=sys.stderr if args.json else sys.stdout)

    if args.with_default_text and not args.text:
        raise UserError("--with-default-text adds the default text to --text FILE: pass --text")
    if args.text:
        text = read_sentences(args.text, column=args.text_column)
        source = args.text
        if args.with_default_text:
            text = list(dict.fromkeys(text + default_text(seed=args.seed)))
            source = f"{args.text} and {DEFAULT_TEXT_SOURCE}"
    else:
        text, source = default_text(seed=args.seed), DEFAULT_TEXT_SOURCE
    n_eval, n_cal = compression_sizes(len(text), args.calibration)
    if n_cal < 1:
        raise UserError(f"--text {source} has too few sentences ({len(text)})")
    held_out, calibration, rest = split_sentences(text, [n_eval, n_cal, -1], seed=args.seed)
    say(f"text: {len(text):,} sentences from {source}; {n_cal} for calibration, "
        f"{len(rest) + n_cal:,} for healing, {n_eval} held out")
    model = AutoModel.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    teacher = AutoModel.from_pretrained(str(path)).eval()
    targets = args.targets.split(",") if args.targets else BERT_TARGETS
    heal = HealConfig(steps=args.heal_steps, lr=args.lr, seed=args.seed,
                      teacher_bf16=args.teacher_bf16, train=args.heal_train,
                      checkpoint_dir=str(out / "healing") if out and args.heal_steps else None)
    if args.reconstruct_steps < 0:
        raise UserError(f"--reconstruct-steps must be >= 0, got {args.reconstruct_steps}")
    cfg = CompressionConfig(targets, budget=args.budget, allocation=args.allocation, heal=heal,
                            reconstruct_steps=args.reconstruct_steps)
    res = compress_model(model, tok, calibration, cfg, heal_text=calibration + rest,
                         progress=not args.quiet)
    rows = res.model.compression_report()
    if not args.json:
        say(format_report(rows))
    cos = embedding_cosine(res.model, teacher, tok, held_out)
    summary = dict(
        budget=args.budget, params_before=res.params_before, params_after=res.params_after,
        ratio=res.ratio, heal_steps=args.heal_steps, seconds=res.seconds,
        reconstruct_steps=args.reconstruct_steps, block_errors=res.block_errors,
        cosine_mean=float(cos.mean()), cosine_min=float(cos.min()), held_out=len(held_out),
        text_sentences=len(text),
        ranks=res.ranks, calibration_errors=res.errors)
    if sick is not None:
        summary["sick_spearman_original"] = sick_spearman(teacher, tok, sick)
        summary["sick_spearman"] = sick_spearman(res.model, tok, sick)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        t = report_totals(rows)
        print(f"kept {t['params_after']:,} of {t['params_before']:,} parameters of the "
              f"targeted layers ({t['ratio']:.1%}); healing {args.heal_steps} steps")
        print(f"embedding cosine to the original on {len(held_out)} held-out sentences: "
              f"mean {summary['cosine_mean']:.4f}, min {summary['cosine_min']:.4f}")
        if sick is not None:
            print(f"SICK relatedness Spearman ({sick}): original "
                  f"{summary['sick_spearman_original']:.4f}, compressed "
                  f"{summary['sick_spearman']:.4f}")
        else:
            print("SICK relatedness: skipped (pass --sick PATH to measure it)")
    if out is not None:
        res.model.save_pretrained(out)
        say(f"saved to {out}")
    return 0


def _weights_for_profile(model_dir: str | None, embeddings: bool = True) -> dict[str, np.ndarray]:
    """2-D weights (``y = x @ W``) without the position and token-type tables."""
    return {n: W for n, W in _load_matrices(model_dir, embeddings).items()
            if not n.endswith(("position_embeddings", "token_type_embeddings"))}


def cmd_inspect(args: argparse.Namespace) -> int:
    """Per-matrix table: shape, site shapes, bond dims, central-bond entropy vs random."""
    from tqdm.auto import tqdm

    from tnlm.analysis import matrix_profile, reference_for

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
    without the base model)."""
    from tnlm import MPO
    from tnlm.integration import load_tensors

    meta, tensors = load_tensors(directory)
    out = {}
    for name, spec in meta["modules"].items():
        cores = [tensors[f"{name}.cores.{k}"].astype(np.float64)
                 for k in range(len(spec["core_shapes"]))]
        out[name] = MPO(cores, in_dim=spec["in_dim"], out_dim=spec["out_dim"])
    return out


def cmd_report(args: argparse.Namespace) -> int:
    """Plots to files: entropy heat map (layer x module type), spectra, entropy profiles.

    Matrices that cannot be profiled (NaN or inf entries, ...) are left out of every
    figure, each named on stderr with the reason (``tnlm report: skipped NAME: REASON``);
    when none can be profiled the command fails, naming them.
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

    src = Path(args.directory) if args.directory else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if src is not None and (src / CONFIG_NAME).is_file():
        profile = model_profile_from_mpos(_saved_mpos(src))
    else:
        profile = model_profile(_weights_for_profile(args.directory), n_sites=args.n_sites)
    rows = profile["rows"]
    skipped = profile.get("skipped", [])
    for name, reason in skipped:
        print(f"tnlm report: skipped {name}: {reason}", file=sys.stderr)
    if not rows:
        raise UserError("no matrices to report on")
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


def build_parser() -> argparse.ArgumentParser:
    from tnlm import __version__

    ap = argparse.ArgumentParser(prog="tnlm", description="MPO compression of language models")
    ap.add_argument("--version", action="version", version=f"tnlm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("compress", help="compress a model's linear layers to a budget and heal it",
                       formatter_class=fmt)
    p.add_argument("model_dir", nargs="?", default=None, help="default: the embedded MiniLM")
    p.add_argument("--budget", type=float, default=0.5,
                   help="fraction of the targeted layers' parameters to keep, model-wide")
    p.add_argument("--heal-steps", type=int, default=2500,
                   help="distillation steps after truncation (0: none)")
    p.add_argument("--lr", type=float, default=5e-4, help="healing learning rate")
    p.add_argument("--heal-train", choices=HEAL_TRAIN_CHOICES, default="all",
                   help="what healing trains: every MPO core ('cores'), the auxiliary cores "
                        "only, or also the linears the allocation kept dense ('all'); "
                        "LayerNorms and biases always")
    p.add_argument("--teacher-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="run the teacher in bfloat16 during healing (default: when the CPU "
                        "has bf16 instructions; pooled outputs within 1e-4 cosine)")
    p.add_argument("--reconstruct-steps", type=int, default=100,
                   help="block-by-block reconstruction steps per block before healing")
    p.add_argument("--allocation", choices=("uniform", "greedy", "sensitivity"),
                   default="sensitivity", help="how the budget is spread over the layers")
    p.add_argument("--calibration", type=int, default=512, help="calibration sentences")
    p.add_argument("--text", default=None,
                   help="unlabeled in-domain text, one sentence per line (default: generated "
                        "sentences and docstrings of the installed Python source; in-domain "
                        "text compresses better, docs/results.md)")
    p.add_argument("--text-column", type=int, default=None,
                   help="take this tab-separated column of --text")
    p.add_argument("--with-default-text", action="store_true",
                   help="heal on --text and the default text together: in-domain text keeps "
                        "the domain's similarities, the default text the rest "
                        "(docs/results.md)")
    p.add_argument("--sick", default=None,
                   help="SICK relatedness file to measure Spearman (default: "
                        f"{DEFAULT_SICK} if present)")
    p.add_argument("--targets", default=None,
                   help="comma-separated module patterns (default: BERT encoder linears)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/minilm-mpo", help="output folder ('' to skip saving)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compress)
    p = sub.add_parser("inspect", help="table of weight matrices, bond dims and entropies",
                       formatter_class=fmt)
    p.add_argument("model_dir", nargs="?", default=None, help="default: the embedded MiniLM")
    p.add_argument("--n-sites", type=int, default=5)
    p.add_argument("--embeddings", action="store_true", help="include embedding tables")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the random-matrix reference column")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("report", help="plots of a model (or a saved MPO model) to files",
                       formatter_class=fmt)
    p.add_argument("directory", nargs="?", default=None,
                   help="a saved MPO model, or a model folder (default: the embedded MiniLM)")
    p.add_argument("--out", default="out/report", help="folder for the figures")
    p.add_argument("--modules", type=int, default=2, help="per-module figures for this many")
    p.add_argument("--n-sites", type=int, default=5)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("decompose", help="exact MPO of every weight matrix, with a report",
                       formatter_class=fmt)
    p.add_argument("model_dir", nargs="?", default=None, help="default: the embedded MiniLM")
    p.add_argument("--n-sites", type=int, default=5)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_decompose)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["compress", *argv]  # the main job: compress the default model
    elif argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        if Path(argv[0]).exists():
            argv = ["compress", *argv]  # ``tnlm MODEL_DIR ...`` compresses that model
        else:
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            print(f"tnlm: error: {argv[0]!r} is neither a command {COMMANDS} nor an existing "
                  f"model folder{hint}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, OSError, ValueError, KeyError, TypeError) as err:
        print(f"tnlm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tnlm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback on request
        if os.environ.get("TNLM_DEBUG"):
            raise
        print(f"tnlm: error: {type(err).__name__}: {err} (TNLM_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
