"""Layer-by-layer compression: one block of the model in memory twice, never the whole model.

The way SVD-LLM's low-resource mode and llm-compressor's sequential pipeline work::

    under torch.distributed: rank r of w keeps only the calibration batches r, r + w, ...
    X_s = X_t = the hidden states entering block 0 on the (this rank's) sequences
    allocation "spectrum"/"residual" (budget < 1): one pass of the dense blocks over X_t,
        each target's whitened spectrum (Grams summed over the ranks, each spectrum
        computed by one rank and shared) -> a rank per target
        minimising the summed errors within the budget (rank 0's choice sent to every rank);
        "sensitivity": the same pass, and each target truncated alone at its
            uniform rank, its block and the blocks after it run on the first
            sensitivity_sequences calibration sequences: its error at the last block's
            output weighs its spectrum (Sensitivity; about (L + 1) / 2 more passes of
            the probe per target kind);
        "uniform": each target the largest rank r with r (I + J) <= budget · I J
            (``pivoted``: r (I + J - r), the gauge-fixed count)
    resume: the finished blocks and this rank's X_s, X_t from the checkpoint
    for block i = 0 .. L-1 (after the checkpoint's last block):
        T_i  = a dense copy of block i (the teacher's block; one block, not the model)
        Y_t  = T_i(X_t)                                   the teacher's outputs
        statistics of block i's target linears on the student's inputs X_s
            (method "tnlm"; with ``cross``, also the cross Gram against the teacher's
             inputs, so each truncation also corrects the error the earlier blocks left;
             "whitened": the dense model's own inputs X_t; "plain": none, the weight's own
             SVD), summed over the ranks
        replace each target by its whitened truncation at the allocated rank
            (tnlm.compress.data_aware: exactly low rank in the 2-site layout);
            distributed: each truncation computed by one rank (largest I J min(I, J)
            first, to the least-loaded rank) and broadcast from it
        "tnlm": fit block i's cores, biases and norms to min the block output error
                ``output_error``: by default ||B_i(X_s) - Y_t||² / ||Y_t||² over the
                whole tensor ("position": its mean over positions; block_error;
                gradients averaged over the ranks; kept only if it lowers that error on
                all ranks' calibration sequences)
        X_s = B_i(X_s);  X_t = Y_t;  drop T_i
        checkpoint_dir: each rank writes its X_s, X_t (not after the last block), rank 0
            block i's weights and then state.json, the file of record

Peak memory is the model, one block's copy and two sets of calibration hidden states
(``2 · n_sequences · seq_len · hidden`` floats), whatever the number of blocks. The
calibration sequences have no padding (a token stream cut into equal lengths), so the
causal mask, rotary position embeddings and grouped-query attention are whatever the
model passes its blocks; the hook that captures block 0's inputs records those arguments
and every block is called with them (``use_cache=False``: no KV cache is threaded
through, which would grow across calls).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import invalidate_caches, kind_of, select_parameters, weight_xw
from tnlm.bridge.kinds import MATRIX_KINDS, dense_module, describe_kinds, extras_of
from tnlm.compress import distributed as dist_
from tnlm.compress.allocate import rank_for_fraction, smallest_fraction, spectrum_ranks
from tnlm.compress.calibration import InputStats, collect_input_stats
from tnlm.compress.data_aware import WhitenedLayer
from tnlm.compress.memory import peak_rss_mb
from tnlm.core.budget import check_fraction
from tnlm.core.pivot import pivoted_params, pivoted_rank_for_fraction
from tnlm.integration.architectures import blocks_of
from tnlm.integration.config import MPOConfig

__all__ = ["METHODS", "ALLOCATIONS", "OUTPUT_ERRORS", "block_error", "dense_spectra",
           "Sensitivity", "LayerwiseConfig", "LayerwiseResult",
           "compress_layerwise", "capture_block_inputs", "fit_block", "block_parameters",
           "write_checkpoint", "read_checkpoint_state",
           "layerwise_fingerprint", "check_checkpoint", "remove_checkpoint",
           "CHECKPOINT_STATE", "check_targets_and_budget", "shared_batches"]

#: ``tnlm``: error-feedback whitening + block fitting; ``whitened``: SVD-LLM-style whitened
#: low rank on the dense model's activations; ``plain``: the weight's own truncated SVD
METHODS = ("tnlm", "whitened", "plain")

#: ``uniform``: every target keeps ``budget`` of its parameters; ``spectrum``: ranks from
#: the dense model's whitened spectra minimising the summed relative output errors of the
#: targets (:func:`tnlm.compress.allocate.spectrum_ranks`); ``residual``: the same with each
#: target's error relative to its block's output (the residual stream) instead of its own;
#: ``sensitivity``: the same with each target's error weighted by what it does
#: to the last block's output when truncated alone (:class:`Sensitivity`)
ALLOCATIONS = ("uniform", "spectrum", "residual", "sensitivity")

#: how a block's output error is measured (:func:`block_error`): what block fitting
#: minimises, what the ``"residual"`` allocation weighs each target's error against and
#: what the result reports
OUTPUT_ERRORS = ("total", "position")


@dataclass
class LayerwiseConfig:
    """What :func:`compress_layerwise` does.

    Attributes:
        target_modules: MPOConfig suffix patterns of the linears to compress.
        budget: fraction of the targeted linears' parameters kept, in (0, 1]. With
            ``allocation="uniform"`` each layer gets the largest rank r with
            ``r (I + J) <= budget · I J`` (``r (I + J - r)`` with ``pivoted``); the other
            allocations share the budget over the
            targets unevenly (the total stays within it). Budget 1 keeps every layer dense
            (error 0), as does a rank reaching ``min(I, J)``.
        method: one of :data:`METHODS`.
        fit_steps: optimizer steps of block fitting per block (method ``tnlm`` only).
        fit_lr: peak learning rate of block fitting (AdamW, warm-up, cosine decay).
        output_error: one of :data:`OUTPUT_ERRORS` (:func:`block_error`): the block
            output error fitting minimises, the ``"residual"`` allocation weighs against
            (:func:`dense_spectra`) and :attr:`LayerwiseResult.block_errors` reports:
            ``"total"`` (default), the error of all positions at once, which massive
            activations dominate; ``"position"``, each token's relative error averaged.
            On SmolLM2 at 60 % "position" fitting changed nothing (3.51x vs 3.48x the
            dense perplexity) and the "position" allocation was far worse (5.52x): it
            takes budget from the early blocks, whose errors reach every later block
            (docs/results.md).
        batch_size: calibration sequences per block forward.
        ridge: relative Cholesky regularisation of the Grams.
        gauge: gauge of the resulting cores.
        allocation: one of :data:`ALLOCATIONS`: how ``budget`` is shared among the
            targets (the non-uniform ones add a pass of the dense model over the
            calibration sequences to measure the spectra first; ``"sensitivity"`` also
            about ``(L + 1) / 2`` passes over its probe per target kind).
        cross: method ``tnlm`` only: truncate against the teacher's outputs through the
            cross Gram ``X_sᵀ X_t`` (error feedback in the statistics); default: the
            student's own inputs ``X_s`` only, the error left to block fitting (measured
            better on SmolLM2: the cross-Gram regression on a few thousand tokens
            overfits, docs/results.md).
        seed: seeds block fitting's batch order (block i uses ``seed + i``).
        pivoted: count (and allocate) each truncated layer's parameters with its bond's
            gauge fixed, ``r (I + J - r)`` instead of ``r (I + J)``
            (:mod:`tnlm.core.pivot`): at the same budget every rank is larger. The layers
            stay 2-site MPOs here (fitting and healing train them as such);
            :func:`tnlm.bridge.pivoted.pivot_layers` turns them into the gauge-fixed
            :class:`~tnlm.bridge.pivoted.PivotedLinear` that stores that count.
        checkpoint_dir: a directory for a resumable checkpoint after every block
            (:func:`write_checkpoint`; ``compress_layerwise(..., resume=True)``
            continues from it); None: no checkpoint. Not part of the settings a resume
            must match.
        sensitivity_sequences: allocation ``"sensitivity"``: how many of the first
            calibration sequences the end-to-end errors are measured on
            (:class:`Sensitivity`; its time grows with them).

    Raises:
        TypeError: ``budget`` is not a real number (a bool included).
        ValueError: ``budget`` not in (0, 1], an unknown ``method``, ``allocation`` or
            ``output_error``, ``fit_steps``/``batch_size``/``sensitivity_sequences`` not
            an int (>= 0 / >= 1 / >= 1), or malformed ``target_modules``.
    """

    target_modules: list[str]
    budget: float = 0.6
    method: str = "tnlm"
    fit_steps: int = 64
    fit_lr: float = 1e-3
    batch_size: int = 8
    ridge: float = 1e-6
    gauge: str = "symmetric"
    cross: bool = False
    seed: int = 0
    allocation: str = "uniform"
    checkpoint_dir: str | None = None
    output_error: str = "total"
    pivoted: bool = False
    sensitivity_sequences: int = 8

    def __post_init__(self) -> None:
        check_fraction("budget", self.budget)
        if not isinstance(self.pivoted, bool):
            raise ValueError(f"pivoted must be a bool, got {self.pivoted!r}")
        if self.output_error not in OUTPUT_ERRORS:
            raise ValueError(f"output_error must be one of {OUTPUT_ERRORS}, got "
                             f"{self.output_error!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, "
                             f"got {self.allocation!r}")
        for name in ("fit_steps", "batch_size", "sensitivity_sequences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "fit_steps"
                                                                       else 1):
                raise ValueError(f"{name} must be an int >= "
                                 f"{0 if name == 'fit_steps' else 1}, got {v!r}")
        MPOConfig(target_modules=self.target_modules)  # validates the patterns' form


@dataclass
class LayerwiseResult:
    ranks: dict[str, int | None]        # None: kept dense
    errors: dict[str, float]            # relative calibration output error per layer
    block_errors: list[tuple[float, float]]  # per block: output error before/after fitting
    params_before: int
    params_after: int
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    #: the calibration sequences the ``"sensitivity"`` allocation measured its ranks on
    #: (read from the checkpoint on a resume); None for another allocation, a budget of
    #: 1, or a checkpoint written before it was recorded
    sensitivity_sequences: int | None = None

    @property
    def ratio(self) -> float:
        """Kept fraction of the targeted parameters (dense-kept layers count whole)."""
        return self.params_after / self.params_before if self.params_before else 0.0


class _Stop(Exception):
    pass


class _BlockCall(nn.Module):
    """``block(x, *args, **kw)`` as a module taking ``x`` and ``extra`` (for hooks)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.training = block.training  # a new module is in training mode; the block decides

    def forward(self, x: torch.Tensor, extra: tuple) -> torch.Tensor:
        out = self.block(x, *extra[0], **extra[1])
        return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, sequences: torch.Tensor, batch_size: int,
                         blocks: nn.ModuleList | None = None) -> list[tuple]:
    """Per batch of ``sequences`` (long, n x T, no padding): ``(x, (args, kwargs))``, the
    hidden states (b, T, hidden) entering the first block and the other arguments the
    model passed it. The rest of the forward is not run."""
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
    """
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
    ``world_size`` batches). Unequal shard lengths raise ``ValueError`` on every rank."""
    params = block_parameters(block)
    sync = sync and dist_.is_distributed()
    if sync:
        dist_.check_same(dist_.digest([len(inputs)]),
                         "numbers of calibration batches for block fitting (it needs equal "
                         "shards: a number of batches divisible by the world size)")
    if not steps or not params:
        return
    flags = [(p, p.requires_grad) for p in block.parameters()]
    call = _BlockCall(block)
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
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for p, s in zip(params, start):
                        p.copy_(s)
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


