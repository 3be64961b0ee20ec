"""Peak resident memory of the causal-LM job's stages on SmolLM2-135M, per healing variant.

Each variant runs in a fresh process: load the GGUF model, compress to 60 % (plain SVD,
uniform ranks: the cheapest compression, the memory of healing does not depend on how the
ranks were chosen), heal a few steps (batch 4 x 128 tokens), and report the process's
peak RSS per stage against its RSS right after loading. Variants:

* ``full``: every block's activations kept, full logits, AdamW's multi-tensor update,
  float32 teacher (healing's defaults until block checkpointing)
* ``blocks``: each block's activations recomputed in backward
  (``CausalHealConfig.checkpoint_blocks``, healing's default)
* ``blocks+chunked``: and the KL in checkpointed chunks of 1,024 positions (no chunking at
  all for a batch of 4 x 128 = 512 positions), per-parameter AdamW
* ``blocks+chunk128``: the same in chunks of 128 positions (4 chunks a batch)
* ``blocks+chunk128+bf16``: and the teacher stored in bfloat16
* ``chunked``: the KL over 1,024-position chunks with checkpointing
  (``CausalHealConfig.chunk``), per-parameter AdamW
* ``chunked+bf16``: the same with the teacher stored in bfloat16 (``teacher_bf16``)
* ``blocks+adafactor``: ``blocks`` with Adafactor (``CausalHealConfig.optimizer``):
  factored second moments, no first moment, instead of AdamW's two moment buffers
* ``blocks+chunk128+adafactor``: ``blocks+chunk128`` with Adafactor (the job's default)
* ``blocks+chunk128+adafactor+copy``: the same with the teacher a full copy of the model,
  as before :func:`tnlm.compress.decoder.job.teacher_copy` shared the embeddings, final norm and
  head with the student
* ``blocks+chunk128+adafactor+nocache``: the job's default without the teacher cache
  (``CausalHealConfig.teacher_cache_mb=0``): the teacher runs every sequence of every step
  (with ``--n-texts`` small, healing passes over the same sequences many times and the
  cache's saving a step shows)
* ``blocks+chunk128+adafactor+storeK``: the job's default with the last K of the 30
  blocks storing their activations instead of recomputing them
  (``CausalHealConfig.stored_blocks``; 30: none recomputed)
* ``blocks+chunk128+adafactor+checkpointed-kl``: the job's default with each chunk of the
  KL checkpointed (both heads and softmaxes run again in the backward pass), as before
  the untrained head's chunks computed their gradient in the forward pass
  (``tnlm.compress.decoder.kl._FusedHeadKL``)

Every variant but ``+copy`` shares those with the student.

Measured (docs/results.md): the chunked KL lowers the healing peak by 2 % and costs 35 %
more time a step; a bfloat16 teacher 8 % and 2.7x the time on a CPU without fast bfloat16
matmuls: the peak is elsewhere.

    python benchmarks/bench_llm_memory.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"full": dict(chunk=None, foreach=None, bf16=False, blocks=False),
            "blocks": dict(chunk=None, foreach=None, bf16=False, blocks=True),
            "blocks+chunked": dict(chunk=1024, foreach=False, bf16=False, blocks=True),
            "blocks+chunk128": dict(chunk=128, foreach=False, bf16=False, blocks=True),
            "blocks+chunk128+bf16": dict(chunk=128, foreach=False, bf16=True, blocks=True),
            "chunked": dict(chunk=1024, foreach=False, bf16=False, blocks=False),
            "chunked+bf16": dict(chunk=1024, foreach=False, bf16=True, blocks=False),
            "blocks+adafactor": dict(chunk=None, foreach=None, bf16=False, blocks=True,
                                     optimizer="adafactor"),
            "blocks+chunk128+adafactor": dict(chunk=128, foreach=False, bf16=False,
                                              blocks=True, optimizer="adafactor"),
            "blocks+chunk128+adafactor+copy": dict(chunk=128, foreach=False, bf16=False,
                                                   blocks=True, optimizer="adafactor",
                                                   full_copy=True),
            "blocks+chunk128+adafactor+nocache": dict(chunk=128, foreach=False, bf16=False,
                                                      blocks=True, optimizer="adafactor",
                                                      teacher_cache_mb=0.0),
            **{f"blocks+chunk128+adafactor+store{k}": dict(
                chunk=128, foreach=False, bf16=False, blocks=True, optimizer="adafactor",
                stored_blocks=k) for k in (10, 20, 30)},
            "blocks+chunk128+adafactor+checkpointed-kl": dict(
                chunk=128, foreach=False, bf16=False, blocks=True, optimizer="adafactor",
                fused=False)}


def child(variant: str, steps: int, n_texts: int | None) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from tnlm.compress.decoder import heal as causal
    from tnlm.compress.decoder import kl
    from tnlm.compress.decoder.heal import CausalHealConfig
    from tnlm.compress.decoder.job import CausalLMRecipe, compress_causal_lm
    from tnlm.compress.decoder.text import self_generated_text
    from tnlm.integration.loading import default_llm_path, load_pretrained

    v = VARIANTS[variant]
    if v["foreach"] is not None:  # force the optimizer's update style
        name = "Adafactor" if v.get("optimizer") == "adafactor" else "AdamW"
        real = getattr(torch.optim, name)
        setattr(causal.torch.optim, name,
                lambda *a, **k: real(*a, **dict(k, foreach=v["foreach"])))
    if not v.get("fused", True):
        kl.ChunkedKL.fused = False
    if v.get("full_copy"):
        import copy

        from tnlm.compress.decoder import job as llm
        llm.teacher_copy = lambda m: copy.deepcopy(m).eval()
    model, tok = load_pretrained(default_llm_path())
    rss = [int(x.split()[1]) / 1024 for x in Path("/proc/self/status").read_text()
           .splitlines() if x.startswith("VmRSS:")][0]
    cache = ROOT / "results/llm/text/selfgen_s0_n64.json"
    texts = json.loads(cache.read_text()) if cache.is_file() else \
        self_generated_text(model, tok, 16, seed=0, progress=False)
    texts = texts[:n_texts]
    recipe = CausalLMRecipe(budget=0.6, method="plain", n_calibration=8, fit_steps=0,
                            heal=CausalHealConfig(steps=steps, chunk=v["chunk"],
                                                  teacher_bf16=v["bf16"],
                                                  checkpoint_blocks=v["blocks"],
                                                  stored_blocks=v.get("stored_blocks", 0),
                                                  optimizer=v.get("optimizer", "adamw"),
                                                  teacher_cache_mb=v.get(
                                                      "teacher_cache_mb",
                                                      CausalHealConfig.teacher_cache_mb)))
    res = compress_causal_lm(model, tok, recipe, text=texts, progress=False)
    return dict(variant=variant, optimizer=recipe.heal.optimizer, rss_after_load_mb=rss,
                peaks_mb=res.peak_rss_mb,
                heal_seconds=res.seconds.get("healing"), losses=res.heal.losses,
                sequences=res.n_sequences, teacher_sequences=res.heal.teacher_sequences)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--n-texts", type=int, default=None,
                    help="heal on the first N of the 64 cached texts (default: all)")
    ap.add_argument("--child", choices=tuple(VARIANTS), default=None)
    ap.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS),
                    help="the first is the baseline of the ratios")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.n_texts)))
        return 0
    rows = []
    for name in args.variants:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps",
                              str(args.steps)] + ([] if args.n_texts is None else
                                                  ["--n-texts", str(args.n_texts)]),
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peaks_mb"]["healing"]
    step0 = rows[0]["heal_seconds"] / args.steps
    print(f"{rows[0]['sequences']} healing sequences, {args.steps} steps of 4")
    print("| variant | RSS after load MB | compression peak MB | healing peak MB | "
          "healing / after load | healing / first's | s per step | time / first's | "
          "teacher ran |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["peaks_mb"]
        print(f"| {r['variant']} | {r['rss_after_load_mb']:.0f} | {p['compression']:.0f} | "
              f"{p['healing']:.0f} | {p['healing'] / r['rss_after_load_mb']:.2f}x | "
              f"{p['healing'] / base:.2f}x | {r['heal_seconds'] / args.steps:.1f} | "
              f"{r['heal_seconds'] / args.steps / step0:.2f}x | {r['teacher_sequences']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
