"""The causal-LM job: compress a decoder to a budget layer by layer, heal it, measure it.

:func:`compress_causal_lm` is what ``tnlm compress MODEL`` runs on a decoder, and what
Python users and the experiments call (its defaults live in :class:`CausalLMRecipe`)::

    text      = the user's text, or (``text_source``) the dense model's own samples
                (data-free; tnlm.compress.decoder.heal) followed by ``prose_fraction`` of the
                prose that ships with tnlm (tnlm.compress.text.lm_sentences), that
                prose alone, or both
    sequences = that text cut into equal-length token sequences
    student   = the model, compressed in place block by block on the first
                ``n_calibration`` sequences (tnlm.compress.layerwise)
    healing   = next-token KL to the dense model on all sequences (tnlm.compress.decoder.heal)

The dense teacher is a copy of the model's blocks made before compression, sharing the
rest (embeddings, final norm, LM head) with the model (:func:`teacher_copy`; a full copy
in bfloat16 with ``heal.teacher_bf16``).

Under ``torch.distributed`` (every rank calls this with the same model and recipe) rank 0
writes the job's own text (:func:`recipe_text`) and sends it to the others; compression shares the
calibration batches and the decompositions among the ranks and healing runs through
``DistributedDataParallel`` (each rank its share of every step's batch); every rank ends
with the same compressed model. Progress bars are rank 0's only.
Every stage's seconds and peak resident memory (MiB, the whole process: the model
included) are recorded.

With ``checkpoint_dir`` the layer-by-layer compression writes its per-block checkpoint
there (:func:`tnlm.compress.layerwise.write_checkpoint`) and the job's own text is
kept beside it (:data:`TEXT_FILE`, written by rank 0); ``resume=True`` continues after the
last finished block on that same text (:func:`check_resume` checks a checkpoint first,
:func:`remove_checkpoint` removes one). Healing has no checkpoint here: a resumed run
heals from the start.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import numbers
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnlm.bridge.pivoted import pivot_layers
from tnlm.compress import distributed as dist_
from tnlm.compress.decoder.heal import CausalHealConfig, CausalHealResult, heal_causal
from tnlm.compress.decoder.kl import check_block_term
from tnlm.compress.decoder.text import (
    check_texts,
    generation_is_neutral,
    self_generated_text,
    start_lines,
    start_order,
    token_sequences,
)
from tnlm.compress.layerwise import (
    CHECKPOINT_STATE,
    OUTPUT_ERRORS,
    LayerwiseConfig,
    LayerwiseResult,
    check_checkpoint,
    check_targets_and_budget,
    compress_layerwise,
    read_checkpoint_state,
    shared_batches,
)
from tnlm.compress.layerwise import remove_checkpoint as _remove_layerwise
from tnlm.compress.memory import peak_rss_mb, start_stage
from tnlm.compress.text import lm_sentences
from tnlm.core.budget import check_fraction
from tnlm.core.pivot import pivoted_params
from tnlm.core.validation import FieldError, check_bool_fields, check_seed, field_errors
from tnlm.integration.architectures import architecture_of, blocks_of
from tnlm.integration.config import MPOConfig
from tnlm.integration.merge import merge_factorized

__all__ = ["CausalLMRecipe", "CausalLMResult", "compress_causal_lm", "check_resume",
           "has_checkpoint", "read_saved_text", "remove_checkpoint", "recipe_text",
           "teacher_copy", "interleave", "shipped_prose", "DEFAULT_PROSE_FRACTION",
           "JOB_HEAL", "TEXT_FILE", "TEXT_SOURCES"]

#: where the job's text comes from when the user gives none
#: (:attr:`CausalLMRecipe.text_source`): the dense model's own samples, the prose that
#: ships with tnlm, the prose followed by the samples, the dense model's own answers to
#: chat prompts in its chat format, or half samples and half answers, alternating
TEXT_SOURCES = ("self", "prose", "both", "chat", "mixed")

#: the share of the shipped prose healing adds after the model's own samples (text sources
#: "self", "chat" and "mixed") when :attr:`CausalLMRecipe.prose_fraction` is None: about
#: as many tokens of prose as 256 samples hold, at no sampling cost (SmolLM2 at 60 %:
#: 2.56x the dense perplexity against 2.62x without, one seed; the job with it and a
#: probe of 4 sequences 2.56 ± 0.02x against 2.61 ± 0.02x, three seeds, docs/results.md)
DEFAULT_PROSE_FRACTION = 0.25

#: the text sources that hold all of the shipped prose (nothing to add after them)
_ALL_PROSE = ("prose", "both")

#: the causal job's healing defaults beyond :class:`~tnlm.compress.decoder.heal.CausalHealConfig`'s
#: (whose own defaults, AdamW and the whole KL at once, serve :func:`heal_causal` callers)
JOB_HEAL = {"optimizer": "adafactor", "chunk": 128}

#: the job's own calibration text in a checkpoint folder (JSON: the texts, the settings
#: they depend on, :meth:`CausalLMRecipe.text_settings`, and a sha256 of the weights of
#: the model they were made with)
TEXT_FILE = "calibration_text.json"
_TEXT_FORMAT = "tnlm-calibration-text"
_TEXT_VERSION = 1


@dataclass
class CausalLMRecipe:
    """Defaults of the causal-LM job.

    Attributes:
        budget: fraction of the targeted linears' parameters kept.
        method: :data:`tnlm.compress.layerwise.METHODS` (``"whitened"`` and ``"plain"`` are
            the baselines).
        target_modules: a non-empty list of patterns, each matching some linear in the
            blocks by its name in the model or in its block (else ``ValueError``), or one
            regular expression (a string), as ``LayerwiseConfig.target_modules`` takes
            them; default (None): the architecture's (``architectures.py``).
        text_source: the text when none is given, one of :data:`TEXT_SOURCES`:
            ``"self"``, the dense model's own ``n_texts`` samples; ``"prose"``, the
            sentences that ship with tnlm (:func:`tnlm.compress.text.lm_sentences`, about
            128k tokens of everyday prose, shuffled with ``seed``; nothing is sampled);
            ``"both"``, the prose then the samples (so the first ``n_calibration``
            sequences, the calibration, are prose, and the samples only heal);
            ``"chat"``, ``n_texts`` conversations:
            a prompt of :func:`tnlm.compress.decoder.prompts.chat_prompts` in the tokenizer's chat
            template and the dense model's sampled answer (needs a chat template;
            :func:`recipe_text`); ``"mixed"``, ``n_texts`` samples, half of them
            continuations as in ``"self"`` and half chat answers as in ``"chat"``,
            alternating (calibration sees both).
        starts: a few lines of the user's own kind of text (examples, not a corpus): the
            model's samples start with them, whole, and continue them (``"chat"``: the
            user's turns the model answers) instead of tnlm's generated sentences (chat
            prompts); :func:`tnlm.compress.decoder.text.self_generated_text`. The text
            stays the model's own, steered towards the user's domain; not with
            ``"prose"``, nor with ``text`` given to :func:`compress_causal_lm`. Kept as a
            tuple of the distinct non-empty lines, stripped. With ``"mixed"`` the lines
            are drawn once for both halves and dealt to them alternately: each line
            once before any twice over the whole text.
        prose_fraction: the text sources that sample (``"self"``, ``"chat"``,
            ``"mixed"``) add this fraction of the shipped prose (shuffled with ``seed``)
            after the samples: the calibration still takes the first ``n_calibration``
            sequences (the samples' when they fill them: 256 samples of SmolLM2 make 229
            sequences of 128 tokens), and healing draws from both. ``None`` (default):
            :data:`DEFAULT_PROSE_FRACTION`; ``0``: the samples alone. ``"prose"`` and
            ``"both"`` hold all the prose already (only None or 0 with them). Text given
            to :func:`compress_causal_lm` is used as it is.
        n_texts: self-generated texts (``text_source`` "self", "both", "chat" or "mixed");
            ``n_texts`` and ``fit_steps`` (256, 16) are the settings every SmolLM2 run
            of docs/results.md used (256 texts alone
            healed to 3.48x the dense perplexity at 60 %, 64 texts to 3.97x, with the
            residual allocation and no prose);
            ``gen_tokens`` tokens each, ``gen_batch`` sampled at once (on these CPUs 64
            at once write about 1.7x the tokens a second of 16 at once), each token from
            the top-0.95 nucleus at temperature 1, among the ``gen_top_k`` most likely
            tokens when set (``None``, the default: all; transformers' ``generate``
            samples among 50 unless told otherwise, as tnlm's samples were drawn before:
            on SmolLM2 at 60 % they healed to 3.52x the dense perplexity, the whole
            nucleus to 2.93x, with the residual allocation, docs/results.md).
        seq_len: tokens per sequence; ``n_calibration`` sequences calibrate (the rest
            of the text only heals).
        n_calibration: the text's first sequences that calibrate: every target's
            whitening statistics and spectrum, the sensitivity allocation's spectra and
            block fitting's batches (healing draws from all sequences). 128 (16,384
            tokens; the MLP's 1,536-wide down projection then sees about ten tokens a
            dimension): SmolLM2 at 60 % healed to 2.312x the dense perplexity against
            2.501x with 32 on the same text and seed (three seeds with 128:
            2.32 ± 0.03x; with 32, on another machine: 2.56 ± 0.02x), for about
            100 s more compression (the job 16:56 against 15:41, docs/results.md).
        fit_steps, fit_lr: block fitting (method ``"tnlm"``).
        output_error: how a block's output error is measured
            (:data:`tnlm.compress.layerwise.OUTPUT_ERRORS`): what block fitting
            minimises, what the ``"residual"`` allocation weighs each target against and
            what the result reports (``LayerwiseConfig.output_error``).
        allocation: how the budget is shared among the targets
            (:data:`tnlm.compress.layerwise.ALLOCATIONS`); ``None`` (default): the
            method's own, :meth:`resolved_allocation`.
        sensitivity_sequences: allocation ``"sensitivity"``: how many of the first
            calibration sequences the end-to-end errors are measured on
            (``LayerwiseConfig.sensitivity_sequences``, whose own default is 8; the
            measurement's time grows with them: on SmolLM2 at 60 % the compression stage
            took 250-260 s with 4 and 314-355 s with 8, and healed to 2.63x against
            2.62x the dense perplexity, one seed, docs/results.md).
        allocation_sequences: the allocations other than ``"uniform"``: how many of the
            first calibration sequences the dense pass measures the spectra on
            (``LayerwiseConfig.allocation_sequences``; None, the default: all
            ``n_calibration``); a multiple of 8, the layer-by-layer batch.
        pivoted: fix each truncated layer's bond gauge (:mod:`tnlm.core.pivot`): the
            budget counts ``r (I + J - r)`` numbers a rank-r layer (every rank larger at the
            same budget), and the layers become
            :class:`~tnlm.bridge.pivoted.PivotedLinear` storing exactly that (the same
            function, up to float rounding). By default healing trains the 2-site MPOs
            and the gauge is fixed after it; ``heal_pivoted``: fixed before healing,
            which then trains the ``r (I + J - r)`` numbers (less optimizer memory, but
            measured worse on SmolLM2 at 80 %: 1.92x vs 1.69x the dense perplexity,
            docs/results.md; AdamW's steps in the gauge-fixed coordinates heal less).
        heal: healing settings (``steps=0``: none;
            :class:`~tnlm.compress.decoder.heal.CausalHealConfig`). The job's default is
            :data:`JOB_HEAL`: Adafactor, whose factored second moments take a fraction of
            AdamW's two moment buffers, and the next-token KL in chunks of 128 positions;
            on SmolLM2 at 60 % they heal as AdamW does (3.52x vs 3.48x the dense
            perplexity) with the healing peak at 3.11x the loaded model instead of 3.68x,
            and at 2.87x with the teacher sharing the embeddings and head
            (:func:`teacher_copy`; docs/results.md). Its ``seed`` follows the recipe's
            when None (:meth:`resolved_heal`).
        seed: the one seed of the job: its text, its ranks' probe and healing's draws.
        stages: budgets above ``budget``, decreasing, to compress to and heal at before
            it (dimension squeezing's cut and recover, for the job): the dense model is
            compressed to ``stages[0]`` and healed, its truncated layers merged back to
            dense linears (each holds the rank it was given) and the healed model
            compressed to the next budget by the same layer-by-layer path (its own
            allocation, whitening and block fitting, the healed blocks as targets), and so
            on to ``budget``. Every stage heals by next-token KL to the dense model, for
            ``heal.steps // (len(stages) + 1)`` steps (the last stage the remainder):
            the same healing steps in all, one more compression a stage. Every budget is
            a fraction of the dense targets' parameters. ``()`` (default): one cut
            (SmolLM2 at 60 %, 80 % first, the steps split evenly: 2.620x the dense
            perplexity against 2.570x with one cut, docs/results.md). With a
            checkpoint folder only the first stage's compression is checkpointed (a
            resumed run heals and compresses the later stages again).
        stage_heal_steps: with ``stages``, each stage's healing steps instead of the even
            split (one a cut, the last cut's last, adding up to ``heal.steps``): SmolLM2 at
            60 %, 80 % first, ``(25, 125)``: 2.508x the dense perplexity against one cut's
            2.570x (one seed, docs/results.md).

    Raises:
        FieldError: (a ``ValueError``; :class:`tnlm.core.validation.FieldError`, its
            ``field`` the field's name) a field out of range or of the wrong type (named;
            ``target_modules`` an empty list too), ``heal.seed`` set and different from
            ``seed`` (field ``heal``), ``n_texts`` < 2 with ``text_source`` ``"mixed"``.
    """

    budget: float = 0.6
    method: str = "tnlm"
    target_modules: list[str] | None = None
    n_texts: int = 256
    gen_batch: int = 64
    gen_tokens: int = 128
    gen_top_k: int | None = None
    seq_len: int = 128
    n_calibration: int = 128
    fit_steps: int = 16
    fit_lr: float = 1e-3
    allocation: str | None = None
    sensitivity_sequences: int = 4
    allocation_sequences: int | None = None
    heal: CausalHealConfig = field(default_factory=lambda: CausalHealConfig(**JOB_HEAL))
    seed: int = 0
    text_source: str = "self"
    starts: tuple[str, ...] | None = None
    prose_fraction: float | None = None
    output_error: str = "total"
    pivoted: bool = False
    heal_pivoted: bool = False
    stages: tuple[float, ...] = ()
    stage_heal_steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("n_texts", "gen_batch", "gen_tokens", "seq_len", "n_calibration",
                     "sensitivity_sequences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FieldError(name, f"{name} must be an int >= 1, got {v!r}")
        if self.sensitivity_sequences > self.n_calibration \
                and self.resolved_allocation() == "sensitivity":
            raise FieldError("sensitivity_sequences",
                             f"sensitivity_sequences ({self.sensitivity_sequences}) are the "
                             f"first calibration sequences: at most n_calibration "
                             f"({self.n_calibration})")
        a = self.allocation_sequences
        per = LayerwiseConfig.batch_size  # the layer-by-layer batch the job uses
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1
                              or a % per or a > self.n_calibration):
            raise FieldError("allocation_sequences",
                             f"allocation_sequences must be None or a multiple of {per} (the "
                             f"layer-by-layer batch) at most n_calibration "
                             f"({self.n_calibration}), got {a!r}")
        with field_errors("seed"):
            self.seed = check_seed(self.seed)
        if not isinstance(self.heal, CausalHealConfig):
            raise FieldError("heal", f"heal must be a CausalHealConfig, got "
                                     f"{type(self.heal).__name__}")
        if self.heal.seed is not None and self.heal.seed != self.seed:
            raise FieldError("heal", f"heal.seed ({self.heal.seed}) differs from seed "
                                     f"({self.seed}): "
                             f"one seed seeds the job (text, ranks and healing's draws); "
                             f"leave heal.seed None or set it equal")
        k = self.gen_top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise FieldError("gen_top_k", f"gen_top_k must be None or an int >= 1, got {k!r}")
        check_bool_fields(self, "pivoted", "heal_pivoted")
        if self.target_modules is not None:  # a string is one regex, as MPOConfig takes it
            with field_errors("target_modules"):
                self.target_modules = MPOConfig(
                    target_modules=self.target_modules).target_modules
        if self.heal_pivoted and not self.pivoted:
            raise FieldError("heal_pivoted",
                             "heal_pivoted fixes the gauge of pivoted layers before healing: "
                             "it needs pivoted=True")
        self.stages = self._checked_stages()
        for name, allowed in (("text_source", TEXT_SOURCES), ("output_error", OUTPUT_ERRORS)):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in allowed:
                raise FieldError(name, f"{name} must be one of "
                                       f"{', '.join(map(repr, allowed))}, "
                                 f"got {v!r}")
        if self.starts is not None:
            with field_errors("starts"):
                lines = tuple(start_lines(self.starts))
            if self.text_source == "prose":
                raise FieldError("starts", "starts are the lines the model's samples start from; "
                                 "text_source 'prose' samples nothing")
            self.starts = lines
        if self.text_source == "mixed" and self.n_texts < 2:
            raise FieldError("n_texts",
                             f"n_texts must be at least 2 with text_source 'mixed' (half "
                             f"continuations, half chat answers), got {self.n_texts}")
        f = self.prose_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float))
                              or not 0 <= f <= 1):  # NaN fails the comparison
            raise FieldError("prose_fraction",
                             f"prose_fraction must be None or a number in [0, 1], got {f!r}")
        if f and self.text_source in _ALL_PROSE:
            raise FieldError("prose_fraction",
                             f"prose_fraction ({f}) adds prose after the model's samples; "
                             f"text_source {self.text_source!r} holds all of it already")

    def resolved_heal(self) -> CausalHealConfig:
        """``heal`` with its seed: the recipe's where ``heal.seed`` is None (the default;
        one seed seeds the text, the ranks and healing's draws)."""
        if self.heal.seed is not None:
            return self.heal
        return dataclasses.replace(self.heal, seed=self.seed)

    def _checked_stages(self) -> tuple[float, ...]:
        st = self.stages
        if isinstance(st, (str, bytes)) or not isinstance(st, (tuple, list)):
            raise FieldError("stages", f"stages must be a tuple of budgets, got {st!r}")
        out: list[float] = []
        if st:
            with field_errors("budget"):
                check_fraction("budget", self.budget)
        for b in st:
            if isinstance(b, bool) or not isinstance(b, numbers.Real) or not (
                    self.budget < b < 1):  # NaN fails the comparison
                raise FieldError("stages",
                                 f"stages must be budgets between budget ({self.budget:g}) "
                                 f"and 1, got {b!r} in {tuple(st)!r}")
            out.append(float(b))
        if any(a <= b for a, b in zip(out, out[1:])):
            raise FieldError("stages",
                             f"stages must decrease (each cut further than the one before), "
                             f"got {tuple(out)!r}")
        if out and self.heal.steps < len(out) + 1:
            raise FieldError("stages",
                             f"stages heal between their cuts: heal.steps (--heal-steps, "
                             f"{self.heal.steps}) must be at least one a stage "
                             f"({len(out) + 1})")
        given = self.stage_heal_steps
        if given is not None:
            if not out:
                raise FieldError("stage_heal_steps",
                                 "stage_heal_steps are the healing steps of each stage: "
                                 "they need stages")
            if isinstance(given, (str, bytes)) or not isinstance(given, (tuple, list)) or any(
                    isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in given):
                raise FieldError("stage_heal_steps",
                                 f"stage_heal_steps must be ints >= 1, one a stage, got "
                                 f"{given!r}")
            if len(given) != len(out) + 1 or sum(given) != self.heal.steps:
                raise FieldError("stage_heal_steps",
                                 f"stage_heal_steps must be {len(out) + 1} numbers (one a "
                                 f"cut: the stages', then the last) adding up to "
                                 f"heal.steps (--heal-steps, {self.heal.steps}), got "
                                 f"{tuple(given)!r}")
            self.stage_heal_steps = tuple(given)
        if out and self.heal_pivoted:
            raise FieldError("stages",
                             "stages merge the truncated layers between cuts; heal_pivoted "
                             "(the gauge fixed before healing) is not supported with them")
        return tuple(out)

    def calibration_count(self, n_sequences: int, world: int = 1) -> int:
        """How many of the text's first ``n_sequences`` sequences calibrate on ``world``
        ranks: ``n_calibration``, or all of them when the text has fewer; in a
        distributed run where the text has fewer and the ranks cannot share them all in
        batches of the layer-by-layer batch (every rank a batch; block fitting, method
        ``"tnlm"``, equal shares), the largest count below that they can share: a
        multiple of 8 x ``world``. (``n_calibration`` itself is not rounded: one the ranks
        cannot share is refused by :func:`~tnlm.compress.layerwise.compress_layerwise`,
        and by ``tnlm compress`` before loading.)

        Raises:
            ValueError: a text too short for every rank to get a batch.
        """
        n = min(self.n_calibration, n_sequences)
        if world <= 1 or n == self.n_calibration:
            return n
        per = LayerwiseConfig.batch_size
        fitting = self.method == "tnlm" and self.fit_steps > 0
        if shared_batches(n, per, world, fitting)[1]:
            return n
        shared = n // (per * world) * per * world
        if not shared:
            raise ValueError(f"the text makes {n_sequences} sequences of {self.seq_len} "
                             f"tokens: {world} ranks need at least {per * (world - 1) + 1} "
                             f"(a batch of up to {per} each) to share the calibration")
        return shared

    def stage_steps(self) -> list[int]:
        """The healing steps of each stage (:attr:`stages`, then ``budget``):
        :attr:`stage_heal_steps`, or ``heal.steps`` split evenly."""
        if self.stage_heal_steps is not None:
            return list(self.stage_heal_steps)
        n = len(self.stages) + 1
        each = self.heal.steps // n
        return [each] * (n - 1) + [self.heal.steps - each * (n - 1)]

    def resolved_prose_fraction(self) -> float:
        """The fraction of the shipped prose :func:`recipe_text` adds after the samples:
        ``prose_fraction``, or :data:`DEFAULT_PROSE_FRACTION` when it is None; 0 for the
        text sources that hold all the prose already."""
        if self.text_source in _ALL_PROSE:
            return 0.0
        return DEFAULT_PROSE_FRACTION if self.prose_fraction is None \
            else float(self.prose_fraction)

    def resolved_allocation(self) -> str:
        """The allocation used: ``allocation`` if given, else ``"sensitivity"`` for method
        ``"tnlm"`` (ranks from the dense model's whitened spectra, each target's error
        weighted by the error it causes at the last block's output when truncated alone:
        SmolLM2 healed at 50 / 60 % 3.43x / 2.62x the dense perplexity, against 5.25x /
        2.93x with ``"residual"``, each error relative to its block's output, and 4.70x /
        3.69x with uniform ranks; docs/results.md) and ``"uniform"`` for the baselines,
        as they are published (SVD-LLM, plain truncated SVD)."""
        if self.allocation is not None:
            return self.allocation
        return "sensitivity" if self.method == "tnlm" else "uniform"

    def layerwise_config(self, model: nn.Module,
                         checkpoint_dir: str | os.PathLike | None = None) -> LayerwiseConfig:
        """The :class:`~tnlm.compress.layerwise.LayerwiseConfig` the job compresses
        ``model`` with (targets: ``target_modules`` or the architecture's)."""
        targets = self.target_modules if self.target_modules is not None \
            else list(architecture_of(model).targets)
        return LayerwiseConfig(targets, budget=self.budget, method=self.method,
                               fit_steps=self.fit_steps, fit_lr=self.fit_lr,
                               output_error=self.output_error, pivoted=self.pivoted,
                               allocation=self.resolved_allocation(), seed=self.seed,
                               sensitivity_sequences=self.sensitivity_sequences,
                               allocation_sequences=self.allocation_sequences,
                               checkpoint_dir=None if checkpoint_dir is None
                               else str(checkpoint_dir))

    def checkpointed_config(self, model: nn.Module,
                            checkpoint_dir: str | os.PathLike | None = None
                            ) -> LayerwiseConfig:
        """The :class:`~tnlm.compress.layerwise.LayerwiseConfig` of the job's first cut,
        the one its checkpoint holds and a resume continues: :meth:`layerwise_config` at
        ``stages[0]`` with :attr:`stages`, else at ``budget``."""
        cfg = self.layerwise_config(model, checkpoint_dir)
        return dataclasses.replace(cfg, budget=self.stages[0]) if self.stages else cfg

    def text_settings(self) -> dict[str, int | str]:
        """What the job's own text (:func:`recipe_text`) depends on besides the model (the
        sampling settings only where it samples)."""
        out: dict[str, int | str] = {"text_source": self.text_source, "seed": self.seed}
        if self.text_source != "prose":
            out.update(n_texts=self.n_texts, gen_tokens=self.gen_tokens,
                       gen_batch=self.gen_batch, gen_top_k=self.gen_top_k,
                       generation="neutral")  # the model's generation_config set aside
            if self.starts is not None:  # the user's lines: how many, and a hash of them
                out.update(starts=len(self.starts), starts_sha256=hashlib.sha256(
                    json.dumps(list(self.starts)).encode()).hexdigest())
        if self.text_source not in _ALL_PROSE:
            out["prose_fraction"] = self.resolved_prose_fraction()
        return out


@dataclass
class CausalLMResult:
    model: nn.Module
    layerwise: LayerwiseResult
    heal: CausalHealResult | None
    n_sequences: int
    seconds: dict[str, float]
    #: per stage ("text", "compression", "healing"): the process's peak resident memory
    #: in MiB during that stage. At each stage's start the memory earlier stages freed is
    #: given back to the system and Linux's high-water mark is reset
    #: (:func:`~tnlm.compress.memory.start_stage`), which also resets what ``getrusage``
    #: reports as the process's peak for the rest of the run.
    peak_rss_mb: dict[str, float | None]
    #: with :attr:`CausalLMRecipe.stages`, one dict a stage, the last one's budget last:
    #: ``budget``, ``params_after``, ``heal_steps``, ``heal_stopped`` and
    #: ``heal_final_loss`` (the last step's KL); ``layerwise`` and ``heal`` are the last
    #: stage's, ``seconds`` and ``peak_rss_mb`` sum and top all stages; empty without stages
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.layerwise.ratio


def recipe_text(model: nn.Module, tokenizer: Any, recipe: CausalLMRecipe,
                progress: bool = False) -> list[str]:
    """The job's text when the user gives none (:attr:`CausalLMRecipe.text_source`): the
    shipped prose shuffled with ``recipe.seed`` and/or ``recipe.n_texts`` samples of the
    dense ``model`` (:func:`tnlm.compress.decoder.text.self_generated_text`), prose first; for
    ``"chat"`` the samples are the model's answers to chat prompts, in its chat format;
    for ``"mixed"`` half of each (:func:`interleave`); with ``recipe.starts`` the samples
    start from the user's lines. After samples alone, the first
    :meth:`~CausalLMRecipe.resolved_prose_fraction` of the shuffled prose."""
    text = shipped_prose(recipe.seed) if recipe.text_source in _ALL_PROSE else []

    def samples(n: int, chat: bool, starts: Sequence[str] | None,
                shuffle: bool = True) -> list[str]:
        return self_generated_text(model, tokenizer, n, max_new_tokens=recipe.gen_tokens,
                                   seed=recipe.seed, batch_size=recipe.gen_batch, chat=chat,
                                   progress=progress, top_k=recipe.gen_top_k, starts=starts,
                                   shuffle_starts=shuffle)

    if recipe.text_source in ("self", "both", "chat"):
        text += samples(recipe.n_texts, recipe.text_source == "chat", recipe.starts)
    elif recipe.text_source == "mixed":
        half = recipe.n_texts // 2
        # the user's lines drawn once for both halves, alternately, and used in that order:
        # each line once before any twice over the whole text
        order = (None if recipe.starts is None
                 else start_order(recipe.starts, recipe.n_texts, recipe.seed))
        text += interleave(
            samples(recipe.n_texts - half, False, order and order[0::2], False),
            samples(half, True, order and order[1::2], False))
    share = recipe.resolved_prose_fraction()
    return text + shipped_prose(recipe.seed, share) if share else text


def shipped_prose(seed: int, fraction: float = 1.0) -> list[str]:
    """The first ``fraction`` of the prose that ships with tnlm
    (:func:`tnlm.compress.text.lm_sentences`) shuffled with ``seed``: what
    :func:`recipe_text` adds after the samples (``prose_fraction``) or gives alone."""
    prose = lm_sentences()
    random.Random(seed).shuffle(prose)
    return prose[:round(fraction * len(prose))]


def interleave(first: Sequence[str], second: Sequence[str]) -> list[str]:
    """``first[0], second[0], first[1], second[1], ...``, then the rest of the longer."""
    out = [t for pair in zip(first, second) for t in pair]
    n = min(len(first), len(second))
    return out + list(first[n:]) + list(second[n:])


def _weights_digest(model: nn.Module) -> str:
    return dist_.digest([x for k, t in model.state_dict().items() for x in (k, t)])


def read_saved_text(directory: str | os.PathLike, recipe: CausalLMRecipe,
                    model: nn.Module | None = None) -> list[str] | None:
    """The job's own text (:func:`recipe_text`) kept in ``directory``
    (:data:`TEXT_FILE`), or None if there is none. Raises ``ValueError`` for an
    unreadable file or one written with other text settings (named) or, given ``model``,
    by a model with other weights."""
    path = Path(directory) / TEXT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable calibration text ({err})") from err
    if (not isinstance(saved, dict) or saved.get("format") != _TEXT_FORMAT
            or saved.get("version") != _TEXT_VERSION or not isinstance(saved.get("texts"), list)
            or not all(isinstance(t, str) for t in saved["texts"])):
        raise ValueError(f"{path} is not a calibration text of this tnlm (format "
                         f"{_TEXT_FORMAT!r} version {_TEXT_VERSION})")
    now, then = recipe.text_settings(), dict(saved.get("settings") or {})
    then.setdefault("text_source", "self")  # written before text_source: the samples
    if then["text_source"] not in _ALL_PROSE:  # written before prose_fraction
        then.setdefault("prose_fraction", 0.0)
    if then["text_source"] != "prose":  # written before gen_top_k: transformers' sampling,
        then.setdefault("gen_top_k", 50)  # whose top_k was 50 unless told otherwise
        # written before the generation_config was set aside: the same texts unless the
        # model's config changed its logits (a repetition penalty, suppressed tokens, ...)
        then.setdefault("generation", "neutral" if model is None or generation_is_neutral(
            model) else "the model's generation_config")
    # the user's start lines are in the settings only when given (older texts match):
    # compared both ways, so a text written from lines is not resumed without them
    keys = list(now) + [k for k in ("starts", "starts_sha256") if k in then and k not in now]
    diff = [f"{k}: {then.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys
            if then.get(k) != now.get(k)]
    if model is not None and saved.get("model") != _weights_digest(model):
        diff.append("the model's weights differ")
    if diff:
        raise ValueError(f"cannot resume from {path}: the text was written for other "
                         "inputs; " + "; ".join(diff))
    return list(saved["texts"])


def _save_text(directory: Path, recipe: CausalLMRecipe, model: nn.Module,
               text: Sequence[str]) -> None:
    from tnlm.integration.io import atomic_write

    directory.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"format": _TEXT_FORMAT, "version": _TEXT_VERSION,
                       "settings": recipe.text_settings(), "model": _weights_digest(model),
                       "texts": list(text)}, indent=0)
    atomic_write(directory / TEXT_FILE, lambda p: p.write_text(body, encoding="utf-8"))


