"""Gradual compression of a causal LM: cut, heal, cut further, heal (SmolLM2-135M).

Dimension squeezing's idea (cut a little, let the rest recover, cut again) for the decoder
job: the dense model is compressed to the first ``--stages`` budget and healed, its MPO
layers merged back to dense linears (exact: each holds the rank it was given), and that
healed model compressed to the next budget by the same layer-by-layer path (its own
allocation, whitening and block fitting, the healed model's blocks as targets), and so on to
``--budget``. Every stage heals by next-token KL to the **original** dense model, with the
job's healing (Adafactor, chunked KL) for its share of ``--heal-steps`` (the batches after
the earlier stages': one walk through the seeded draws); the budget is
always the fraction of the dense targets' parameters. Same job text as
``experiments/llm_calibration.py`` (the recipe's own text for the seed, cached in
``--text-cache``), so its one-shot rows (2.570x at 60 %, seed 0, 150 steps) compare directly.
``CausalLMRecipe.stages`` (``tnlm compress --lm-stages``) does the same inside the job, with
the steps split evenly; here each stage's steps are given. Prints one JSON line per stage
(held-out perplexity ratio, non-overlapping 256-token windows on the natural held-out text,
the CLI job's measure).

    python experiments/llm_gradual.py --budget 0.6 --stages 0.8 --heal-steps 75 75
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_calibration import job_setup  # noqa: E402

from tnlm.compress.decoder.heal import CausalHealConfig, heal_causal  # noqa: E402
from tnlm.compress.decoder.job import JOB_HEAL, CausalLMRecipe  # noqa: E402
from tnlm.compress.decoder.quality import perplexity  # noqa: E402
from tnlm.compress.decoder.text import token_sequences  # noqa: E402
from tnlm.compress.layerwise import compress_layerwise  # noqa: E402
from tnlm.integration.merge import merge_factorized  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--stages", type=float, nargs="*", default=[0.8],
                   help="intermediate budgets, decreasing, each above --budget")
    p.add_argument("--heal-steps", type=int, nargs="+", default=[75, 75],
                   help="healing steps of each stage (one more than --stages)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-calibration", type=int, default=32,
                   help="calibration sequences of each cut (default: 32, as the documented "
                        "runs; the job's default is 128)")
    p.add_argument("--text-cache", type=Path, default=Path("results/llm/text"))
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = p.parse_args(argv)
    budgets = [*args.stages, args.budget]
    if len(args.heal_steps) != len(budgets):
        p.error(f"--heal-steps needs {len(budgets)} numbers, one a stage")
    if any(b <= c for b, c in zip(budgets, budgets[1:])):
        p.error(f"budgets must decrease: {budgets}")
    torch.manual_seed(args.seed)
    dense, tok, text, ev, dense_ppl = job_setup(args.budget, args.seed, args.text_cache)
    dense.eval()
    base = CausalLMRecipe(budget=args.budget, seed=args.seed, n_calibration=args.n_calibration)
    sequences = token_sequences(tok, list(text), base.seq_len)
    model = copy.deepcopy(dense)
    t_all = time.time()
    for k, (budget, steps) in enumerate(zip(budgets, args.heal_steps)):
        if k:
            print(f"stage {k}: merged {merge_factorized(model)} MPO layers", flush=True)
        recipe = CausalLMRecipe(budget=budget, seed=args.seed, n_calibration=args.n_calibration,
                                heal=CausalHealConfig(steps=steps, **JOB_HEAL,
                                                      first_draw=sum(args.heal_steps[:k])))
        t = time.time()
        lw = compress_layerwise(model, sequences[:recipe.n_calibration],
                                recipe.layerwise_config(model), progress=False)
        t_comp = time.time() - t
        ppl_cut = perplexity(model, tok, ev, max_length=256, stride=256).ppl
        t = time.time()
        healed = heal_causal(model, dense, sequences, recipe.resolved_heal(), progress=True)
        t_heal = time.time() - t
        ppl = perplexity(model, tok, ev, max_length=256, stride=256).ppl
        row = {"budget": args.budget, "stages": budgets, "heal_steps": args.heal_steps,
               "seed": args.seed, "stage": k, "stage_budget": budget, "stage_steps": steps,
               "params_after": lw.params_after, "ppl_before_healing": ppl_cut,
               "ratio_before_healing": ppl_cut / dense_ppl, "ppl": ppl,
               "dense_ppl": dense_ppl, "ppl_ratio": ppl / dense_ppl,
               "heal_stopped": healed.stopped, "compression_s": t_comp, "healing_s": t_heal,
               "wall": time.time() - t_all}
        print(json.dumps(row), flush=True)
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
