"""A small training loop and evaluation for sequence classification, for the experiments
and the notebooks (``make_optimizer`` lives in :mod:`tnlm.bridge.finetune`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import make_optimizer

__all__ = ["make_optimizer", "train_steps", "evaluate", "matthews"]


def train_steps(model: nn.Module, batches: Iterator[dict], optimizer: torch.optim.Optimizer,
                steps: int, *, max_grad_norm: float = 1.0, warmup: int = 0,
                progress: bool = True, desc: str = "train", teacher: nn.Module | None = None,
                kd_weight: float = 0.5, temperature: float = 2.0) -> dict[str, float]:
    """Run ``steps`` optimizer steps on batches drawn from the iterator ``batches``.

    Linear warm-up over ``warmup`` steps, then linear decay to zero. With a ``teacher``
    (knowledge distillation) the loss is ``(1 - kd_weight) · CE + kd_weight · T² ·
    KL(teacher ‖ student)`` on logits softened by ``temperature``.
    Returns the mean training loss and the seconds per step.
    """
    base = [g["lr"] for g in optimizer.param_groups]

    def scale(t: int) -> float:
        if warmup and t < warmup:
            return (t + 1) / warmup
        return max(0.0, (steps - t) / max(1, steps - warmup))

    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    losses, t0 = [], time.perf_counter()
    for t in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr * scale(t)
        batch = next(batches)
        out = model(**batch)
        loss = out.loss
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(**batch).logits
            kl = torch.nn.functional.kl_div(
                torch.log_softmax(out.logits / temperature, -1),
                torch.log_softmax(t_logits / temperature, -1), log_target=True,
                reduction="batchmean")
            loss = (1 - kd_weight) * loss + kd_weight * temperature ** 2 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    for g, lr in zip(optimizer.param_groups, base):
        g["lr"] = lr
    return {"loss": float(np.mean(losses)) if losses else float("nan"),
            "sec_per_step": (time.perf_counter() - t0) / max(1, steps)}


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation coefficient of binary predictions (0 if undefined)."""
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred == 0) & (gold == 0)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / den) if den else 0.0


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """Mean loss, accuracy and Matthews correlation over ``batches``."""
    model.eval()
    losses, preds, golds, n = [], [], [], 0
    for batch in batches:
        out = model(**batch)
        k = len(batch["labels"])
        losses.append(float(out.loss) * k)
        n += k
        preds.append(out.logits.argmax(-1).cpu().numpy())
        golds.append(batch["labels"].cpu().numpy())
    if n == 0:
        raise ValueError("batches is empty: nothing to evaluate")
    pred, gold = np.concatenate(preds), np.concatenate(golds)
    return {"loss": sum(losses) / n, "accuracy": float((pred == gold).mean()),
            "mcc": matthews(pred, gold)}
