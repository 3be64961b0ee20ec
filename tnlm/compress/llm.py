"""The causal-LM job: compress a decoder to a budget layer by layer, heal it, measure it.

:func:`compress_causal_lm` is what ``tnlm compress MODEL`` runs on a decoder, and what
Python users and the experiments call (its defaults live in :class:`CausalLMRecipe`)::

    text      = the dense model's own samples (data-free; tnlm.compress.causal)
                or the user's text
    sequences = that text cut into equal-length token sequences
    student   = the model, compressed in place block by block on the first
                ``n_calibration`` sequences (tnlm.compress.layerwise)
    healing   = next-token KL to the dense model on all sequences (tnlm.compress.causal)

The dense teacher is a copy of the model made before compression (the only second copy,
in bfloat16 with ``heal.teacher_bf16``: peak memory is about twice the model plus one
batch of activations and logits).

Under ``torch.distributed`` (every rank calls this with the same model and recipe) rank 0
writes the self-generated text and sends it to the others; compression shares the
calibration batches and the decompositions among the ranks and healing runs through
``DistributedDataParallel`` (each rank its share of every step's batch); every rank ends
with the same compressed model. Progress bars are rank 0's only.
Every stage's seconds and peak resident memory (MiB, the whole process: the model
included) are recorded.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tnlm.compress import distributed as dist_
from tnlm.compress.causal import (
    CausalHealConfig,
    CausalHealResult,
    heal_causal,
    self_generated_text,
    token_sequences,
)
from tnlm.compress.layerwise import (
    LayerwiseConfig,
    LayerwiseResult,
    compress_layerwise,
    peak_rss_mb,
    reset_peak_rss,
)
from tnlm.integration.architectures import architecture_of

__all__ = ["CausalLMRecipe", "CausalLMResult", "compress_causal_lm"]


@dataclass
class CausalLMRecipe:
    """Defaults of the causal-LM job.

    Attributes:
        budget: fraction of the targeted linears' parameters kept.
        method: :data:`tnlm.compress.layerwise.METHODS` (``"whitened"`` and ``"plain"`` are
            the baselines).
        target_modules: patterns; default: the architecture's (``architectures.py``).
        n_texts: self-generated texts when no text is given; ``gen_tokens`` tokens each,
            ``gen_batch`` sampled at once (on these CPUs 64 at once write about 1.7x the
            tokens a second of 16 at once).
        seq_len: tokens per sequence; ``n_calibration`` sequences calibrate (the rest
            of the text only heals).
        fit_steps, fit_lr: block fitting (method ``"tnlm"``).
        allocation: how the budget is shared among the targets
            (:data:`tnlm.compress.layerwise.ALLOCATIONS`); ``None`` (default): the
            method's own, :meth:`resolved_allocation`.
        heal: healing settings (``steps=0``: none; ``heal.optimizer``: ``"adamw"`` or
            ``"adafactor"``, whose factored second moments take a fraction of AdamW's
            two moment buffers, :class:`~tnlm.compress.causal.CausalHealConfig`).
    """

    budget: float = 0.6
    method: str = "tnlm"
    target_modules: list[str] | None = None
    n_texts: int = 128
    gen_batch: int = 64
    gen_tokens: int = 128
    seq_len: int = 128
    n_calibration: int = 64
    fit_steps: int = 32
    fit_lr: float = 1e-3
    allocation: str | None = None
    heal: CausalHealConfig = field(default_factory=CausalHealConfig)
    seed: int = 0


    def resolved_allocation(self) -> str:
        """The allocation used: ``allocation`` if given, else ``"residual"`` for method
        ``"tnlm"`` (ranks from the dense model's whitened spectra, each target's error
        relative to its block's output: SmolLM2 at 60 % without healing 6.74x the dense
        perplexity vs 10.5x with uniform ranks, docs/results.md) and ``"uniform"`` for the
        baselines, as they are published (SVD-LLM, plain truncated SVD)."""
        if self.allocation is not None:
            return self.allocation
        return "residual" if self.method == "tnlm" else "uniform"


@dataclass
class CausalLMResult:
    model: nn.Module
    layerwise: LayerwiseResult
    heal: CausalHealResult | None
    n_sequences: int
    seconds: dict[str, float]
    #: per stage ("text", "compression", "healing"): the process's peak resident memory
    #: in MiB during that stage. Measured by resetting Linux's high-water mark at each
    #: stage's start (:func:`~tnlm.compress.layerwise.reset_peak_rss`), which also resets
    #: what ``getrusage`` reports as the process's peak for the rest of the run.
    peak_rss_mb: dict[str, float | None]

    @property
    def ratio(self) -> float:
        return self.layerwise.ratio


def compress_causal_lm(model: nn.Module, tokenizer: Any, recipe: CausalLMRecipe | None = None,
                       *, text: Sequence[str] | None = None, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> CausalLMResult:
    """Compress a causal LM in place (module docstring); returns a :class:`CausalLMResult`.

    Raises:
        ValueError: a model that is not a causal LM tnlm knows, text too short for one
            sequence, or (distributed) a healing batch smaller than the world size;
            nothing has been changed then.
        tnlm.compress.distributed.RankFailure: another rank stopped or the process
            group's timeout passed.
    """
    recipe = recipe or CausalLMRecipe()
    say = log or (lambda s: None)
    arch = architecture_of(model)
    if not arch.causal:
        raise ValueError(f"compress_causal_lm needs a causal LM; {type(model).__name__} "
                         f"({arch.name}) is an encoder")
    rank, size = dist_.world()
    if size > 1 and recipe.heal.steps and recipe.heal.batch_size < size:
        raise ValueError(f"recipe.heal.batch_size ({recipe.heal.batch_size}) must be at least "
                         f"the world size ({size}): each rank heals on its share of a batch")
    progress = progress and rank == 0
    targets = list(recipe.target_modules or arch.targets)
    lw_cfg = LayerwiseConfig(targets, budget=recipe.budget, method=recipe.method,
                             fit_steps=recipe.fit_steps, fit_lr=recipe.fit_lr,
                             allocation=recipe.resolved_allocation(), seed=recipe.seed)
    seconds: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    t0 = time.perf_counter()
    reset_peak_rss()
    if text is None:
        if rank == 0:
            text = self_generated_text(model, tokenizer, recipe.n_texts,
                                       max_new_tokens=recipe.gen_tokens, seed=recipe.seed,
                                       batch_size=recipe.gen_batch, progress=progress)
        if size > 1:  # rank 0's text on every rank (the others wait for it)
            text = dist_.broadcast_json(text, 0, "the self-generated text")
        seconds["text"] = time.perf_counter() - t0
        peaks["text"] = peak_rss_mb()
    sequences = token_sequences(tokenizer, list(text), recipe.seq_len)
    say(f"{sequences.shape[0]} sequences of {recipe.seq_len} tokens")
    teacher = None
    if recipe.heal.steps:
        teacher = copy.deepcopy(model).eval()
        if recipe.heal.teacher_bf16:  # stored in bfloat16: half the memory, no casts a step
            teacher.to(torch.bfloat16)
    t1 = time.perf_counter()
    reset_peak_rss()
    lw = compress_layerwise(model, sequences[:recipe.n_calibration], lw_cfg, progress=progress,
                            log=say)
    seconds["compression"] = time.perf_counter() - t1
    peaks["compression"] = peak_rss_mb()
    healed = None
    if teacher is not None:
        t1 = time.perf_counter()
        reset_peak_rss()
        healed = heal_causal(model, teacher, sequences, recipe.heal, progress=progress)
        seconds["healing"] = time.perf_counter() - t1
        peaks["healing"] = peak_rss_mb()
        if healed.stopped:
            say(f"healing stopped early: {healed.stopped}")
        del teacher
    seconds["total"] = time.perf_counter() - t0
    return CausalLMResult(model, lw, healed, int(sequences.shape[0]), seconds, peaks)
