"""One transformer block as the layer-by-layer path sees it: the inputs the model passes
its first block (:func:`capture_block_inputs`), a block's relative output error
(:func:`block_error`) and fitting a truncated block to its dense outputs
(:func:`fit_block`, training :func:`block_parameters`)."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tnlm.bridge import select_parameters
from tnlm.compress import distributed as dist_
from tnlm.compress.layerwise.config import OUTPUT_ERRORS
from tnlm.core.validation import check_positive_int
from tnlm.integration.architectures import blocks_of

__all__ = ["BlockCall", "block_error", "block_parameters", "capture_block_inputs",
           "check_output_error", "fit_block", "put_back", "refuse_shared_blocks"]

class _Stop(Exception):
    pass


class BlockCall(nn.Module):
    """``block(x, *args, **kw)`` as a module taking ``x`` and ``extra`` (for hooks)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.training = block.training  # a new module is in training mode; the block decides

    def forward(self, x: torch.Tensor, extra: tuple) -> torch.Tensor:
        out = self.block(x, *extra[0], **extra[1])
        return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def put_back(params: Sequence[nn.Parameter], start: Sequence[torch.Tensor]) -> None:
    """Copy the values ``start`` back into ``params`` and drop their gradients: a block's
    trained parameters as they were before a fitting that diverged."""
    for p, s in zip(params, start):
        p.copy_(s)
        p.grad = None


def refuse_shared_blocks(model: nn.Module, blocks: nn.ModuleList, what: str) -> None:
    """Refuse a stack of shared blocks: ALBERT's layer groups (``config.num_hidden_groups``
    of them, each applied ``num_hidden_layers / num_hidden_groups`` times per forward). A
    block-by-block path (``what``) sees one application of each block, so its statistics,
    targets and errors would leave the others out. Other stacks pass, whatever their
    config's ``num_hidden_layers`` says (a stack cut without updating it still runs each
    block once).

    Raises:
        ValueError: the config has ``num_hidden_groups`` and the stack holds fewer blocks
            than ``num_hidden_layers``.
    """
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    groups = getattr(config, "num_hidden_groups", None)
    if groups is not None and isinstance(n, int) and not isinstance(n, bool) and \
            n > len(blocks):
        raise ValueError(
            f"{what}: {type(model).__name__} has {len(blocks)} block(s) in its stack but "
            f"runs {n} layers per forward (config.num_hidden_layers = {n}): its blocks "
            "are shared, each applied several times (ALBERT's layer groups); a "
            "block-by-block path needs every block called exactly once per forward")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, sequences: torch.Tensor, batch_size: int,
                         blocks: nn.ModuleList | None = None) -> list[tuple]:
    """Per batch of ``sequences`` (long, n x T, no padding): ``(x, (args, kwargs))``, the
    hidden states (b, T, hidden) entering the first block and the other arguments the
    model passed it. The rest of the forward is not run. Raises ``TypeError`` for a
    ``batch_size`` that is not an int (a bool or a float too) and ``ValueError`` for one
    below 1, as :func:`tnlm.core.validation.check_positive_int`."""
    batch_size = check_positive_int(batch_size, "batch_size")
    blocks = blocks_of(model) if blocks is None else blocks
    cur: dict[str, Any] = {}

    def pre(mod, args, kwargs):
        cur["x"] = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values",
                                                            "past_key_value", "layer_past")}
        if "use_cache" in kw:
            kw["use_cache"] = False
        cur["extra"] = (tuple(args[1:]), kw)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    out = []
    was = model.training
    model.eval()
    try:
        for i in range(0, sequences.shape[0], batch_size):
            ids = sequences[i:i + batch_size]
            with contextlib.suppress(_Stop):
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            out.append((cur["x"].detach(), cur["extra"]))
    finally:
        handle.remove()
        model.train(was)
    return out


