"""Where each allocation puts the budget on SmolLM2-135M: the fraction of each block's
targeted parameters kept by uniform ranks, the ``residual`` allocation and the
``sensitivity`` allocation (:class:`tnlm.compress.layerwise.Sensitivity`), from the
calibration sequences the job used (the first 32 of the seed's self-generated texts; the
job calibrates on 128 since, ``--n-calibration 128``;
read from the experiments' text cache), without compressing anything.

    python experiments/llm_allocation.py --budgets 0.5 0.6 0.8 \
        --out results/llm/allocation_s0.json --plot docs/figures/llm_allocation.png

Also written: each target's measured end-to-end error (the sensitivity) and the relative
whitened error at its uniform rank, so the weights can be read back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tnlm.compress.allocate import rank_params, spectrum_ranks, uniform_ranks  # noqa: E402
from tnlm.compress.decoder.text import token_sequences  # noqa: E402
from tnlm.compress.layerwise import (  # noqa: E402
    Sensitivity,
    capture_block_inputs,
    dense_spectra,
)
from tnlm.integration.architectures import blocks_of, default_targets  # noqa: E402
from tnlm.integration.loading import LLM_MISSING, load_default_llm  # noqa: E402

ALLOCATIONS = ("uniform", "residual", "sensitivity")


def kept_per_block(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]],
                   prefix: str) -> list[float]:
    """Fraction of each block's targeted parameters kept (dense: all of them)."""
    kept: dict[int, int] = defaultdict(int)
    total: dict[int, int] = defaultdict(int)
    for n, (i, j) in shapes.items():
        b = int(n[len(prefix) + 1:].split(".")[0])
        r = ranks[n]
        kept[b] += i * j if r is None else int(rank_params(i, j, r))
        total[b] += i * j
    return [kept[b] / total[b] for b in sorted(total)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texts", type=Path, default=None,
                   help="the self-generated texts (JSON list); default: the experiments' "
                        "cache of the seed's 256 nucleus samples")
    p.add_argument("--n-calibration", type=int, default=32,
                   help="calibration sequences (default: 32, as the documented runs; the "
                        "job's default is 128)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    texts_file = args.texts or Path(
        f"results/llm/text/selfgen_s{args.seed}_n256_b64_nucleus.json")
    if not texts_file.is_file():
        p.error(f"--texts: {texts_file} does not exist (run experiments/llm_compress.py "
                "with the seed first, or pass --texts)")
    loaded = load_default_llm()
    if loaded is None:
        print(LLM_MISSING)
        return 2
    model, tok = loaded
    seqs = token_sequences(tok, json.loads(texts_file.read_text()), 128)[:args.n_calibration]
    blocks = blocks_of(model)
    targets = default_targets(model)
    per_block = [[n for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)
                  and n.split(".")[-1] in targets] for b in blocks]
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    data = capture_block_inputs(model, seqs, 8, blocks)
    out: dict = {"seed": args.seed, "texts": str(texts_file), "budgets": {}}
    for budget in args.budgets:
        t0 = time.perf_counter()
        sens = Sensitivity(budget)
        sens.start(blocks, data[:1])  # the job's probe: the first 8 sequences, one batch
        spectra, share = dense_spectra(blocks, data, per_block, prefix, progress=True,
                                       sensitivity=sens)
        seconds = time.perf_counter() - t0
        shapes = {n: (i, j) for n, (i, j, _) in spectra.items()}
        ranks = {"uniform": uniform_ranks(shapes, budget),
                 "residual": spectrum_ranks(spectra, budget, share),
                 "sensitivity": spectrum_ranks(spectra, budget, sens.weights())}
        out["budgets"][str(budget)] = {
            "seconds": seconds,
            "kept_per_block": {a: kept_per_block(r, shapes, prefix) for a, r in ranks.items()},
            "ranks": ranks, "sensitivity": sens.errors, "relative": sens.relative}
        print(f"budget {budget}: spectra and sensitivities in {seconds:.0f} s")
        for a in ALLOCATIONS:
            k = out["budgets"][str(budget)]["kept_per_block"][a]
            print(f"  {a:12s} " + " ".join(f"{v:.2f}" for v in k))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)
    if args.plot:
        plot(out, args.plot)
    return 0


def plot(out: dict, path: Path) -> None:
    """One panel per budget: the fraction of each block's parameters kept, per allocation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(out["budgets"])
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.4), sharey=True,
                             squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for a, style in zip(ALLOCATIONS, ("k:", "C1-", "C0-")):
            k = out["budgets"][b]["kept_per_block"][a]
            ax.plot(range(len(k)), k, style, marker="." if a != "uniform" else None,
                    label=a if a != "sensitivity" else "sensitivity (default)")
        ax.set_title(f"{float(b):.0%} of the targeted parameters")
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of the block's parameters kept")
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle("SmolLM2-135M: where each allocation puts the budget", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
