"""Healing by distillation: the truncated model learns to reproduce the original, no labels.

Teacher: the original dense model (frozen). Student: the compressed model. On
unlabeled sentences the loss is::

    loss = w_hidden · mean_l ||h_l^s - h_l^t||² / ||h_l^t||²      (masked, every layer output)
         + w_cos   · mean_b (1 - cos(pool^s_b, pool^t_b))          (mean-pooled embeddings)
         + term                                                  (HealConfig.term, if any)

``HealConfig.term``, a :class:`HealTerm`, adds one more term and may shape the batches
(its own draws, pairs of entries kept on one rank, hooks around the forward passes). The
library ships none: the terms screened so far (a similarity-structure term with
nearest-neighbour pairs, word-swapped twins, attention relations) measured no gain and
live in ``experiments/heal_terms.py``.

What trains (``train``, one of :data:`TRAIN_CHOICES`, the sets of those names in
:mod:`tnlm.bridge.finetune`): ``"cores"`` every MPO core and bias, plus the norm layers;
``"cores-central"`` the same without the central tensors; ``"cores+linears"`` adds every
dense ``nn.Linear`` / ``Conv1D`` (layers the allocation kept dense, a pooler), never the
embedding tables. These were called ``"auxiliary"`` and ``"all"`` before, words that name
other sets in ``MPOConfig``; given here they are refused with a message naming the new
spelling.
Batches draw sentences of similar token length (``bucket``, see
:func:`length_bucketed_draws`): on the main job's mixed text a uniform batch is padded to
about 2.7x its real tokens. ``teacher_bf16`` runs the frozen teacher under bfloat16
autocast on CPU (about 3x faster on CPUs with bf16 instructions; pooled outputs within
1e-4 cosine of float32). AdamW, linear warm-up then
cosine decay, gradient clipping. Under ``torch.distributed`` each rank takes its
own share of every batch and the student runs inside torch's DistributedDataParallel,
which averages the gradients over the ranks; the logged loss is the ranks' mean, so every
rank takes the same decisions and ends with the same weights. Checkpoints (safetensors +
JSON, no pickle) let a run resume exactly; they record the settings they were made with
(:func:`heal_settings`: the hyper-parameters, a hash of the text and of the teacher, the
caller's context such as the budget) and a run with other settings refuses to resume
from them.

A loss that blows up stops the run with :class:`FloatingPointError`: a non-finite loss
leaves the student as it was after the last finite step; a running mean of the last
:data:`BLOWUP_WINDOW` losses above ``max_loss_ratio`` times the first loss (at least
:data:`LOSS_FLOOR`) restores the best student seen (the lowest batch loss). The message
names the step the student was left at or restored to and the checkpoint on disk, if
this run has one.
"""

from __future__ import annotations

import abc
import contextlib
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge.finetune import HEALING_RENAMED, check_train, select_parameters
from tnlm.compress import distributed as dist_
from tnlm.compress.heal_state import (  # the state's names it exported, still importable here
    STATE_FILE,
    STATE_TENSORS,
    check_resumable,
    heal_settings,
    load_heal_state,
    read_heal_state,
    save_heal_state,
)
from tnlm.compress.snapshot import ParameterSnapshot
from tnlm.compress.text import check_texts
from tnlm.core.validation import check_bool_fields, check_seed

__all__ = ["HealConfig", "HealResult", "heal", "mean_pool", "check_same_architecture",
           "length_bucketed_draws", "fast_bf16", "HealTerm", "HealBatch", "BLOWUP_WINDOW",
           # the healing checkpoint's (tnlm.compress.heal_state), as before it moved there
           "heal_settings", "read_heal_state", "check_resumable", "STATE_FILE",
           "STATE_TENSORS"]


#: what healing may train: names of :data:`tnlm.bridge.finetune.TRAIN_SETS`
TRAIN_CHOICES = ("cores", "cores-central", "cores+linears")
#: losses averaged for the blow-up test (``HealConfig.max_loss_ratio``)
BLOWUP_WINDOW = 10
#: the first loss counts as at least this much in the blow-up test: a student that starts
#: very close to its teacher (a tiny random BERT at loss 6e-5) may spike 100x in the first
#: steps of a run that then recovers; a blow-up reaches losses of order 1 (MiniLM at 50 %
#: starts at 0.26; lr 10 makes it non-finite within 6 steps)
LOSS_FLOOR = 1e-2