def check_output_error(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming argument ``name`` unless ``value`` is one of
    :data:`OUTPUT_ERRORS`."""
    if not isinstance(value, str) or value not in OUTPUT_ERRORS:
        raise ValueError(f"{name} must be one of {OUTPUT_ERRORS}, got {value!r}")


def block_error(y: torch.Tensor, t: torch.Tensor, kind: str = "total") -> torch.Tensor:
    """Relative squared error of a block's output ``y`` against ``t`` (both ``(b, T, d)``;
    a 0-dim tensor), one of :data:`OUTPUT_ERRORS`:

    * ``"position"``: ``mean_p ||y_p - t_p||² / ||t_p||²`` over the ``b · T`` positions,
      each token's own relative error: what the next RMSNorm or LayerNorm passes on,
      since it divides every position by its own scale;
    * ``"total"``: ``||y - t||² / ||t||²`` over everything. On Llama-family models a few
      positions carry "massive activations" (SmolLM2-135M, blocks 15-25: the first token
      holds 95-99.5 % of the residual stream's energy), so this error is almost only
      theirs.

    Raises ``ValueError`` for another ``kind``.
    """
    check_output_error("kind", kind)
    if kind == "total":
        return ((y - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-30)
    per = ((y - t) ** 2).sum(-1) / (t ** 2).sum(-1).clamp_min(1e-30)
    return per.mean()


def block_parameters(root: nn.Module, *, linears: bool = False) -> list[nn.Parameter]:
    """What fitting trains below ``root``: the set ``"cores"`` of
    :mod:`tnlm.bridge.finetune` (every MPO core and bias, the norm layers: LayerNorm,
    RMSNorm, any leaf whose class name holds "norm"), with ``linears`` the set
    ``"cores+linears"`` (the dense Linear/Conv1D layers too); each parameter once
    (:func:`~tnlm.bridge.finetune.select_parameters`)."""
    return [p for _, p in select_parameters(root, "cores+linears" if linears else "cores")]


def fit_block(block: nn.Module, inputs: list[tuple], targets: list[torch.Tensor], steps: int,
              *, lr: float = 1e-3, warmup: int = 8, seed: int = 0, sync: bool = False,
              error: str = "total") -> None:
    """Train ``block``'s cores, biases and norms (in place) on
    ``block_error(block(x), y, error)`` (:func:`block_error`) over random batches of
    ``inputs`` (as :func:`capture_block_inputs` gives them) against ``targets``; other
    parameters and every ``requires_grad`` flag are left as they were.

    With ``sync`` (under ``torch.distributed``) each rank holds its own shard of the
    batches, all shards of the same length: every rank draws the same index from the same
    seeded generator, takes that batch of its shard, and the gradients and loss are
    averaged over the ranks before each step, so the ranks stay identical (one step sees
    ``world_size`` batches). Unequal shard lengths raise ``ValueError`` on every rank, as
    does an ``error`` not in :data:`OUTPUT_ERRORS`."""
    check_output_error("error", error)
    params = block_parameters(block)
    sync = sync and dist_.is_distributed()
    if sync:
        dist_.check_same(dist_.digest([len(inputs)]),
                         "numbers of calibration batches for block fitting (it needs equal "
                         "shards: a number of batches divisible by the world size)")
    if not steps or not params:
        return
    flags = [(p, p.requires_grad) for p in block.parameters()]
    call = BlockCall(block)
    rng = random.Random(seed)
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: min(1.0, (t + 1) / max(1, warmup))
            * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
        start = [p.detach().clone() for p in params]
        for _ in range(steps):
            j = rng.randrange(len(inputs))
            x, extra = inputs[j]
            loss = block_error(call(x, extra), targets[j], error)
            opt.zero_grad(set_to_none=True)
            if sync:  # the loss averaged with the gradients: every rank decides alike
                loss.backward()
                loss = dist_.average_gradients(params, loss)
            if not torch.isfinite(loss):
                put_back(params, start)
                raise FloatingPointError(f"block fitting diverged (loss {float(loss)}); "
                                         f"the block was restored; lower fit_lr ({lr})")
            if not sync:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for p in params:  # the gradients of the last step would outlive the block
            p.grad = None
