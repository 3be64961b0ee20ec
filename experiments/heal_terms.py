"""Healing-loss terms screened on MiniLM that measured no gain, kept runnable here.

Each is a :class:`tnlm.compress.distill.HealTerm`, passed as ``HealConfig(term=...)``
(``main_job_screen.py --w-rel/--neighbours``, ``heal_screen.py --twins/--w-attn``):

* :class:`RelationalTerm`: ``w_rel · mean_bc (C^s_bc - C^t_bc)²`` with
  ``C_bc = cos(pool_b, pool_c)`` over the sentences of a batch, to keep which sentences
  are close to which (what similarity search and SICK measure). With ``neighbours=True``
  half of each batch are anchors drawn at random and half their nearest neighbours in the
  teacher's embedding space (:func:`nearest_neighbours`, found once), so the term also sees
  close pairs. On MiniLM at 50 %, 300 steps: SICK +0.001, held-out cosine -0.005
  (results/main_job/, docs/results.md).
* :class:`TwinTerm`: ``twins`` sentences of each batch come with a twin, the same sentence
  with a ``twin_words`` share of its words swapped for words of the tokenizer's vocabulary
  (:func:`swap_words`, :func:`vocabulary_words`); ``w_twin · mean_k (cos^s(a_k, a'_k) -
  cos^t(a_k, a'_k))²`` asks the student to rate each pair as the teacher does. On MiniLM at
  50 %, 2000 steps, ``twins=8``: held-out cosine 0.970 -> 0.941, SICK 0.786 -> 0.784
  (results/heal_screen/twins8_2000.json).
* :class:`AttentionTerm`: ``w_attn · mean_{l,x} KL(A^t_{l,x} || A^s_{l,x})`` for x in
  ``relations``: ``"qk"`` the attention distribution softmax(Q_h K_hᵀ/√d_h) of block l per
  head, ``"vv"`` its value relation softmax(V_h V_hᵀ/√d_h) (as in MiniLM's own
  distillation), read from the outputs of the self-attention's ``query``/``key``/``value``
  modules by forward hooks (:func:`attention_projections`, :func:`relation_kl`). On MiniLM
  at 50 %, 2000 steps, ``w_attn=1``: SICK 0.7915 -> 0.7931, held-out cosine 0.9696 ->
  0.9699 (within the seed spread) for 13 % more time per step
  (results/heal_screen/captions_attn1_2000.json).

Under ``torch.distributed`` each rank computes a term over its own share of the batch
(whole pairs), so the relational term compares fewer pairs than one process would.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tnlm.compress.distill import HealBatch, HealConfig, HealTerm
from tnlm.compress.quality import embed

__all__ = ["ATTN_RELATIONS", "AttentionTerm", "RelationalTerm", "TwinTerm",
           "attention_projections", "nearest_neighbours", "relation_kl", "swap_words",
           "vocabulary_words"]

#: relation name -> the (query, key, value) outputs it pairs: softmax(A Bᵀ/√d_h) per head
ATTN_RELATIONS = {"qk": (0, 1), "vv": (2, 2)}


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside an ``MPOModel`` (else ``model``)."""
    return getattr(model, "base_model", model) if hasattr(model, "mpo_config") else model


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


# ------------------------------------------------------------------ text helpers (twins)
def vocabulary_words(tokenizer: Any) -> list[str]:
    """The whole lower-case words of a tokenizer's vocabulary (ASCII letters, at least two;
    no word pieces, marks or special tokens), sorted."""
    return sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha()
                  and w.islower() and len(w) > 1)


def swap_words(sentence: str, words: Sequence[str], share: float, rng: random.Random) -> str:
    """``sentence`` with a ``share`` of its lower-case words (at least one, if it has any)
    replaced by other words drawn from ``words``; other tokens and the spacing of a
    whitespace-split sentence are kept."""
    tokens = sentence.split()
    spots = [i for i, t in enumerate(tokens) if t.isalpha() and t.islower()]
    if not spots or not words:
        return sentence
    for i in rng.sample(spots, max(1, round(share * len(spots)))):
        w = rng.choice(words)
        while w == tokens[i] and len(set(words)) > 1:  # a swap changes the word
            w = rng.choice(words)
        tokens[i] = w
    return " ".join(tokens)


