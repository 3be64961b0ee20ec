"""SmolLM2-135M-Instruct compressed layer by layer, healed, and scored by perplexity.

One run = one (method, budget, seed): the dense model's self-generated text (cached per
seed in ``--text-cache`` so every method of a seed calibrates and heals on the same
text), compression (``tnlm.compress.decoder.job``), healing, then the held-out perplexity of
natural text never used for either (``decoder.quality.natural_eval_text``: SST-2 dev, CoLA
dev, SICK trial sentences; non-overlapping windows of ``--eval-length`` tokens, as SVD-LLM
scores WikiText) against the dense model's, greedy answers to the 50 shipped questions
against the dense model's (identical answers, the teacher-forced top-1 agreement on the
dense answers' tokens, and keyword-checked right answers), stage times and peak memory.
Writes one JSON.

    python experiments/llm_compress.py --method tnlm --budget 0.6 --seed 0 \\
        --out results/llm/tnlm_0.6_s0.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tnlm.compress.decoder.heal import OPTIMIZERS, CausalHealConfig  # noqa: E402
from tnlm.compress.decoder.job import (  # noqa: E402
    TEXT_SOURCES,
    CausalLMRecipe,
    compress_causal_lm,
    has_checkpoint,
    interleave,
    recipe_text,
    shipped_prose,
)
from tnlm.compress.decoder.quality import (  # noqa: E402
    answer_agreement,
    answer_token_agreement,
    answers_correct,
    greedy_answers,
    natural_eval_text,
    perplexity,
    simple_questions,
)
from tnlm.compress.decoder.text import self_generated_text  # noqa: E402
from tnlm.compress.layerwise import ALLOCATIONS, METHODS, OUTPUT_ERRORS  # noqa: E402
from tnlm.compress.memory import mmap_large_allocations, release_memory, rss_mb  # noqa: E402
from tnlm.integration.loading import LLM_MISSING, load_default_llm  # noqa: E402


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def by_document(model, tok, eval_text, max_length: int) -> list[float]:
    """The perplexity of each held-out document alone (SST-2 dev, CoLA dev, SICK trial),
    in non-overlapping windows as the whole stream's."""
    return [perplexity(model, tok, [doc], max_length=max_length, stride=max_length).ppl
            for doc in eval_text]


