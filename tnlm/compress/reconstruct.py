"""Block-by-block reconstruction of a compressed model against its original (no labels).

For block i = 0 .. L-1 of the layer stack::

    inputs   X_s: the student's own hidden states, through the already reconstructed
                  blocks 0 .. i-1 (so later blocks learn to correct earlier errors)
    targets  Y_t: the teacher's block i applied to the teacher's hidden states
    fit      block i's MPO cores, biases and LayerNorms to min ||B_i(X_s) - Y_t||² / ||Y_t||²
             (masked by the attention mask), AdamW with warm-up and cosine decay

A step costs one block's forward and backward instead of the whole model's, so the
blocks reach a given error for about half the compute of end-to-end distillation
(measured on MiniLM, docs/results.md); :func:`tnlm.compress.distill.heal` then
finishes end to end. The block stack is the architecture's
(:func:`tnlm.integration.architectures.find_blocks`: ``encoder.layer`` in BERT, ``h`` in
GPT-2, ``layers`` in Llama); it must hold at least two blocks, each called once per
forward (ALBERT's shared layer groups are refused).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.compress.layerwise.blocks import block_parameters, put_back, refuse_shared_blocks
from tnlm.compress.text import check_texts
from tnlm.core.validation import check_number, check_positive_int, check_size
from tnlm.integration.architectures import find_blocks
from tnlm.integration.surgery import temporary

__all__ = ["reconstruct_blocks"]


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The model's block stack (:func:`find_blocks`), at least two blocks, each run once
    per forward.

    Raises:
        ValueError: no such stack, or shared blocks (ALBERT's layer groups:
            :func:`~tnlm.compress.layerwise.blocks.refuse_shared_blocks`).
    """
    blocks = find_blocks(model)
    refuse_shared_blocks(model, blocks, "reconstruct_blocks")
    if len(blocks) < 2:
        raise ValueError(f"{type(model).__name__} has no stack of repeated blocks")
    return blocks


