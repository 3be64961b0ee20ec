"""Causal LMs: the healing loss, the KL of next-token distributions, computed in chunks.

The student's next-token distributions against the dense teacher's::

    loss = mean over tokens t of KL(p_teacher(· | x_<t) || p_student(· | x_<t))

(temperature 1). With ``hidden_weight`` w > 0 the student's block outputs are matched to
the teacher's as well, each position's error relative to the teacher's state there (the
massive activations of a few positions would otherwise be all the term sees)::

    loss += w * mean over blocks l and tokens t of
            ||h_student^l(t) - h_teacher^l(t)||^2 / ||h_teacher^l(t)||^2

(``h^l``: the model's ``hidden_states[l]``, l = 1 .. L, the last after the final norm).

:class:`ChunkedKL` computes it ``chunk`` positions at a time, never holding the full
(b, T, vocab) logits; :func:`next_token_kl` is the plain form on full logits, used for
models whose logits are not their head applied to the last hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tnlm.bridge import invalidate_caches
from tnlm.compress import distributed as dist_

__all__ = ["next_token_kl", "ChunkedKL", "check_block_term"]


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``mean_t KL(p_t || p_s)`` over every position of logits (b, T, vocab), float32."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def _kl_sum(h: torch.Tensor, t: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None, t_weight: torch.Tensor | None,
            t_bias: torch.Tensor | None) -> torch.Tensor:
    """Summed KL of a chunk: the student's logits ``head(h)`` against the teacher's, which
    are ``t`` or, with ``t_weight``, the teacher's head applied to its hidden states ``t``."""
    s, t = _chunk_log_probs(h, t, weight, bias, t_weight, t_bias)
    return F.kl_div(s, t, log_target=True, reduction="sum")


def _chunk_log_probs(h: torch.Tensor, t: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, t_weight: torch.Tensor | None,
                     t_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's next-token log-probabilities of a chunk (float32),
    as :func:`_kl_sum` compares them."""
    s = F.log_softmax(F.linear(h, weight, bias).float(), dim=-1)
    if t_weight is not None:
        t = F.linear(t, t_weight, t_bias)
    return s, F.log_softmax(t.float(), dim=-1)


class _FusedHeadKL(torch.autograd.Function):
    """:func:`_kl_sum` of one chunk with its gradient for ``h`` computed in the forward
    pass, for a head that is not trained (the student's and the teacher's alike).

    The gradient of ``sum KL(p_t || p_s)`` with respect to the student's logits is
    ``p_s - p_t`` (every row of ``p_t`` sums to 1), so the gradient for ``h`` is
    ``(p_s - p_t) @ W``: a (chunk, hidden) tensor is all the chunk keeps for the backward
    pass. The checkpointed :func:`_kl_sum` instead runs both heads and softmaxes again in
    the backward pass and then the softmax's and the KL's own backward: on SmolLM2-135M
    (49,152-token vocabulary) those were most of a healing step's time beyond the
    blocks' matmuls (docs/results.md). The same loss and gradient up to float rounding
    (tests/test_decoder.py); not twice differentiable."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, t: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, t_weight: torch.Tensor | None,
                t_bias: torch.Tensor | None) -> torch.Tensor:
        log_s, log_t = _chunk_log_probs(h, t, weight, bias, t_weight, t_bias)
        total = F.kl_div(log_s, log_t, log_target=True, reduction="sum")
        if ctx.needs_input_grad[0]:
            diff = log_s.exp_().sub_(log_t.exp_())  # p_s - p_t, in log_s's and log_t's place
            ctx.save_for_backward((diff.to(weight.dtype) @ weight).to(h.dtype))
        else:
            ctx.save_for_backward(None)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_h,) = ctx.saved_tensors
        return (None if grad_h is None else (grad_h.float() * grad).to(grad_h.dtype),
                None, None, None, None, None)


