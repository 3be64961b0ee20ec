"""NucleusSampler: transformers' top-p distribution, drawn one uniform number a row."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from tnlm.compress.decoder.sampling import NucleusSampler


def _hf_probs(scores: torch.Tensor, temperature: float, top_p: float,
              top_k: int | None = None) -> torch.Tensor:
    scores = scores / temperature
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    return TopPLogitsWarper(top_p)(None, scores).softmax(-1)


@pytest.mark.parametrize(("temperature", "top_p", "top_k"),
                         [(1.0, 0.95, None), (0.7, 0.5, None), (1.3, 1.0, None),
                          (1.0, 0.95, 50), (1.0, 0.99, 7), (1.0, 1.0, 1)])
def test_the_distribution_is_transformers_top_p(temperature, top_p, top_k):
    """transformers' TopK (when given) then TopP warpers, softmaxed."""
    torch.manual_seed(0)
    scores = torch.randn(6, 300) * 3
    mine = NucleusSampler(temperature, top_p, top_k=top_k).probabilities(scores)
    torch.testing.assert_close(mine, _hf_probs(scores, temperature, top_p, top_k),
                               rtol=1e-5, atol=1e-7)
    if top_k is not None:
        assert bool(((mine > 0).sum(-1) <= top_k).all())


@pytest.mark.parametrize(("k", "top_k"), [(1024, None), (3, None), (1024, 12)])
def test_draws_follow_the_distribution(k, top_k):
    """20,000 draws of one row: each token's frequency within 5 standard errors of its
    probability; a token outside the nucleus is never drawn."""
    torch.manual_seed(1)
    row = torch.randn(1, 40) * 1.5
    sampler = NucleusSampler(1.0, 0.9, torch.Generator().manual_seed(0), top_k=top_k)
    sampler.k = k  # 3: every row's nucleus is wider, drawn from its full sort
    n = 20_000
    out = sampler(None, row.expand(n, -1).contiguous())
    assert torch.equal((out == 0).sum(-1), torch.ones(n, dtype=torch.long))
    assert bool(torch.isinf(out).sum(-1).eq(39).all())
    freq = torch.bincount(out.argmax(-1), minlength=40).double() / n
    p = sampler.probabilities(row)[0].double()
    assert int((p > 0).sum()) > 3  # the nucleus is wider than k=3
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() <= 5 * se + 1e-12).all())
    assert bool((freq[p == 0] == 0).all())


def test_the_top_k_path_draws_a_several_token_nucleus():
    """k < V with the nucleus inside the top k (the path of a confident step): several
    tokens drawn, each as often as its probability (5 standard errors)."""
    torch.manual_seed(4)
    row = torch.randn(1, 40)
    row[0, :6] += 4.0  # six likely tokens hold nearly all the mass
    sampler = NucleusSampler(1.0, 0.5, torch.Generator().manual_seed(1))
    sampler.k = 10
    _, _, whole = sampler._nucleus(row, 10)  # noqa: SLF001 - the path under test
    assert bool(whole.all())
    n = 20_000
    freq = torch.bincount(sampler(None, row.expand(n, -1).contiguous()).argmax(-1),
                          minlength=40).double() / n
    p = sampler.probabilities(row)[0].double()
    assert int((p > 0).sum()) >= 2
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all())


def test_top_k_keeps_ties_and_top_p_one_is_the_whole_distribution():
    """Tokens tied with the k-th largest stay (TopKLogitsWarper); top_p=1 draws from the
    whole softmax, every token possible."""
    scores = torch.tensor([[3.0, 2.0, 1.0, 1.0, 1.0, 0.0]])
    p = NucleusSampler(1.0, 1.0, top_k=3).probabilities(scores)
    torch.testing.assert_close(p, _hf_probs(scores, 1.0, 1.0, 3))
    assert int((p > 0).sum()) == 5
    row = torch.randn(1, 30)
    sampler = NucleusSampler(1.0, 1.0, torch.Generator().manual_seed(2))
    n = 30_000
    freq = torch.bincount(sampler(None, row.expand(n, -1).contiguous()).argmax(-1),
                          minlength=30).double() / n
    want = row.softmax(-1)[0].double()
    torch.testing.assert_close(sampler.probabilities(row)[0].double(), want)
    assert bool(((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-12).all())


def test_a_batch_mixes_narrow_and_wide_rows():
    """Rows whose nucleus fits in the top k and rows drawn from their full sort, in one
    batch: each row's draws stay in its own nucleus."""
    torch.manual_seed(2)
    peaked = torch.full((1, 60), -10.0)
    peaked[0, 7] = 10.0
    flat = torch.zeros(1, 60)
    scores = torch.cat([peaked, flat] * 500)
    sampler = NucleusSampler(1.0, 0.95, torch.Generator().manual_seed(3))
    sampler.k = 5
    got = sampler(None, scores).argmax(-1)
    assert bool((got[0::2] == 7).all())
    assert len(set(got[1::2].tolist())) > 40  # the flat rows use their whole nucleus


def test_seeded_draws_repeat_and_bad_arguments_are_refused():
    scores = torch.randn(8, 100)
    a = NucleusSampler(1.0, 0.9, torch.Generator().manual_seed(5))(None, scores)
    b = NucleusSampler(1.0, 0.9, torch.Generator().manual_seed(5))(None, scores)
    assert torch.equal(a, b)
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            NucleusSampler(temperature=bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
            NucleusSampler(top_p=bad)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="top_k must be None or an int >= 1"):
            NucleusSampler(top_k=bad)