def _run(block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _sq_parts(y: torch.Tensor, t: torch.Tensor, mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||y - t||², ||t||²)`` over the tokens of ``mask``."""
    m = mask.unsqueeze(-1).to(t.dtype)
    return ((y - t) ** 2 * m).sum(), (t ** 2 * m).sum()


def _rel_err(y: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The training loss: the masked relative squared error ``||y - t||² / ||t||²``."""
    num, den = _sq_parts(y, t, mask)
    return num / den.clamp_min(1e-12)


def _relative(pairs: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """The masked relative error ``||y - t|| / ||t||`` over every token of the batches
    ``(y, t, mask)`` (not squared: as the calibration errors)."""
    num = den = 0.0
    for y, t, mask in pairs:
        a, b = _sq_parts(y, t, mask)
        num, den = num + float(a), den + float(b)
    return math.sqrt(num / max(den, 1e-12)) if math.isfinite(num) else math.nan


def _diverged(i: int, params: list[nn.Parameter], start: list[torch.Tensor]
              ) -> FloatingPointError:
    """Put block ``i``'s trained ``params`` back to their values ``start`` before its
    fitting (:func:`~tnlm.compress.layerwise.blocks.put_back`); the error to raise."""
    put_back(params, start)
    return FloatingPointError(f"block {i} reconstruction diverged (the block was put back "
                              "as it was before its fitting); lower lr")


@torch.no_grad()
def _capture(model: nn.Module, first: nn.Module, batches: list[dict]) -> list[tuple]:
    """Per batch: (hidden input of the first block, its other args and kwargs, mask)."""
    cur: dict[str, Any] = {}

    def pre(mod, args, kwargs):
        cur["x"] = args[0] if args else kwargs["hidden_states"]
        cur["args"] = tuple(args[1:])
        cur["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = first.register_forward_pre_hook(pre, with_kwargs=True)
    out = []
    try:
        for b in batches:
            with contextlib.suppress(_Stop):
                model(**b)
            out.append((cur["x"].detach(), cur["args"], cur["kw"], b["attention_mask"]))
    finally:
        handle.remove()
    return out


def reconstruct_blocks(student: nn.Module, teacher: nn.Module, tokenizer: Any,
                       sentences: Sequence[str], steps_per_block: int, *, lr: float = 1e-3,
                       batch_size: int = 32, max_length: int = 64, warmup: int = 10,
                       seed: int = 0, progress: bool = False) -> list[tuple[float, float]]:
    """Reconstruct ``student``'s blocks in order (see the module docstring), in place.

    Args:
        student: the compressed model (same architecture as ``teacher``); its MPO cores,
            biases and LayerNorms of each block train in turn, nothing else changes.
        teacher: the original model (not modified).
        sentences: unlabeled text; all of it is cached as block inputs (keep it to a
            few thousand sentences).
        steps_per_block: optimizer steps per block (0: measure only).

    Returns:
        Per block ``(error before, error after)``: the masked relative error
        ``||y_s - y_t|| / ||y_t||`` (not squared, as the calibration errors) of the
        block's output (on the student's own hidden states) against the teacher's over
        every token of the cached batches.

    Raises:
        TypeError: ``sentences`` is one string (its characters would be the sentences) or
            holds items that are not strings; ``steps_per_block`` or ``batch_size`` is not
            an int; ``lr`` is not a number.
        ValueError: no sentences, ``steps_per_block`` < 0, ``batch_size`` < 1, ``lr`` not
            finite and > 0, a model without a stack of at
            least two blocks each run once per forward (ALBERT's shared layer groups:
            fewer blocks than ``config.num_hidden_layers``), or stacks of different
            lengths; nothing is changed.
        FloatingPointError: a block's reconstruction diverged (a non-finite error): that
            block is put back as it was before its fitting, the blocks before it keep
            their fitted values.
    """
    sentences = check_texts(sentences, "sentences")
    if not sentences:
        raise ValueError("sentences must hold at least one sentence")
    steps_per_block = check_size(steps_per_block, "steps_per_block")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_number(lr, "lr", positive=True)
    s_blocks, t_blocks = _blocks(student), _blocks(teacher)
    if len(s_blocks) != len(t_blocks):
        raise ValueError(f"student has {len(s_blocks)} blocks, teacher {len(t_blocks)}")
    batches = []
    for i in range(0, len(sentences), batch_size):
        b = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
        batches.append({k: v for k, v in b.items()
                        if k in ("input_ids", "attention_mask", "token_type_ids")})
    rng = random.Random(seed)
    report = []
    # the student's flags and modes are put back at the end; the fitted values stay
    with temporary(student, modes=True):
        student.eval()
        teacher.eval()
        data = _capture(teacher, t_blocks[0], batches)
        # the student's own first hidden states: its embeddings may be compressed too
        xs = [d[0] for d in _capture(student, s_blocks[0], batches)]
        xt = [d[0] for d in data]
        for p in student.parameters():
            p.requires_grad_(False)
        for i in tqdm(range(len(s_blocks)), desc="block reconstruction", disable=not progress,
                      leave=False):
            sb, tb = s_blocks[i], t_blocks[i]
            with torch.no_grad():
                yt = [_run(tb, x, d[1], d[2]) for x, d in zip(xt, data)]
                before = _relative((_run(sb, x, d[1], d[2]), y, d[3])
                                   for x, y, d in zip(xs, yt, data))
            params = block_parameters(sb)
            fitting = bool(steps_per_block and params)
            start = [p.detach().clone() for p in params] if fitting else []
            if fitting:
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
                n = steps_per_block
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda t, n=n: min(1.0, (t + 1) / max(1, warmup))
                    * 0.5 * (1 + math.cos(math.pi * min(t, n) / n)))
                for _ in range(n):
                    j = rng.randrange(len(data))
                    loss = _rel_err(_run(sb, xs[j], data[j][1], data[j][2]), yt[j], data[j][3])
                    if not torch.isfinite(loss):
                        raise _diverged(i, params, start)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                for p in params:
                    p.requires_grad_(False)
            with torch.no_grad():
                xs = [_run(sb, x, d[1], d[2]) for x, d in zip(xs, data)]
                after = _relative((y, t, d[3]) for y, t, d in zip(xs, yt, data))
            if fitting and not math.isfinite(after):  # the last step diverged
                raise _diverged(i, params, start)
            xt = yt
            report.append((before, after))
    return report