@torch.no_grad()
def dense_spectra(blocks: nn.ModuleList, data: list[tuple], per_block: list[list[str]],
                  prefix: str, ridge: float = 1e-6, progress: bool = False,
                  reduce: bool = False, error: str = "total",
                  sensitivity: Sensitivity | None = None
                  ) -> tuple[dict[str, tuple[int, int, Any]], dict[str, float]]:
    """The dense blocks run in turn on the captured inputs ``data``; per target, its
    whitened spectrum on its own dense inputs. With ``reduce``, ``data`` is this rank's
    share and the Grams and output energies are summed over the ranks of the
    ``torch.distributed`` process group; each spectrum is computed by one rank (by cost)
    and sent to the others, so every rank gets the same spectra.

    Returns:
        ``(spectra, block_share)``: ``name -> (in, out, tail)`` with ``tail[r]`` the
        squared singular values a rank-r truncation discards, and ``name -> tail[0] / E``,
        the target's output energy relative to the residual stream ``h`` its block
        writes, ``E`` as ``error`` (:data:`OUTPUT_ERRORS`) measures it: ``"total"``,
        ``E = Σ_p ||h_p||²``; ``"position"``, ``E = N² / Σ_p ||h_p||⁻²`` over the ``N``
        positions, so that ``tail[r] / E`` is the mean over positions of
        ``||e_p||² / ||h_p||²`` for an error ``e`` spread evenly over the positions (a
        position with massive activations then weighs as little as it does after the
        next norm, instead of setting ``E`` alone).

    With ``sensitivity`` (:meth:`Sensitivity.start` called) each target is also truncated
    alone, at its uniform rank, and the last block's output error it causes on the
    sensitivity's probe is recorded in ``sensitivity.errors``; with ``reduce`` every rank
    computes every spectrum then (from the summed statistics) and measures on its probe.
    """
    spectra: dict[str, tuple[int, int, Any]] = {}
    share: dict[str, float] = {}
    xs = [d[0] for d in data]
    for i in tqdm(range(len(blocks)), desc="spectra", disable=not progress, leave=False):
        call = _BlockCall(blocks[i])
        names = per_block[i]
        if names:
            stats = collect_input_stats(call, [dict(x=x, extra=d[1]) for x, d in zip(xs, data)],
                                        [f"block.{n}" for n in names], reduce=reduce)
        ys = [call(x, d[1]) for x, d in zip(xs, data)]
        if error == "total":
            energy = sum(float((y.double() ** 2).sum()) for y in ys)
            if reduce:
                energy = dist_.all_reduce_floats([energy], "output energies")[0]
        else:
            sq = [(y.double() ** 2).sum(-1).clamp_min(1e-30) for y in ys]
            inv, count = sum(float((1 / q).sum()) for q in sq), sum(q.numel() for q in sq)
            if reduce:
                inv, count = dist_.all_reduce_floats([inv, float(count)], "output energies")
            energy = count ** 2 / inv if inv else 0.0
        energy = energy or 1.0
        Ws = [weight_xw(blocks[i].get_submodule(n)) for n in names]
        own = [stats[f"block.{n}"] for n in names]
        if sensitivity is not None:  # one whitened layer alive at a time
            all_tails = []
            for n, W, st in zip(names, Ws, own):
                wl = WhitenedLayer(W, st, ridge, vectors=True)
                sensitivity.measure(i, n, f"{prefix}.{i}.{n}", wl)
                all_tails.append(wl.tails)
                del wl
        else:
            all_tails = _tails(Ws, own, ridge, reduce, i)
        for n, W, tails in zip(names, Ws, all_tails):
            key = f"{prefix}.{i}.{n}"
            spectra[key] = (int(W.shape[0]), int(W.shape[1]), tails)
            share[key] = float(tails[0]) / energy
        if sensitivity is not None:
            sensitivity.advance(i)
        xs = ys
    return spectra, share


