"""How many calibration sequences the causal job's statistics need (SmolLM2-135M).

The job calibrates on its first ``n_calibration`` sequences of 128 tokens (128 by
default since this script's measurement; 32 before, 4,096 tokens): every target's
whitening Gram and spectrum come from them, and block
fitting draws its batches there. A 1,536-wide input (the MLP's down projection) then has
under three tokens a dimension. This script compresses the same dense model on the same
job text (the recipe's own text for the seed: the model's samples and a quarter of the
shipped prose, written once to ``--text-cache``) with each ``--n-calibration`` given, heals
with the job's healing (``--heal-steps``, 0: none) and prints the held-out perplexity ratio,
one JSON line per setting, in the CLI job's measure (natural held-out text,
non-overlapping 256-token windows).

    python experiments/llm_calibration.py --budget 0.6 --n-calibration 32 128 --heal-steps 0
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tnlm.compress.decoder.heal import CausalHealConfig  # noqa: E402
from tnlm.compress.decoder.job import JOB_HEAL, CausalLMRecipe, compress_causal_lm, recipe_text  # noqa: E402
from tnlm.compress.decoder.quality import natural_eval_text, perplexity  # noqa: E402
from tnlm.integration.loading import default_llm_path, load_pretrained  # noqa: E402


def job_setup(budget: float, seed: int, text_cache: Path
              ) -> tuple[torch.nn.Module, Any, list[str], list[str], float]:
    """``(dense SmolLM2, tokenizer, the job's text for the seed, the natural held-out text,
    the dense perplexity on it)``; the text is the recipe's own (its samples and a quarter
    of the shipped prose), written once to ``text_cache``."""
    model, tok = load_pretrained(default_llm_path())
    base = CausalLMRecipe(budget=budget, seed=seed)
    cache = text_cache / f"job_s{seed}_n{base.n_texts}.json"
    if cache.is_file():
        text = json.loads(cache.read_text())
    else:
        t = time.time()
        text = recipe_text(model, tok, base, progress=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(text))
        print(f"text: {len(text)} texts in {time.time() - t:.0f} s -> {cache}", flush=True)
    ev = natural_eval_text()
    if ev is None:
        raise SystemExit("needs ../shared/data beside the working folder (held-out text)")
    dense = perplexity(model, tok, ev, max_length=256, stride=256).ppl
    print(json.dumps({"dense": dense}), flush=True)
    return model, tok, text, ev, dense


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-calibration", type=int, nargs="+", default=[32, 128])
    p.add_argument("--allocation-sequences", type=int, default=None,
                   help="the dense spectra pass (the allocation) on the first N calibration "
                        "sequences only (default: all)")
    p.add_argument("--heal-steps", type=int, default=0)
    p.add_argument("--text-cache", type=Path, default=Path("results/llm/text"))
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model, tok, text, ev, dense = job_setup(args.budget, args.seed, args.text_cache)
    for n in args.n_calibration:
        m = copy.deepcopy(model)
        recipe = CausalLMRecipe(budget=args.budget, seed=args.seed, n_calibration=n,
                                allocation_sequences=args.allocation_sequences,
                                heal=CausalHealConfig(steps=args.heal_steps, **JOB_HEAL))
        t = time.time()
        res = compress_causal_lm(m, tok, recipe, text=text, progress=False)
        ppl = perplexity(m, tok, ev, max_length=256, stride=256).ppl
        row = {"budget": args.budget, "seed": args.seed, "n_calibration": n,
               "allocation_sequences": args.allocation_sequences,
               "heal_steps": args.heal_steps, "ratio_kept": res.ratio, "ppl": ppl,
               "dense_ppl": dense, "ppl_ratio": ppl / dense, "seconds": res.seconds,
               "wall": time.time() - t}
        print(json.dumps(row), flush=True)
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
