"""Seconds per healing step on the main job's text, in one run: uniform draws vs
length-bucketed draws, float32 vs bfloat16 teacher (ratios against the first arm).

The student is the embedded MiniLM truncated to ``--budget`` (data-aware, uniform ranks,
no reconstruction); each arm heals a fresh copy for ``--steps`` steps (after one warm-up
step) on the same sentences. The arms are run in turn, twice, and the faster pass is kept
(the machine is shared).

With ``--texts`` the arms are instead the main job's healing settings
(``EncoderRecipe().heal_config``) on its default text with and without the shipped prose
(``default_text(n_lm=0)``, the former default; the whole text, not the job's split):
the seconds a step and the mean tokens of the text's sentences (every sentence is drawn
with the same probability), to say how much of a step's cost the longer prose sentences
explain.

Usage:
    python benchmarks/bench_heal.py [--steps 30] [--threads 2] [--texts]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--texts", action="store_true",
                    help="the job's healing on its default text with and without the prose")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    from tnlm.compress.distill import HealConfig, fast_bf16, heal
    from tnlm.compress.encoder import EncoderRecipe
    from tnlm.compress.pipeline import CompressionConfig, compress_model
    from tnlm.compress.text import default_text
    from tnlm.integration import default_model_path
    from tnlm.integration.architectures import default_targets

    path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    text = default_text(seed=0)
    model = AutoModel.from_pretrained(path).eval()
    student = compress_model(model, tok, text[:128], CompressionConfig(
        default_targets(model), budget=args.budget, heal=None), progress=False).model
    def best_seconds(arms: dict) -> dict[str, float]:
        """Per arm ``name -> (sentences, steps -> HealConfig)``: seconds a step of a fresh
        copy of the student after one warm-up step, the faster of two interleaved passes."""
        best = {name: float("inf") for name in arms}
        for _ in range(2):
            for name, (sents, config) in arms.items():
                s = copy.deepcopy(student)
                heal(s, teacher, tok, sents, config(1), progress=False)  # warm-up
                t0 = time.perf_counter()
                heal(s, teacher, tok, sents, config(args.steps), progress=False)
                best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
        return best

    def mean_tokens(sents: list[str], max_length: int) -> float:
        n = [len(x) for x in tok(sents, truncation=True, max_length=max_length)["input_ids"]]
        return sum(n) / len(n)

    if args.texts:
        recipe = EncoderRecipe()
        length = recipe.heal_config().max_length
        texts = {"former default text (no prose)": default_text(seed=0, n_lm=0),
                 "default text (with prose)": text}
        best = best_seconds({name: (sents, lambda k: recipe.heal_config(steps=k))
                             for name, sents in texts.items()})
        base = best[next(iter(texts))]
        print(f"bf16 instructions: {fast_bf16()}; threads {torch.get_num_threads()}")
        print("| text | sentences | mean tokens | s/step | ratio |\n|---|---|---|---|---|")
        for name, sents in texts.items():
            print(f"| {name} | {len(sents)} | {mean_tokens(sents, length):.1f} | "
                  f"{best[name]:.3f} | {best[name] / base:.2f}x |")
        return
    arms = [("uniform draws, float32 teacher", dict(bucket=0)),
            ("bucketed draws, float32 teacher", dict(bucket=8)),
            ("uniform draws, bfloat16 teacher", dict(bucket=0, teacher_bf16=True)),
            ("bucketed draws, bfloat16 teacher", dict(bucket=8, teacher_bf16=True)),
            ("bucketed draws, bfloat16 teacher and student",
             dict(bucket=8, teacher_bf16=True, student_bf16=True))]
    best = best_seconds({name: (text, lambda k, kw=kw: HealConfig(steps=k, **kw))
                         for name, kw in arms})
    print(f"text: {len(text)} sentences, mean {mean_tokens(text, 64):.1f} tokens; "
          f"bf16 instructions: {fast_bf16()}; threads {torch.get_num_threads()}")
    base = best[arms[0][0]]
    print("| arm | s/step | ratio |\n|---|---|---|")
    for name, _ in arms:
        print(f"| {name} | {best[name]:.3f} | {best[name] / base:.2f}x |")

if __name__ == "__main__":
    main()
