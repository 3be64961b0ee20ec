"""MiniLM inference and training steps: MPO models against the dense model, in the same run.

Usage:  python benchmarks/bench_model.py [--threads 1] [--repeats 7] [--train-repeats 5]
                                         [--no-cache-arm] [--markdown table.md]
                                         [--plot docs/figures/bench_model.png]
        python benchmarks/bench_model.py --threads 1 --training-only [--train-repeats 7]
(results in docs/benchmarks.md were run with ``--threads 1 --no-cache-arm``; about 15
minutes, most of it the batch-64 forwards and the training steps; ``--training-only``
times the training steps alone, a few minutes)

Models (all-MiniLM-L6-v2, the 36 encoder linears as targets):
  * dense: the transformers model as loaded
  * MPO untruncated: ``get_mpo_model`` (5 balanced sites, mode auto), with the dense-W cache
    (default) and without it (``cache_dense=False``: W rebuilt at every forward)
  * compressed 50 % / 25 %: ``compress_model(..., CompressionConfig(targets, budget=b,
    heal=None))`` on the calibration sentences below (2-site low-rank layers)
Inference: eval mode, ``torch.no_grad()``, batches of 1, 8 and 64 sentences x 64 tokens.
Training: one step (forward, loss, backward, AdamW step) on 32 sentences x 64 tokens for
the dense model (all parameters), LFA (untruncated MPO, ``setup_training("auxiliary")``:
central tensors frozen) and LoRA (peft, r=8, the same targets); with ``--chain-arm``
also LFA with ``MPOModule.block_train = False`` (autograd through the chain's einsums,
the chain-autograd reference).

Every figure is a ratio of medians against the dense model, with the arms interleaved
in each repeat (the machine's load drifts between repeats, not within one).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from tnlm.bridge import MPOModule
from tnlm.compress.pipeline import CompressionConfig, compress_model
from tnlm.integration import MPOConfig, get_mpo_model, load_default_model
from tnlm.integration.architectures import default_targets

TOKENS = 64

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Two children are building a sandcastle at the beach.",
    "The stock market fell sharply after the announcement.",
    "She reads a novel every week during her commute.",
    "Heavy rain is expected across the region tomorrow.",
    "The chef prepared a delicious meal with fresh vegetables.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The committee postponed its decision until next month.",
    "A dog is running through a field of tall grass.",
    "He forgot his umbrella and got soaked on the way home.",
    "The new phone has a faster processor and a better camera.",
    "Volunteers cleaned up the park on Saturday morning.",
    "The orchestra performed a symphony by Beethoven.",
    "Traffic was backed up for miles because of the accident.",
    "The museum opened an exhibition of modern sculpture.",
    "A woman is slicing tomatoes in the kitchen.",
    "The team celebrated their victory late into the night.",
    "Prices of fresh fruit rose during the winter months.",
    "The students listened carefully to the lecture on physics.",
    "A cat is sleeping on a sunny windowsill.",
    "The airline cancelled dozens of flights due to the storm.",
    "He has been learning to play the piano for three years.",
    "The library extended its opening hours during exams.",
    "A group of hikers reached the summit at dawn.",
    "The film received mixed reviews from critics.",
    "Engineers are testing a new design for the bridge.",
    "The children laughed at the clown's silly tricks.",
    "Local farmers sell their produce at the weekly market.",
    "The conference will be held online this year.",
    "A boy is riding a bicycle down a steep hill.",
    "The government announced new measures to reduce pollution.",
    "She painted the walls of her room a pale shade of blue.",
    "The restaurant was too noisy for a quiet conversation.",
    "An old man is feeding pigeons in the square.",
    "The software update fixed several security problems.",
    "They watched the sunset from the top of the lighthouse.",
    "The hospital hired more nurses to cope with demand.",
    "This movie is a complete waste of time and money.",
    "What a wonderful, heartfelt and beautifully acted story.",
]


def batch_of(tok, n: int) -> dict[str, torch.Tensor]:
    sents = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
    b = tok(sents, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
    return {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def interleaved(arms: dict[str, callable], repeats: int, min_sample: float = 0.2
                ) -> dict[str, float]:
    """Median seconds per call of each arm. Every repeat runs each arm once, in rotating
    order; a sample is ``k`` consecutive calls, ``k`` chosen so that the first arm's sample
    lasts ``min_sample`` seconds (short forwards are otherwise at the mercy of the load)."""
    for fn in arms.values():  # warm-up (caches, allocator)
        fn()
    first = next(iter(arms.values()))
    t0 = time.perf_counter()
    first()
    k = max(1, math.ceil(min_sample / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = arms[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            times[name].append((time.perf_counter() - t0) / k)
    return {name: statistics.median(t) for name, t in times.items()}


def build_models(args) -> tuple[dict[str, nn.Module], object, dict[str, float]]:
    dense, tok = load_default_model()
    dense.eval()
    targets = default_targets(dense)  # the 36 encoder linears
    targets_params = sum(m.weight.numel() for n, m in dense.named_modules()
                         if isinstance(m, nn.Linear) and n.startswith("encoder."))
    models: dict[str, nn.Module] = {"dense": dense}
    sizes = {"dense": 1.0}
    mpo = get_mpo_model(copy.deepcopy(dense), MPOConfig(target_modules=targets), progress=False)
    n_mpo = sum(1 for _ in mpo.mpo_modules())
    assert n_mpo == 36, f"expected the 36 encoder linears, got {n_mpo}"
    models["MPO untruncated"] = mpo.eval()
    sizes["MPO untruncated"] = sum(sum(c.numel() for c in m.cores)
                                   for _, m in mpo.mpo_modules()) / targets_params
    if args.no_cache_arm:
        nocache = copy.deepcopy(mpo)
        for _, m in nocache.mpo_modules():
            m.cache_dense = False
        models["MPO untruncated, no cache"] = nocache.eval()
        sizes["MPO untruncated, no cache"] = sizes["MPO untruncated"]
    for budget in args.budgets:
        t0 = time.perf_counter()
        res = compress_model(copy.deepcopy(dense), tok, SENTENCES,
                             CompressionConfig(targets, budget=budget, heal=None),
                             progress=False)
        name = f"compressed {int(round(budget * 100))} %"
        models[name] = res.model.eval()
        sizes[name] = res.params_after / res.params_before
        print(f"{name}: ranks {sorted(set(res.ranks.values()))}, params {sizes[name]:.3f} "
              f"of the targets ({time.perf_counter() - t0:.1f} s)", flush=True)
    return models, tok, sizes


def bench_inference(models, tok, batches, repeats) -> dict[int, dict[str, float]]:
    out = {}
    for n in batches:
        inputs = batch_of(tok, n)

        def run(m, inputs=inputs):
            with torch.no_grad():
                m(**inputs)

        t = interleaved({name: (lambda m=m: run(m)) for name, m in models.items()}, repeats)
        out[n] = {name: t[name] / t["dense"] for name in t}
        out[n]["_dense_ms"] = t["dense"] * 1e3
        print(f"batch {n:3d} x {TOKENS} tokens: dense {t['dense'] * 1e3:8.1f} ms   "
              + "   ".join(f"{k} {v:.2f}x" for k, v in out[n].items()
                           if k not in ("dense", "_dense_ms")), flush=True)
        # modes the MPO layers ran in
        for name, m in models.items():
            if hasattr(m, "mpo_modules"):
                modes = sorted({mm.last_mode for _, mm in m.mpo_modules()})
                print(f"    {name}: layer modes {modes}", flush=True)
    return out


LFA = "LFA (MPO, central frozen)"
LFA_CHAIN = "LFA, chain autograd"


def bench_training(dense_model, mpo_model, tok, batch, repeats, lr=1e-4,
                   chain_arm: bool = False) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model

    inputs = batch_of(tok, batch)
    arms_models = {}
    d = copy.deepcopy(dense_model).train()
    for p in d.parameters():
        p.requires_grad_(True)
    arms_models["dense"] = d
    lfa = copy.deepcopy(mpo_model).train()
    lfa.setup_training("auxiliary")
    arms_models[LFA] = lfa
    if chain_arm:
        chain = copy.deepcopy(lfa)
        for _, m in chain.mpo_modules():
            m.block_train = False
        arms_models[LFA_CHAIN] = chain
    lora = get_peft_model(copy.deepcopy(dense_model),
                          LoraConfig(r=8, lora_alpha=16, target_modules=default_targets(dense_model),
                                     lora_dropout=0.0)).train()
    arms_models["LoRA r=8"] = lora
    trainable = {}
    arms = {}
    for name, m in arms_models.items():
        params = [p for p in m.parameters() if p.requires_grad]
        trainable[name] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=lr)

        def step(m=m, opt=opt):
            out = m(**inputs).last_hidden_state
            loss = out.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        arms[name] = step
    t = interleaved(arms, repeats, min_sample=0.0)
    res = {name: t[name] / t["dense"] for name in t}
    res["_dense_ms"] = t["dense"] * 1e3
    print(f"training step, batch {batch} x {TOKENS}: dense {t['dense'] * 1e3:.0f} ms   "
          + "   ".join(f"{k} {v:.2f}x (trainable {trainable[k] / 1e6:.2f} M)"
                       for k, v in res.items() if not k.startswith("_")), flush=True)
    lora = "LoRA r=8"
    print(f"    LFA / LoRA {t[LFA] / t[lora]:.2f}"
          + (f"   LFA / LFA chain autograd {t[LFA] / t[LFA_CHAIN]:.2f}" if chain_arm else ""),
          flush=True)
    res["_lfa_over_lora"] = t[LFA] / t[lora]
    res["_trainable"] = trainable
    return res


def markdown(inf, train, sizes, args) -> str:
    out = ""
    if inf:
        names = [n for n in next(iter(inf.values())) if not n.startswith("_")]
        head = "| batch (sentences x 64 tokens) | dense (ms) | " + " | ".join(
            f"{n} ({sizes[n]:.2f})" if n != "dense" else n for n in names[1:]) + " |"
        lines = [head, "|" + "---|" * (len(names) + 1)]
        for b, row in inf.items():
            lines.append(f"| {b} | {row['_dense_ms']:.0f} | "
                         + " | ".join(f"{row[n]:.2f}" for n in names[1:]) + " |")
        out = "\n".join(lines)
    if train:
        tn = [n for n in train if not n.startswith("_")]
        out += ("\n\n" if out else "") + ("| training step (32 x 64 tokens) | "
                                            + " | ".join(tn) + " |\n|"
                + "---|" * (len(tn) + 1) + "\n| time / dense | "
                + " | ".join(f"{train[n]:.2f}" for n in tn) + " |\n| trainable params | "
                + " | ".join(f"{train['_trainable'][n] / 1e6:.2f} M" for n in tn) + " |")
    return out


def plot(inf, train, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in next(iter(inf.values())) if not n.startswith("_") and n != "dense"]
    fig, axes = plt.subplots(1, 2 if train else 1, figsize=(11 if train else 6, 4),
                             squeeze=False)
    ax = axes[0, 0]
    batches = list(inf)
    width = 0.8 / len(names)
    top = 2.0
    for k, n in enumerate(names):
        xs = [i + k * width for i in range(len(batches))]
        ys = [inf[b][n] for b in batches]
        ax.bar(xs, [min(y, top) for y in ys], width, label=n)
        for x, y in zip(xs, ys):
            ax.text(x, min(y, top) + 0.02, f"{y:.2f}", ha="center", va="bottom", fontsize=6,
                    rotation=90)
    ax.set_ylim(0, top + 0.35)
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(batches))])
    ax.set_xticklabels([f"{b} x 64" for b in batches])
    ax.set_ylabel("time / dense (eval, no_grad)")
    ax.set_title("MiniLM inference (bars cut at 2; labels: ratios)")
    ax.legend(fontsize=8)
    if train:
        ax = axes[0, 1]
        tn = [n for n in train if not n.startswith("_")]
        ax.bar(range(len(tn)), [train[n] for n in tn], color=["gray", "C4", "C5", "C6"][: len(tn)])
        for i, n in enumerate(tn):
            ax.text(i, train[n] + 0.01, f"{train[n]:.2f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="k", lw=1)
        ax.set_xticks(range(len(tn)))
        ax.set_xticklabels(tn, fontsize=8)
        ax.set_ylabel("step time / dense step")
        ax.set_title("training step, 32 x 64 tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--train-repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25])
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--training-only", action="store_true",
                    help="time the training steps only (no inference, no compressed models)")
    ap.add_argument("--chain-arm", action="store_true",
                    help="also time LFA with autograd through the chain's einsums "
                         "(MPOModule.block_train = False)")
    ap.add_argument("--no-cache-arm", action="store_true",
                    help="also time the untruncated MPO model with cache_dense=False")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="write the table here")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    if args.training_only:
        args.budgets, args.no_cache_arm, args.skip_training = [], False, False
    models, tok, sizes = build_models(args)
    inf = {} if args.training_only else bench_inference(models, tok, args.batches, args.repeats)
    train = None
    if not args.skip_training:
        train = bench_training(models["dense"], models["MPO untruncated"], tok,
                               args.train_batch, args.train_repeats, chain_arm=args.chain_arm)
    table = markdown(inf, train, sizes, args)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot and inf:
        plot(inf, train, args.plot)
    assert all(isinstance(m, MPOModule) for _, m in models["MPO untruncated"].mpo_modules())


if __name__ == "__main__":
    main()