class Sensitivity:
    """End-to-end sensitivities of the targets, measured on the dense model for the
    ``"sensitivity"`` allocation: target ``n`` of block ``i`` alone truncated (whitened,
    its statistics from the calibration batches) at the rank ``r_n`` the budget gives it
    uniformly, the blocks ``i .. L-1`` run on the probe sequences, and the error of the
    last block's output against the dense one, position by position
    (:func:`block_error` ``"position"``: what the final norm passes to the head) is
    ``errors[n]``. :meth:`weights` turns them into the per-target weights of
    :func:`~tnlm.compress.allocate.spectrum_ranks`::

        w_n = errors[n] / (tail_n[r_n] / tail_n[0])

    so that the allocation minimises ``Σ_n errors[n] · tail_n[r] / tail_n[r_n]``: each
    target's measured end-to-end error, scaled linearly with its own whitened output
    error. Unlike the ``"residual"`` weights, which compare a target's error with its
    block's output energy, this counts what an error does downstream (through every later
    block and after the massive activations a few positions carry), at the budget asked.
    Cost: ``L - i`` block forwards on the probe per target of block ``i`` (from 0), about
    ``(L + 1) / 2`` passes of the model per target kind. With one shared block applied
    many times (ALBERT's layer group) the "last block's output" is one application of
    it, not the model's output.

    Args:
        budget: the fraction kept; each target's measuring rank is the uniform rank.
        pivoted: count ranks gauge-fixed (:func:`pivoted_rank_for_fraction`).

    Use: :meth:`start` with the blocks and the probe (block 0's inputs, as
    :func:`capture_block_inputs` gives them), then per block ``i`` in order
    :meth:`measure` each target and :meth:`advance`.
    """

    def __init__(self, budget: float, *, pivoted: bool = False) -> None:
        self.budget = check_fraction("budget", budget)
        self.pivoted = pivoted
        self.errors: dict[str, float] = {}
        self.relative: dict[str, float] = {}
        self._blocks: nn.ModuleList | None = None
        self._probe: list[tuple] = []
        self._x: list[torch.Tensor] = []
        self._reference: list[torch.Tensor] = []
        self._at = 0

    @torch.no_grad()
    def start(self, blocks: nn.ModuleList, probe: list[tuple]) -> None:
        """Keep the probe (``(x, extra)`` per batch, block 0's inputs) and the dense
        model's last-block outputs on it."""
        if not probe:
            raise ValueError("the sensitivity probe needs at least one batch")
        self._blocks, self._probe, self._at = blocks, list(probe), 0
        self._x = [x for x, _ in self._probe]
        self._reference = [self._run(0, x, extra) for x, extra in self._probe]

    @torch.no_grad()
    def _run(self, start: int, x: torch.Tensor, extra: tuple) -> torch.Tensor:
        for b in range(start, len(self._blocks)):
            x = _BlockCall(self._blocks[b])(x, extra)
        return x

    def rank(self, in_dim: int, out_dim: int) -> int:
        """The measuring rank of an ``in_dim x out_dim`` target (the uniform one)."""
        uniform = pivoted_rank_for_fraction if self.pivoted else rank_for_fraction
        return int(uniform(in_dim, out_dim, self.budget))

    @torch.no_grad()
    def measure(self, block: int, name: str, key: str, layer: WhitenedLayer) -> None:
        """Truncate ``name`` of ``block`` (the block :meth:`advance` reached) alone and
        record its end-to-end error under ``key``; ``layer`` is its
        ``WhitenedLayer(..., vectors=True)``."""
        from tnlm.integration.surgery import temporary

        if block != self._at:
            raise ValueError(f"the probe is at block {self._at}, not {block}")
        I, J = layer.shape
        r = self.rank(I, J)
        tail = layer.tails
        self.relative[key] = float(tail[min(r, len(tail) - 1)]) / (float(tail[0]) or 1.0)
        if r >= min(I, J):  # the uniform rank keeps it whole: nothing to measure
            self.errors[key] = 0.0
            return
        like = self._blocks[block].get_submodule(name)
        # the truncation's function as a plain module of the layer's kind (the MPO layer
        # computes the same; building it would decompose the matrix again)
        new = dense_module(kind_of(like), layer.truncated(r).to(like.weight.dtype), like.bias,
                           extras_of(like))
        with temporary(self._blocks[block], {name: new.to(like.weight.device)}):
            errs = [block_error(self._run(block, x, extra).double(), ref.double(), "position")
                    for x, (_, extra), ref in zip(self._x, self._probe, self._reference)]
        err = float(sum(float(e) for e in errs) / len(errs))
        if not math.isfinite(err):
            raise FloatingPointError(f"the sensitivity of {key} is {err}: the last block's "
                                     "output overflowed on the probe (use another allocation "
                                     "or a float32 model)")
        self.errors[key] = err

    @torch.no_grad()
    def advance(self, block: int) -> None:
        """Move the probe through the dense ``block`` (the one just measured)."""
        if block != self._at:
            raise ValueError(f"the probe is at block {self._at}, not {block}")
        call = _BlockCall(self._blocks[block])
        self._x = [call(x, extra) for x, (_, extra) in zip(self._x, self._probe)]
        self._at += 1

    def weights(self) -> dict[str, float]:
        """``key -> w_n`` (class docstring). A target whose uniform rank already loses
        nothing (relative error 0) weighs as the median measured target."""
        w = {k: self.errors[k] / rel for k, rel in self.relative.items() if rel > 0}
        fill = float(sorted(w.values())[len(w) // 2]) if w else 1.0
        return {k: w.get(k, fill) for k in self.relative}


def _tails(Ws: list[torch.Tensor], stats: list[InputStats], ridge: float, reduce: bool,
           block: int) -> list[Any]:
    """:attr:`WhitenedLayer.tails` of each weight (in, out) with its statistics. With
    ``reduce`` under ``torch.distributed`` each is computed by one rank
    (:func:`~tnlm.compress.distributed.owners_by_cost`, cost ``I J min(I, J)``) and all are
    gathered by one float64 sum over the ranks (the others add zeros: exact)."""
    rank, size = dist_.world() if reduce else (0, 1)
    if size == 1:
        return [WhitenedLayer(W, st, ridge).tails for W, st in zip(Ws, stats)]
    dims = [(int(W.shape[0]), int(W.shape[1])) for W in Ws]
    owners = dist_.owners_by_cost([I * J * min(I, J) for I, J in dims], size)
    lengths = [min(I, J) + 1 for I, J in dims]
    # one more slot per rank: 1 where that rank's share failed, so every rank raises
    flat = torch.zeros(sum(lengths) + size, dtype=torch.float64)
    at, failed = 0, None
    for W, st, owner, n in zip(Ws, stats, owners, lengths):
        if owner == rank and failed is None:
            try:
                flat[at:at + n] = torch.as_tensor(WhitenedLayer(W, st, ridge).tails,
                                                  dtype=torch.float64)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the others know
                failed = err
                flat[sum(lengths) + rank] = 1.0
        at += n
    dist_.all_reduce_sum(flat, f"block {block}'s spectra")
    bad = [r for r in range(size) if flat[sum(lengths) + r] > 0]
    if failed is not None:
        raise failed
    if bad:
        raise RuntimeError(f"rank {bad[0]} could not compute block {block}'s spectra; "
                           "see its error")
    return [part.numpy() for part in torch.split(flat[:sum(lengths)], lengths)]


#: the checkpoint's file of record (written last, after the block and hidden-state files)
CHECKPOINT_STATE = "state.json"
_CHECKPOINT_FORMAT = "tnlm-layerwise-checkpoint"
#: 2: the model is fingerprinted by its architecture, parameter dtype and weights
_CHECKPOINT_VERSION = 2
#: configuration fields that say where or how a model was loaded, not what it computes
_VOLATILE_CONFIG = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                              "architectures", "attn_implementation", "use_cache",
                              "output_attentions", "output_hidden_states", "return_dict",
                              "torchscript"})


