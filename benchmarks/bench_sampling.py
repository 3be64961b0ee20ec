"""Seconds to sample text with SmolLM2-135M: transformers' sampling against tnlm's
``NucleusSampler``, in one run (ratios against the first arm).

Every arm writes ``--texts`` continuations of the same short prompt, ``--tokens`` new
tokens each, all in one batch with the KV cache (as ``self_generated_text`` does):

* ``transformers top-p 0.95 (+ top-k 50)``: ``generate(do_sample=True, top_p=0.95)``,
  with the ``top_k=50`` transformers adds unless told otherwise (how tnlm sampled
  before ``NucleusSampler``);
* ``transformers top-p 0.95``: the same with ``top_k=0`` (the distribution tnlm samples
  now);
* ``tnlm NucleusSampler top-p 0.95``: ``generate(do_sample=False)`` with the sampler as
  its logits processor (one uniform draw a row among the 1,024 most likely tokens);
* ``greedy``: no sampling at all, the floor of the model's own decoding time.

The arms run in turn, ``--repeats`` times; the fastest of each is kept (the machine is
shared).

    python benchmarks/bench_sampling.py [--texts 64] [--tokens 48] [--repeats 2]

With ``--batch-sizes B1 B2 ...`` it measures instead how many texts a second tnlm's
sampler writes when ``B`` are sampled at once (``--texts`` texts in all, a multiple of
every B; the job's ``CausalLMRecipe.gen_batch`` is 64), ratios against the first B:

    python benchmarks/bench_sampling.py --batch-sizes 64 128 256 --texts 256 --tokens 128
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="texts sampled at once, each size in turn (the sampler only)")
    args = ap.parse_args(argv)
    if args.batch_sizes and min(args.batch_sizes) < 1:
        ap.error(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    if args.batch_sizes and any(args.texts % b for b in args.batch_sizes):
        ap.error(f"--texts ({args.texts}) must be a multiple of every --batch-sizes value")
    import torch

    from tnlm.compress.decoder.sampling import NucleusSampler
    from tnlm.integration.loading import default_llm_path, load_pretrained

    model, tok = load_pretrained(default_llm_path())
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(["The weather this morning"] * args.texts, return_tensors="pt", padding=True)
    common = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                  pad_token_id=tok.pad_token_id)
    if args.batch_sizes:
        return batch_sizes(model, tok, args, common)
    arms = {
        "transformers top-p 0.95 (+ top-k 50)": lambda: model.generate(
            **batch, do_sample=True, top_p=0.95, **common),
        "transformers top-p 0.95": lambda: model.generate(
            **batch, do_sample=True, top_p=0.95, top_k=0, **common),
        "tnlm NucleusSampler top-p 0.95": lambda: model.generate(
            **batch, do_sample=False, **common, logits_processor=[
                NucleusSampler(1.0, 0.95, torch.Generator().manual_seed(0))]),
        "greedy": lambda: model.generate(**batch, do_sample=False, **common),
    }
    best = {name: float("inf") for name in arms}
    with torch.no_grad():
        model.generate(**batch, do_sample=False, max_new_tokens=2,
                       pad_token_id=tok.pad_token_id)  # warm-up
        for _ in range(args.repeats):
            for name, run in arms.items():
                t0 = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t0)
    first = next(iter(best.values()))
    floor = best["greedy"]
    print(f"{args.texts} texts x {args.tokens} new tokens, threads {torch.get_num_threads()}")
    print("| arm | seconds | vs first | ms a step beyond greedy |")
    print("|---|---|---|---|")
    for name, sec in best.items():
        print(f"| {name} | {sec:.2f} | {sec / first:.2f}x | "
              f"{(sec - floor) / args.tokens * 1e3:.0f} |")
    return 0


def batch_sizes(model, tok, args, common) -> int:
    """Texts a second of the sampler at each batch size (the fastest of --repeats)."""
    import torch

    from tnlm.compress.decoder.sampling import NucleusSampler

    best = {}
    with torch.no_grad():
        model.generate(**tok(["a"], return_tensors="pt"), do_sample=False, max_new_tokens=2,
                       pad_token_id=tok.pad_token_id)  # warm-up
        for _ in range(args.repeats):
            for b in args.batch_sizes:
                batch = tok(["The weather this morning"] * b, return_tensors="pt",
                            padding=True)
                t0 = time.perf_counter()
                for _ in range(args.texts // b):
                    model.generate(**batch, do_sample=False, **common, logits_processor=[
                        NucleusSampler(1.0, 0.95, torch.Generator().manual_seed(0))])
                sec = time.perf_counter() - t0
                best[b] = min(best.get(b, float("inf")), sec)
    first = best[args.batch_sizes[0]]
    print(f"{args.texts} texts x {args.tokens} new tokens, threads {torch.get_num_threads()}")
    print("| texts at once | seconds | texts a second | time vs first |")
    print("|---|---|---|---|")
    for b, sec in best.items():
        print(f"| {b} | {sec:.1f} | {args.texts / sec:.2f} | {sec / first:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
