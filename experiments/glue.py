"""One arm of the GLUE fine-tuning comparison on the offline MiniLM.

Usage:
    python experiments/glue.py --arm mpo_lfa --task sst2 --train-size 10000 --steps 313 \
        --out results/sst2/mpo_lfa.json

Arms (same data, seed, steps, batch size and schedule for each):
  dense        full fine-tuning of the dense model
  mpo_full     MPO of the 36 encoder linear layers, untruncated, every tensor trained
  mpo_lfa      the same, lightweight fine-tuning: central tensors frozen (gauge: center on
               the central tensor)
  mpo_lfa_sym  as mpo_lfa, cores in the paper's symmetric gauge
  lora         LoRA via peft on the same 36 layers, rank chosen for a similar trained count
  mpo_dir      MPO truncated directly to ~50% of the encoder linear parameters, then LFA
  mpop         start from mpo_lfa's fine-tuned model, dimension squeezing to the same size
               as mpo_dir (recovery fine-tuning between cuts)
  compress     task-specific compression: start from the dense arm's fine-tuned model
               (the teacher), data-aware MPOs at --budget calibrated on training sentences,
               label-free healing (--heal-steps), then --steps of fine-tuning with knowledge
               distillation from the teacher's logits (every MPO core trains)
In the MPO arms the word embedding table (11.7M parameters) is frozen, as it is in LoRA;
every other parameter that is not in an MPO layer trains (biases, LayerNorm, position and
token-type embeddings, pooler, classifier). Results: one JSON per arm.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.data import Batches, load_task  # noqa: E402
from experiments.training import evaluate, train_steps  # noqa: E402
from tnlm import make_optimizer, parameter_report  # noqa: E402
from tnlm.compress import DimensionSqueezer  # noqa: E402
from tnlm.compress.allocate import uniform_overrides  # noqa: E402
from tnlm.compress.distill import HealConfig  # noqa: E402
from tnlm.compress.pipeline import CompressionConfig, compress_model  # noqa: E402
from tnlm.integration import MPOConfig, MPOModel, default_model_path, get_mpo_model  # noqa: E402
from tnlm.integration.architectures import default_targets  # noqa: E402

ARMS = ("dense", "mpo_full", "mpo_lfa", "mpo_lfa_sym", "lora", "mpo_dir", "mpop", "compress")


def base_model(num_labels: int, seed: int):
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    path = str(default_model_path())
    model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(path)


def freeze_word_embeddings(model) -> None:
    for name, p in model.named_parameters():
        if "word_embeddings" in name:
            p.requires_grad_(False)


def mpo_layer_counts(model) -> tuple[int, int]:
    """(trained, total) parameters inside the MPO layers' cores."""
    trained = total = 0
    for _, m in model.mpo_modules():
        for c in m.cores:
            total += c.numel()
            trained += c.numel() if c.requires_grad else 0
    return trained, total