def dense_reference(model, tok, cache: Path, eval_text, max_length: int) -> dict:
    """Dense perplexity and answers (their strings and generated token ids), computed once
    and cached; the keyword-checked count with the current keys."""
    ref = json.loads(cache.read_text()) if cache.is_file() else {}
    if "ppl" not in ref:
        t = time.perf_counter()
        ppl = perplexity(model, tok, eval_text, max_length=max_length, stride=max_length)
        ref = dict(ppl=ppl.ppl, n_tokens=ppl.n_tokens, seconds=time.perf_counter() - t)
    if "ppl_by_document" not in ref:  # caches from before it: each document alone
        ref["ppl_by_document"] = by_document(model, tok, eval_text, max_length)
        _atomic_json(cache, ref)
    if "answer_ids" not in ref:  # caches from before the ids keep their strings
        answers, ids = greedy_answers(model, tok, simple_questions(), return_ids=True)
        ref.setdefault("answers", answers)
        ref.update(answer_ids=ids,
                   token_agreement=answer_token_agreement(model, tok, simple_questions(), ids))
        _atomic_json(cache, ref)
    ref["answers_correct"] = sum(answers_correct(ref["answers"]))  # the current keys
    return ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS + ("dense",), default="tnlm")
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-texts", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=64,
                   help="texts sampled at once (a new text cache is written with it)")
    p.add_argument("--top-k", type=int, default=None,
                   help="the samples drawn among the K most likely tokens, then the top-0.95 "
                        "nucleus (default: the whole nucleus, as the job; text caches written "
                        "before the sampler were drawn with K=50 and are read for --top-k 50)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-calibration", type=int, default=32,
                   help="calibration sequences (default: 32, as every documented run; the "
                        "job's default is 128 since)")
    p.add_argument("--fit-steps", type=int, default=16)
    p.add_argument("--output-error", choices=OUTPUT_ERRORS, default="total",
                   help="a block's output error (fitting, the residual allocation): each "
                        "position's relative error averaged (position) or all positions' at "
                        "once (total, the default)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="default: the job's (sensitivity for tnlm, uniform for the baselines)")
    p.add_argument("--sensitivity-sequences", type=int, default=8,
                   help="allocation sensitivity: calibration sequences of its probe (the "
                        "CLI job's default: 4; 8 here, as every earlier run)")
    p.add_argument("--pivoted", action="store_true",
                   help="fix each truncated bond's gauge: r (I + J - r) numbers a layer")
    p.add_argument("--heal-pivoted", action="store_true",
                   help="with --pivoted: fix the gauge before healing (default: after)")
    p.add_argument("--heal-steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="healing's optimizer (adafactor: factored second moments, less "
                        "memory; the same lr)")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="weight of the block-output term in healing (needs --chunk)")
    p.add_argument("--chunk", type=int, default=None,
                   help="healing's KL over chunks of this many positions (less memory)")
    p.add_argument("--eval-length", type=int, default=256)
    p.add_argument("--add-prose", type=float, default=0.0,
                   help="after the text, this fraction of the shipped prose (shuffled with "
                        "the seed): more healing text at no sampling cost (calibration "
                        "still takes the first sequences; the CLI job's default: 0.25; 0 "
                        "here, as every earlier run)")
    p.add_argument("--text-cache", type=Path, default=Path("results/llm/text"))
    p.add_argument("--text", choices=TEXT_SOURCES, default="self",
                   help="calibration and healing text: the dense model's own samples "
                        "(self), the prose that ships with tnlm (prose: "
                        "tnlm.compress.decoder.job.recipe_text, shuffled with the seed), or the "
                        "prose then the samples (both), the model's own answers to "
                        "chat prompts in its chat format (chat), or the first half of "
                        "each of the seed's two caches, alternating (mixed)")
    p.add_argument("--text-file", type=Path, default=None, metavar="JSON",
                   help="calibrate and heal on this JSON list of strings instead (a user's "
                        "own text, e.g. experiments/indomain_text.py's); --text and "
                        "--add-prose are then refused")
    p.add_argument("--teacher-cache-mb", type=float, default=None,
                   help="healing's teacher cache limit (default: CausalHealConfig's; 0: none)")
    p.add_argument("--eval-at", type=int, nargs="*", default=[],
                   help="healing steps after which the perplexity is also measured (the "
                        "healing curve of one run; 0: before healing; the last step is "
                        "always measured)")
    p.add_argument("--no-answers", action="store_true")
    p.add_argument("--teacher-bf16", action="store_true")
    p.add_argument("--no-checkpoint-blocks", action="store_true",
                   help="keep every block's activations in healing (the former default)")
    p.add_argument("--low-memory", action="store_true",
                   help="as tnlm compress --low-memory: every block >= 128 KiB mapped")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                   help="keep the layer-by-layer compression's per-block checkpoint here "
                        "and resume from it when it is there: a healing sweep compresses "
                        "once (the blocks and their ranks are read back; healing starts "
                        "afresh)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    bad = [k for k in args.eval_at if not 0 <= k < args.heal_steps]
    if bad:
        p.error(f"--eval-at: steps must be in [0, --heal-steps) = [0, {args.heal_steps}) "
                f"(the last step is always measured), got {bad}")
    if not 0.0 <= args.add_prose <= 1.0:
        p.error(f"--add-prose: a fraction in [0, 1], got {args.add_prose}")
    if args.add_prose and args.text in ("prose", "both"):
        p.error(f"--add-prose: --text {args.text} holds all of the prose already")
    if args.text_file is not None and (args.add_prose or args.text != "self"):
        p.error("--text-file: the text is the file's alone (no --add-prose or --text)")
    if args.sensitivity_sequences < 1:
        p.error(f"--sensitivity-sequences: at least 1, got {args.sensitivity_sequences}")
    if args.hidden_weight and not args.chunk:
        p.error("--hidden-weight needs --chunk (the block term runs with the chunked KL)")
    mapped = mmap_large_allocations() if args.low_memory else False
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    loaded = load_default_llm()
    if loaded is None:
        print(LLM_MISSING)
        return 2
    model, tok = loaded
    load_s = time.perf_counter() - t0
    dense_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    release_memory()  # as the job's stages start: what the loading freed is given back
    rss_loaded = rss_mb() or _rss()
    eval_text = natural_eval_text()
    if eval_text is None:
        print("../shared/data is absent: no natural held-out text")
        return 2
    ref = dense_reference(model, tok, args.text_cache.parent / "dense.json", eval_text,
                          args.eval_length)
    # the texts depend on how many are sampled at once; 16 was the only batch once
    batch = "" if args.gen_batch == 16 else f"_b{args.gen_batch}"
    # caches without a suffix were drawn by transformers' sampling, which applied top_k=50
    top = "" if args.top_k == 50 else ("_nucleus" if args.top_k is None else f"_k{args.top_k}")
    t1 = time.perf_counter()

    def samples(chat: bool) -> list[str]:
        """The seed's n_texts samples (continuations, or chat answers), cached."""
        kind = "selfgen-chat" if chat else "selfgen"
        text_file = args.text_cache / f"{kind}_s{args.seed}_n{args.n_texts}{batch}{top}.json"
        if text_file.is_file():
            return json.loads(text_file.read_text())
        own = self_generated_text(model, tok, args.n_texts, seed=args.seed, progress=True,
                                  batch_size=args.gen_batch, chat=chat,
                                  top_k=args.top_k)
        _atomic_json(text_file, own)
        return own

    texts = []
    if args.text_file is not None:  # the user's own text, nothing sampled
        texts = json.loads(args.text_file.read_text())
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
            p.error(f"--text-file: a JSON list of strings expected in {args.text_file}")
    elif args.text in ("prose", "both"):  # the job's prose (the samples are cached here)
        texts = recipe_text(None, tok, CausalLMRecipe(text_source="prose", seed=args.seed))
    if args.text_file is not None:
        pass
    elif args.text in ("self", "both", "chat"):
        texts += samples(args.text == "chat")
    elif args.text == "mixed":  # the first halves of both caches, alternating
        half = args.n_texts // 2
        texts = interleave(samples(False)[:args.n_texts - half], samples(True)[:half])
    if args.add_prose:  # as the job adds it (CausalLMRecipe.prose_fraction)
        texts += shipped_prose(args.seed, args.add_prose)
    text_s = time.perf_counter() - t1
    recipe = CausalLMRecipe(
        budget=args.budget, method="tnlm" if args.method == "dense" else args.method,
        seq_len=args.seq_len, n_calibration=args.n_calibration, fit_steps=args.fit_steps,
        output_error=args.output_error, pivoted=args.pivoted,
        heal_pivoted=args.heal_pivoted,
        allocation=args.allocation, sensitivity_sequences=args.sensitivity_sequences,
        heal=CausalHealConfig(steps=args.heal_steps, lr=args.lr, batch_size=args.batch_size,
                              teacher_bf16=args.teacher_bf16, seed=args.seed,
                              checkpoint_blocks=not args.no_checkpoint_blocks,
                              optimizer=args.optimizer, chunk=args.chunk,
                              hidden_weight=args.hidden_weight,
                              teacher_cache_mb=CausalHealConfig.teacher_cache_mb
                              if args.teacher_cache_mb is None else args.teacher_cache_mb),
        seed=args.seed)
    res = None
    curve: dict[int, float] = {}
    curve_s = [0.0]  # the curve's measures take place inside healing's seconds

    def measure(step: int) -> None:
        if step in args.eval_at:  # checked to be below --heal-steps
            t = time.perf_counter()
            r = perplexity(model, tok, eval_text, max_length=args.eval_length,
                           stride=args.eval_length).ppl / ref["ppl"]
            curve[step] = r
            curve_s[0] += time.perf_counter() - t
            print(f"healing step {step}: perplexity {r:.3f}x the dense model's")

    if args.method != "dense":
        resume = args.checkpoint is not None and has_checkpoint(args.checkpoint)
        res = compress_causal_lm(model, tok, recipe, text=texts, progress=True, log=print,
                                 on_heal_step=measure if args.eval_at else None,
                                 checkpoint_dir=args.checkpoint, resume=resume)
    t1 = time.perf_counter()
    ppl = perplexity(model, tok, eval_text, max_length=args.eval_length,
                     stride=args.eval_length)
    eval_s = time.perf_counter() - t1
    docs = by_document(model, tok, eval_text, args.eval_length)
    out = dict(method=args.method, budget=args.budget, seed=args.seed,
               allocation=recipe.resolved_allocation() if args.method != "dense" else None,
               heal_optimizer=recipe.heal.optimizer, args={
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        dense_ppl=ref["ppl"], ppl=ppl.ppl, ppl_ratio=ppl.ppl / ref["ppl"],
        # each held-out document alone (SST-2 dev, CoLA dev, SICK trial) against the dense
        ppl_by_document=docs, ppl_ratio_by_document=[
            a / b for a, b in zip(docs, ref["ppl_by_document"])],
        eval_tokens=ppl.n_tokens, dense_param_mb=dense_mb, mmap_threshold_set=mapped)
    if res is not None:
        # the curve's measures ran inside healing: their time is taken out
        # (heal_curve_seconds); the healing peak includes them
        secs = {k: v - (curve_s[0] if k in ("healing", "total") else 0.0)
                for k, v in res.seconds.items()}
        out.update(pivoted=args.pivoted, kept=res.ratio, resumed=resume,
                   # the probe the ranks were measured on (a resumed run's: its checkpoint's)
                   sensitivity_sequences_used=res.layerwise.sensitivity_sequences,
                   stored_params=sum(p.numel() for p in model.parameters()),
                   params_before=res.layerwise.params_before,
                   params_after=res.layerwise.params_after,
                   block_errors=res.layerwise.block_errors,
                   ranks=res.layerwise.ranks,
                   heal_losses=res.heal.losses[::10] if res.heal else None,
                   heal_stopped=res.heal.stopped if res.heal else None,
                   heal_teacher_sequences=res.heal.teacher_sequences if res.heal else None,
                   heal_teacher_kept_mb=res.heal.teacher_kept_mb if res.heal else None,
                   heal_hidden_losses=res.heal.hidden_losses[::10] if res.heal else None,
                   # the last point: the parameters kept (after a stop, the snapshot's:
                   # those after best_step optimizer steps)
                   heal_curve={**curve, (res.heal.best_step if res.heal.stopped
                                         else args.heal_steps): ppl.ppl / ref["ppl"]}
                   if curve and res.heal else None,
                   seconds=dict(load=load_s, text=text_s, **secs, eval=eval_s),
                   peak_rss_mb=_rss(), rss_after_load_mb=rss_loaded,
                   stage_peak_rss_mb=res.peak_rss_mb,
                   heal_curve_seconds=curve_s[0],
                   heal_peak_includes_curve=bool(curve),
                   compress_seconds=secs.get("compression", 0) + secs.get("healing", 0))
    if not args.no_answers:
        answers = greedy_answers(model, tok, simple_questions())
        out.update(answers=answers, answer_agreement=answer_agreement(answers, ref["answers"]),
                   answers_correct=sum(answers_correct(answers)),
                   dense_answers_correct=ref["answers_correct"],
                   token_agreement=answer_token_agreement(model, tok, simple_questions(),
                                                          ref["answer_ids"]),
                   dense_token_agreement=ref["token_agreement"])
    _atomic_json(args.out, out)
    print(json.dumps({k: v for k, v in out.items()
                      if k not in ("answers", "heal_losses", "heal_hidden_losses", "block_errors",
                                   "ranks", "args")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