def _block_file(d: Path, i: int) -> Path:
    return d / f"block_{i:05d}.safetensors"


def _hidden_file(d: Path, i: int, rank: int) -> Path:
    return d / f"hidden_{i:05d}_rank{rank}.safetensors"


#: :class:`LayerwiseConfig` fields a resume need not agree on: where the checkpoint is, and
#: the probe the allocation was measured on (a checkpoint keeps the ranks it allocated)
_NOT_SETTINGS = ("checkpoint_dir", "sensitivity_sequences")


def _settings(config: LayerwiseConfig) -> dict[str, Any]:
    """Every :class:`LayerwiseConfig` field but :data:`_NOT_SETTINGS`, as JSON gives it
    back."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(config).items()
                                  if k not in _NOT_SETTINGS}))


def _architecture(cfg: Any) -> Any:
    """A transformers configuration as a dict without the fields of :data:`_VOLATILE_CONFIG`
    and the private ones (``_commit_hash``, ...), nested configurations alike."""
    if isinstance(cfg, dict):
        return {k: _architecture(v) for k, v in cfg.items()
                if k not in _VOLATILE_CONFIG and not str(k).startswith("_")}
    if hasattr(cfg, "to_dict"):
        return _architecture(cfg.to_dict())
    return cfg


def layerwise_fingerprint(model: nn.Module, sequences: torch.Tensor, config: LayerwiseConfig,
                          per_block: list[list[str]], world_size: int) -> dict[str, Any]:
    """What a checkpoint of :func:`compress_layerwise` must agree on to be resumed: the
    settings (every :class:`LayerwiseConfig` field but ``checkpoint_dir`` and
    ``sensitivity_sequences``: the checkpoint keeps the ranks it allocated), a sha256 of
    the calibration sequences, the model (its class, its configuration's architecture
    fields — not where it was loaded from, the transformers version or the configured
    dtype —, the targets per block, its parameters' dtypes and a sha256 of its state
    dict's tensors, one pass over them) and the number of ranks (each rank keeps its own
    hidden states). Take it before the model is changed."""
    cfg = getattr(model, "config", None)
    arch = json.loads(json.dumps(_architecture(cfg), sort_keys=True, default=str)) \
        if cfg is not None else None
    weights = [x for k, t in model.state_dict().items() for x in (k, t)]
    return {"settings": _settings(config),
            "sequences": f"{tuple(sequences.shape)} {dist_.digest([sequences])}",
            "model": {"class": type(model).__name__, "config": arch,
                      "targets": [list(b) for b in per_block],
                      "dtype": ", ".join(sorted({str(p.dtype) for p in model.parameters()})),
                      "weights": dist_.digest(weights)},
            "world_size": int(world_size)}


def _short(v: Any, n: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def _differences(saved: dict[str, Any], now: dict[str, Any], where: str = "") -> list[str]:
    """What differs between two fingerprints, by dotted field name."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        key = f"{where}{k}"
        if a == b:
            continue
        if key == "model.weights":
            out.append("the model's weights differ")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, key + ".")
        else:
            out.append(f"{key}: {_short(a)} in the checkpoint, {_short(b)} now")
    return out


def _tensors(items: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with storage of its own (safetensors refuses shared)."""
    seen: set[int] = set()
    out = {}
    for k, t in items.items():
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def write_checkpoint(directory: str | os.PathLike, index: int, state: dict[str, Any],
                     block: nn.Module, xs: list[torch.Tensor] | None,
                     xt: list[torch.Tensor] | None, *, rank: int | None = None,
                     distributed: bool | None = None) -> None:
    """Record that block ``index`` is finished.

    Each rank writes its hidden states for the next block (``xs.k`` student, ``xt.k``
    teacher, (b, T, hidden) per batch k) to ``hidden_<index>_rank<r>.safetensors``
    (``xs`` None: none, after the last block); after all ranks have, rank 0 writes the
    block's state dict (MPO cores, biases, norms) to ``block_<index>.safetensors`` and
    then ``state.json`` (``state`` plus ``last_block``), the file of record: a crash at
    any point leaves the previous checkpoint whole. Every file is written to a temporary
    file and renamed over its name; hidden states two blocks old are removed (after the
    last block, all of them).

    ``rank`` and ``distributed`` are the ones :func:`compress_layerwise` runs with
    (default: those of the initialized process group). With ``distributed`` every rank
    calls this, collectively (a barrier); without, the caller is rank 0 alone and no
    other rank is waited for."""
    from safetensors.torch import save_file

    from tnlm.integration.io import atomic_write

    if distributed is None:
        distributed = dist_.is_distributed()
    if rank is None:
        rank = dist_.world()[0] if distributed else 0
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if xs is not None:
        hidden = _tensors({**{f"xs.{k}": x for k, x in enumerate(xs)},
                           **{f"xt.{k}": x for k, x in enumerate(xt or [])}})
        atomic_write(_hidden_file(d, index, rank), lambda p: save_file(hidden, str(p)))
    if distributed:
        dist_.barrier("the checkpoint's hidden states")
    if rank == 0:
        weights = _tensors(dict(block.state_dict()))
        atomic_write(_block_file(d, index), lambda p: save_file(weights, str(p)))
        text = json.dumps({**state, "format": _CHECKPOINT_FORMAT,
                           "version": _CHECKPOINT_VERSION, "last_block": int(index)},
                          indent=1, sort_keys=True)
        atomic_write(d / CHECKPOINT_STATE, lambda p: p.write_text(text))
    _hidden_file(d, index - 2, rank).unlink(missing_ok=True)  # state.json is at index-1 or on
    if xs is None:  # the last block: no resume reads hidden states any more
        if distributed:
            dist_.barrier("the checkpoint's state")
        _hidden_file(d, index - 1, rank).unlink(missing_ok=True)


def read_checkpoint_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``state.json`` of a :func:`compress_layerwise` checkpoint, or None if there is
    none. Raises ``ValueError`` for a file that is not such a checkpoint or one of another
    version."""
    path = Path(directory) / CHECKPOINT_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable layer-by-layer checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a layer-by-layer compression checkpoint")
    if state.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: layer-by-layer checkpoint version {state.get('version')!r}; "
                         f"this tnlm reads version {_CHECKPOINT_VERSION} only (start again "
                         "without resume, or resume with the tnlm that wrote it)")
    if not isinstance(state.get("last_block"), int) or state["last_block"] < 0:
        raise ValueError(f"{path}: no valid last_block ({state.get('last_block')!r})")
    return state