class ChunkedKL:
    """``next_token_kl`` of a causal LM whose logits are ``head(hidden)``, computed ``chunk``
    positions at a time: for an untrained head (healing's) each chunk's gradient is
    computed in its forward pass (:class:`_FusedHeadKL`), for a trained one the heads and
    softmaxes are recomputed in the backward pass (activation checkpointing); neither
    the student's full (b, T, vocab) logits, their log-softmax and gradient, nor the
    teacher's logits are ever held at once (the teacher
    gives its last hidden states, :meth:`teacher_side`, and its head is applied chunk by
    chunk: about 100 MB less for SmolLM2's 49,152-token vocabulary at 4 x 128 positions).
    Used only after a check on the first batch that ``head(base(ids))`` equals the
    model's own logits (:meth:`check`; models that scale or cap their logits, e.g.
    Gemma-2, Granite, fall back to the full logits of both)."""

    #: an untrained head's chunks through :class:`_FusedHeadKL` (False: checkpointed
    #: :func:`_kl_sum` chunks always, as before it; benchmarks/bench_llm_memory.py)
    fused: bool = True

    def __init__(self, student: nn.Module, chunk: int, teacher: nn.Module | None = None,
                 hidden_weight: float = 0.0) -> None:
        self.student, self.chunk = student, chunk
        self.hidden_weight = float(hidden_weight)
        self.base, self.head = self._parts(student)
        self.ok: bool | None = None if self.head is not None else False
        # the teacher's head chunk by chunk only for a teacher of the student's own class
        # (whose logits check() shows to be head(hidden)); else its full logits
        same = teacher is not None and type(teacher) is type(student)
        self.t_base, self.t_head = self._parts(teacher) if same else (None, None)
        if self.hidden_weight and (self.head is None or self.t_head is None):
            raise ValueError("hidden_weight needs a student and a teacher of one class, each "
                             "a base model and a linear LM head (get_output_embeddings); got "
                             f"{type(student).__name__} and {type(teacher).__name__}")

    @staticmethod
    def _parts(model: nn.Module) -> tuple[nn.Module | None, nn.Linear | None]:
        base = getattr(model, "base_model", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") \
            else None
        if base is None or base is model or not isinstance(head, nn.Linear):
            return None, None
        return base, head

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base(input_ids=ids, use_cache=False).last_hidden_state

    @staticmethod
    def _states(base: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every block's output of ``base`` for ``ids``: ``hidden_states[1:]``, L tensors
        (b, T, hidden), the last after the final norm (= ``last_hidden_state``)."""
        return base(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[1:]

    def check(self, ids: torch.Tensor) -> bool:
        """On the first batch: does ``head(base(ids))`` give the student's own logits (the
        same on every rank)? Later calls return the first answer. Checked on the batch's
        first sequence only: the two (T, vocab) logits and the comparison's temporaries
        of a whole batch were the largest tensors of a healing step."""
        if self.ok is None:
            one = ids[:1]
            with torch.no_grad():
                full = self.student(input_ids=one, use_cache=False).logits
                mine = self.head(self.hidden(one))
                self.ok = full.shape == mine.shape and torch.allclose(
                    full.float(), mine.float(), rtol=1e-4, atol=1e-4)
            # these forwards without gradients let MPO layers cache their dense W, which
            # healing's forwards (with gradients) never read nor free
            invalidate_caches(self.student)
            if dist_.is_distributed():  # every rank takes the same path
                agree = dist_.all_reduce_floats([float(self.ok)], "the chunked KL's check")
                self.ok = agree[0] == dist_.world()[1]
        return bool(self.ok)

    @property
    def gives_hidden(self) -> bool:
        """After :meth:`check`: whether :meth:`teacher_side` gives the teacher's last hidden
        states (its head then runs chunk by chunk) rather than its full logits."""
        return bool(self.ok) and self.t_head is not None

    def teacher_side(self, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """What the KL needs of ``teacher`` (the model given at construction) for batch
        ``ids``, after :meth:`check`: its last hidden states when the logits are computed
        chunk by chunk (the teacher is the same architecture as the student), else its
        full logits (float32)."""
        if self.hidden_weight and self.gives_hidden:  # (b, L, T, hidden): every block's
            return torch.stack(self._states(self.t_base, ids), dim=1).to(
                self.t_head.weight.dtype)
        if self.gives_hidden:  # in the head's dtype (autocast may differ)
            return self.t_base(input_ids=ids, use_cache=False).last_hidden_state.to(
                self.t_head.weight.dtype)
        return teacher(input_ids=ids, use_cache=False).logits.float()

    def __call__(self, ids: torch.Tensor, t_out: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(loss, block term)``: the KL plus ``hidden_weight`` x the block-output term
        (module docstring) and that term alone (None without ``hidden_weight``)."""
        from torch.utils.checkpoint import checkpoint

        if not self.check(ids):
            if self.hidden_weight:
                raise ValueError("hidden_weight needs a model whose logits are its head "
                                 "applied to its last hidden states (this one scales or caps "
                                 "them); set hidden_weight=0")
            return next_token_kl(self.student(input_ids=ids, use_cache=False).logits,
                                 t_out), None
        term = None
        if self.hidden_weight:
            if t_out.dim() != 4:  # (a teacher head is checked at construction)
                raise ValueError("hidden_weight needs the teacher's states of every block "
                                 "(teacher_side of a teacher of the student's class)")
            states = self._states(self.base, ids)
            term = _block_term(states, t_out)
            h, t = states[-1].flatten(0, -2), t_out[:, -1].flatten(0, -2)
        else:
            h = self.hidden(ids).flatten(0, -2)
            t = t_out.flatten(0, -2)
        # with a teacher given, t_out is its hidden states (teacher_side after the check)
        if self.t_head is not None and t.shape[-1] != self.t_head.in_features:
            raise ValueError(f"the teacher's hidden states (width {self.t_head.in_features}, "
                             f"teacher_side) were expected, got width {t.shape[-1]}")
        # detached: the teacher is not trained (no gradient kept on its head)
        t_weight = self.t_head.weight.detach() if self.t_head is not None else None
        t_bias = self.t_head.bias.detach() if self.t_head is not None and \
            self.t_head.bias is not None else None
        total = h.new_zeros((), dtype=torch.float32)
        # a head that is not trained (healing's, whose trained parameters are in the
        # blocks): each chunk's gradient for h computed at once (_FusedHeadKL)
        fused = self.fused and torch.is_grad_enabled() and h.requires_grad and not (
            t.requires_grad or self.head.weight.requires_grad or (
                self.head.bias is not None and self.head.bias.requires_grad))
        for i in range(0, h.shape[0], self.chunk):
            args = (h[i:i + self.chunk], t[i:i + self.chunk], self.head.weight,
                    self.head.bias, t_weight, t_bias)
            total = total + (_FusedHeadKL.apply(*args) if fused else
                             checkpoint(_kl_sum, *args, use_reentrant=False))
        kl = total / h.shape[0]
        return (kl, None) if term is None else (kl + self.hidden_weight * term, term)


def _block_term(states: Sequence[torch.Tensor], teacher: torch.Tensor) -> torch.Tensor:
    """The mean over blocks and positions of ``||s - t||² / ||t||²`` per position: the
    student's block outputs ``states`` (L tensors (b, T, hidden)) against the teacher's
    ``teacher`` (b, L, T, hidden)."""
    if len(states) != teacher.shape[1]:
        raise ValueError(f"the teacher has {teacher.shape[1]} block outputs, the student "
                         f"{len(states)}")
    total = teacher.new_zeros((), dtype=torch.float32)
    for i, h in enumerate(states):
        t = teacher[:, i].float()
        err = (h.float() - t).pow(2).sum(-1)
        total = total + (err / t.pow(2).sum(-1).clamp_min(1e-12)).mean()
    return total / len(states)


def check_block_term(model: nn.Module, chunk: int, hidden_weight: float) -> None:
    """Before any work: can a student like ``model`` (and its teacher, a copy) heal with
    the block-output term (``hidden_weight`` > 0)? It needs a linear LM head whose output
    is the model's logits (no scaling or capping, e.g. Gemma-2's soft cap, Cohere's
    ``logit_scale``), checked on one short sequence of the dense model as
    :meth:`ChunkedKL.check` checks healing's first batch. Raises the ``ValueError``
    healing would raise at its first step."""
    kl = ChunkedKL(model, chunk, model, hidden_weight)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(8) % vocab).unsqueeze(0).to(model.get_output_embeddings().weight.device)
    if not kl.check(ids):
        raise ValueError("hidden_weight needs a model whose logits are its head applied to "
                         "its last hidden states (this one scales or caps them); set "
                         "hidden_weight=0")