def check_resume(model: nn.Module, tokenizer: Any, recipe: CausalLMRecipe,
                 directory: str | os.PathLike, *, text: Sequence[str] | None = None,
                 world_size: int = 1) -> int | None:
    """The last block finished in the checkpoint in ``directory`` that
    ``compress_causal_lm(model, tokenizer, recipe, text=text, checkpoint_dir=directory,
    resume=True)`` on ``world_size`` ranks would continue after, checked on the unchanged
    model before any work (:func:`tnlm.compress.layerwise.check_checkpoint` on the
    calibration sequences, with ``text`` None those of the text kept there); None when
    only the job's own text is there (no block was finished: the run starts at
    block 0 on that text).

    Raises:
        FileNotFoundError: nothing to resume in ``directory``.
        ValueError: a checkpoint written for other settings, text, model or world size
            (every difference named), of another format, with files missing, or without
            the text it was calibrated on.
    """
    d = Path(directory)
    saved_text = text is None
    if text is not None:
        text = check_texts(text, "text")
    if text is None:
        text = read_saved_text(d, recipe, model)
        if text is None:
            if read_checkpoint_state(d) is None:
                raise FileNotFoundError(f"no layer-by-layer checkpoint in {d}")
            raise ValueError(f"cannot resume from {d}: it holds no text of the job's own "
                             f"({TEXT_FILE}), so it was calibrated on a text file: pass the "
                             f"same --text FILE (text=) as that run")
    sequences = token_sequences(tokenizer, list(text), recipe.seq_len)
    sequences = sequences[:recipe.calibration_count(sequences.shape[0], world_size)]
    try:
        state = check_checkpoint(d, model, sequences, recipe.checkpointed_config(model, d),
                                 world_size)
    except FileNotFoundError:
        if saved_text:
            return None
        raise
    return int(state["last_block"])


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds something a resume continues from: a layer-by-layer
    state (``state.json``) or the job's own text (:data:`TEXT_FILE`)."""
    d = Path(directory)
    return (d / CHECKPOINT_STATE).is_file() or (d / TEXT_FILE).is_file()


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """Remove what ``compress_causal_lm(..., checkpoint_dir=directory)`` wrote there: the
    text (first), then the layer-by-layer checkpoint
    (:func:`tnlm.compress.layerwise.remove_checkpoint`) and the folder if it is empty."""
    d = Path(directory)
    if not d.is_dir():
        return
    (d / TEXT_FILE).unlink(missing_ok=True)
    for f in d.glob(f".{TEXT_FILE}.*.tmp"):
        f.unlink(missing_ok=True)
    _remove_layerwise(d)