def build(arm: str, args, num_labels: int):
    model, tok = base_model(num_labels, args.seed)
    targets = default_targets(model)  # the 36 encoder linears
    info: dict = {}
    if arm == "dense":
        info["adapted_trained"] = info["adapted_total"] = sum(
            m.weight.numel() for n, m in model.named_modules()
            if n.startswith("bert.encoder") and isinstance(m, torch.nn.Linear))
        return model, tok, info
    if arm == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                         target_modules=targets, task_type="SEQ_CLS")
        model = get_peft_model(model, cfg)
        info["adapted_trained"] = sum(p.numel() for n, p in model.named_parameters()
                                      if "lora_" in n)
        info["adapted_total"] = info["adapted_trained"]
        return model, tok, info
    if arm == "compress":
        from transformers import BertForSequenceClassification

        src = Path(args.models) / "dense"
        if not (src / "config.json").is_file():
            sys.exit(f"glue.py: the compress arm needs the dense arm's model in {src}: "
                     "run --arm dense first")
        teacher = BertForSequenceClassification.from_pretrained(str(src)).eval()
        model = BertForSequenceClassification.from_pretrained(str(src))
        info["teacher"] = teacher
        return model, tok, info
    if arm == "mpop":
        src = Path(args.models) / "mpo_lfa"
        model = MPOModel.from_pretrained(model, src, train="auxiliary")
    else:
        overrides = (uniform_overrides(model, MPOConfig(target_modules=targets), 0.5)
                     if arm == "mpo_dir" else {})
        cfg = MPOConfig(target_modules=targets, overrides=overrides,
                        train="all" if arm == "mpo_full" else "auxiliary",
                        gauge="symmetric" if arm == "mpo_lfa_sym" else "central",
                        modules_to_save=["classifier"])
        model = get_mpo_model(model, cfg, progress=False)
    freeze_word_embeddings(model)
    return model, tok, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=ARMS, required=True)
    ap.add_argument("--task", choices=("sst2", "cola"), default="sst2")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=313)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--mpo-lr", type=float, default=None, help="MPO cores (default: --lr)")
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-size", type=int, default=None, help="dev subset (default: all)")
    ap.add_argument("--squeeze-delta", type=float, default=0.1)
    ap.add_argument("--squeeze-step", type=int, default=8)
    ap.add_argument("--squeeze-cuts", type=int, default=12, help="cuts per squeezing iteration")
    ap.add_argument("--squeeze-recover", type=int, default=10, help="recovery steps per iteration")
    ap.add_argument("--post-steps", type=int, default=0,
                    help="mpop: lightweight fine-tuning steps after squeezing (fresh optimizer)")
    ap.add_argument("--budget", type=float, default=0.5, help="compress: fraction kept")
    ap.add_argument("--heal-steps", type=int, default=300, help="compress: label-free healing")
    ap.add_argument("--plain", action="store_true",
                    help="compress: direct truncation baseline (plain SVD of the weights, no "
                         "calibration); with --heal-steps 0 --kd-weight 0, the paper's "
                         "'direct truncation then fine-tuning'")
    ap.add_argument("--kd-weight", type=float, default=0.5,
                    help="compress: weight of the logit distillation (0: cross-entropy only)")
    ap.add_argument("--models", default="results/models", help="where fine-tuned models are kept")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="", help="label suffix for a variant run (e.g. an lr)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    try:
        train_x, train_y = load_task(args.task, "train", args.data_dir)
        dev_x, dev_y = load_task(args.task, "dev", args.data_dir, limit=args.eval_size)
    except FileNotFoundError as err:
        sys.exit(f"glue.py: {err}")
    order = np.random.default_rng(args.seed).permutation(len(train_x))
    # 512 held-out training sentences for squeezing's loss, never trained on
    n_train = min(args.train_size, len(train_x) - 512)
    tr, val = order[:n_train], order[n_train: n_train + 512]
    num_labels = int(max(train_y)) + 1

    model, tok, info = build(args.arm, args, num_labels)
    mk = lambda idx, shuffle: Batches(tok, [train_x[i] for i in idx], train_y[idx],  # noqa: E731
                                      args.batch_size, args.max_length, shuffle, args.seed)
    train = mk(tr, True).forever()
    val_batches = mk(val, False)
    dev = Batches(tok, dev_x, dev_y, 64, args.max_length)
    lr = args.lora_lr if args.arm == "lora" else args.lr
    progress = not args.no_progress
    t0 = time.perf_counter()
    squeeze_info = {}
    if args.arm == "mpop":
        start = evaluate(model, dev)
        squeeze_info["dev_before"] = start

        def recover(m):
            train_steps(m, train, make_optimizer(m, lr, args.mpo_lr), args.squeeze_recover,
                        progress=False)

        target = sum(m.in_dim * m.out_dim for _, m in model.mpo_modules()) // 2
        sq = DimensionSqueezer(model, lambda m: evaluate(m, val_batches)["loss"], recover,
                               delta=args.squeeze_delta, step=args.squeeze_step,
                               cuts_per_iter=args.squeeze_cuts, max_iters=200,
                               target_params=target, log=None)
        res = sq.run()
        squeeze_info.update(reason=res.reason, start_loss=res.start_loss,
                            final_loss=res.final_loss, start_params=res.start_params,
                            final_params=res.final_params, cuts=len(res.history),
                            iterations=len({s.iteration for s in res.history}),
                            recovery_steps=args.squeeze_recover * len(
                                {s.iteration for s in res.history}),
                            history=res.table())
        stats = {"loss": res.final_loss, "sec_per_step": float("nan")}
        if args.post_steps:
            squeeze_info["dev_after_squeeze"] = evaluate(model, dev)
            stats = train_steps(model, train, make_optimizer(model, lr, args.mpo_lr),
                                args.post_steps, warmup=args.post_steps // 10,
                                progress=progress, desc="post-squeeze")
            squeeze_info["post_steps"] = args.post_steps
    elif args.arm == "compress":
        teacher = info.pop("teacher")
        squeeze_info["teacher_dev"] = evaluate(teacher, dev)
        calib = [train_x[i] for i in val]  # held-out training sentences, labels unused
        heal_text = [train_x[i] for i in tr]
        cfg = CompressionConfig(default_targets(model), budget=args.budget,
                                whiten=not args.plain,
                                heal=HealConfig(steps=args.heal_steps, seed=args.seed))
        res = compress_model(model, tok, calib, cfg, heal_text=heal_text, progress=progress)
        model = res.model
        squeeze_info.update(plain=args.plain, kd_weight=args.kd_weight,
                            heal_steps=args.heal_steps, budget=args.budget,
                            ratio=res.ratio, params_after=res.params_after,
                            dev_after_truncation_and_healing=evaluate(model, dev),
                            seconds=res.seconds)
        for _, m in model.mpo_modules():
            m.unfreeze()
        for n, p in model.named_parameters():
            p.requires_grad_("word_embeddings" not in n)
        stats = train_steps(model, train, make_optimizer(model, lr, args.mpo_lr), args.steps,
                            warmup=args.steps // 10, progress=progress, desc="compress+kd",
                            teacher=teacher if args.kd_weight > 0 else None,
                            kd_weight=args.kd_weight)
    else:
        opt = make_optimizer(model, lr, args.mpo_lr)
        stats = train_steps(model, train, opt, args.steps, warmup=args.steps // 10,
                            progress=progress, desc=args.arm)
    train_time = time.perf_counter() - t0
    result = evaluate(model, dev)
    rep = parameter_report(model)
    if hasattr(model, "mpo_modules"):
        info["adapted_trained"], info["adapted_total"] = mpo_layer_counts(model)
    if args.arm == "mpo_lfa" and not args.tag:  # the starting point of the mpop arm
        model.save_pretrained(Path(args.models) / "mpo_lfa")
    if args.arm == "dense" and not args.tag:  # the teacher of the compress arm
        model.save_pretrained(Path(args.models) / "dense")
    out = dict(arm=args.arm, tag=args.tag, task=args.task, steps=args.steps,
               train_size=int(n_train),
               batch_size=args.batch_size, lr=lr, mpo_lr=args.mpo_lr, seed=args.seed,
               dev=result, train_loss=stats["loss"], sec_per_step=stats["sec_per_step"],
               train_seconds=train_time, trained_params=rep.trainable, total_params=rep.total,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               **info, squeeze=squeeze_info)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "squeeze"}, indent=1))


if __name__ == "__main__":
    main()