@dataclass
class HealBatch:
    """What a :class:`HealTerm` sees of one step's batch on this rank (float32 outputs)."""

    student: nn.Module
    teacher: nn.Module
    #: the tokenized texts (input_ids, attention_mask, ...)
    batch: dict[str, torch.Tensor]
    #: the texts' positions in the step's entries (:meth:`HealTerm.entries`), in order
    positions: list[int]
    #: every layer's output (embeddings first), of the student and of the teacher
    student_hidden: tuple[torch.Tensor, ...]
    teacher_hidden: tuple[torch.Tensor, ...]
    #: the mean-pooled last layer (:func:`mean_pool`), (batch, dim)
    student_pooled: torch.Tensor
    teacher_pooled: torch.Tensor


class HealTerm(abc.ABC):
    """One more term of the healing loss, with a say in how the batches are made.

    :func:`heal` calls :meth:`prepare` once, then every step: the step's drawn sentences
    become :meth:`entries`, a rank takes whole groups of :attr:`group` consecutive entries
    (:func:`rank_share`), the teacher's and the student's forward passes run inside
    :meth:`recording`, and :meth:`loss` is added to the loss. Only :meth:`loss` must be
    written; the other methods default to doing nothing. Loss and batches must depend only
    on the arguments (and the seeds in ``config``): a resumed run replays the same steps.
    """

    #: consecutive entries that stay together on one rank (2 for pairs)
    group: int = 1

    def settings(self) -> dict[str, Any]:
        """JSON values recorded with the healing settings (:func:`heal_settings`): a
        checkpoint made with other settings is not resumed. Default: the class name and
        the instance's public attributes."""
        return {"name": type(self).__name__,
                **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def prepare(self, teacher: nn.Module, tokenizer: Any, sentences: Sequence[str],
                config: HealConfig, rng: random.Random) -> list[list[int]] | None:
        """Called once before training; may return every step's draw (``config.steps``
        lists of indices into ``sentences``) in place of :func:`heal`'s own, drawn with
        ``rng`` (seeded by ``config.seed``). Default: ``None``."""
        return None

    def entries(self, step: int, texts: list[str]) -> list[str]:
        """The texts of step ``step`` (0-based) from the ones drawn for it, before the
        ranks share them. Default: the drawn texts."""
        return texts

    @contextlib.contextmanager
    def recording(self, student: nn.Module, teacher: nn.Module) -> Iterator[None]:
        """A context around the teacher's and the student's forward passes (e.g. forward
        hooks that keep what :meth:`loss` needs). Default: nothing."""
        yield

    @abc.abstractmethod
    def loss(self, hb: HealBatch) -> torch.Tensor | float:
        """The term (weight included) for this rank's share of the batch."""


@dataclass
class HealConfig:
    """Hyper-parameters of :func:`heal` (defaults: measured on MiniLM, docs/results.md).

    ``teacher_bf16``: ``None`` decides by :func:`fast_bf16` when the config is made.
    ``student_bf16``: the student's forward (and so its backward) under bfloat16 autocast
    too, the weights and the loss staying float32; off by default (on MiniLM at 50 % it
    saved only about 10 % of a step: ``benchmarks/bench_heal.py``).
    ``dropout``: run the student with its dropout layers active (off by default: the
    teacher runs without dropout, so dropout only adds noise to the fit).
    ``term``: one more loss term (a :class:`HealTerm`, module docstring); ``None`` by
    default (the terms screened measured no gain: ``experiments/heal_terms.py``). Its
    :meth:`HealTerm.settings` are recorded with the healing settings.
    When healing runs (``steps`` > 0), ``lr`` and ``max_grad_norm`` must be > 0 and
    ``w_hidden`` or ``w_cos`` > 0 unless a ``term`` gives the loss: otherwise every step
    would run and change nothing (``ValueError``). ``seed``: an int in [0, 2**63 - 1].
    ``max_loss_ratio``: stop (``FloatingPointError``, the best student restored) when the
    mean of the last :data:`BLOWUP_WINDOW` losses exceeds this multiple of the first loss
    (counted as at least :data:`LOSS_FLOOR`); 0: never.
    """

    steps: int = 300
    lr: float = 3e-4
    warmup: int = 20
    batch_size: int = 32
    max_length: int = 64
    w_hidden: float = 1.0
    w_cos: float = 1.0
    train: str = "cores"
    seed: int = 0
    max_grad_norm: float = 1.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    dropout: bool = False
    bucket: int = 8
    teacher_bf16: bool | None = False
    student_bf16: bool = False
    max_loss_ratio: float = 10.0
    term: HealTerm | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        for name in ("lr", "w_hidden", "w_cos", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("lr", "max_grad_norm"):  # 0 would run every step and change nothing
            if self.steps and getattr(self, name) == 0:
                raise ValueError(f"{name} must be > 0 when healing runs (steps={self.steps}), "
                                 f"got 0")
        if self.steps and self.w_hidden == 0 and self.w_cos == 0 and self.term is None:
            raise ValueError("w_hidden and w_cos are both 0 and there is no term: healing "
                             "would have no loss; set one of them > 0")
        self.seed = check_seed(self.seed)
        r = self.max_loss_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (
                r == 0 or (math.isfinite(r) and r > 1)):
            raise ValueError(f"max_loss_ratio must be 0 (off) or a finite number > 1, got {r!r}")
        if isinstance(self.bucket, bool) or not isinstance(self.bucket, int) or self.bucket < 0:
            raise ValueError(f"bucket must be an int >= 0 (0 or 1: uniform draws), got "
                             f"{self.bucket!r}")
        if self.teacher_bf16 is None:  # auto: where the CPU has bf16 instructions
            self.teacher_bf16 = fast_bf16()
        if not isinstance(self.teacher_bf16, bool):
            raise ValueError(f"teacher_bf16 must be a bool or None (auto), got "
                             f"{self.teacher_bf16!r}")
        check_bool_fields(self, "student_bf16", "dropout")
        if self.term is not None and not isinstance(self.term, HealTerm):
            raise ValueError(f"term must be a HealTerm or None, got "
                             f"{type(self.term).__name__}")
        check_train(self.train, TRAIN_CHOICES, HEALING_RENAMED)


@dataclass
class HealResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trained_params: int = 0
    resumed_from: int = 0

    @property
    def seconds_per_step(self) -> float:
        done = self.steps - self.resumed_from
        return self.seconds / done if done else 0.0


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens: (batch, seq, dim), (batch, seq) -> (batch, dim)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model) if hasattr(model, "mpo_config") else model


def check_same_architecture(student: nn.Module, teacher: nn.Module) -> None:
    """Raise ``ValueError`` unless both models have the same hidden size and depth."""
    s, t = getattr(_base(student), "config", None), getattr(_base(teacher), "config", None)
    if s is None or t is None:
        raise ValueError("teacher and student must be transformers models (with a .config)")
    for key in ("hidden_size", "num_hidden_layers", "model_type"):
        if getattr(s, key, None) != getattr(t, key, None):
            raise ValueError(f"teacher's {key} is {getattr(t, key, None)!r} but the student's is "
                             f"{getattr(s, key, None)!r}: distillation needs the same architecture")


def _trainable(student: nn.Module, train: str) -> list[tuple[str, nn.Parameter]]:
    return select_parameters(student, train)


def _loss(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor],
          cfg: HealConfig, positions: Sequence[int] = ()) -> torch.Tensor:
    """The healing loss of one batch (module docstring); ``positions``: the batch's entries'
    positions in the step's entries, for ``cfg.term``."""
    mask = batch["attention_mask"]
    term = cfg.term
    with term.recording(student, teacher) if term is not None else contextlib.nullcontext():
        with torch.no_grad(), torch.autocast(
                "cpu", dtype=torch.bfloat16,
                enabled=cfg.teacher_bf16 and mask.device.type == "cpu"):
            t = teacher(**batch, output_hidden_states=True)
        with torch.autocast("cpu", dtype=torch.bfloat16,
                            enabled=cfg.student_bf16 and mask.device.type == "cpu"):
            s = student(**batch, output_hidden_states=True)
    th = tuple(h.float() for h in t.hidden_states)
    sh = tuple(h.float() for h in s.hidden_states)
    m = mask.unsqueeze(-1).to(sh[-1].dtype)
    hid = sum(((hs - ht) ** 2 * m).sum() / (ht ** 2 * m).sum().clamp_min(1e-12)
              for hs, ht in zip(sh[1:], th[1:]))
    hid = hid / max(len(sh) - 1, 1)
    ps, pt = mean_pool(sh[-1], mask), mean_pool(th[-1], mask)
    cos = 1 - F.cosine_similarity(ps, pt, dim=-1).mean()
    loss = cfg.w_hidden * hid + cfg.w_cos * cos
    if term is not None:
        loss = loss + term.loss(HealBatch(student, teacher, batch, list(positions), sh, th,
                                          ps, pt))
    return loss