def teacher_copy(model: nn.Module) -> nn.Module:
    """The dense teacher healing distils from: a copy of ``model`` (in eval mode) whose
    blocks are its own and whose other parameters and buffers (embeddings, final norm, LM
    head) are ``model``'s own tensors, not copies (moving either model to another device
    or dtype moves them for both).

    Exact for the job: compression replaces targets inside the blocks only
    (``compress_layerwise``) and healing trains only what is in the blocks
    (:func:`~tnlm.compress.decoder.heal.heal_causal`), so those shared tensors hold the dense
    values throughout. The teacher adds the blocks' bytes only: SmolLM2-135M's tied
    embedding (28.3M of its 134.5M parameters, 113 MB) is held once instead of twice.
    Not for a teacher that is cast afterwards (``.to(dtype)`` would cast the shared
    tensors of ``model`` too): the bfloat16 teacher is a full copy.
    """
    inside = {id(t) for block in blocks_of(model)
              for t in (*block.parameters(), *block.buffers())}
    memo = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in inside}
    return copy.deepcopy(model, memo).eval()


def compress_causal_lm(model: nn.Module, tokenizer: Any, recipe: CausalLMRecipe | None = None,
                       *, text: Sequence[str] | None = None, progress: bool = True,
                       log: Callable[[str], None] | None = None,
                       checkpoint_dir: str | os.PathLike | None = None,
                       resume: bool = False,
                       on_heal_step: Callable[[int], None] | None = None) -> CausalLMResult:
    """Compress a causal LM in place (module docstring); returns a :class:`CausalLMResult`.

    Args:
        checkpoint_dir: a folder for the layer-by-layer compression's per-block checkpoint
            (``LayerwiseConfig.checkpoint_dir``: rank 0 writes the blocks and
            ``state.json``, each rank its hidden states; under ``torch.distributed`` the
            folder must be shared) and, when ``text`` is None, the job's own text
            (:data:`TEXT_FILE`, rank 0). Not removed at the end
            (:func:`remove_checkpoint`).
        resume: continue from the checkpoint in ``checkpoint_dir``
            (``compress_layerwise(..., resume=True)``: the finished blocks are read, not
            compressed again; the result is the uninterrupted run's), with ``text`` None
            on the text kept there (written again if there is none). Healing starts from
            the beginning.
        on_heal_step: called before healing with 0 and after each healing step with its
            number (:func:`~tnlm.compress.decoder.heal.heal_causal`'s ``on_step``), e.g. to
            measure the model along the way (with ``recipe.pivoted`` the gauge is fixed
            after healing unless ``heal_pivoted``: the same function either way).

    Raises:
        ValueError: a model that is not a causal LM tnlm knows, text too short for one
            sequence, (distributed) a healing batch smaller than the world size,
            ``resume`` without ``checkpoint_dir``, ``recipe.text_source`` ``"chat"`` or
            ``"mixed"`` with a tokenizer that has no chat template (before anything is
            sampled; unless ``text`` is given or a resume reads the text kept), or a
            checkpoint or kept text that cannot be resumed (:func:`check_resume`); the
            model has not been changed then (with ``checkpoint_dir``, the job's own text
            may already be kept there).
        tnlm.compress.distributed.RankFailure: another rank stopped or the process
            group's timeout passed.
    """
    recipe = recipe or CausalLMRecipe()
    say = log or (lambda s: None)
    arch = architecture_of(model)
    if not arch.causal:
        raise ValueError(f"compress_causal_lm needs a causal LM; {type(model).__name__} "
                         f"({arch.name}) is an encoder")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs checkpoint_dir")
    if text is not None:
        text = check_texts(text, "text")
        if recipe.starts is not None:
            raise ValueError("recipe.starts steer the model's own samples; with text given "
                             "nothing is sampled (leave one of them out)")
    elif recipe.text_source in ("chat", "mixed") and not getattr(
            tokenizer, "chat_template", None) and not (
            resume and (Path(checkpoint_dir) / TEXT_FILE).is_file()):
        raise ValueError(f"text_source {recipe.text_source!r} samples chat answers: the "
                         "tokenizer has no chat template (use 'self', 'prose' or 'both')")
    rank, size = dist_.world()
    if size > 1 and recipe.heal.steps and recipe.heal.batch_size < size:
        raise ValueError(f"recipe.heal.batch_size ({recipe.heal.batch_size}) must be at least "
                         f"the world size ({size}): each rank heals on its share of a batch")
    progress = progress and rank == 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    lw_cfg = recipe.layerwise_config(model, ckpt)
    check_targets_and_budget(model, lw_cfg)  # before the text is written
    if recipe.heal.steps and recipe.heal.hidden_weight:  # what healing's first step checks
        check_block_term(model, recipe.heal.chunk, recipe.heal.hidden_weight)
    seconds: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    t0 = time.perf_counter()
    start_stage()
    if text is None:
        sent: dict[str, Any] = {}
        if rank == 0:
            try:
                text = read_saved_text(ckpt, recipe, model) if resume else None
                if text is not None:
                    say(f"calibration text: the {len(text)} texts kept in {ckpt / TEXT_FILE}")
                else:
                    text = recipe_text(model, tokenizer, recipe, progress=progress)
                    if ckpt is not None:  # a resume calibrates on the same text
                        _save_text(ckpt, recipe, model, text)
                sent = {"text": text}
            except Exception as err:  # noqa: BLE001 -- every rank stops with it
                if size == 1:
                    raise
                sent = {"error": f"{type(err).__name__}: {err}"}
        if size > 1:  # rank 0's text on every rank (the others wait for it)
            sent = dist_.broadcast_json(sent, 0, "the job's text")
            if "error" in sent:
                raise ValueError(f"rank 0: {sent['error']}")
            text = sent["text"]
        seconds["text"] = time.perf_counter() - t0
        peaks["text"] = peak_rss_mb()
    sequences = token_sequences(tokenizer, list(text), recipe.seq_len)
    n_cal = recipe.calibration_count(sequences.shape[0], size)
    say(f"{sequences.shape[0]} sequences of {recipe.seq_len} tokens"
        + ("" if sequences.shape[0] >= recipe.n_calibration else
           f"; all {n_cal} calibrate (fewer than n_calibration, {recipe.n_calibration})"
           if n_cal == sequences.shape[0] else
           f"; the first {n_cal} calibrate (fewer than n_calibration, "
           f"{recipe.n_calibration}: the most that {size} ranks share in batches of "
           f"{LayerwiseConfig.batch_size})"))
    teacher = None
    if recipe.heal.steps:
        if recipe.heal.teacher_bf16:  # stored in bfloat16: half the memory, no casts a step
            teacher = copy.deepcopy(model).eval().to(torch.bfloat16)
        else:
            teacher = teacher_copy(model)
    budgets = [*recipe.stages, recipe.budget]
    steps = recipe.stage_steps()
    heal_config = recipe.resolved_heal()
    healed = None
    stages: list[dict[str, Any]] = []

    def finish(name: str, t1: float) -> None:
        """Add a compression's or healing's seconds and peak to the job's (over stages)."""
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t1
        peaks[name] = max(filter(None, (peaks.get(name), peak_rss_mb())), default=None)

    def record(budget: float, k: int) -> None:
        stages.append({"budget": budget, "params_after": lw.params_after,
                       "heal_steps": steps[k] if healed is not None else 0,
                       "heal_stopped": None if healed is None else healed.stopped,
                       "heal_final_loss": healed.losses[-1] if healed and healed.losses
                       else None})

    def heal_stage(k: int) -> CausalHealResult:
        """Stage k's healing: its share of the steps, the draws after the earlier
        stages' (one walk through the seeded batches), numbered on from them."""
        t1 = time.perf_counter()
        start_stage()
        done = sum(steps[:k])

        def on_step(i: int) -> None:
            if on_heal_step is not None and (i or not k):  # 0 once, before all healing
                on_heal_step(done + i)

        out = heal_causal(model, teacher, sequences,
                          dataclasses.replace(heal_config, steps=steps[k],
                                              first_draw=heal_config.first_draw + done),
                          progress=progress, on_step=on_step)
        finish("healing", t1)
        return out

    def compress(k: int) -> LayerwiseResult:
        t1 = time.perf_counter()
        start_stage()
        # the first cut is the one checkpointed (and resumed); the later ones start from
        # healed weights, which a resumed run heals again; each cut to its own budget
        cfg = recipe.checkpointed_config(model, ckpt) if k == 0 else \
            dataclasses.replace(lw_cfg, budget=budgets[k], checkpoint_dir=None)
        out = compress_layerwise(model, sequences[:n_cal], cfg,
                                 progress=progress, log=say, resume=resume and k == 0)
        finish("compression", t1)
        return out

    for k, budget in enumerate(budgets[:-1]):  # cut, heal, merge (recipe.stages)
        lw = compress(k)
        say(f"stage {k + 1} of {len(budgets)}: {lw.params_after:,} of "
            f"{lw.params_before:,} parameters kept ({lw.ratio:.1%}); healing {steps[k]} steps")
        healed = heal_stage(k)
        record(budget, k)
        if healed.stopped:  # its best state is restored: the next cut starts from it
            say(f"healing stopped early at stage {k + 1} (its best state kept; the next "
                f"cut starts from it): {healed.stopped}")
        merge_factorized(model)  # exact: the next cut starts from the healed weights
    lw = compress(len(budgets) - 1)

    def fix_gauge() -> None:
        t1 = time.perf_counter()
        pivoted = pivot_layers(model, [n for n, r in lw.ranks.items() if r is not None])
        # counted with the gauge fixed already; less only where a rank proved lower
        lw.params_after -= sum(pivoted_params(m.in_dim, m.out_dim, lw.ranks[n]) - m.n_params
                               for n, m in pivoted.items())
        lw.ranks.update({n: m.rank for n, m in pivoted.items()})
        seconds["pivoting"] = time.perf_counter() - t1
        say(f"{len(pivoted)} layers stored with their bond gauge fixed")

    if recipe.pivoted and recipe.heal_pivoted:  # healing trains the gauge-fixed layers
        fix_gauge()
    if teacher is not None and all(r is None for r in lw.ranks.values()):
        say("no healing: nothing was truncated (every targeted layer kept dense)")
        teacher = None
    if teacher is not None:
        healed = heal_stage(len(budgets) - 1)
        if healed.stopped:
            say(f"healing stopped early: {healed.stopped}")
        del teacher
    if recipe.pivoted and not recipe.heal_pivoted:  # healing trained the 2-site MPOs
        fix_gauge()
    if recipe.stages:  # the last stage, counted after the gauge is fixed
        record(recipe.budget, -1)
    seconds["total"] = time.perf_counter() - t0
    return CausalLMResult(model, lw, healed, int(sequences.shape[0]), seconds, peaks, stages)