# ------------------------------------------------------------------ relational term
@torch.no_grad()
def nearest_neighbours(model: nn.Module, tokenizer: Any, sentences: Sequence[str],
                       max_length: int = 64, batch_size: int = 64,
                       chunk: int = 2048) -> list[int]:
    """For each sentence, the index of its most similar *other* sentence by the cosine of
    ``model``'s mean-pooled embeddings (:func:`tnlm.compress.quality.embed`, in eval
    mode; (n,) list; n >= 2)."""
    was = model.training
    model.eval()
    try:
        e = embed(model, tokenizer, sentences, batch_size, max_length).float()
    finally:
        model.train(was)
    out: list[int] = []
    for i in range(0, len(e), chunk):
        sim = e[i:i + chunk] @ e.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + i] = -math.inf
        out += sim.argmax(1).tolist()
    return out


class RelationalTerm(HealTerm):
    """The in-batch similarity-structure term, optionally on nearest-neighbour pairs
    (module docstring)."""

    def __init__(self, w_rel: float, neighbours: bool = False) -> None:
        if not isinstance(neighbours, bool):
            raise ValueError(f"neighbours must be a bool, got {neighbours!r}")
        self.w_rel = _weight("w_rel", w_rel)
        self.neighbours = neighbours
        self._group = 1

    @property
    def group(self) -> int:  # pairs once prepare() drew neighbour pairs
        return self._group

    def prepare(self, teacher: nn.Module, tokenizer: Any, sentences: Sequence[str],
                config: HealConfig, rng: random.Random) -> list[list[int]] | None:
        self._group = 1
        if not self.neighbours or len(sentences) < 2:
            return None
        if config.batch_size % 2:
            raise ValueError(f"batch_size must be even with neighbours=True (pairs), got "
                             f"{config.batch_size}")
        near = nearest_neighbours(teacher, tokenizer, sentences, config.max_length)
        self._group = 2  # [a0, n0, a1, n1, ...]: a rank takes whole pairs
        return [[j for _ in range(config.batch_size // 2)
                 for i in [rng.randrange(len(sentences))] for j in (i, near[i])]
                for _ in range(config.steps)]

    def loss(self, hb: HealBatch) -> torch.Tensor | float:
        if not self.w_rel:  # neighbour pairs alone
            return 0.0
        es = F.normalize(hb.student_pooled, dim=-1)
        et = F.normalize(hb.teacher_pooled, dim=-1)
        return self.w_rel * ((es @ es.T - et @ et.T) ** 2).mean()


# ------------------------------------------------------------------ twins
class TwinTerm(HealTerm):
    """Word-swapped twins and the squared gap of the pair cosines (module docstring)."""

    group = 2  # [a0, twin(a0), a1, twin(a1), ..., the rest]: a rank takes whole pairs

    def __init__(self, twins: int, twin_words: float = 0.15, w_twin: float = 10.0) -> None:
        if isinstance(twins, bool) or not isinstance(twins, int) or twins < 1:
            raise ValueError(f"twins must be an int >= 1, got {twins!r}")
        if isinstance(twin_words, bool) or not isinstance(twin_words, (int, float)) or \
                not 0 < twin_words <= 1:
            raise ValueError(f"twin_words must be a share in (0, 1], got {twin_words!r}")
        self.twins, self.twin_words = twins, float(twin_words)
        self.w_twin = _weight("w_twin", w_twin)
        self._words: list[str] = []
        self._seed = 0

    def prepare(self, teacher: nn.Module, tokenizer: Any, sentences: Sequence[str],
                config: HealConfig, rng: random.Random) -> list[list[int]] | None:
        if 2 * self.twins > config.batch_size:
            raise ValueError(f"twins must be an int in [1, batch_size / 2], got {self.twins} "
                             f"with batch_size {config.batch_size}")
        self._words = vocabulary_words(tokenizer)
        if not self._words:
            raise ValueError("twins need whole lower-case words in the tokenizer's vocabulary "
                             "to swap in; this tokenizer has none")
        self._seed = config.seed
        return None

    def entries(self, step: int, texts: list[str]) -> list[str]:
        swap = random.Random((self._seed * 1_000_003 + step) * 1_009 + 7)
        return [t for a in texts[:self.twins]
                for t in (a, swap_words(a, self._words, self.twin_words, swap))
                ] + texts[self.twins:len(texts) - self.twins]

    def loss(self, hb: HealBatch) -> torch.Tensor | float:
        # this rank's pairs come first: entries 2k, 2k+1 (k < its pairs)
        pairs = sum(1 for i in hb.positions if i < 2 * self.twins) // 2
        if not pairs or not self.w_twin:
            return 0.0
        ps, pt = hb.student_pooled, hb.teacher_pooled
        a, b = slice(0, 2 * pairs, 2), slice(1, 2 * pairs, 2)
        gap = (F.cosine_similarity(ps[a], ps[b], dim=-1)
               - F.cosine_similarity(pt[a], pt[b], dim=-1))
        return self.w_twin * (gap ** 2).mean()


# ------------------------------------------------------------------ attention relations
def attention_projections(model: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """Per self-attention block of ``model`` (in order): its ``(query, key, value)``
    modules (BERT-style attention; dense or MPO layers alike); [] if it has none."""
    out = []
    for _, m in _base(model).named_modules():
        qkv = tuple(getattr(m, a, None) for a in ("query", "key", "value"))
        if all(isinstance(x, nn.Module) for x in qkv):
            out.append(qkv)
    return out


class Recorder:
    """Forward hooks keeping the outputs of the query/key/value modules of one forward,
    every call in order (a module shared across layers, ALBERT-style, is called once per
    layer)."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = attention_projections(model)
        if not self.blocks:
            raise ValueError("w_attn > 0 needs BERT-style self-attention modules with query, "
                             "key and value submodules; this model has none")
        self.out: dict[int, list[torch.Tensor]] = {}
        self.handles = [mod.register_forward_hook(self._hook(id(mod)))
                        for qkv in self.blocks for mod in qkv]

    def _hook(self, key: int):
        def hook(_m, _inp, output):
            self.out.setdefault(key, []).append(output)
        return hook

    def qkv(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(query, key, value) outputs, float32, per block and call: [(B, L, D) x 3, ...]."""
        return [(a.float(), b.float(), c.float()) for q, k, v in self.blocks
                for a, b, c in zip(self.out.get(id(q), []), self.out.get(id(k), []),
                                   self.out.get(id(v), []))]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def relation_kl(a_s: torch.Tensor, b_s: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor,
                heads: int, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the relations softmax(A_h B_hᵀ/√d_h) per head.

    ``a_*``, ``b_*``: (batch, seq, dim) with dim = heads · d_h; ``mask``: (batch, seq), 1 for
    real tokens. Keys that are padding get probability 0; the KL (summed over keys) is
    averaged over heads and real query tokens. Returns a scalar.
    """
    bsz, n, dim = a_s.shape
    if dim % heads:
        raise ValueError(f"width {dim} is not a multiple of heads={heads}")
    dh = dim // heads
    keep = mask.bool()

    def logp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.view(bsz, n, heads, dh).transpose(1, 2)
        b = b.view(bsz, n, heads, dh).transpose(1, 2)
        scores = (a @ b.transpose(-1, -2)) / math.sqrt(dh)
        return torch.log_softmax(scores.masked_fill(~keep[:, None, None, :], -1e4), dim=-1)

    lt, ls = logp(a_t, b_t), logp(a_s, b_s)
    kl = (lt.exp() * (lt - ls)).sum(-1)  # (batch, heads, seq)
    rows = keep[:, None, :].expand_as(kl)
    return kl[rows].mean()


class AttentionTerm(HealTerm):
    """The attention-relation term (module docstring)."""

    def __init__(self, w_attn: float, relations: Sequence[str] = ("qk",)) -> None:
        if isinstance(relations, str) or not isinstance(relations, (tuple, list)) or \
                not relations or any(not isinstance(r, str) or r not in ATTN_RELATIONS
                                     for r in relations):
            raise ValueError(f"relations must be a non-empty tuple of "
                             f"{tuple(ATTN_RELATIONS)}, got {relations!r}")
        self.w_attn = _weight("w_attn", w_attn)
        self.relations = list(dict.fromkeys(relations))
        self._qkv: tuple[list, list] = ([], [])

    @contextlib.contextmanager
    def recording(self, student: nn.Module, teacher: nn.Module) -> Iterator[None]:
        recs: list[Recorder] = []
        try:
            recs.append(Recorder(teacher))
            recs.append(Recorder(student))
            yield
            self._qkv = (recs[0].qkv(), recs[1].qkv())
        finally:
            for r in recs:
                r.remove()

    def loss(self, hb: HealBatch) -> torch.Tensor:
        tqkv, sqkv = self._qkv
        self._qkv = ([], [])
        if not sqkv or len(sqkv) != len(tqkv):
            raise ValueError(f"attention relations: the teacher's query/key/value modules ran "
                             f"{len(tqkv)} times, the student's {len(sqkv)}; they must run "
                             f"alike and at least once")
        heads = _base(hb.student).config.num_attention_heads
        mask = hb.batch["attention_mask"]
        terms = [relation_kl(sq[i], sq[j], tq[i], tq[j], heads, mask)
                 for sq, tq in zip(sqkv, tqkv)
                 for i, j in (ATTN_RELATIONS[r] for r in self.relations)]
        return self.w_attn * torch.stack(terms).mean()