class _StudentLoss(nn.Module):
    """:func:`_loss` of a batch as the module ``DistributedDataParallel`` wraps: the
    student is its only submodule (the teacher is held outside the module tree, so it is
    neither copied between the ranks nor trained)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: HealConfig) -> None:
        super().__init__()
        self.student = student
        self._outside = (teacher, cfg)

    def forward(self, batch: dict[str, torch.Tensor], positions: Sequence[int]
                ) -> torch.Tensor:
        teacher, cfg = self._outside
        return _loss(self.student, teacher, batch, cfg, positions)


def fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (oneDNN's check), i.e.
    whether ``HealConfig(teacher_bf16=True)`` speeds healing up rather than down."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _token_lengths(tokenizer: Any, sentences: Sequence[str], max_length: int) -> list[int]:
    ids = tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]
    return [len(x) for x in ids]


def length_bucketed_draws(lengths: Sequence[int], batch_size: int, steps: int, bucket: int,
                          rng: random.Random) -> list[list[int]]:
    """``steps`` batches of ``batch_size`` indices whose sentences have similar lengths.

    The indices are sorted by length (ties in random order) and cut into windows of
    ``bucket · batch_size`` consecutive sentences; a step picks a window with probability
    proportional to its size and draws ``batch_size`` sentences from it (with
    replacement), so every sentence is drawn with the same probability, as in uniform
    draws, while a batch is padded only to the longest of similar lengths.
    """
    n = len(lengths)
    if n == 0:
        raise ValueError("lengths must not be empty")
    order = sorted(range(n), key=lambda i: (lengths[i], rng.random()))
    width = max(1, bucket * batch_size)
    windows = [order[i:i + width] for i in range(0, n, width)]
    weights = [len(w) for w in windows]
    picks = rng.choices(range(len(windows)), weights=weights, k=steps)
    return [[windows[k][rng.randrange(len(windows[k]))] for _ in range(batch_size)]
            for k in picks]


def rank_share(draw: Sequence[int], rank: int, world: int, group: int = 1) -> list[int]:
    """The part of one step's ``draw`` that ``rank`` of ``world`` trains on: whole groups
    of ``group`` consecutive entries (pairs stay together with ``group=2``), dealt
    round-robin; a rank left with nothing takes the first group."""
    return [d for k, d in enumerate(draw) if (k // group) % world == rank] or list(
        draw[:group])


def heal(student: nn.Module, teacher: nn.Module, tokenizer: Any, sentences: Sequence[str],
         config: HealConfig | None = None, *, progress: bool = True,
         context: dict[str, Any] | None = None) -> HealResult:
    """Distil ``teacher`` into ``student`` on ``sentences`` (see the module docstring).

    Args:
        student: the compressed model (an ``MPOModel`` or a model with MPO layers),
            trained in place; left in eval mode.
        teacher: the original model, same architecture; never modified.
        tokenizer: a transformers tokenizer for both.
        sentences: unlabeled text; each step draws ``batch_size`` of them (seeded).
        config: :class:`HealConfig`. With ``checkpoint_dir``, a state there made with the
            same settings (:func:`heal_settings`) is resumed; one made with other settings
            raises (remove it to start afresh).
        context: JSON values recorded with the settings (what made the student: budget,
            allocation, ...), so that a checkpoint of another student is not resumed.

    Raises:
        TypeError: ``sentences`` is one string (its characters would be the sentences).
        ValueError: empty ``sentences``, different architectures, nothing to train, a
            corrupt checkpoint or one made with other settings (naming the file).
        FloatingPointError: the loss blew up (module docstring): a non-finite loss
            leaves the student as after the last finite step, a running mean above
            ``max_loss_ratio`` x the first loss restores the best student seen; the
            message names that step and this run's checkpoint on disk, if any (written
            every ``checkpoint_every`` steps, so it may be older).
    """
    cfg = config or HealConfig()
    sentences = [s for s in check_texts(sentences, "sentences") if s.strip()]
    if not sentences:
        raise ValueError("sentences must hold at least one non-empty string")
    check_same_architecture(student, teacher)
    params = _trainable(student, cfg.train)
    if not params:
        raise ValueError("student has no MPO cores or norm layers to train")
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=0.0)
    steps = cfg.steps

    def schedule(t: int) -> float:
        warm = min(1.0, (t + 1) / max(1, cfg.warmup))
        return warm * 0.5 * (1 + math.cos(math.pi * min(t, steps) / max(steps, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    res = HealResult(trained_params=sum(p.numel() for _, p in params))
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    settings = heal_settings(cfg, sentences, teacher, context) if ckpt is not None else {}
    start = 0
    if ckpt is not None and (ckpt / STATE_FILE).exists():
        start, res.losses = load_heal_state(ckpt, params, opt, settings)
        for _ in range(start):
            sched.step()
        res.resumed_from = start
    rank, world = dist_.world()
    rng = random.Random(cfg.seed)
    term = cfg.term
    draws = term.prepare(teacher, tokenizer, sentences, cfg, rng) if term is not None else None
    group = term.group if term is not None else 1  # a rank takes whole groups (pairs)
    if draws is not None:
        if len(draws) != steps:
            raise ValueError(f"the term's draws cover {len(draws)} steps, not {steps}")
    elif cfg.bucket > 1:
        draws = length_bucketed_draws(_token_lengths(tokenizer, sentences, cfg.max_length),
                                      cfg.batch_size, steps, cfg.bucket, rng)
    else:
        draws = [[rng.randrange(len(sentences)) for _ in range(cfg.batch_size)]
                 for _ in range(steps)]
    # the student of the lowest loss (in memory: an encoder's trained parameters are few)
    best = ParameterSnapshot([p for _, p in params], "memory")
    best_step, best_loss, saved = start, math.inf, 0

    def on_disk() -> str:
        if saved:
            return f"{ckpt / STATE_FILE} holds this run's checkpoint of step {saved}"
        if start:
            return f"{ckpt / STATE_FILE} still holds the checkpoint of step {start} it resumed"
        return "no checkpoint was written"
    bar = tqdm(range(start, steps), desc="healing", disable=not progress or rank != 0,
               initial=start, total=steps)
    t0 = time.perf_counter()
    # dropout off by default: the teacher runs without it, and dropout in the student only
    # adds noise to the fit (measured on MiniLM at 50 %: held-out cosine 0.8955 vs 0.8867
    # after 150 steps, and faster steps)
    student.train(cfg.dropout)
    # under torch.distributed DDP averages the gradients over the ranks in backward (a
    # trainable parameter no rank's loss uses, e.g. a pooler's, keeps grad None: the
    # optimizer skips it)
    loss_of = dist_.data_parallel(_StudentLoss(student, teacher, cfg),
                                  find_unused_parameters=True)
    try:
        for step in bar:
            entries = [sentences[i] for i in draws[step]]
            if term is not None:
                entries = term.entries(step, entries)
            positions = rank_share(range(len(entries)), rank, world, group)
            texts = [entries[i] for i in positions]
            batch = tokenizer(texts, padding=True, truncation=True,
                              max_length=cfg.max_length, return_tensors="pt")
            batch = {k: v for k, v in batch.items()
                     if k in ("input_ids", "attention_mask", "token_type_ids")}
            # dropout masks from (seed, step, rank), not the process's RNG: resuming
            # from a checkpoint replays exactly the steps an uninterrupted run takes
            dev = params[0][1].device
            with torch.random.fork_rng(devices=[dev] if dev.type != "cpu" else [],
                                       device_type=dev.type if dev.type != "cpu" else None):
                torch.manual_seed(((cfg.seed * 1_000_003 + step) * 1_009 + rank) % 2 ** 64)
                with dist_.rank_failures("healing's forward"):
                    loss = loss_of(batch, positions)
            opt.zero_grad(set_to_none=True)
            with dist_.rank_failures("the gradients in healing"):
                loss.backward()
            # the ranks' mean loss: every rank takes the same decisions below
            value = dist_.all_reduce_floats([float(loss.detach())], "the healing loss")[0] / world
            if not math.isfinite(value):  # nothing was updated yet at this step
                raise FloatingPointError(
                    f"healing diverged at step {step + 1} of {steps} (loss {value}); the "
                    f"student was restored to step {step}, its last finite state; "
                    f"{on_disk()}; lower lr (now {cfg.lr:g})")
            if value < best_loss:  # the student this loss was measured on: before the update
                best_loss, best_step = value, step
                best.take()
            res.losses.append(value)
            recent = res.losses[-BLOWUP_WINDOW:]
            mean, first = sum(recent) / len(recent), max(res.losses[0], LOSS_FLOOR)
            if cfg.max_loss_ratio and mean > cfg.max_loss_ratio * first:
                best.restore()
                raise FloatingPointError(
                    f"healing diverged at step {step + 1} of {steps}: the mean loss of the "
                    f"last {len(recent)} steps, {mean:.3g}, is above {cfg.max_loss_ratio:g} x "
                    f"the first loss {res.losses[0]:.3g}; the student was restored to its "
                    f"best state, after step {best_step} (loss {best_loss:.3g}); {on_disk()}; "
                    f"lower lr (now {cfg.lr:g})")
            torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{value:.4f}")
            if ckpt is not None and rank == 0 and ((step + 1) % cfg.checkpoint_every == 0
                                                   or step + 1 == steps):
                save_heal_state(ckpt, step + 1, params, opt, res.losses, settings)
                saved = step + 1
    finally:
        del loss_of  # DDP's hooks on the parameters go with it
        res.seconds = time.perf_counter() - t0
        student.eval()
    res.steps = steps
    return res
