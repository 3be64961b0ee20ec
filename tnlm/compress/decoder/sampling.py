"""Nucleus sampling for text generation on the CPU, one draw per row.

transformers' sampling draws a token with ``torch.multinomial``, which fills a tensor
of exponential random numbers as large as the logits (batch x vocab) at every new
token: for SmolLM2-135M's 49,152-token vocabulary at 64 texts a step, 68 ms on two
cores, and the top-p filter sorts every row (docs/results.md). :class:`NucleusSampler`
draws the same distribution by inverse transform instead: one uniform number per row,
searched in the cumulative probabilities of the row's 1,024 most likely tokens
(``topk``, normalized over the whole row), where a confident step's nucleus lies; a
row whose nucleus is wider is drawn from its own full sort.

It is a logits processor for greedy generation: it samples, and returns scores whose
only finite entry per row is the drawn token (0, the others ``-inf``), so
``generate(do_sample=False, logits_processor=[sampler])`` keeps the drawn token and
everything else of ``generate`` (KV cache, padding, stopping) is unchanged::

    scores (b, V) -> / temperature -> -inf below the top_k-th largest (with top_k)
                  -> top 1,024 (full sort if the nucleus is wider)
                  -> probabilities (over all V) -> cumsum
                  -> nucleus: the most likely tokens whose mass reaches top_p
                  -> u ~ U(0, mass of the nucleus) -> first cumsum >= u -> token

The nucleus is transformers' ``TopPLogitsWarper``'s: a token is dropped when it and
every less likely token together hold at most ``1 - top_p`` of the probability (the
most likely token is always kept).
"""

from __future__ import annotations

import math

import torch

__all__ = ["NucleusSampler"]


class NucleusSampler:
    """A ``transformers`` logits processor that samples one token per row from
    ``softmax(scores / temperature)`` restricted to its top-``top_p`` nucleus, with
    ``generator`` (a ``torch.Generator`` on the scores' device; seeded, the draws are
    reproducible). Pass it to ``generate(..., do_sample=False)`` as the last processor.
    ``top_k``: first keep only the ``top_k`` most likely tokens, the nucleus then taken
    among them (transformers' ``TopKLogitsWarper`` before ``TopPLogitsWarper``; its
    ``generate(do_sample=True)`` applies ``top_k=50`` unless told otherwise or the
    model's ``generation_config`` sets another). ``top_p=1``: the whole distribution,
    drawn without a sort.

    Scores may hold ``-inf`` (tokens masked by an earlier processor); a call raises
    ``ValueError`` on scores holding NaN or ``+inf``, on a row with no finite score, and
    on a ``temperature`` so small that the scores over it overflow float32 (nothing could
    be drawn from them).

    Raises:
        ValueError: ``temperature`` not a finite number > 0, ``top_p`` not in (0, 1],
            ``top_k`` neither None nor an int >= 1.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, top_k: int | None = None) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or \
                not 0 < top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        self.top_k = top_k
        self.temperature, self.top_p, self.generator = float(temperature), float(top_p), \
            generator

    #: the most likely tokens looked at first (``topk``); a row whose nucleus is wider
    #: is drawn from its full sort
    k: int = 1024

    def _nucleus(self, logits: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(probs, ids, whole)``: each row's ``k`` most likely tokens, most likely first
        ((b, k) ids), their probabilities (normalized over the whole row) and 0 outside
        the nucleus, and whether all of each row's nucleus is among them ((b,) bool)."""
        lse = logits.logsumexp(-1, keepdim=True)
        top, ids = logits.topk(k, dim=-1)  # sorted, most likely first
        probs = (top - lse).exp_()
        if self.top_p >= 1.0:  # no nucleus: every token stays (float rounding drops none)
            return probs, ids, torch.full(probs.shape[:1], k == logits.shape[-1])
        cum = probs.cumsum(-1)
        # TopPLogitsWarper's rule: a token goes when it and every less likely token hold
        # at most 1 - top_p (1 - cum + p: its mass and the rest's)
        keep = (1.0 - cum + probs) > 1.0 - self.top_p
        keep[:, 0] = True
        whole = (cum[:, -1] >= self.top_p) | (k == logits.shape[-1])
        return probs.mul_(keep), ids, whole

    def _pick(self, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(b, 1): one token id a row, drawn with weights ``probs`` (b, m) among ``ids``."""
        cum = probs.cumsum(-1)  # rising through the nucleus, flat after it
        # u in (0, mass]: the first position whose cumulative mass reaches u has weight
        u = (1.0 - torch.rand((cum.shape[0], 1), generator=self.generator,
                              device=cum.device)) * cum[:, -1:]
        pos = torch.searchsorted(cum, u).clamp_(max=cum.shape[-1] - 1)
        return ids.gather(1, pos)

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        """(b, 1) token ids drawn from each row's nucleus."""
        vocab = logits.shape[-1]
        if self.top_p >= 1.0:  # the whole distribution: no sort, no top-k
            probs = (logits - logits.logsumexp(-1, keepdim=True)).exp_()
            return self._pick(probs, torch.arange(vocab, device=logits.device).expand_as(
                probs))
        probs, ids, whole = self._nucleus(logits, min(self.k, vocab))
        token = self._pick(probs, ids)
        if not bool(whole.all()):  # a wider nucleus: those rows alone from their full sort
            rows = (~whole).nonzero().squeeze(1)
            wide_probs, wide_ids, _ = self._nucleus(logits[rows], vocab)
            token = token.index_copy_(0, rows, self._pick(wide_probs, wide_ids))
        return token

    def _logits(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores over the temperature; with ``top_k``, ``-inf`` below each row's
        ``top_k``-th largest (ties with it kept, as ``TopKLogitsWarper`` keeps them).
        ``ValueError`` unless each row's largest is finite (see the class docstring)."""
        logits = scores.float() / self.temperature
        top = logits.amax(-1)  # NaN where a row holds one
        if not bool(torch.isfinite(top).all()):
            if bool((scores.isnan() | scores.isposinf()).any()):
                raise ValueError("scores hold NaN or +inf; a sampler takes finite scores or "
                                 "-inf (masked tokens)")
            if bool(scores.isneginf().all(-1).any()):
                raise ValueError("scores hold a row whose every token is masked (-inf): "
                                 "nothing to draw from")
            big = float(scores[scores.isfinite()].abs().amax())
            raise ValueError(f"temperature {self.temperature!r} makes the scores overflow "
                             f"float32 (scores up to {big:.3g} in absolute value); use a "
                             "larger temperature")
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill_(logits < kth, -math.inf)
        return logits

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """(b, V) the distribution each row is drawn from (for tests and inspection)."""
        logits = self._logits(scores)
        probs, ids, _ = self._nucleus(logits, logits.shape[-1])
        probs = probs / probs.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter_(1, ids, probs)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (b, V) -> (b, V): 0 at each row's drawn token, ``-inf`` elsewhere."""
        token = self._draw(self._logits(scores))
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, token, 0.0)