def _check_files(d: Path, state: dict[str, Any], n_blocks: int, ranks: list[int]) -> None:
    """Raise ``ValueError`` unless checkpoint ``d`` (its ``state``) fits a model of
    ``n_blocks`` blocks and holds the finished blocks' files and, before the last block,
    the hidden states of each of ``ranks``."""
    last = int(state["last_block"])
    if last >= n_blocks:
        raise ValueError(f"checkpoint {d}: block {last} is finished but the model has "
                         f"{n_blocks} blocks")
    missing = [_block_file(d, i).name for i in range(last + 1) if not _block_file(d, i).is_file()]
    if missing:
        raise ValueError(f"checkpoint {d}: {', '.join(missing)} missing")
    if last == n_blocks - 1:
        return
    for rank in ranks:
        path = _hidden_file(d, last, rank)
        if not path.is_file():
            raise ValueError(f"checkpoint {d}: {path.name} is missing (rank {rank}'s hidden "
                             f"states after block {last})")


def _refuse_other_inputs(d: Path, state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every difference unless checkpoint ``d`` (its ``state``)
    was written for ``fingerprint`` (:func:`layerwise_fingerprint`)."""
    saved = state.get("fingerprint", {})
    if isinstance(saved.get("settings"), dict):  # written before these settings
        saved = {**saved, "settings": {"output_error": "total", "pivoted": False, **{
            k: v for k, v in saved["settings"].items() if k not in _NOT_SETTINGS}}}
    diff = _differences(saved, fingerprint)
    if diff:
        raise ValueError(f"cannot resume from {d}: it was written for other inputs; "
                         + "; ".join(diff))


def check_targets_and_budget(model: nn.Module,
                             config: LayerwiseConfig) -> dict[str, tuple[int, int]]:
    """The ``(in, out)`` shape of every linear ``config.target_modules`` matches in the
    model's blocks, after checking, without any work on the model, that the patterns
    match (each one of a list) and that ``config.budget`` can be met: at least the
    fraction kept with every targeted layer at rank 1 (the residual and spectrum
    allocations refuse less; a uniform rank would be floored at 1 and keep more than the
    budget asked for).

    Raises:
        ValueError: a pattern that matches no linear (as :func:`compress_layerwise`), or a
            budget below that smallest fraction (naming both).
    """
    return _checked_targets(model, blocks_of(model), config)[1]


def _checked_targets(model: nn.Module, blocks: nn.ModuleList, config: LayerwiseConfig
                     ) -> tuple[list[list[str]], dict[str, tuple[int, int]]]:
    """``(per block the targeted names, their shapes by full name)``, after the checks of
    :func:`check_targets_and_budget`."""
    per_block = _targets_per_block(model, blocks, config)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    shapes = {}
    for i, names in enumerate(per_block):
        for n in names:
            W = weight_xw(blocks[i].get_submodule(n))
            shapes[f"{prefix}.{i}.{n}"] = (int(W.shape[0]), int(W.shape[1]))
    if config.budget < 1 and shapes:
        least = smallest_fraction(shapes, "uniform", pivoted=config.pivoted)
        if config.budget < least:
            raise ValueError(f"budget {config.budget:g} is below the smallest model of these "
                             f"{len(shapes)} layers: every one at rank 1 keeps {least:.4g} "
                             "of their parameters")
    return per_block, shapes


def shared_batches(n_sequences: int, batch_size: int, world: int,
                   fitting: bool) -> tuple[int, bool]:
    """``(batches, whether world ranks can share them)``: ``n_sequences`` calibration
    sequences in batches of ``batch_size``; every rank needs a batch, and block fitting
    (``fitting``) equal shares (a number of batches divisible by ``world``)."""
    n_batches = -(-n_sequences // batch_size)
    return n_batches, not (n_batches < world or (fitting and n_batches % world))


def _targets_per_block(model: nn.Module, blocks: nn.ModuleList,
                       config: LayerwiseConfig) -> list[list[str]]:
    """Per block, the names (in the block) of its linears ``config.target_modules`` match.

    A pattern of a list matches a linear by its name in the model
    (``model.layers.3.mlp.down_proj``: suffix patterns as
    :class:`~tnlm.integration.config.MPOConfig` matches them, so ``down_proj``,
    ``mlp.down_proj`` and ``layers.3.mlp.down_proj`` all match it). A regular expression
    matches the names in the block (``mlp.down_proj``), as it always did, or, if it
    matches none of them, the names in the model.

    Raises:
        ValueError: a pattern of a list that matches no linear in the blocks (naming it,
            and the modules outside the blocks it matches: the layer-by-layer path
            compresses inside the blocks only), or a regular expression that matches none.
    """
    cfg = MPOConfig(target_modules=config.target_modules, gauge=config.gauge)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    linears = [(i, n, f"{prefix}.{i}.{n}" if prefix else f"{i}.{n}")
               for i, b in enumerate(blocks) for n, m in b.named_modules()
               if n and kind_of(m) in MATRIX_KINDS]
    regex = isinstance(config.target_modules, str)
    by_inner = regex and any(cfg.is_target(inner) for _, inner, _ in linears)

    def hit(pattern: Any, inner: str, full: str) -> bool:
        if regex:
            return cfg.is_target(inner if by_inner else full)
        return cfg.pattern_matches(pattern, full)

    patterns = [config.target_modules] if regex else list(config.target_modules)
    matched = {p: {k for k, (_, inner, full) in enumerate(linears) if hit(p, inner, full)}
               for p in patterns}
    for p in patterns:
        if matched[p]:
            continue
        outside = [n for n, _ in model.named_modules() if n and n != prefix
                   and not n.startswith(f"{prefix}.")
                   and (re.fullmatch(p, n) if regex else cfg.pattern_matches(p, n))]
        where = (f"; it matches {outside[:3]}, outside the blocks ({prefix}): the layer-by-layer "
                 "path compresses inside the blocks only") if outside else ""
        leaves = sorted({inner.rsplit(".", 1)[-1] for _, inner, _ in linears})
        raise ValueError(f"target_modules pattern {p!r} matches no "
                         f"{describe_kinds(MATRIX_KINDS)} in the blocks of "
                         f"{type(model).__name__}{where} (the blocks' linears: {leaves})")
    per_block: list[list[str]] = [[] for _ in blocks]
    chosen = set().union(*matched.values())
    for k, (i, inner, _) in enumerate(linears):
        if k in chosen:
            per_block[i].append(inner)
    return per_block


def check_checkpoint(directory: str | os.PathLike, model: nn.Module, sequences: torch.Tensor,
                     config: LayerwiseConfig, world_size: int = 1) -> dict[str, Any]:
    """The state (``state.json``) of the checkpoint in ``directory`` after checking that
    ``compress_layerwise(model, sequences, config, resume=True)`` on ``world_size`` ranks
    can continue from it, without changing anything: the checks that call makes before it
    touches the model (format version; the fingerprint of the settings, the sequences, the
    model and the world size, :func:`layerwise_fingerprint`; the finished blocks' files
    and every rank's hidden states), but not the hidden states' shapes. Take it on the
    unchanged model. One pass over the model's weights (their sha256).

    Raises:
        FileNotFoundError: ``directory`` holds no checkpoint.
        ValueError: a checkpoint of another format or version, for other inputs (every
            difference named, as :func:`compress_layerwise` names them) or with files
            missing.
    """
    d = Path(directory)
    state = read_checkpoint_state(d)
    if state is None:
        raise FileNotFoundError(f"no layer-by-layer checkpoint in {d} (no {CHECKPOINT_STATE})")
    blocks = blocks_of(model)
    per_block = _targets_per_block(model, blocks, config)
    _refuse_other_inputs(d, state, layerwise_fingerprint(model, sequences, config, per_block,
                                                         world_size))
    _check_files(d, state, len(blocks), list(range(world_size)))
    return state


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """Remove a :func:`write_checkpoint` checkpoint: its ``state.json`` first (so what is
    left is never taken for a checkpoint), then its block and hidden-state files and the
    temporary files of interrupted writes; then ``directory`` itself if that left it
    empty (other files are kept)."""
    d = Path(directory)
    if not d.is_dir():
        return
    (d / CHECKPOINT_STATE).unlink(missing_ok=True)
    for pattern in ("block_*.safetensors", "hidden_*_rank*.safetensors",
                    f".{CHECKPOINT_STATE}.*.tmp", ".block_*.safetensors.*.tmp",
                    ".hidden_*_rank*.safetensors.*.tmp"):
        for f in d.glob(pattern):
            f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        d.rmdir()


def _load_hidden(d: Path, state: dict[str, Any], data: list[tuple], rank: int,
                 n_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This rank's ``(xs, xt)`` for the block after checkpoint ``d``'s last one (none after
    the last block), checked against the captured inputs ``data``, and a check that the
    finished blocks' files are there: everything a resume reads but the block files'
    contents, before the model is touched. Raises ``ValueError`` naming what is wrong."""
    from safetensors.torch import load_file

    _check_files(d, state, n_blocks, [rank])
    last = int(state["last_block"])
    if last == n_blocks - 1:
        return [], []
    path = _hidden_file(d, last, rank)
    hidden = load_file(str(path))
    n = len(data)
    bad = (len(hidden) != 2 * n
           or any(f"{a}.{k}" not in hidden or hidden[f"{a}.{k}"].shape != data[k][0].shape
                  for a in ("xs", "xt") for k in range(n)))
    if bad:
        raise ValueError(f"checkpoint {d}: {path.name} does not hold this rank's {n} batches "
                         f"of hidden states of shapes "
                         f"{sorted({tuple(dd[0].shape) for dd in data})}")
    dev = [dd[0].device for dd in data]
    return ([hidden[f"xs.{k}"].to(dev[k]) for k in range(n)],
            [hidden[f"xt.{k}"].to(dev[k]) for k in range(n)])


def _restore(d: Path, state: dict[str, Any], blocks: nn.ModuleList, prefix: str,
             swap: Any) -> None:
    """Put the finished blocks of checkpoint ``d`` into ``blocks`` through ``swap``: the
    MPO layers by ``swap.put``, and every other tensor the blocks' state dicts load into
    (norms, non-target linears, dense-kept targets) recorded first by ``swap.save_value``,
    so undoing ``swap`` gives the model back as it was."""
    from safetensors.torch import load_file

    from tnlm.bridge import MPOModule

    last = int(state["last_block"])
    structures = state["structures"]
    for i in range(last + 1):
        block = blocks[i]
        head = f"{prefix}.{i}."
        replaced = {name[len(head):]: struct for name, struct in structures.items()
                    if name.startswith(head)}
        for k, t in block.state_dict(keep_vars=True).items():
            if not any(k.startswith(r + ".") for r in replaced):
                swap.save_value(t)
        for name, struct in replaced.items():
            old = block.get_submodule(name)
            w = getattr(old, "weight", None)
            swap.put(head + name, MPOModule.from_structure(
                struct, dtype=w.dtype if w is not None else torch.float32,
                device=w.device if w is not None else None))
        block.load_state_dict(load_file(str(_block_file(d, i))), strict=True)


def compress_layerwise(model: nn.Module, sequences: torch.Tensor, config: LayerwiseConfig, *,
                       progress: bool = True, log: Callable[[str], None] | None = None,
                       resume: bool = False, distributed: bool | None = None
                       ) -> LayerwiseResult:
    """Compress ``model``'s target linears in place, one block at a time (module docstring).

    Args:
        model: a transformers model with an entry in
            :mod:`tnlm.integration.architectures` (a causal LM or an encoder).
        sequences: calibration token ids (n, T), long, no padding; under
            ``torch.distributed``, the same full tensor on every rank.
        config: :class:`LayerwiseConfig`.
        resume: continue from the checkpoint in ``config.checkpoint_dir`` (after its last
            finished block; the result is the uninterrupted run's); without a checkpoint
            there, start from the beginning.
        distributed: share the work over the ranks of the initialized ``torch.distributed``
            process group (default: whenever one with more than one rank is). Rank r
            captures the calibration batches r, r + w, ... (batches of
            ``config.batch_size`` sequences); Gram statistics, spectra and errors are
            summed over the ranks (:mod:`tnlm.compress.distributed`); each block's
            truncations (and each spectrum for the allocation) are shared among the ranks
            by cost, each computed by one rank and broadcast from it, so every rank holds
            the single-process truncations; block fitting averages gradients each step (it
            needs a number of batches divisible by the world size). Every rank must call this
            with the same arguments and ends with the same compressed model (checked:
            the sequences, the settings, with a checkpoint the model's fingerprint and
            the checkpoint state each rank read). False inside a process group: this
            process works alone as rank 0 (its checkpoint waits for no other rank).

    Returns:
        A :class:`LayerwiseResult` (errors over all ranks' sequences); the targets of
        ``model`` are now ``MPOLinear`` layers.

    Raises:
        TypeError: ``config.budget`` of the wrong type (raised when the
            :class:`LayerwiseConfig` is made; :func:`tnlm.core.budget.check_fraction`).
        ValueError: bad sequences, patterns that match no linear of any block, a
            distributed run with fewer batches than ranks (or, when fitting, a number of
            batches not divisible by the world size) or whose ranks were given different
            settings, models or checkpoint states, or a checkpoint to resume of another
            version, with missing or mis-shaped files, or whose settings, sequences, model
            (architecture, targets, dtype, weights) or world size differ (named in the
            message); the model is unchanged.
        tnlm.compress.distributed.RankFailure: another rank stopped or the process
            group's timeout passed; the model is unchanged and the last checkpoint stays
            resumable.
    """
    from tnlm.integration.surgery import Swap

    if not torch.is_tensor(sequences) or sequences.dim() != 2 or sequences.numel() == 0 \
            or sequences.dtype not in (torch.int64, torch.int32):
        raise ValueError("sequences must be a non-empty (n, T) tensor of token ids, got "
                         + (f"shape {tuple(sequences.shape)} {sequences.dtype}"
                            if torch.is_tensor(sequences) else type(sequences).__name__))
    say = log or (lambda s: None)
    blocks = blocks_of(model)
    per_block, _ = _checked_targets(model, blocks, config)
    dist = dist_.is_distributed() and (distributed is None or bool(distributed))
    rank, size = dist_.world() if dist else (0, 1)
    fitting = config.method == "tnlm" and config.fit_steps > 0
    if dist:
        dist_.check_same(dist_.digest([sequences]), "calibration sequences")
        n_batches, ok = shared_batches(sequences.shape[0], config.batch_size, size, fitting)
        if not ok:
            raise ValueError(
                f"{sequences.shape[0]} sequences make {n_batches} batches of "
                f"{config.batch_size}, which {size} ranks cannot share: every rank needs a "
                "batch" + (", and block fitting equal shares (a number of batches divisible "
                           "by the world size)" if fitting else ""))
        local = torch.cat([sequences[s] for s in dist_.shard_batches(
            sequences.shape[0], config.batch_size, rank, size)])
    else:
        local = sequences
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    fingerprint = (layerwise_fingerprint(model, sequences, config, per_block, size)
                   if ckpt is not None else None)  # before anything changes the model
    saved, problem = None, None
    if resume:
        if ckpt is None:
            raise ValueError("resume needs config.checkpoint_dir")
        try:
            saved = read_checkpoint_state(ckpt)
        except ValueError as err:
            problem = err
    if dist:  # every rank goes on from the same settings, model and checkpoint state
        agreed = dist_.digest([
            json.dumps(fingerprint if fingerprint is not None else _settings(config),
                       sort_keys=True),
            "none" if saved is None else json.dumps(saved, sort_keys=True), str(problem)])
        try:
            dist_.check_same(agreed, "settings, models or checkpoint states (each rank "
                             "reads state.json itself: the directory must be shared)")
        except ValueError:
            if problem is not None:
                raise problem from None
            raise
    if problem is not None:
        raise problem
    if saved is not None:
        _refuse_other_inputs(ckpt, saved, fingerprint)
    elif ckpt is not None and rank == 0:  # a fresh run: an earlier state.json in the folder
        (ckpt / CHECKPOINT_STATE).unlink(missing_ok=True)  # must not point at this run's files
    times: dict[str, float] = {}
    ranks: dict[str, int | None] = {}
    errors: dict[str, float] = {}
    structures: dict[str, dict[str, Any]] = {}
    block_errors: list[tuple[float, float]] = []
    before = after = 0
    t0 = time.perf_counter()
    data = capture_block_inputs(model, local, config.batch_size, blocks)
    xs = [d[0] for d in data]
    xt = list(xs)
    times["capture"] = time.perf_counter() - t0
    restored: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    if saved is not None:  # read and checked on every rank before the model is touched
        try:
            restored, problem = _load_hidden(ckpt, saved, data, rank, len(blocks)), None
        except ValueError as err:
            problem = err
        if dist:
            bad = dist_.all_reduce_floats([float(problem is not None)],
                                          "the checkpoint's hidden states")[0]
            if bad and problem is None:
                raise ValueError(f"cannot resume from {ckpt}: {int(bad)} other rank(s) "
                                 "could not read their hidden states (their errors name them)")
        if problem is not None:
            raise problem
    allocated: dict[str, int | None] | None = None
    probe: int | None = None
    if saved is not None:
        allocated = saved["allocated"]
        probe = saved.get("probe")
    elif config.allocation != "uniform" and config.budget < 1:
        t0 = time.perf_counter()
        was = model.training
        model.eval()
        sens = None
        try:
            if config.allocation == "sensitivity":
                sens = Sensitivity(float(config.budget), pivoted=config.pivoted)
                # the first sequences of all, the same probe on every rank
                n = min(config.sensitivity_sequences, int(sequences.shape[0]))
                if n < config.sensitivity_sequences:
                    warnings.warn(f"sensitivity_sequences: a probe of "
                                  f"{config.sensitivity_sequences} sequences, but only {n} "
                                  f"calibration sequences: measured on {n}", stacklevel=2)
                probe = n
                sens.start(blocks, capture_block_inputs(model, sequences[:n],
                                                        config.batch_size, blocks))
            spectra, share = dense_spectra(blocks, data, per_block, prefix, config.ridge,
                                           progress, reduce=dist, error=config.output_error,
                                           sensitivity=sens)
        finally:
            model.train(was)
        weights = (share if config.allocation == "residual" else
                   sens.weights() if sens is not None else None)
        del sens  # its probe's hidden states
        allocated = spectrum_ranks(spectra, float(config.budget), weights,
                                   pivoted=config.pivoted)
        if dist:  # the same spectra on every rank; rank 0's choice is everyone's
            allocated = dist_.broadcast_json(allocated, 0, "the allocated ranks")
        times["allocation"] = time.perf_counter() - t0

    def mean_error(parts: list[torch.Tensor]) -> float:
        """Mean of the batches' errors over all ranks' batches (equal-sized batches
        unless the last is short: then a mean of batch means, not of positions)."""
        total, count = sum(float(e) for e in parts), float(len(parts))
        if dist:
            total, count = dist_.all_reduce_floats([total, count], "block errors")
        return total / count

    flags = [(p, p.requires_grad) for p in model.parameters()]
    swap = Swap(model)  # undone on failure: the swapped layers and what fitting changes
    for p in block_parameters(blocks):  # besides them (norms)
        swap.save_value(p)
    was = model.training
    model.eval()
    t_trunc = t_fit = 0.0
    start = 0
    try:
        if saved is not None and restored is not None:  # the finished blocks, through swap
            _restore(ckpt, saved, blocks, prefix, swap)
            xs, xt = restored
            del restored
            ranks, errors = dict(saved["ranks"]), dict(saved["errors"])
            structures = dict(saved["structures"])
            block_errors = [tuple(e) for e in saved["block_errors"]]
            before, after = int(saved["params_before"]), int(saved["params_after"])
            start = int(saved["last_block"]) + 1
            say(f"resumed from {ckpt} after block {start - 1}")
        for i in tqdm(range(start, len(blocks)), desc="layer-by-layer", disable=not progress,
                      leave=False):
            block = blocks[i]
            t1 = time.perf_counter()
            teacher = copy.deepcopy(block).eval()
            call_s, call_t = _BlockCall(block), _BlockCall(teacher)
            names = per_block[i]
            with torch.no_grad():
                yt = [call_t(x, d[1]) for x, d in zip(xt, data)]
            if names and config.method != "plain":
                # the _BlockCall wrapper names the block "block"
                mods = [f"block.{n}" for n in names]
                if config.method == "tnlm":
                    stats = collect_input_stats(
                        call_s, [dict(x=x, extra=d[1]) for x, d in zip(xs, data)], mods,
                        reference=_PairedInputs(call_t, xt, data) if config.cross else None,
                        reduce=dist)
                else:
                    stats = collect_input_stats(
                        call_t, [dict(x=x, extra=d[1]) for x, d in zip(xt, data)], mods,
                        reduce=dist)
                stats = {n: stats[f"block.{n}"] for n in names}
            todo: list[_Truncation] = []
            for n in names:
                old = block.get_submodule(n)
                W = weight_xw(old)
                I, J = (int(d) for d in W.shape)
                before += I * J
                uniform = pivoted_rank_for_fraction if config.pivoted else rank_for_fraction
                rank_n = (uniform(I, J, float(config.budget)) if allocated is None
                          else allocated[f"{prefix}.{i}.{n}"])
                if config.budget >= 1 or rank_n is None or rank_n >= min(I, J):
                    ranks[f"{prefix}.{i}.{n}"] = None  # budget 1: nothing is truncated
                    errors[f"{prefix}.{i}.{n}"] = 0.0
                    after += I * J
                    continue
                st = stats[n] if config.method != "plain" else InputStats(
                    torch.eye(I, dtype=torch.float64), 1)
                todo.append(_Truncation(n, old, W, st, rank_n))
            # distributed: each truncation by one rank (by cost), sent from it to the others
            for job, new in zip(todo, _truncate(todo, config, rank, size if dist else 1, i)):
                swap.put(f"{prefix}.{i}.{job.name}", new)
                ranks[f"{prefix}.{i}.{job.name}"] = job.rank
                errors[f"{prefix}.{i}.{job.name}"] = float(new.truncation_error)
                structures[f"{prefix}.{i}.{job.name}"] = new.structure()
                after += (pivoted_params(job.W.shape[0], job.W.shape[1], job.rank)
                          if config.pivoted else sum(c.numel() for c in new.cores))
            t_trunc += time.perf_counter() - t1
            t1 = time.perf_counter()
            with torch.no_grad():
                ys = [call_s(x, d[1]) for x, d in zip(xs, data)]
                err0 = err1 = mean_error([block_error(y_s, y, config.output_error)
                                           for y_s, y in zip(ys, yt)])
            if fitting and any(ranks[f"{prefix}.{i}.{n}"] for n in names):
                kept = {k: v.detach().clone() for k, v in block.state_dict().items()}
                try:
                    fit_block(block, [(x, d[1]) for x, d in zip(xs, data)], yt,
                              config.fit_steps, lr=config.fit_lr, seed=config.seed + i,
                              sync=dist, error=config.output_error)
                except FloatingPointError as err:  # diverged: the block as truncated
                    block.load_state_dict(kept)
                    say(f"block {i}: fitting skipped ({err})")
                with torch.no_grad():
                    fitted = [call_s(x, d[1]) for x, d in zip(xs, data)]
                    err1 = mean_error([block_error(y_s, y, config.output_error)
                                        for y_s, y in zip(fitted, yt)])
                    if err1 < err0:  # fitting never leaves a block worse than it found it
                        ys = fitted
                    else:
                        block.load_state_dict(kept)
                        err1 = err0
            xs = ys
            t_fit += time.perf_counter() - t1
            xt = yt
            block_errors.append((err0, err1))
            del teacher, call_t
            # the dense W the error passes cached: as large as the dense block, unused
            # until the model is evaluated (and then rebuilt), so not kept block after block
            invalidate_caches(block)
            if ckpt is not None:
                write_checkpoint(ckpt, i, dict(
                    fingerprint=fingerprint, allocated=allocated, probe=probe, ranks=ranks,
                    errors=errors,
                    structures=structures, block_errors=block_errors, params_before=before,
                    params_after=after), block, xs if i + 1 < len(blocks) else None,
                    xt if i + 1 < len(blocks) else None, rank=rank, distributed=dist)
            say(f"block {i}: output error {err0:.4f} -> {err1:.4f}")
    except BaseException:
        swap.undo()
        raise
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was)
    times["truncation"] = t_trunc
    times["fitting"] = t_fit
    return LayerwiseResult(ranks, errors, block_errors, before, after, times, peak_rss_mb(),
                           sensitivity_sequences=probe)


@dataclass
class _Truncation:
    """One target of a block to truncate: its name in the block, the layer, its weight
    (in, out), its statistics and the rank to keep."""

    name: str
    old: nn.Module
    W: torch.Tensor
    stats: InputStats
    rank: int

    @property
    def cost(self) -> float:
        """The SVD's ``I J min(I, J)`` (measured proportional to a truncation's time)."""
        I, J = (int(d) for d in self.W.shape)
        return float(I * J * min(I, J))


def _truncate(todo: list[_Truncation], config: LayerwiseConfig, rank: int, size: int,
              block: int) -> list[nn.Module]:
    """The whitened truncations of ``todo`` (MPO layers, in order). With ``size`` > 1
    (every rank calls this with the same ``todo``) each is computed by one rank,
    :func:`~tnlm.compress.distributed.owners_by_cost`, and sent from it: its structure as
    JSON (or the error that stopped its owner, raised on every rank), then its tensors;
    the others build the layer from the structure. Every rank ends with the owners'
    layers, bit for bit."""
    owners = dist_.owners_by_cost([t.cost for t in todo], size) if size > 1 else [0] * len(todo)
    out: list[nn.Module | None] = [None] * len(todo)
    failed: BaseException | None = None
    for k, (job, owner) in enumerate(zip(todo, owners)):
        if owner == rank and failed is None:
            try:
                out[k] = WhitenedLayer(job.W, job.stats, config.ridge).layer(
                    job.rank, job.old, config.gauge)
            except Exception as err:
                if size == 1:
                    raise
                failed = err
    if size == 1:
        return out  # type: ignore[return-value]
    from tnlm.bridge import MPOModule

    for src in range(size):
        mine = [k for k, o in enumerate(owners) if o == src]
        if not mine:
            continue
        sent = None
        if src == rank:
            sent = ({"error": f"{type(failed).__name__}: {failed}"} if failed is not None
                    else {"structures": [out[k].structure() for k in mine]})
        sent = dist_.broadcast_json(sent, src, f"block {block}'s truncations on rank {src}")
        if "error" in sent:
            if src == rank and failed is not None:
                raise failed
            raise RuntimeError(f"rank {src} could not truncate block {block}'s "
                               f"{', '.join(todo[k].name for k in mine)}: {sent['error']}")
        for k, spec in zip(mine, sent["structures"]):
            if out[k] is None:
                w = getattr(todo[k].old, "weight", None)
                out[k] = MPOModule.from_structure(
                    spec, dtype=w.dtype if w is not None else torch.float32,
                    device=w.device if w is not None else None)
            dist_.broadcast_module(out[k], src, f"block {block}'s {todo[k].name}")
    return out  # type: ignore[return-value]


class _PairedInputs(nn.Module):
    """The reference for :func:`collect_input_stats`: called with the same batch dicts as
    the student, it runs the teacher's block on the teacher's own inputs of that batch."""

    def __init__(self, call_t: _BlockCall, xt: list[torch.Tensor], data: list[tuple]) -> None:
        super().__init__()
        self.block = call_t.block  # module names as in the student's _BlockCall
        self.training = call_t.training
        self.xt = xt
        self.data = data
        self._k = 0

    def forward(self, x: torch.Tensor, extra: tuple) -> torch.Tensor:
        k = self._k
        self._k = (k + 1) % len(self.xt)
        return _BlockCall.forward(self, self.xt[k], self.data[k][1])
