"""Causal LMs: healing on next-token distributions.

The student learns the dense teacher's next-token distributions on the text of
:mod:`tnlm.compress.decoder.text` (data-free: the model's own samples, shipped prose):
the loss of :mod:`tnlm.compress.decoder.kl` (the KL per token, optionally plus the block
outputs' relative error, ``hidden_weight``).

AdamW (or Adafactor, ``optimizer="adafactor"``: see
:class:`CausalHealConfig`), linear warm-up, cosine decay, gradient clipping. What trains
(``train``, one of :data:`TRAIN`, the sets of those names in :mod:`tnlm.bridge.finetune`,
taken in the blocks: never the embeddings, the final norm or the LM head): ``"cores"``
every MPO core and bias and the norms; ``"cores+linears"`` (the default) adds the dense
linears of the blocks. ``"all"``, this set's former name, is refused with a message
naming the new one (``"all"`` trains every parameter in ``MPOConfig``). A loss that becomes
non-finite or whose running mean exceeds ``blowup`` x its start (the first step's loss,
after ``warmup`` steps the lower of that and the warm-up steps' mean; at least
:data:`BLOWUP_FLOOR`) stops the run and restores the parameters of the step with the lowest running
loss when a snapshot was last taken (:class:`tnlm.compress.snapshot.ParameterSnapshot`,
on disk by default): a snapshot is taken at a new lowest running loss that comes at least
``snapshot_every`` steps after the previous snapshot. The result says so (``stopped``,
``best_step``).

Under ``torch.distributed`` (a process group of more than one rank) every rank draws the
same batch of ``batch_size`` sequences from the same seeded generator and takes its own
share of it (rank ``r`` of ``w``: the sequences ``r, r + w, ...`` of the batch); the student
runs inside torch's ``DistributedDataParallel``, which averages the gradients over the
ranks in ``backward``. Each rank's loss is weighted by its share of the batch, so the
averaged gradient and the loss (all-reduced before any decision: blow-up, best step) are
the single-process ones of the whole batch, up to the order of float additions.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import invalidate_caches
from tnlm.bridge.finetune import HEALING_RENAMED, check_train, select_parameters
from tnlm.compress import distributed as dist_
from tnlm.compress.decoder.kl import ChunkedKL, next_token_kl
from tnlm.compress.snapshot import SNAPSHOT_PLACES, ParameterSnapshot
from tnlm.core.validation import check_bool_fields, check_seed
from tnlm.integration.architectures import blocks_of
from tnlm.integration.surgery import checkpointed, temporary

__all__ = ["CausalHealConfig", "CausalHealResult", "heal_causal", "healing_optimizer",
           "OPTIMIZERS", "BLOWUP_FLOOR"]


#: what causal healing may train: names of :data:`tnlm.bridge.finetune.TRAIN_SETS`
TRAIN = ("cores", "cores+linears")

#: the least start the blow-up test compares with (a KL in nats a token): a student that
#: starts almost exact (tiny random models: about 1e-5) is stopped when its running loss
#: passes ``blowup`` x this, not at noise of a thousandth of a nat
BLOWUP_FLOOR = 1e-3

#: the optimizers causal healing may use (``CausalHealConfig.optimizer``)
OPTIMIZERS = ("adamw", "adafactor")


def _unknown_optimizer(name: object) -> ValueError:
    return ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, "
                      f"got {name!r}")


@dataclass
class CausalHealConfig:
    """Settings of :func:`heal_causal` (see the module docstring); ``train`` is one of
    :data:`TRAIN`. ``checkpoint_blocks`` (default on): each block's activations are
    recomputed in the backward pass instead of kept (:func:`tnlm.integration.surgery.
    checkpointed`): the same gradients, one block's activations at a time instead of
    every block's, one more forward pass a step (measured in docs/results.md).
    ``stored_blocks`` (default 0): with ``checkpoint_blocks``, the last this many blocks
    keep their activations for the backward pass instead of running their forward again
    (the same gradients; each such block saves its share of that extra forward pass and
    holds its activations through the step: on SmolLM2-135M at a batch of 4 x 128
    tokens, 10 of its 30 blocks stored made a step 0.96x as long and the healing peak
    142 MB higher, all 30 0.92x and 666 MB, docs/results.md). At least the number of
    blocks: none recomputed, as without ``checkpoint_blocks``.

    ``optimizer`` (one of :data:`OPTIMIZERS`): ``"adamw"`` (the default) keeps two moment
    buffers the size of every trained parameter (twice their bytes: about 0.5 GB for
    SmolLM2-135M at a 60 % budget); ``"adafactor"`` (``torch.optim.Adafactor``, weight
    decay 0, the same ``lr``, warm-up and cosine decay) keeps no first moment and, for
    every matrix, its second moment factored into row and column means (rows + cols
    numbers instead of rows x cols; an MPO core is factored without its size-1
    dimensions, :func:`healing_optimizer`); vectors (norms, biases) keep a full second
    moment.
    Adafactor's step is made absolute, as AdamW's: torch scales each step by
    max(eps2, the parameter's RMS), and tnlm sets eps2 = 1, so a parameter whose RMS is at
    most 1 (the linears and cores; norm weights near 1) moves by about ``lr`` along its
    RMS-clipped normalized update and one ``lr`` means about the same for both optimizers
    (with torch's default eps2 = 1e-3 the step shrinks with the weights' RMS: on the tiny
    Llama of the tests, 10x less progress).

    ``teacher_cache_mb``: with the chunked KL (``chunk``), the teacher's last hidden
    states for a sequence ((T, hidden) floats: 0.28 MiB for SmolLM2-135M at 128 tokens)
    are kept after its first forward and reused whenever the sequence comes back, as
    long as all kept states stay within this many MiB (then the rest are recomputed each
    time; 0: none kept). The draws are known before the first step, so a sequence that
    does not come back is never kept and a kept one is dropped after its last draw (150
    steps of 4 on 917 sequences keep nothing). Healing passes over the sequences several
    times (150 steps of 4 on 256 sequences: 2.3 times), and the teacher's forward is one
    of the five block passes of a step (teacher, student, the student's recomputation,
    backward's two).
    The full logits the KL takes without ``chunk`` (24 MiB a sequence for SmolLM2) are
    never kept. With ``hidden_weight`` the teacher's states of every block are kept
    ((L, T, hidden) a sequence: 8.4 MiB for SmolLM2), so the same limit keeps fewer, and
    the term keeps a float32 copy of the student's block outputs for the backward pass
    (about 35 MiB for SmolLM2 at 4 x 128 positions).

    ``snapshot`` (one of :data:`tnlm.compress.snapshot.SNAPSHOT_PLACES`): where the trained
    parameters of the best step so far are kept for the restore after a blow-up: ``"disk"``
    (the default: an unnamed file in the temporary folder, ``$TMPDIR``, freed at the end or
    when the process dies, even killed; as many bytes as the trained parameters, 256 MB for
    SmolLM2-135M at a 60 % budget, written from the parameters' own memory, so none of it is
    in the process's resident set; a failed write warns and keeps it in memory) or
    ``"memory"`` (a copy beside them). ``snapshot_every``: a snapshot is taken when the
    running loss is the lowest so far and at least this many steps after the last snapshot
    (10 by default: at most 30 writes in 300 steps; 1: at every new lowest loss). Each rank
    of a distributed run writes its own file.

    ``hidden_weight``: the weight of the block-output term (module docstring); 0, the
    default, distils the next-token distributions alone. Needs ``chunk``.

    ``seed``: the draws' seed; ``None`` (default): the recipe's in
    :func:`tnlm.compress.decoder.job.compress_causal_lm`, 0 when :func:`heal_causal` is called
    alone. ``first_draw``: skip that many batches of the seeded draws (the steps take the
    batches ``first_draw``, ``first_draw + 1``, ... of the sequence the seed gives): the
    stages of a staged job (``CausalLMRecipe.stages``) walk one sequence of batches, as
    one healing of all their steps would, instead of each stage drawing the same first
    batches again."""

    steps: int = 150
    lr: float = 2e-4
    batch_size: int = 4
    warmup: int = 10
    train: str = "cores+linears"
    blowup: float = 10.0
    teacher_bf16: bool = False
    seed: int | None = None
    first_draw: int = 0
    chunk: int | None = None
    checkpoint_blocks: bool = True
    stored_blocks: int = 0
    optimizer: str = "adamw"
    teacher_cache_mb: float = 256.0
    hidden_weight: float = 0.0
    snapshot: str = "disk"
    snapshot_every: int = 10

    def __post_init__(self) -> None:
        w = self.hidden_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (
                math.isfinite(w) and w >= 0):
            raise ValueError(f"hidden_weight must be a finite number >= 0, got {w!r}")
        if isinstance(self.teacher_cache_mb, bool) or not isinstance(
                self.teacher_cache_mb, (int, float)) or not (
                math.isfinite(self.teacher_cache_mb) and self.teacher_cache_mb >= 0):
            raise ValueError(f"teacher_cache_mb must be a finite number >= 0 (MiB), got "
                             f"{self.teacher_cache_mb!r}")
        if not isinstance(self.optimizer, str) or self.optimizer not in OPTIMIZERS:
            raise _unknown_optimizer(self.optimizer)
        if self.optimizer == "adafactor" and not hasattr(torch.optim, "Adafactor"):
            raise ValueError(f"optimizer 'adafactor' needs torch >= 2.5 (torch.optim.Adafactor); "
                             f"this is torch {torch.__version__}")
        if self.chunk is not None and (isinstance(self.chunk, bool)
                                       or not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"chunk must be None or an int >= 1, got {self.chunk!r}")
        if self.hidden_weight and self.chunk is None:
            raise ValueError(f"hidden_weight ({self.hidden_weight}) needs the chunked KL: "
                             "set chunk (e.g. 128)")
        if not isinstance(self.snapshot, str) or self.snapshot not in SNAPSHOT_PLACES:
            raise ValueError(f"snapshot must be one of {', '.join(map(repr, SNAPSHOT_PLACES))}, "
                             f"got {self.snapshot!r}")
        for name, lo in (("steps", 0), ("batch_size", 1), ("warmup", 0),
                         ("snapshot_every", 1), ("stored_blocks", 0), ("first_draw", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float))
                                             and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.seed is not None:
            self.seed = check_seed(self.seed)
        check_train(self.train, TRAIN, HEALING_RENAMED)
        check_bool_fields(self, "checkpoint_blocks", "teacher_bf16")
        if not (isinstance(self.blowup, (int, float)) and self.blowup > 1):
            raise ValueError(f"blowup must be a number > 1, got {self.blowup!r}")


@dataclass
class CausalHealResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None   # why the run stopped early (parameters restored), or None
    #: the step of the last snapshot: its parameters (those after ``best_step`` optimizer
    #: steps) are what a stopped run restored
    best_step: int | None = None
    #: sequences the teacher ran (each batch's sequences not found in the teacher cache;
    #: under torch.distributed, this rank's)
    teacher_sequences: int = 0
    #: the most the teacher cache held at once, MiB (this rank's)
    teacher_kept_mb: float = 0.0
    #: with ``hidden_weight``: each step's block-output term (unweighted; ``losses`` holds
    #: the whole loss, this term weighted included)
    hidden_losses: list[float] = field(default_factory=list)


class _TeacherCache:
    """The teacher's outputs per sequence index, each kept after its first forward while
    all kept outputs stay within ``limit_mb`` MiB (``CausalHealConfig.teacher_cache_mb``).
    The teacher runs without dropout and a causal LM's output for a sequence does not
    depend on the other sequences of its batch, so a kept output is the recomputed one
    (up to the float rounding of another batch shape).

    ``uses`` (index -> how many times healing will still ask for it: the draws are known
    in advance, :func:`_draws`): an output is kept only if its sequence comes back and is
    dropped after its last use, so a run that sees each sequence once keeps nothing."""

    def __init__(self, limit_mb: float, uses: Mapping[int, int]) -> None:
        self.limit = limit_mb * 2 ** 20
        self.kept: dict[int, torch.Tensor] = {}
        self.bytes = 0
        self.peak_bytes = 0
        self.computed = 0
        self.uses = Counter(uses)

    def _size(self, row: torch.Tensor) -> int:
        return row.numel() * row.element_size()

    def get(self, idx: Sequence[int], compute: Callable[[list[int]], torch.Tensor],
            keep: bool = True) -> torch.Tensor:
        """The stacked outputs of the sequences ``idx`` (repeats allowed); ``compute(
        missing)`` runs the teacher on the distinct ones not kept, in their order. With
        ``keep`` False (full logits) nothing is kept: ``compute(idx)`` runs on them all."""
        if not keep:
            self.computed += len(idx)
            return compute(list(idx))
        self.uses.subtract(idx)
        missing = list(dict.fromkeys(i for i in idx if i not in self.kept))
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            out = compute(missing)
            self.computed += len(missing)
            for i, row in zip(missing, out):
                size = self._size(row)
                if self.uses[i] > 0 and self.bytes + size <= self.limit:
                    self.kept[i] = row.clone()  # not a view: the batch's tensor is freed
                    self.bytes += size
                else:
                    fresh[i] = row
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        got = torch.stack([self.kept[i] if i in self.kept else fresh[i] for i in idx])
        for i in dict.fromkeys(idx):  # a kept output healing will not ask for again
            if self.uses[i] <= 0 and i in self.kept:
                self.bytes -= self._size(self.kept.pop(i))
        return got


def _draws(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The sequence indices of every healing step's batch: consecutive ``batch_size``
    slices of seeded random permutations of ``range(n)``, a new permutation whenever
    fewer than a batch are left (``random.Random(seed)``)."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < batch_size:  # fewer sequences than a batch too
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


class _HealingLoss(nn.Module):
    """The student's next-token KL to the teacher's logits of a batch, as the one module
    ``DistributedDataParallel`` wraps (the chunked KL runs the student's base model and
    head itself, so the student alone cannot be the wrapped module)."""

    def __init__(self, student: nn.Module, kl: ChunkedKL | None) -> None:
        super().__init__()
        self.student = student
        self.kl = kl

    def forward(self, ids: torch.Tensor, t_out: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(loss, block term or None)``; ``t_out``: the teacher's logits, or with the
        chunked KL what :meth:`ChunkedKL.teacher_side` gave."""
        if self.kl is not None:
            return self.kl(ids, t_out)
        return next_token_kl(self.student(input_ids=ids, use_cache=False).logits, t_out), None


def _trainable(student: nn.Module, train: str) -> list[nn.Parameter]:
    return [p for _, p in select_parameters(blocks_of(student), train)]


def healing_optimizer(params: Sequence[nn.Parameter],
                      config: CausalHealConfig) -> torch.optim.Optimizer:
    """The optimizer :func:`heal_causal` steps (single process and under
    ``DistributedDataParallel`` alike): ``config.optimizer`` over ``params`` at
    ``config.lr``, weight decay 0, Adafactor's steps absolute (see
    :class:`CausalHealConfig`).

    Adafactor factors a tensor's second moment over its last two dimensions, and an MPO
    core of a low-rank layer is a matrix stored with size-1 dimensions (``(1, in, 1, r)``,
    ``(r, 1, out, 1)``): factored as stored, one of its two factors would be as large as
    the core. So Adafactor steps views of the parameters without their size-1 dimensions
    (the same storage: stepping a view steps the parameter), and a step pre-hook hands it
    the parameters' gradients, viewed alike (and drops them after the step); its
    ``zero_grad`` clears the gradients of ``params`` themselves."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if config.optimizer != "adafactor":
        raise _unknown_optimizer(config.optimizer)
    pairs = [(p, p.detach().view([n for n in p.shape if n != 1] or [1]))
             for p in params if p.dim() > 2 and 1 in p.shape]
    viewed = {id(p): v for p, v in pairs}
    opt = torch.optim.Adafactor([viewed.get(id(p), p) for p in params], lr=config.lr,
                                eps=(None, 1.0), weight_decay=0.0)  # absolute steps

    def grads_to_views(*_: Any) -> None:
        for p, v in pairs:
            v.grad = None if p.grad is None else p.grad.reshape(v.shape)

    def drop_view_grads(*_: Any) -> None:  # the gradients stay the parameters' alone
        for _p, v in pairs:
            v.grad = None

    def zero_grad(set_to_none: bool = True) -> None:  # the parameters', not the views'
        for p in params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    opt.register_step_pre_hook(grads_to_views)
    opt.register_step_post_hook(drop_view_grads)
    opt.zero_grad = zero_grad  # type: ignore[method-assign]
    return opt


def heal_causal(student: nn.Module, teacher: nn.Module, sequences: torch.Tensor,
                config: CausalHealConfig, *, progress: bool = True,
                on_step: Callable[[int], None] | None = None) -> CausalHealResult:
    """Distil ``teacher``'s next-token distributions into ``student`` (in place) on
    ``sequences`` (n, T) token ids; ``requires_grad`` flags and modes are restored.

    ``on_step(k)`` is called before the first step (k = 0) and after the k-th optimizer
    step (k = 1 .. steps), e.g. to measure the student along the way (under
    ``torch.no_grad`` it may run the student; the MPO layers' dense caches it leaves are
    freed after it). The step's gradients are already freed when it runs.

    Under ``torch.distributed`` every rank calls this with the same models, sequences
    and config; each step's batch is shared among the ranks and the student trained
    through ``DistributedDataParallel`` (module docstring). The ranks end with the same
    student and result (but ``teacher_sequences``: each rank's own).

    Raises:
        ValueError: empty or malformed ``sequences``, nothing to train, or (distributed)
            ``config.batch_size`` below the world size or ranks given different sequences.
        tnlm.compress.distributed.RankFailure: another rank stopped or the process
            group's timeout passed.
    """
    if not torch.is_tensor(sequences) or sequences.dim() != 2 or sequences.shape[0] == 0:
        raise ValueError("sequences must be a non-empty (n, T) tensor of token ids")
    rank, size = dist_.world()
    if size > 1 and config.batch_size < size:
        raise ValueError(f"batch_size ({config.batch_size}) must be at least the world size "
                         f"({size}): each rank takes its share of every step's batch")
    result = CausalHealResult()
    if config.steps == 0:
        return result
    params = _trainable(student, config.train)
    if not params:
        raise ValueError("the student has nothing to train (no MPO layer, norm or linear in "
                         "its blocks)")
    if size > 1:
        dist_.check_same(dist_.digest([sequences]), "healing sequences")
    n = config.steps
    draws = _draws(sequences.shape[0], config.first_draw + n, config.batch_size,
                   0 if config.seed is None else config.seed)[config.first_draw:]
    t0 = time.perf_counter()
    best_loss, run = math.inf, None
    start = first = math.nan
    # flags and modes of both models are given back as they were; values stay healed
    blocks = list(blocks_of(student)) if config.checkpoint_blocks else []
    blocks = blocks[:max(0, len(blocks) - config.stored_blocks)]  # the last ones store
    invalidate_caches(student)  # an evaluation's dense W: stale after the first step
    # the best state so far, for the restore after a blow-up (freed on any exit)
    with ParameterSnapshot(params, config.snapshot) as snap, \
            temporary(student, modes=True), temporary(teacher, modes=True), \
            checkpointed(blocks):
        for p in student.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        student.eval()  # no dropout (also attention's functional one); gradients still flow
        teacher.eval()
        opt = healing_optimizer(params, config)
        opt.zero_grad(set_to_none=True)  # none left by earlier work
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: min(1.0, (t + 1) / max(1, config.warmup))
            * 0.5 * (1 + math.cos(math.pi * min(t, n) / n)))
        # DDP after the flags are set: it averages the gradients of what trains
        kl = ChunkedKL(student, config.chunk, teacher, config.hidden_weight) \
            if config.chunk else None
        loss_of = dist_.data_parallel(_HealingLoss(student, kl))
        # how often this rank will ask for each sequence
        uses = Counter(i for batch in draws for i in batch[rank::size])
        cache = _TeacherCache(config.teacher_cache_mb, uses)

        def teacher_out(which: list[int]) -> torch.Tensor:
            ids = sequences[which]
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                 enabled=config.teacher_bf16):
                return kl.teacher_side(teacher, ids) if kl is not None else \
                    teacher(input_ids=ids, use_cache=False).logits.float()
        try:
            if on_step is not None:
                on_step(0)
                invalidate_caches(student)
            for step in tqdm(range(n), desc="healing (next-token KL)",
                             disable=not progress or rank != 0, leave=False):
                idx = draws[step]
                mine = idx[rank::size]  # this rank's share of the step's batch
                share = len(mine) / len(idx)
                ids = sequences[mine]
                if kl is not None:
                    with dist_.rank_failures("healing's forward"):
                        kl.check(ids)  # before autocast: the check compares float32 logits
                # hidden states are kept; full logits, (T, vocab) a sequence, never
                t_out = cache.get(mine, teacher_out, keep=kl is not None and kl.gives_hidden)
                with dist_.rank_failures("healing's forward"):
                    loss, term = loss_of(ids, t_out)
                # the whole batch's loss: the ranks' shares weighted by their sizes
                sent = [float(loss.detach()) * share]
                if term is not None:
                    sent.append(float(term.detach()) * share)
                got = dist_.all_reduce_floats(sent, "the healing loss")
                value = got[0]
                result.losses.append(value)
                if term is not None:
                    result.hidden_losses.append(got[1])
                run = value if run is None else 0.9 * run + 0.1 * value
                if step == 0:
                    first = value
                if step < max(1, config.warmup):
                    start = value if step == 0 else (start * step + value) / (step + 1)
                # against the first loss (the unhealed student's) from the first step, so that
                # a blow-up within the warm-up cannot raise its own reference; after it,
                # against the lower of that and the warm-up's mean
                ref = max(first if step < config.warmup else min(first, start), BLOWUP_FLOOR)
                if not math.isfinite(value) or run > config.blowup * ref:
                    why = "is not finite" if not math.isfinite(value) else \
                        f"{run:.3g} exceeded {config.blowup:g}x its start ({ref:.3g})"
                    result.stopped = (f"loss {why} at step {step + 1}; the parameters of step "
                                      f"{result.best_step or 0} were restored (lower lr, "
                                      f"now {config.lr:g})")
                    break
                if run < best_loss and (result.best_step is None or
                                        step - result.best_step >= config.snapshot_every):
                    best_loss, result.best_step = run, step
                    snap.take()
                # DDP averages over the ranks: weighted by size x shares = the batch's mean
                with dist_.rank_failures("the gradients in healing"):
                    (loss * (share * size) if size > 1 else loss).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)  # not kept through the next forward
                sched.step()
                if on_step is not None:
                    on_step(step + 1)
                    invalidate_caches(student)  # an evaluation's dense W: stale next step
        finally:
            del loss_of  # DDP's hooks on the parameters go with it, also on error
            result.teacher_sequences = cache.computed
            result.teacher_kept_mb = cache.peak_bytes / 2 ** 20
            del cache  # the kept states do not outlive healing, also on error
            for p in params:  # nor gradients of a step an error interrupted
                p.grad = None
            if result.stopped and snap.taken:  # (none taken: stopped before any update)
                snap.restore()
    result.seconds = time.perf_counter() - t0
    return result
