"""Compress a transformers model to a parameter budget: calibrate, truncate, heal.

:func:`compress_model` is the mechanism behind ``tnlm compress`` on an encoder (the job
itself, with its text split, measures and defaults, is
:func:`tnlm.compress.encoder.compress_encoder`)::

    teacher = copy of the original (frozen)
    for each group of target layers, in forward order (one transformer block at a time):
        record inputs of the partly compressed model and of the teacher (calibration)
        replace each layer by its data-aware MPO (tnlm.compress.data_aware) at the
        rank its share of the budget allows
    heal the student by distillation from the teacher (tnlm.compress.distill)

``budget`` is the fraction of the targeted layers' parameters kept, model-wide; it
is met or refused: a budget below the smallest model the allocation can make
raises before any work (:func:`check_budget`), and a budget of 1 keeps every layer
dense (nothing is truncated, nothing healed).
:class:`CompressionConfig`'s defaults are the mechanism's, cheaper than the job's
(:class:`tnlm.compress.encoder.EncoderRecipe`: sensitivity allocation, reconstruction,
2500 healing steps). Its default allocation gives every layer the same fraction (the
largest rank within it); ``allocation="greedy"`` spends the budget where the calibration
output error drops most per parameter (measured worse end to end on MiniLM,
docs/results.md, but offered). The model is changed only if everything
succeeds; on any error the original layers are put back.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import kind_of, weight_xw
from tnlm.bridge.kinds import MATRIX_KINDS, describe_kinds
from tnlm.bridge.pivoted import pivot_layers
from tnlm.compress.allocate import (
    block_index,
    measure_sensitivity,
    rank_for_fraction,
    rank_params,
    sensitivity_ranks,
    smallest_fraction,
    uniform_ranks,
)
from tnlm.compress.calibration import InputStats, collect_input_stats
from tnlm.compress.data_aware import WhitenedLayer, output_error
from tnlm.compress.distill import HealConfig, HealResult, heal
from tnlm.compress.heal_state import check_heal_dir
from tnlm.compress.layerwise.blocks import refuse_shared_blocks
from tnlm.compress.reconstruct import reconstruct_blocks
from tnlm.compress.text import check_texts
from tnlm.core.budget import check_fraction
from tnlm.core.validation import check_bool_fields, check_positive_int, check_seed
from tnlm.integration import MPOConfig, MPOModel
from tnlm.integration.architectures import block_indices, find_blocks
from tnlm.integration.surgery import Swap, weight_sharers

__all__ = ["CompressionConfig", "CompressionResult", "compress_model", "rank_for_fraction",
           "layer_groups", "target_shapes", "check_budget", "run_context"]


ALLOCATIONS = ("uniform", "greedy", "sensitivity")


@dataclass
class CompressionConfig:
    """What :func:`compress_model` does. The defaults are the mechanism's; ``tnlm compress``
    uses :meth:`tnlm.compress.encoder.EncoderRecipe.compression_config`.

    Attributes:
        target_modules: PEFT-style patterns of the layers to compress (Linear/Conv1D).
        budget: model-wide fraction of the targeted parameters to keep, in (0, 1].
        allocation: ``"uniform"`` (same fraction per layer), ``"greedy"`` (calibration
            errors) or ``"sensitivity"`` (end-to-end drops on ``probe_size`` calibration
            sentences; layers may stay dense; see :mod:`tnlm.compress.allocate`).
        probe_size: sentences of the sensitivity probe.
        reconstruct_steps: block-by-block reconstruction steps per block before healing
            (:mod:`tnlm.compress.reconstruct`; 0: none), on ``reconstruct_size`` sentences.
        sequential: calibrate each block on the partly compressed model's inputs
            and fit to the teacher's outputs (error feedback; needs ``whiten``); default:
            one pass on the original model (measured better on MiniLM: held-out cosine
            0.781 vs 0.748 at 50 % before healing, docs/results.md).
        whiten: minimise the calibration output error (data-aware); ``False`` truncates
            the weight itself (plain low-rank SVD), the baseline (its reported ``errors``
            are still the calibration output errors; ``sequential`` needs ``whiten``).
        gauge: gauge of the resulting cores (:data:`tnlm.core.spec.GAUGES`).
        pivoted: count and allocate each truncated layer with its bond's gauge fixed,
            ``r (I + J - r)`` numbers instead of ``r (I + J)`` (:mod:`tnlm.core.pivot`):
            a larger rank at the same budget; after healing the layers become
            :class:`~tnlm.bridge.pivoted.PivotedLinear` storing exactly that count.
        heal: distillation settings; ``None`` or ``steps=0`` skips healing.
        seed: the order block reconstruction draws its batches in (healing has its own,
            ``heal.seed``; the job sets both from its seed).
    """

    target_modules: list[str] | str
    budget: float = 0.5
    allocation: str = "uniform"
    probe_size: int = 128
    reconstruct_steps: int = 0
    reconstruct_size: int = 1024
    sequential: bool = False
    whiten: bool = True
    gauge: str = "symmetric"
    ridge: float = 1e-6
    heal: HealConfig | None = field(default_factory=HealConfig)
    pivoted: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_fraction("budget", self.budget)
        self.seed = check_seed(self.seed)
        check_bool_fields(self, "pivoted", "sequential", "whiten")
        for name in ("probe_size", "reconstruct_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1 (sentences), got {v!r}")
        r = self.ridge
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (
                math.isfinite(r) and r >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {r!r}")
        if self.heal is not None and not isinstance(self.heal, HealConfig):
            raise ValueError(f"heal must be a HealConfig or None, got "
                             f"{type(self.heal).__name__}")
        if isinstance(self.reconstruct_steps, bool) or not isinstance(
                self.reconstruct_steps, int) or self.reconstruct_steps < 0:
            raise ValueError(f"reconstruct_steps must be an int >= 0, got "
                             f"{self.reconstruct_steps!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.sequential and not self.whiten:
            raise ValueError("sequential=True needs whiten=True: sequential calibration fits "
                             "each block to the teacher's outputs through the calibration "
                             "statistics, which whiten=False (plain SVD of the weights) does "
                             "not use; pass sequential=False or whiten=True")
        MPOConfig(target_modules=self.target_modules)  # validates the patterns' form


@dataclass
class CompressionResult:
    model: MPOModel
    ranks: dict[str, int]
    errors: dict[str, float]           # relative calibration output error per layer
    params_before: int
    params_after: int
    heal: HealResult | None
    #: seconds a phase, each its own (they do not overlap, so they add up):
    #: "sensitivity" (allocation "sensitivity"; else "allocation": from the start to the
    #: ranks, the teacher's copy, the calibration statistics and the probe),
    #: "truncation", "reconstruction", "healing", "pivoting"
    seconds: dict[str, float]
    #: per block, its masked output error ``||y_s - y_t|| / ||y_t||`` before / after
    #: reconstruction: relative, not squared (the decoder's ``LayerwiseResult.block_errors``
    #: are squared)
    block_errors: list[tuple[float, float]] | None = None

    @property
    def ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 0.0

    def table(self) -> list[dict[str, Any]]:
        return [dict(name=n, rank=r, error=self.errors[n]) for n, r in self.ranks.items()]


def layer_groups(names: Sequence[str], model: nn.Module | None = None) -> list[list[str]]:
    """Target names grouped by their block, in block order; names outside the blocks form a
    last group. The block of a name is found in ``model``'s block stack
    (:func:`tnlm.integration.architectures.block_indices`) when ``model`` is given and
    has one, else from the name (:func:`tnlm.compress.allocate.block_index`: its first
    numeric part)."""
    names = list(names)
    where = block_indices(model, names) if model is not None else {}
    if not any(b is not None for b in where.values()):  # no model, or no block stack
        where = {n: block_index(n) for n in names}
    groups: dict[float, list[str]] = {}
    for n in names:
        b = where[n]
        groups.setdefault(math.inf if b is None else b, []).append(n)
    return [groups[k] for k in sorted(groups)]


def _greedy_ranks(layers: dict[str, WhitenedLayer], fraction: float,
                  pivoted: bool = False) -> dict[str, int | None]:
    """Ranks maximising the drop of Σ relative squared output error per parameter (a rank
    more costs ``I + J``, with ``pivoted`` ``I + J - 2r - 1``). A truncated layer stays
    cheaper than its dense matrix: past the largest such rank the next step keeps the
    layer dense (``None``, no error), as :func:`~tnlm.compress.allocate.spectrum_ranks`
    does."""
    def size(n: str, r: int | None) -> int:
        I, J = layers[n].shape
        return I * J if r is None else rank_params(I, J, r, pivoted=pivoted)

    def top(n: str) -> int:  # the largest rank costing less than the dense matrix
        I, J = layers[n].shape
        r = min(len(layers[n].spectrum), I, J)
        while r > 1 and rank_params(I, J, r, pivoted=pivoted) >= I * J:
            r -= 1
        return r

    budget = fraction * sum(wl.shape[0] * wl.shape[1] for wl in layers.values())
    ranks: dict[str, int | None] = {n: 1 for n in layers}
    tops = {n: top(n) for n in layers}
    spent = sum(size(n, 1) for n in layers)
    total = {n: float(wl.tails[0]) or 1.0 for n, wl in layers.items()}
    while True:
        best, gain, step = None, -1.0, 0
        for n, wl in layers.items():
            r = ranks[n]
            if r is None:
                continue
            nxt = r + 1 if r < tops[n] else None  # past the top: dense
            cost = size(n, nxt) - size(n, r)
            if cost <= 0 or spent + cost > budget:
                continue
            drop = float(wl.spectrum[r] ** 2) if nxt is not None else float(wl.tails[r])
            g = drop / total[n] / cost
            if g > gain:
                best, gain, step = n, g, cost
        if best is None:
            return ranks
        spent += step
        r = ranks[best]
        ranks[best] = r + 1 if r < tops[best] else None


def target_shapes(model: nn.Module, config: CompressionConfig) -> dict[str, tuple[int, int]]:
    """``name -> (in, out)`` of the layers ``config`` compresses in ``model``.

    Raises:
        ValueError: the patterns match no nn.Linear or Conv1D, or one pattern of a list
            matches none (a misspelled target is never left out silently; the message
            names close leaf names), or a matched layer shares its weight with another
            module (a head tied to the word embeddings: an MPO would silently untie them
            and the counted saving would not happen).
    """
    mpo_cfg = MPOConfig(target_modules=config.target_modules, gauge=config.gauge)
    matrices = {n: m for n, m in model.named_modules() if n and kind_of(m) in MATRIX_KINDS}
    out = {n: tuple(int(d) for d in weight_xw(m).shape) for n, m in matrices.items()
           if mpo_cfg.is_target(n)}
    if not out:
        raise ValueError(f"target_modules {config.target_modules!r} match no "
                         f"{describe_kinds(MATRIX_KINDS)} of {type(model).__name__}")
    if not isinstance(config.target_modules, str):
        for p in config.target_modules:
            if not any(MPOConfig.pattern_matches(p, n) for n in matrices):
                leaves = sorted({n.rsplit(".", 1)[-1] for n in matrices})
                close = difflib.get_close_matches(p.rsplit(".", 1)[-1], leaves, n=3)
                hint = f"; did you mean {close}?" if close else f"; leaf names: {leaves[:12]}"
                raise ValueError(f"target_modules pattern {p!r} matches no "
                                 f"{describe_kinds(MATRIX_KINDS)} of {type(model).__name__}"
                                 f"{hint}")
    _check_untied(model, out, config.target_modules)
    return out


def _check_untied(model: nn.Module, names: Sequence[str], targets: Any) -> None:
    """``ValueError`` naming the first of ``names`` whose weight another module of ``model``
    also holds (tied weights), as :func:`tnlm.integration.get_mpo_model` refuses it."""
    for name, others in weight_sharers(model, names).items():
        raise ValueError(f"target_modules {targets!r} match module {name!r}, which shares "
                         f"its weight with {others} (tied weights): an MPO would silently "
                         "untie them (the dense table stays, the saving would not happen); "
                         "untie them first or leave the module out of target_modules")


#: :func:`compress_model`'s defaults of ``batch_size`` and ``max_length``, which
#: :func:`run_context` records only when others were used (states written before it
#: recorded them resume)
CALIBRATION_BATCH, CALIBRATION_MAX_LENGTH = 32, 64


def run_context(config: CompressionConfig,
                calibration: Sequence[str] | None = None, *,
                batch_size: int = CALIBRATION_BATCH,
                max_length: int = CALIBRATION_MAX_LENGTH) -> dict[str, Any]:
    """What decides the student healing starts from, besides the healing settings, the text
    and the teacher: recorded in the healing checkpoint
    (:func:`tnlm.compress.heal_state.heal_settings`), so that resuming with another budget,
    allocation, calibration text ... is refused. ``calibration``: the sentences the
    truncation was measured on (their count and a hash of them, as :func:`compress_model`
    keeps them: non-empty strings). ``batch_size``, ``max_length``: :func:`compress_model`'s,
    which decide its calibration statistics and block reconstruction (recorded when not
    the defaults)."""
    targets = config.target_modules
    out = dict(budget=float(config.budget), allocation=config.allocation,
               target_modules=targets if isinstance(targets, str) else list(targets),
               probe_size=config.probe_size, reconstruct_steps=config.reconstruct_steps,
               reconstruct_size=config.reconstruct_size, sequential=config.sequential,
               whiten=config.whiten, gauge=config.gauge, ridge=config.ridge,
               **({"pivoted": True} if config.pivoted else {}),
               **({"seed": config.seed} if config.seed else {}),
               **({"batch_size": batch_size} if batch_size != CALIBRATION_BATCH else {}),
               **({"max_length": max_length} if max_length != CALIBRATION_MAX_LENGTH
                  else {}))
    if calibration is not None:
        kept = [s for s in check_texts(calibration, "calibration") if s.strip()]
        out.update(calibration=len(kept), calibration_sha256=hashlib.sha256(
            json.dumps(kept).encode()).hexdigest())
    return out


def check_budget(model: nn.Module, config: CompressionConfig, name: str = "budget") -> float:
    """The smallest budget ``config.allocation`` can meet on ``model``'s targets
    (:func:`tnlm.compress.allocate.smallest_fraction`); raises ``ValueError`` naming
    ``name``, the requested and the smallest fraction if ``config.budget`` is below it."""
    floor = smallest_fraction(target_shapes(model, config), config.allocation,
                              pivoted=config.pivoted)
    if config.budget < 1 and config.budget < floor:
        raise ValueError(f"{name} {config.budget:g} cannot be met: the smallest model the "
                         f"{config.allocation!r} allocation can make keeps {floor:.6g} of the "
                         f"targeted parameters ({floor:.2%}); pass {name} >= "
                         f"{math.ceil(floor * 1e6) / 1e6:g}")
    return floor


def compress_model(model: nn.Module, tokenizer: Any, calibration: Sequence[str],
                   config: CompressionConfig, *, heal_text: Sequence[str] = (),
                   batch_size: int = CALIBRATION_BATCH,
                   max_length: int = CALIBRATION_MAX_LENGTH, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> CompressionResult:
    """Compress ``model``'s target layers in place into data-aware MPOs, then heal.

    Args:
        model: a transformers model (not an ``MPOModel``). It runs in eval mode throughout
            (healing trains with ``config.heal.dropout``) and is left in eval mode.
        tokenizer: its tokenizer.
        calibration: sentences for the input statistics (a few hundred suffice).
        config: :class:`CompressionConfig`.
        heal_text: sentences for distillation (default: ``calibration``).
        batch_size, max_length: sentences per batch and tokens per sentence of the
            calibration passes and of block reconstruction (whose own defaults are the
            same). The sensitivity probe embeds as
            :func:`tnlm.compress.quality.embed` does (batches of 64, up to 128 tokens),
            healing as ``config.heal`` says (its ``batch_size``, ``max_length``).

    Returns:
        A :class:`CompressionResult` whose ``model`` wraps the compressed ``model``.

    Raises:
        TypeError: ``calibration`` or ``heal_text`` is one string (its characters would
            be the sentences); ``batch_size`` or ``max_length`` is not an int.
        ValueError: no calibration text, a ``heal_text`` of blank sentences only, a
            ``batch_size`` or ``max_length`` below 1, a pattern matching no layer or a
            layer with tied weights (:func:`target_shapes`), a model that is already an
            ``MPOModel``, a budget below the smallest model the allocation can make
            (:func:`check_budget`), shared blocks (ALBERT's layer groups) with
            ``reconstruct_steps``; the model is unchanged.
        FloatingPointError: healing diverged (:func:`tnlm.compress.distill.heal`); the
            model is put back as it came in.
    """
    if isinstance(model, MPOModel):
        raise ValueError("model is already an MPOModel; compress the original model")
    calibration = [s for s in check_texts(calibration, "calibration") if s.strip()]
    heal_text = check_texts(heal_text, "heal_text")
    if not calibration:
        raise ValueError("calibration must hold at least one non-empty sentence")
    if heal_text and not any(s.strip() for s in heal_text):
        raise ValueError(f"heal_text holds {len(heal_text)} sentence(s), all blank: pass "
                         "non-empty sentences, or leave heal_text out to heal on calibration")
    batch_size = check_positive_int(batch_size, "batch_size")
    max_length = check_positive_int(max_length, "max_length")
    say = log or (lambda s: None)
    mpo_cfg = MPOConfig(target_modules=config.target_modules, gauge=config.gauge)
    shapes = target_shapes(model, config)
    names = list(shapes)
    check_budget(model, config)
    if config.reconstruct_steps:  # shared blocks (ALBERT) refused now, not after truncation
        refuse_shared_blocks(model, find_blocks(model), "compress_model (reconstruct_steps)")
    context = None  # what the healing state records of this run, when it heals
    if config.heal is not None and config.heal.steps > 0:  # a state of another run: now
        context = run_context(config, calibration, batch_size=batch_size,
                              max_length=max_length)
        check_heal_dir(config.heal, list(heal_text) or calibration, model, context)
    times: dict[str, float] = {}
    stats: dict[str, InputStats] = {}
    t0 = time.perf_counter()
    teacher = copy.deepcopy(model).eval()
    batches = [
        dict(tokenizer(calibration[i:i + batch_size], padding=True, truncation=True,
                       max_length=max_length, return_tensors="pt"))
        for i in range(0, len(calibration), batch_size)]
    originals = {n: model.get_submodule(n) for n in names}
    swapped: list[str] = []
    ranks: dict[str, int | None] = {}
    errors: dict[str, float] = {}
    fraction = float(config.budget)
    groups = layer_groups(names, model) if config.sequential else [names]
    swap = Swap(model, modes=True)  # undoing puts every module's train/eval mode back
    model.eval()  # no dropout in the calibration, the probe or the measures
    # healing trains the LayerNorms in place: undoing also copies back the teacher's
    # values (an untouched copy of the model as it came in), after the modules are back
    swap.on_undo(lambda: model.load_state_dict(teacher.state_dict()))
    try:
        if fraction >= 1:  # nothing is truncated: no MPO is smaller than its dense matrix
            ranks = {n: None for n in names}
        elif config.allocation == "uniform":
            ranks = uniform_ranks(shapes, fraction, pivoted=config.pivoted)
        else:  # ranks need every layer's spectrum up front
            stats = collect_input_stats(model, batches, names)
            layers = {n: WhitenedLayer(weight_xw(originals[n]), stats[n], config.ridge)
                      for n in names}
            if config.allocation == "greedy":
                ranks = _greedy_ranks(layers, fraction, config.pivoted)
            else:
                sens = measure_sensitivity(model, tokenizer, calibration[:config.probe_size],
                                           layers, gauge=config.gauge, progress=progress,
                                           pivoted=config.pivoted)
                ranks = sensitivity_ranks(layers, sens, fraction, pivoted=config.pivoted)
        # from the start to the ranks: the teacher's copy, the statistics, the probe
        times["sensitivity" if config.allocation == "sensitivity" else "allocation"] = \
            time.perf_counter() - t0
        t_trunc = time.perf_counter()  # the phases' seconds do not overlap
        for group in tqdm(groups, desc="data-aware truncation", disable=not progress,
                          leave=False):
            ref = teacher if config.sequential else None
            if all(ranks[n] is None for n in group):
                for n in group:
                    errors[n] = 0.0
                continue
            if config.whiten:
                stats = collect_input_stats(model, batches, group, reference=ref)
                measured = stats
            else:  # identity metric: plain SVD of the weight; the errors reported are
                # still the calibration output errors (one pass, not sequential: refused)
                measured = stats if all(n in stats for n in group) else \
                    collect_input_stats(model, batches, group)
                stats = {n: InputStats(torch.eye(weight_xw(originals[n]).shape[0],
                                                 dtype=torch.float64), 1) for n in group}
            for n in group:
                old = originals[n]
                W = weight_xw(old)
                I, J = W.shape
                rank = ranks.setdefault(n, rank_for_fraction(I, J, fraction,
                                                             pivoted=config.pivoted))
                if rank is not None and rank >= min(I, J):  # full rank: the dense layer
                    rank = ranks[n] = None
                if rank is None:  # the allocation keeps this layer dense
                    errors[n] = 0.0
                    continue
                new = WhitenedLayer(W, stats[n], config.ridge).layer(rank, old, config.gauge)
                if not config.whiten:  # the weight error above: the output error instead
                    with torch.no_grad():
                        stored = new.dense_matrix(torch.float64).detach()
                    new.truncation_error = output_error(W, stored, measured[n])
                errors[n] = float(new.truncation_error)
                swap.replace({n: new})
                swapped.append(n)
            say(f"block of {len(group)} layers: output errors "
                + ", ".join(f"{errors[n]:.3f}" for n in group))
        times["truncation"] = time.perf_counter() - t_trunc
        text = list(heal_text) or calibration
        block_errors = None
        if not swapped:
            say("every layer stays dense: nothing to reconstruct or heal")
        if config.reconstruct_steps > 0 and swapped:
            t1 = time.perf_counter()
            block_errors = reconstruct_blocks(model, teacher, tokenizer,
                                              text[:config.reconstruct_size],
                                              config.reconstruct_steps,
                                              batch_size=batch_size, max_length=max_length,
                                              seed=config.seed, progress=progress)
            say("block reconstruction, relative output error per block: " + ", ".join(
                f"{a:.3f}->{b:.3f}" for a, b in block_errors))
            times["reconstruction"] = time.perf_counter() - t1
        wrapped = MPOModel(model, mpo_cfg)
        result = None
        if config.heal is not None and config.heal.steps > 0 and swapped:
            t1 = time.perf_counter()
            result = heal(wrapped, teacher, tokenizer, text, config.heal, progress=progress,
                          context=context)
            times["healing"] = time.perf_counter() - t1
        if config.pivoted and swapped:  # the gauge fixed last: healing trained 2-site MPOs
            t1 = time.perf_counter()
            for n, m in pivot_layers(model, swapped).items():
                if n in ranks:
                    ranks[n] = m.rank  # lower only where W's numerical rank is
            times["pivoting"] = time.perf_counter() - t1
    except BaseException:
        swap.undo()
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    # the training modes need MPO layers; with none (nothing swapped, or every layer
    # gauge-fixed: PivotedLinear has no auxiliary tensor) everything stays frozen
    if any(True for _ in wrapped.mpo_modules()):
        wrapped.setup_training()
    before = sum(weight_xw(originals[n]).numel() for n in names)
    after = sum(sum(c.numel() for c in m.cores) for _, m in wrapped.mpo_modules())
    after += sum(m.n_params for _, m in wrapped.pivoted_modules())
    after += sum(weight_xw(originals[n]).numel() for n, r in ranks.items() if r is None)
    return CompressionResult(wrapped, ranks, errors, before, after, result, times, block_errors)
