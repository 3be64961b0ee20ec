"""Command-line interface: ``tnlm <command> [MODEL_DIR] ...``.

Commands default to the embedded MiniLM when MODEL_DIR is omitted. User
mistakes print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["main"]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line."""


def _load_matrices(model_dir: str | None) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from tnlm.integration import default_model_path

    path = Path(model_dir) if model_dir else default_model_path()
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"MODEL_DIR {path} holds no model.safetensors")
    weights = load_file(str(file))
    return {k.removesuffix(".weight"): v for k, v in weights.items()
            if k.endswith(".weight") and v.ndim == 2}


def cmd_decompose(args: argparse.Namespace) -> int:
    """Decompose every 2-D weight exactly and print bond dimensions, errors and entropies."""
    from tqdm.auto import tqdm

    from tnlm import MPO

    mats = _load_matrices(args.model_dir)
    names = [n for n in mats if n.endswith(("query", "key", "value", "dense"))
             or n.endswith("word_embeddings")]
    if not names:
        raise UserError("no linear or embedding weights found in the model")
    print(f"{'module':44s} {'I x J':>12s} {'in_shape':>18s} {'out_shape':>16s} "
          f"{'bond_dims':>22s} {'rel.err':>8s} {'S_central':>9s}")
    for name in tqdm(names, desc="decompose", leave=False, disable=args.quiet):
        W = mats[name]
        # the y = x @ W convention: nn.Linear stores weight (out, in); embeddings (vocab, dim)
        W = W if name.endswith("embeddings") else W.T
        mpo = MPO.from_matrix(W.astype(np.float64), n_sites=args.n_sites, pad=True)
        err = np.linalg.norm(mpo.to_matrix() - W) / np.linalg.norm(W)
        s = mpo.entanglement_entropy(max(mpo.central_index - 1, 0))
        print(f"{name:44s} {str(W.shape):>12s} {str(mpo.in_shape):>18s} "
              f"{str(mpo.out_shape):>16s} {str(mpo.bond_dims):>22s} {err:8.1e} {s:9.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tnlm", description="MPO compression of language models")
    sub = ap.add_subparsers(dest="command")
    p = sub.add_parser("decompose", help="exact MPO of every weight matrix, with a report")
    p.add_argument("model_dir", nargs="?", default=None, help="default: the embedded MiniLM")
    p.add_argument("--n-sites", type=int, default=5)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_decompose)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["decompose", *(argv or [])])
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"tnlm: error: {err}", file=sys.stderr)
        return 2
