"""The layer-by-layer loop (:func:`compress_layerwise`; the package docstring draws it):
capture block 0's inputs, allocate, then per block truncate its targets (shared over the
ranks by cost), fit it, checkpoint it."""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import invalidate_caches, weight_xw
from tnlm.compress import distributed as dist_
from tnlm.compress.allocate import spectrum_ranks, uniform_ranks
from tnlm.compress.calibration import InputStats, collect_input_stats
from tnlm.compress.data_aware import WhitenedLayer, output_error
from tnlm.compress.layerwise.blocks import (
    BlockCall,
    block_error,
    block_parameters,
    capture_block_inputs,
    fit_block,
    refuse_shared_blocks,
)
from tnlm.compress.layerwise.checkpoint import (
    CHECKPOINT_STATE,
    layerwise_fingerprint,
    load_hidden,
    read_checkpoint_state,
    refuse_other_inputs,
    restore_blocks,
    settings_of,
    write_checkpoint,
)
from tnlm.compress.layerwise.config import LayerwiseConfig, LayerwiseResult
from tnlm.compress.layerwise.spectra import Sensitivity, dense_spectra
from tnlm.compress.layerwise.targets import checked_targets, shared_batches
from tnlm.compress.memory import peak_rss_mb
from tnlm.core.pivot import pivoted_params
from tnlm.integration.architectures import blocks_of

__all__ = ["compress_layerwise"]

def _allocation_batches(data: list[tuple], n: int, config: LayerwiseConfig, rank: int,
                        size: int) -> list[tuple]:
    """This rank's captured batches among the first ``config.allocation_sequences`` of the
    ``n`` calibration sequences (all of them when it is None or at least ``n``)."""
    k = config.allocation_sequences
    if k is None or k >= n:
        return data
    # rank r holds the global batches r, r + size, ... (dist_.shard_batches)
    first = k // config.batch_size
    return [d for j, d in enumerate(data) if rank + j * size < first]


def compress_layerwise(model: nn.Module, sequences: torch.Tensor, config: LayerwiseConfig, *,
                       progress: bool = True, log: Callable[[str], None] | None = None,
                       resume: bool = False, distributed: bool | None = None
                       ) -> LayerwiseResult:
    """Compress ``model``'s target linears in place, one block at a time (the package docstring,
    :mod:`tnlm.compress.layerwise`).

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
        ValueError: bad sequences (token ids outside the model's vocabulary included),
            a block stack whose blocks do not each run once per
            forward (ALBERT's shared layer groups: fewer blocks than
            ``config.num_hidden_layers``), patterns that match no linear of any block, a
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
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if isinstance(vocab, int):
        lo, hi = int(sequences.min()), int(sequences.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"sequences hold token ids outside the model's vocabulary of "
                             f"{vocab} (ids 0 .. {vocab - 1}): min {lo}, max {hi}")
    say = log or (lambda s: None)
    blocks = blocks_of(model)
    refuse_shared_blocks(model, blocks, "compress_layerwise")
    per_block, shapes = checked_targets(model, blocks, config)
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
        k = config.allocation_sequences
        if config.allocation != "uniform" and k is not None and k < sequences.shape[0] \
                and k // config.batch_size < size:
            raise ValueError(f"allocation_sequences ({k}) make {k // config.batch_size} "
                             f"batches of {config.batch_size}, which {size} ranks cannot "
                             f"share: every rank needs a batch")
        local = torch.cat([sequences[s] for s in dist_.shard_batches(
            sequences.shape[0], config.batch_size, rank, size)])
    else:
        local = sequences
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    # before anything changes the model; under torch.distributed always, so that ranks
    # holding different models are refused with or without a checkpoint
    fingerprint = (layerwise_fingerprint(model, sequences, config, per_block, size)
                   if ckpt is not None or dist else None)
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
            json.dumps(fingerprint if fingerprint is not None else settings_of(config),
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
        refuse_other_inputs(ckpt, saved, fingerprint)
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
            restored, problem = load_hidden(ckpt, saved, data, rank, len(blocks)), None
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
            spectra, share = dense_spectra(blocks, _allocation_batches(
                                               data, sequences.shape[0], config, rank, size),
                                           per_block, prefix, config.ridge,
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
    # "uniform": every target's rank_for_fraction, less where rank 1 of the small ones
    # keeps more than their share (allocate.uniform_ranks): within the budget; not stored
    # in the checkpoint (allocated stays None), the same from the shapes on a resume
    uniform = (uniform_ranks(shapes, float(config.budget), pivoted=config.pivoted)
               if allocated is None and config.budget < 1 else None)

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
            restore_blocks(ckpt, saved, blocks, prefix, swap)
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
            call_s, call_t = BlockCall(block), BlockCall(teacher)
            names = per_block[i]
            # the teacher's outputs: from the statistics' pass where it runs the teacher
            # (plain, whitened; tnlm with cross), else from a forward of their own below
            yt: list[torch.Tensor] = []
            if names:  # plain: the teacher's statistics for the errors reported only
                # the BlockCall wrapper names the block "block"
                mods = [f"block.{n}" for n in names]
                if config.method == "tnlm":
                    stats = collect_input_stats(
                        call_s, [dict(x=x, extra=d[1]) for x, d in zip(xs, data)], mods,
                        reference=_PairedInputs(call_t, xt, data) if config.cross else None,
                        reduce=dist, reference_outputs=yt if config.cross else None)
                else:
                    stats = collect_input_stats(
                        call_t, [dict(x=x, extra=d[1]) for x, d in zip(xt, data)], mods,
                        reduce=dist, outputs=yt)
                stats = {n: stats[f"block.{n}"] for n in names}
            if not yt:
                with torch.no_grad():
                    yt = [call_t(x, d[1]) for x, d in zip(xt, data)]
            todo: list[_Truncation] = []
            for n in names:
                old = block.get_submodule(n)
                W = weight_xw(old)
                I, J = (int(d) for d in W.shape)
                before += I * J
                chosen = allocated if allocated is not None else uniform
                rank_n = chosen[f"{prefix}.{i}.{n}"] if chosen is not None else None
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
                errors[f"{prefix}.{i}.{job.name}"] = (
                    float(new.truncation_error) if config.method != "plain" else
                    _output_error(job.W, new, stats[job.name]))  # not the weight's own
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


def _output_error(W: torch.Tensor, layer: nn.Module, stats: InputStats) -> float:
    """The relative calibration output error of ``layer`` against the dense ``W``
    (:func:`~tnlm.compress.data_aware.output_error`, on the inputs ``stats`` describe)."""
    with torch.no_grad():
        return output_error(W.to(torch.float64), layer.dense_matrix(torch.float64), stats)


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

    def __init__(self, call_t: BlockCall, xt: list[torch.Tensor], data: list[tuple]) -> None:
        super().__init__()
        self.block = call_t.block  # module names as in the student's BlockCall
        self.training = call_t.training
        self.xt = xt
        self.data = data
        self._k = 0

    def forward(self, x: torch.Tensor, extra: tuple) -> torch.Tensor:
        k = self._k
        self._k = (k + 1) % len(self.xt)
        return BlockCall.forward(self, self.xt[k], self.data[k][1])
