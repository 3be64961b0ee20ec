"""tnlm.compress: calibration statistics, data-aware truncation, the budgeted pipeline with
rollback, distillation healing (loss, freezing, resumability, divergence) and the text helpers.

Everything runs on a random-init 2-layer BERT of width 32 and a 63-token vocabulary.
"""

import copy
import math
import random

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from experiments import heal_terms as ht
from tests.common import SHORT_WORDS as WORDS
from tests.common import one_thread  # noqa: F401  (module-scoped autouse fixture)
from tnlm.bridge import MPOLinear, MPOModule, weight_xw
from tnlm.compress import distill, heal_state
from tnlm.compress.calibration import InputStats, collect_input_stats
from tnlm.compress.data_aware import WhitenedLayer, output_error, whitening_factor
from tnlm.compress.distill import HealConfig, heal
from tnlm.compress.pipeline import (
    CompressionConfig,
    compress_model,
    layer_groups,
    rank_for_fraction,
)
from tnlm.compress.text import docstring_sentences, read_sentences, split_sentences
from tnlm.integration import MPOConfig, MPOModel

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
           "output.dense"]
PARTIAL = ["query", "value", "intermediate.dense"]   # leaves key, attention.output, output, pooler


def bert(hidden=32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=2 * hidden,
                     max_position_embeddings=64, **kw)
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)]
    vocab += [f"##{chr(c)}" for c in range(97, 123)] + [".", ",", "the", "is", "of", "and"]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(vocab))
    # transformers 5 ignores ``vocab_file=``; ``vocab=`` takes the file
    t = BertTokenizerFast(vocab=str(path))
    assert len(t.get_vocab()) == len(vocab) <= 64
    assert 1 not in t("the cat sat.")["input_ids"]  # no [UNK]: the vocabulary was read
    return t


@pytest.fixture(scope="module")
def sentences():
    r = random.Random(0)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(2, 9))) + "." for _ in range(48)]


def batch_of(tok, sents):
    b = tok(list(sents), padding=True, return_tensors="pt")
    return {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def snapshot(model):
    return dict(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                types={n: type(m) for n, m in model.named_modules()},
                grad={n: p.requires_grad for n, p in model.named_parameters()},
                training={n: m.training for n, m in model.named_modules()})


def assert_unchanged(model, snap, batch, out_before):
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    changed = [k for k, v in state.items() if not torch.equal(v, snap["state"][k])]
    assert not changed, f"parameters changed by a failed compression: {changed}"
    assert {n: type(m) for n, m in model.named_modules()} == snap["types"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snap["grad"]
    assert {n: m.training for n, m in model.named_modules()} == snap["training"]
    with torch.no_grad():
        out = model.eval()(**batch).last_hidden_state
    assert torch.equal(out, out_before)


# --------------------------------------------------------------------------- calibration
def capture_inputs(model, batches, names):
    """Inputs of the named layers on the non-padding tokens, by a hook of our own."""
    got = {n: [] for n in names}
    mods = dict(model.named_modules())
    handles = []
    for n in names:
        def fn(mod, inp, out, n=n):
            got[n].append(inp[0].detach())
        handles.append(mods[n].register_forward_hook(fn))
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return {n: torch.cat([x[b["attention_mask"].bool()] for x, b in zip(xs, batches)]).double()
            for n, xs in got.items()}


NAMES = ["encoder.layer.0.attention.self.query", "encoder.layer.1.intermediate.dense",
         "encoder.layer.1.output.dense"]


def test_gram_is_xtx_of_the_non_padding_tokens(tok, sentences):
    model = bert()
    batches = [batch_of(tok, sentences[:5]), batch_of(tok, sentences[5:12])]
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)
    X = capture_inputs(model, batches, NAMES)
    model.train()  # calibration must run in eval mode (no dropout) and restore this
    stats = collect_input_stats(model, batches, NAMES)
    assert model.training and all(m.training for m in model.modules())
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
    for n in NAMES:
        s = stats[n]
        assert s.n_tokens == n_tok == X[n].shape[0]
        assert s.gram.dtype == torch.float64 and s.gram.shape == (X[n].shape[1],) * 2
        torch.testing.assert_close(s.gram, X[n].T @ X[n], rtol=1e-12, atol=1e-12)
        assert s.cross is None and s.ref_gram is None
    # padding matters: the Gram of all positions is different
    model.eval()
    stats_eval = collect_input_stats(model, batches, NAMES[:1])
    assert not model.training
    full = capture_inputs(model, [{**b, "attention_mask": torch.ones_like(b["attention_mask"])}
                                  for b in batches], NAMES[:1])[NAMES[0]]
    assert not torch.allclose(stats_eval[NAMES[0]].gram, full.T @ full)


def test_cross_gram_against_a_reference_model(tok, sentences):
    model, ref = bert(seed=0), bert(seed=1)
    batches = [batch_of(tok, sentences[:6]), batch_of(tok, sentences[6:9])]
    Xs, Xt = capture_inputs(model, batches, NAMES), capture_inputs(ref, batches, NAMES)
    ref.train()
    stats = collect_input_stats(model, batches, NAMES, reference=ref)
    assert ref.training and not model.training
    for n in NAMES:
        s = stats[n]
        assert not torch.allclose(Xs[n], Xt[n])
        torch.testing.assert_close(s.gram, Xs[n].T @ Xs[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.cross, Xs[n].T @ Xt[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.ref_gram, Xt[n].T @ Xt[n], rtol=1e-12, atol=1e-12)


def test_layers_reading_one_input_share_its_products_and_outputs_are_returned(
        tok, sentences, monkeypatch):
    """query, key and value read one tensor: its rows and products are computed once a
    batch (in the model and in the reference) and give exactly the statistics of
    collecting each alone; the forwards' outputs are returned (model and reference),
    equal to running them again."""
    from tnlm.compress import calibration

    model, ref = bert(seed=0), bert(seed=1)
    batches = [batch_of(tok, sentences[:6]), batch_of(tok, sentences[6:9])]
    qkv = [f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")]
    names = qkv + ["encoder.layer.0.output.dense"]
    outs, ref_outs, rows_of = [], [], []
    real = calibration._masked_rows

    def counted(x, mask, name):
        rows_of.append(name)
        return real(x, mask, name)

    monkeypatch.setattr(calibration, "_masked_rows", counted)
    stats = collect_input_stats(model, batches, names, reference=ref, outputs=outs,
                                reference_outputs=ref_outs)
    # per batch and model: the shared input once (at the query), the other layer's once
    assert rows_of == [qkv[0], names[-1]] * 2 * len(batches)
    monkeypatch.setattr(calibration, "_masked_rows", real)
    for n in names:
        alone = collect_input_stats(model, batches, [n], reference=ref)[n]
        for field in ("gram", "cross", "ref_gram"):
            assert torch.equal(getattr(stats[n], field), getattr(alone, field)), (n, field)
        assert stats[n].n_tokens == alone.n_tokens
    assert torch.equal(stats[qkv[0]].gram, stats[qkv[2]].gram)
    assert not torch.equal(stats[qkv[0]].gram, stats[names[-1]].gram)
    assert len(outs) == len(ref_outs) == len(batches)
    with torch.no_grad():
        for b, o, r in zip(batches, outs, ref_outs):
            assert torch.equal(o.last_hidden_state, model.eval()(**b).last_hidden_state)
            assert torch.equal(r.last_hidden_state, ref.eval()(**b).last_hidden_state)


def test_collect_input_stats_bad_input(tok, sentences):
    model = bert()
    batch = batch_of(tok, sentences[:3])
    with pytest.raises(ValueError, match="module_names must name at least one"):
        collect_input_stats(model, [batch], [])
    with pytest.raises(ValueError, match="'encoder.nope' is not a module"):
        collect_input_stats(model, [batch], ["encoder.nope"])
    with pytest.raises(ValueError, match="reference model"):
        collect_input_stats(model, [batch], ["pooler.dense"], reference=torch.nn.Linear(2, 2))
    model.train()
    with pytest.raises(ValueError, match="no calibration tokens"):
        collect_input_stats(model, [], NAMES)
    masked = {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}
    with pytest.raises(ValueError, match="no calibration tokens"):
        collect_input_stats(model, [masked], NAMES)
    assert model.training and all(m.training for m in model.modules())
    assert not model.encoder.layer[0].attention.self.query._forward_hooks  # hooks removed


# --------------------------------------------------------------------------- data-aware
def rel_out(X, W, Wa):
    return float(torch.linalg.norm(X @ (W - Wa)) / torch.linalg.norm(X @ W))


@pytest.fixture
def xw():
    g = torch.Generator().manual_seed(0)
    # anisotropic inputs, so that the data-aware and the plain truncation differ
    X = torch.randn(200, 12, generator=g, dtype=torch.float64)
    X = X @ torch.diag(torch.logspace(0, -2, 12, dtype=torch.float64))
    X = X @ torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0]
    W = torch.randn(12, 10, generator=g, dtype=torch.float64)
    return X, W


def svd_truncated(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def test_whitened_mpo_reports_its_output_error_and_beats_plain_svd(xw):
    X, W = xw
    wl = WhitenedLayer(W, InputStats(X.T @ X, X.shape[0]))
    gaps = []
    for r in range(1, 10):
        mpo = wl.mpo(r)
        assert mpo.n_sites == 2 and mpo.bond_dims == (r,)
        Wa = mpo.to_matrix()
        measured = rel_out(X, W, Wa)
        assert abs(mpo.truncation_error - measured) < 1e-9
        assert abs(wl.rank_error(r) - measured) < 1e-5  # the spectrum predicts it (ridge)
        plain = rel_out(X, W, svd_truncated(W, r))
        assert measured <= plain + 1e-9
        gaps.append(plain - measured)
    assert max(gaps) > 0.05  # strictly better where it matters
    full = wl.mpo(10)
    assert full.truncation_error < 1e-9 and rel_out(X, W, full.to_matrix()) < 1e-9


def test_whitened_truncated_weight_is_the_mpo_s_matrix(xw):
    """``truncated(r)`` (with ``vectors=True``) is the weight ``mpo(r)`` represents, and
    its spectrum the one ``svdvals`` gives; without the vectors it is refused."""
    X, W = xw
    stats = InputStats(X.T @ X, X.shape[0])
    wl = WhitenedLayer(W, stats, vectors=True)
    plain = WhitenedLayer(W, stats)
    assert np.allclose(wl.spectrum, plain.spectrum, rtol=1e-10, atol=1e-12)
    for r in (1, 3, 7, 10, 99):
        Wm = plain.mpo(min(r, 10)).to_matrix()
        assert torch.allclose(wl.truncated(r), Wm, rtol=0, atol=1e-9 * float(Wm.abs().max()))
    with pytest.raises(ValueError, match=r"truncated\(\) needs the SVD's vectors"):
        plain.truncated(3)


def test_whitened_mpo_with_output_sites(xw):
    X, W = xw
    wl = WhitenedLayer(W, InputStats(X.T @ X, X.shape[0]))
    mpo = wl.mpo(4, out_shape=(2, 5), max_bond=3)
    assert mpo.n_sites == 3
    assert mpo.in_shape == (12, 1, 1) and mpo.out_shape == (1, 2, 5)
    assert mpo.bond_dims[0] == 4 and mpo.bond_dims[1] <= 3
    assert abs(mpo.truncation_error - rel_out(X, W, mpo.to_matrix())) < 1e-9
    # the output-side cut only adds error to the 2-site rank-4 layer
    assert mpo.truncation_error >= wl.mpo(4).truncation_error - 1e-9
    per_bond = wl.mpo(4, out_shape=(2, 5), max_bond=[1])
    assert per_bond.bond_dims == (4, 1)
    with pytest.raises(ValueError, match="max_bond"):
        wl.mpo(4, out_shape=(2, 5), max_bond=[1, 2])


def test_whitened_layer_rejects_a_wrong_gram(xw):
    X, W = xw
    with pytest.raises(ValueError, match=r"gram has shape \(11, 11\), expected \(12, 12\)"):
        WhitenedLayer(W, InputStats(torch.eye(11, dtype=torch.float64), 5))


def test_output_error_and_truncation_against_a_reference(xw):
    X_t, W = xw
    g = torch.Generator().manual_seed(1)
    X_s = X_t + 0.05 * torch.randn(X_t.shape, generator=g, dtype=torch.float64)
    stats = InputStats(X_s.T @ X_s, X_s.shape[0], cross=X_s.T @ X_t, ref_gram=X_t.T @ X_t)

    def measure(Wa):
        return float(torch.linalg.norm(X_s @ Wa - X_t @ W) / torch.linalg.norm(X_t @ W))

    Wa = W + 0.1 * torch.randn(W.shape, generator=g, dtype=torch.float64)
    assert abs(output_error(W, Wa, stats) - measure(Wa)) < 1e-9
    assert abs(output_error(W, W, stats) - measure(W)) < 1e-9 and measure(W) > 0.01
    wl = WhitenedLayer(W, stats)
    no_feedback = WhitenedLayer(W, InputStats(stats.gram, stats.n_tokens))
    for r in (2, 5):
        mpo = wl.mpo(r)
        assert abs(mpo.truncation_error - measure(mpo.to_matrix())) < 1e-9
        # fitting X_t W (not X_s W) is better on this measure
        assert mpo.truncation_error <= measure(no_feedback.mpo(r).to_matrix()) + 1e-9
    # full rank: the least-squares fit of X_t W from X_s, not zero
    best = torch.linalg.lstsq(X_s, X_t @ W).solution
    assert abs(wl.mpo(10).truncation_error - measure(best)) < 1e-7


def test_whitening_factor_ridge_escalation_and_zero_gram():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 8, generator=g, dtype=torch.float64)
    G = X.T @ X                                     # rank 3 of 8
    L = whitening_factor(G)
    assert torch.equal(L, torch.tril(L)) and torch.isfinite(L).all()
    lam = torch.diagonal(L @ L.T - G)
    scale = float(torch.trace(G)) / 8
    torch.testing.assert_close(L @ L.T - G, torch.diag(lam), rtol=0, atol=1e-9 * scale)
    assert 0 < float(lam.mean()) <= 1e-5 * scale
    # slightly indefinite (round-off of a rank-deficient Gram): the ridge is raised x10
    bad = G - 1e-4 * scale * torch.eye(8, dtype=torch.float64)
    L = whitening_factor(bad)
    lam = float(torch.diagonal(L @ L.T - bad).mean()) / (float(torch.trace(bad)) / 8)
    assert lam > 1e-4 and math.log10(lam / 1e-6) == pytest.approx(round(math.log10(lam / 1e-6)))
    # an exactly singular PSD Gram also works without a default ridge
    singular = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    for ridge in (1e-6, 0.0):
        L = whitening_factor(singular, ridge=ridge)
        assert torch.isfinite(L).all() and float(torch.diagonal(L).min()) > 0
    for gram in (torch.zeros(4, 4), torch.full((4, 4), float("nan")), torch.eye(3)[:2]):
        with pytest.raises(ValueError, match="gram must be"):
            whitening_factor(gram)
    with pytest.raises(ValueError, match="ridge"):
        whitening_factor(G, ridge=-1.0)


# --------------------------------------------------------------------------- pipeline
def targeted(model, patterns):
    cfg = MPOConfig(target_modules=patterns)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and cfg.is_target(n)}


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_compress_model_keeps_the_budget(tok, sentences, budget):
    model = bert()
    original = copy.deepcopy(model)
    before = targeted(model, PARTIAL)
    untouched = {n: m for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n not in before}
    assert len(before) == 6 and "pooler.dense" in untouched and len(untouched) == 7
    res = compress_model(model, tok, sentences, CompressionConfig(PARTIAL, budget=budget,
                                                                  heal=None), progress=False)
    assert isinstance(res.model, MPOModel) and res.model.base_model is model and res.heal is None
    assert res.params_before == sum(m.weight.numel() for m in before.values())
    assert 0 < res.ratio <= budget
    assert res.ranks.keys() == before.keys() == res.errors.keys()
    for n, old in before.items():
        new = model.get_submodule(n)
        assert isinstance(new, MPOLinear) and new.n_sites == 2
        I, J = weight_xw(old).shape
        assert res.ranks[n] == rank_for_fraction(I, J, budget) and new.bond_dims == (res.ranks[n],)
        assert 0 < res.errors[n] < 1 and new.truncation_error == res.errors[n]
        torch.testing.assert_close(new.bias, old.bias)
    for n, m in untouched.items():
        assert model.get_submodule(n) is m
    orig_state = original.state_dict()
    for k, v in model.state_dict().items():
        if not any(k.startswith(n + ".") for n in before):
            assert torch.equal(v, orig_state[k]), k
    assert not any(isinstance(m, MPOModule) for m in original.modules())


def test_reported_errors_are_calibration_output_errors(tok, sentences):
    model = bert()
    original = copy.deepcopy(model)
    res = compress_model(model, tok, sentences, CompressionConfig(PARTIAL, budget=0.25,
                                                                  heal=None), progress=False)
    batches = [batch_of(tok, sentences[i:i + 32]) for i in range(0, len(sentences), 32)]
    X = capture_inputs(original, batches, list(res.ranks))
    for n, err in res.errors.items():
        W = weight_xw(original.get_submodule(n)).double()
        Wa = model.get_submodule(n).dense_matrix(torch.float64).detach()
        assert rel_out(X[n], W, Wa) == pytest.approx(err, rel=1e-4)
        assert err < rel_out(X[n], W, svd_truncated(W, res.ranks[n]))  # data-aware wins


def test_sequential_calibration_and_plain_svd_baseline(tok, sentences):
    one_pass = compress_model(bert(), tok, sentences, CompressionConfig(TARGETS, budget=0.25,
                                                                        heal=None),
                              progress=False)
    seq = compress_model(bert(), tok, sentences,
                         CompressionConfig(TARGETS, budget=0.25, sequential=True, heal=None),
                         progress=False)
    assert seq.ranks == one_pass.ranks and seq.ratio == one_pass.ratio <= 0.25
    for n, err in seq.errors.items():
        if ".layer.0." in n:  # block 0 sees the original inputs either way
            assert err == pytest.approx(one_pass.errors[n], rel=1e-6)  # up to the ridge
        else:                 # block 1 fits the teacher's outputs from compressed inputs
            assert err != pytest.approx(one_pass.errors[n], rel=1e-6)
    model = bert()
    plain = compress_model(model, tok, sentences,
                           CompressionConfig(TARGETS, budget=0.25, whiten=False, heal=None),
                           progress=False)
    assert plain.ranks == one_pass.ranks
    original = bert()
    batches = [batch_of(tok, sentences[i:i + 32]) for i in range(0, len(sentences), 32)]
    X = capture_inputs(original, batches, list(plain.ranks))
    for n, err in plain.errors.items():
        W = weight_xw(original.get_submodule(n)).double()
        s = torch.linalg.svdvals(W)
        r = plain.ranks[n]
        Wa = model.get_submodule(n).dense_matrix(torch.float64).detach()
        # the plain SVD of the weight; its reported error is the calibration output error
        assert model.get_submodule(n).measured_error(W) == pytest.approx(
            float(s[r:].norm() / s.norm()), rel=1e-4)
        assert err == pytest.approx(rel_out(X[n], W, Wa), rel=1e-4)
        assert err >= one_pass.errors[n] - 1e-9  # the data-aware truncation's is lower


def test_rank_for_fraction_is_the_largest_rank_within_the_fraction():
    for I, J, f in [(32, 32, 0.5), (32, 64, 0.25), (64, 32, 0.1), (384, 1536, 0.3), (8, 8, 0.01)]:
        r = rank_for_fraction(I, J, f)
        assert r >= 1
        assert r == 1 or r * (I + J) <= f * I * J
        assert (r + 1) * (I + J) > f * I * J


def test_greedy_allocation_keeps_the_budget(tok, sentences):
    model = bert()
    res = compress_model(model, tok, sentences,
                         CompressionConfig(TARGETS, budget=0.3, allocation="greedy", heal=None),
                         progress=False)
    assert 0 < res.ratio <= 0.3 and len(res.ranks) == 12
    assert all(r >= 1 for r in res.ranks.values())
    assert len(set(res.ranks.values())) > 1  # not the uniform ranks
    for n, r in res.ranks.items():
        assert model.get_submodule(n).bond_dims == (r,)


def test_compress_model_rolls_back_when_a_layer_fails(tok, sentences, monkeypatch):
    model = bert()
    batch = batch_of(tok, sentences[:4])
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    snap = snapshot(model)
    real, calls = WhitenedLayer.mpo, []

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(self, *a, **kw)

    monkeypatch.setattr("tnlm.compress.pipeline.WhitenedLayer.mpo", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        compress_model(model, tok, sentences, CompressionConfig(TARGETS, heal=None),
                       progress=False)
    assert len(calls) == 3
    assert_unchanged(model, snap, batch, out)


def test_compress_model_rolls_back_when_healing_diverges(tok, sentences):
    model = bert()
    model.train()
    batch = batch_of(tok, sentences[:4])
    with torch.no_grad():
        out = copy.deepcopy(model).eval()(**batch).last_hidden_state
    model.embeddings.word_embeddings.weight.requires_grad_(False)  # flags are restored too
    snap = snapshot(model)
    cfg = CompressionConfig(TARGETS, heal=HealConfig(steps=4, lr=1e30, warmup=1, batch_size=4))
    with pytest.raises(FloatingPointError, match="diverged at step 2"):
        compress_model(model, tok, sentences, cfg, progress=False)
    assert_unchanged(model, snap, batch, out)


def test_compress_model_heals_and_leaves_the_teacher_out(tok, sentences):
    model = bert()
    cfg = CompressionConfig(PARTIAL, budget=0.25,
                            heal=HealConfig(steps=2, batch_size=4, warmup=1))
    res = compress_model(model, tok, sentences, cfg, progress=False)
    assert res.heal is not None and res.heal.steps == 2 and len(res.heal.losses) == 2
    assert all(math.isfinite(v) for v in res.heal.losses)
    assert {"truncation", "healing"} <= res.seconds.keys()


def test_the_phases_seconds_do_not_overlap(tok, sentences):
    """"truncation" was timed from the start, like "sensitivity", so the summary's seconds
    counted the sensitivity probe twice and added up to more than the whole run."""
    import time

    cfg = CompressionConfig(PARTIAL, budget=0.5, allocation="sensitivity", probe_size=8,
                            heal=None)
    t0 = time.perf_counter()
    res = compress_model(bert(), tok, sentences, cfg, progress=False)
    wall = time.perf_counter() - t0
    assert {"sensitivity", "truncation"} <= res.seconds.keys()
    assert sum(res.seconds.values()) <= wall


@pytest.mark.parametrize("budget", [0, 0.0, 1.5, -0.1, True, "0.5", float("nan")])
def test_compression_config_rejects_bad_budgets(budget):
    with pytest.raises((ValueError, TypeError), match="budget"):
        CompressionConfig(TARGETS, budget=budget)


def test_compress_model_bad_input_leaves_the_model_alone(tok, sentences):
    model = bert()
    batch = batch_of(tok, sentences[:4])
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    snap = snapshot(model)
    cfg = CompressionConfig(TARGETS, heal=None)
    for empty in ([], ["", "  \n"]):
        with pytest.raises(ValueError, match="calibration must hold"):
            compress_model(model, tok, empty, cfg, progress=False)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        compress_model(model, tok, sentences, CompressionConfig(["nothing.here"], heal=None),
                       progress=False)
    with pytest.raises(ValueError, match="allocation"):
        CompressionConfig(TARGETS, allocation="best")
    wrapped = MPOModel(model, MPOConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="already an MPOModel"):
        compress_model(wrapped, tok, sentences, cfg, progress=False)
    assert_unchanged(model, snap, batch, out)


def test_layer_groups_follow_block_order():
    names = ["encoder.layer.10.output.dense", "pooler.dense", "encoder.layer.2.query",
             "encoder.layer.0.value", "encoder.layer.2.key", "encoder.layer.1.query"]
    assert layer_groups(names) == [["encoder.layer.0.value"], ["encoder.layer.1.query"],
                                   ["encoder.layer.2.query", "encoder.layer.2.key"],
                                   ["encoder.layer.10.output.dense"], ["pooler.dense"]]
    assert layer_groups([]) == []


def test_layer_groups_from_the_model_blocks_not_the_names():
    """With the model at hand a numbered module outside the block stack is not put in a
    block by its number (the name alone would put ``extra.0`` in block 0)."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, vocab_size=50))
    model.extra = torch.nn.ModuleList([torch.nn.Linear(16, 16)])
    names = ["extra.0", "encoder.layer.1.attention.self.query",
             "encoder.layer.0.output.dense"]
    assert layer_groups(names) == [["extra.0", "encoder.layer.0.output.dense"],
                                   ["encoder.layer.1.attention.self.query"]]
    assert layer_groups(names, model) == [["encoder.layer.0.output.dense"],
                                          ["encoder.layer.1.attention.self.query"],
                                          ["extra.0"]]
    # a model with no block stack: grouped by the names, as without a model
    assert layer_groups(names, torch.nn.Linear(2, 2)) == layer_groups(names)


# --------------------------------------------------------------------------- healing
@pytest.fixture(scope="module")
def damaged(tok, sentences):
    """(teacher, student): weights large enough that truncation hurts, rank-1 layers."""
    teacher = bert(initializer_range=0.3, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    student = compress_model(copy.deepcopy(teacher), tok, sentences,
                             CompressionConfig(TARGETS, budget=0.06, heal=None),
                             progress=False).model
    assert all(m.bond_dims == (1,) for _, m in student.mpo_modules())
    return teacher, student


def test_heal_reduces_the_distillation_loss(tok, sentences, damaged):
    teacher, student = copy.deepcopy(damaged[0]), copy.deepcopy(damaged[1])
    cfg = HealConfig(steps=20, lr=1e-2, warmup=1, batch_size=16)
    batch = batch_of(tok, sentences[:16])
    with torch.no_grad():
        before = float(distill._loss(student.eval(), teacher, batch, cfg))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    res = heal(student, teacher, tok, sentences, cfg, progress=False)
    with torch.no_grad():
        after = float(distill._loss(student, teacher, batch, cfg))
    assert not student.training
    assert res.steps == 20 and len(res.losses) == 20 and res.resumed_from == 0
    assert after < 0.97 * before
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_heal_auxiliary_leaves_central_cores_alone(tok, sentences, damaged):
    teacher, student = copy.deepcopy(damaged[0]), copy.deepcopy(damaged[1])
    mods = list(student.mpo_modules())
    central = {n: m.cores[m.central_index].detach().clone() for n, m in mods}
    aux = {n: [c.detach().clone() for c in m.auxiliary_parameters()] for n, m in mods}
    res = heal(student, teacher, tok, sentences,
               HealConfig(steps=3, lr=1e-2, warmup=1, batch_size=8,
                          train="cores-central"),
               progress=False)
    assert res.trained_params > 0
    for n, m in mods:
        assert torch.equal(m.cores[m.central_index], central[n]), n
        assert not m.cores[m.central_index].requires_grad
    assert any(not torch.equal(a, b) for n, m in mods
               for a, b in zip(m.auxiliary_parameters(), aux[n]))


def test_heal_resumes_exactly_from_a_checkpoint(tok, sentences, tmp_path, monkeypatch):
    # default dropout: the resumed run must not depend on the process's RNG state
    teacher = bert()
    student = compress_model(copy.deepcopy(teacher), tok, sentences,
                             CompressionConfig(TARGETS, budget=0.25, heal=None),
                             progress=False).model
    assert student.config.hidden_dropout_prob > 0

    def cfg(d):
        return HealConfig(steps=6, lr=1e-2, warmup=2, batch_size=8, checkpoint_dir=str(d),
                          checkpoint_every=3)

    torch.manual_seed(123)
    whole = copy.deepcopy(student)
    res_whole = heal(whole, teacher, tok, sentences, cfg(tmp_path / "a"), progress=False)

    class Preempted(Exception):
        pass

    real, calls = distill._loss, []

    def preempt(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise Preempted
        return real(*a, **kw)

    monkeypatch.setattr(distill, "_loss", preempt)
    torch.manual_seed(7)
    with pytest.raises(Preempted):
        heal(copy.deepcopy(student), teacher, tok, sentences, cfg(tmp_path / "b"),
             progress=False)
    monkeypatch.setattr(distill, "_loss", real)
    assert '"step": 3' in (tmp_path / "b" / "heal_state.json").read_text()
    torch.manual_seed(99)
    resumed = copy.deepcopy(student)  # a new process: fresh student, state from disk
    res = heal(resumed, teacher, tok, sentences, cfg(tmp_path / "b"), progress=False)
    assert res.resumed_from == 3 and res.steps == 6 and len(res.losses) == 6
    assert res.losses == pytest.approx(res_whole.losses, rel=1e-6, abs=1e-7)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], v) for k, v in student.state_dict().items())



def test_compress_model_refuses_a_healing_state_of_another_run_before_any_work(
        tok, sentences, tmp_path, monkeypatch):
    """``compress_model(..., heal=HealConfig(checkpoint_dir=d))`` with a state in ``d`` made
    at another budget, or with ``d`` a file: refused only at healing, after the
    truncation and reconstruction (and, for a file, at the first checkpoint save). Both
    are now refused before the first calibration pass."""
    from tnlm.compress import pipeline

    d = tmp_path / "state"

    def cfg(budget):
        return CompressionConfig(TARGETS, budget=budget, reconstruct_steps=0,
                                 heal=HealConfig(steps=2, batch_size=4, warmup=1,
                                                 checkpoint_dir=str(d)))

    compress_model(bert(), tok, sentences, cfg(0.5), progress=False)
    assert (d / "heal_state.json").is_file()
    calls = []
    monkeypatch.setattr(pipeline, "collect_input_stats",
                        lambda *a, **kw: calls.append(1) or {})
    with pytest.raises(ValueError, match=r"other settings \(context\.budget: 0\.5 there, "
                                         r"0\.25 now\)"):
        compress_model(bert(), tok, sentences, cfg(0.25), progress=False)
    # the tokenization that built the student is part of the run (it was not recorded:
    # a state of 64-token calibration resumed on a student of 32-token calibration)
    with pytest.raises(ValueError, match=r"context\.max_length: None there, 32 now"):
        compress_model(bert(), tok, sentences, cfg(0.5), max_length=32, progress=False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"checkpoint_dir .*file is a file"):
        compress_model(bert(), tok, sentences, CompressionConfig(
            TARGETS, budget=0.5, heal=HealConfig(steps=2, checkpoint_dir=str(f))),
            progress=False)
    assert calls == []


def test_the_seed_reaches_block_reconstruction(tok, sentences):
    """``reconstruct_blocks`` drew its batches with seed 0 whatever the job's seed: seeds 0
    and 1 of ``tnlm compress`` reconstructed alike. ``CompressionConfig.seed`` (the job's
    seed) now orders them."""
    def run(seed):
        torch.manual_seed(0)
        cfg = CompressionConfig(TARGETS, budget=0.5, reconstruct_steps=3,
                                reconstruct_size=len(sentences), heal=None, seed=seed)
        res = compress_model(bert(), tok, sentences, cfg, batch_size=4, progress=False)
        return res.block_errors

    assert run(0) == run(0)
    assert run(0) != run(1)
    with pytest.raises(ValueError, match="seed"):
        CompressionConfig(TARGETS, seed=-1)

def test_heal_rejects_another_architecture(tok, sentences, damaged):
    with pytest.raises(ValueError, match="hidden_size.*same architecture"):
        heal(copy.deepcopy(damaged[1]), bert(hidden=48), tok, sentences,
             HealConfig(steps=1), progress=False)


def _spy_loss(monkeypatch, nan_at=None):
    """Record the student's state before every step; optionally a NaN loss at step nan_at."""
    real, states = distill._loss, []

    def spy(student, teacher, batch, cfg, positions=()):
        states.append({k: v.detach().clone() for k, v in student.state_dict().items()})
        loss = real(student, teacher, batch, cfg, positions)
        return loss * float("nan") if len(states) == nan_at else loss

    monkeypatch.setattr(distill, "_loss", spy)
    return states


@pytest.mark.parametrize("how", ["lr", "nan"])
def test_heal_divergence_restores_the_last_finite_state(tok, sentences, damaged, monkeypatch,
                                                        how):
    teacher, student = copy.deepcopy(damaged[0]), copy.deepcopy(damaged[1])
    states = _spy_loss(monkeypatch, nan_at=3 if how == "nan" else None)
    cfg = HealConfig(steps=5, lr=1e30 if how == "lr" else 1e-2, warmup=1, batch_size=4)
    with pytest.raises(FloatingPointError, match="diverged at step") as err:
        heal(student, teacher, tok, sentences, cfg, progress=False)
    k = len(states)
    assert k >= 2 and f"step {k}" in str(err.value) and f"restored to step {k - 1}" in str(err.value)
    last_good = states[-1]
    assert any(not torch.equal(v, states[0][key]) for key, v in last_good.items())
    for key, v in student.state_dict().items():
        assert torch.equal(v, last_good[key]), key
    assert not student.training


def test_heal_bad_input(tok, sentences, damaged):
    teacher, student = damaged
    for empty in ([], ["", "   "]):
        with pytest.raises(ValueError, match="sentences must hold"):
            heal(student, teacher, tok, empty, HealConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="transformers models"):
        heal(torch.nn.Linear(2, 2), teacher, tok, sentences, progress=False)


@pytest.mark.parametrize("kw, name", [
    (dict(steps=-1), "steps"), (dict(steps=2.5), "steps"), (dict(steps=True), "steps"),
    (dict(batch_size=0), "batch_size"), (dict(checkpoint_every=0), "checkpoint_every"),
    (dict(lr=float("nan")), "lr"), (dict(lr=-1e-3), "lr"), (dict(max_grad_norm=float("inf")),
                                                               "max_grad_norm"),
    (dict(train="x"), "train"), (dict(bucket=-1), "bucket"), (dict(bucket=2.0), "bucket"),
    (dict(teacher_bf16=1), "teacher_bf16"), (dict(student_bf16="yes"), "student_bf16"),
    (dict(term="twins"), "term"),
])
def test_heal_config_rejects_bad_values(kw, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        HealConfig(**kw)


def test_length_bucketed_draws_pad_less_and_draw_every_sentence_alike():
    rng = random.Random(0)
    lengths = [rng.randrange(4, 64) for _ in range(2000)]
    draws = distill.length_bucketed_draws(lengths, 32, 3000, 4, random.Random(1))
    assert len(draws) == 3000 and all(len(b) == 32 for b in draws)
    assert draws == distill.length_bucketed_draws(lengths, 32, 3000, 4, random.Random(1))

    def fill(batches):  # real tokens / padded tokens
        return sum(sum(lengths[i] for i in b) for b in batches) / sum(
            32 * max(lengths[i] for i in b) for b in batches)

    uniform = [[rng.randrange(2000) for _ in range(32)] for _ in range(3000)]
    assert fill(uniform) < 0.6 < 0.9 < fill(draws)
    counts = torch.bincount(torch.tensor([i for b in draws for i in b]), minlength=2000)
    assert int((counts == 0).sum()) < 20  # 48 draws per sentence on average
    assert abs(float(counts.float().mean()) - 48) < 1e-9 and float(counts.float().std()) < 10
    with pytest.raises(ValueError, match="lengths"):
        distill.length_bucketed_draws([], 32, 1, 4, random.Random(0))


def test_heal_train_cores_linears_trains_dense_linears_and_bf16_teacher_stays_close(
        tok, sentences, damaged):
    teacher = damaged[0]
    student = compress_model(copy.deepcopy(teacher), tok, sentences,
                             CompressionConfig(PARTIAL, budget=0.3, heal=None),
                             progress=False).model
    dense = student.base_model.encoder.layer[0].attention.self.key  # left dense
    before = dense.weight.detach().clone()
    res = heal(student, teacher, tok, sentences,
               HealConfig(steps=3, lr=1e-2, warmup=1, batch_size=8,
                          train="cores+linears"),
               progress=False)
    res_cores = heal(copy.deepcopy(student), teacher, tok, sentences,
                     HealConfig(steps=1, batch_size=8), progress=False)
    assert res.trained_params > res_cores.trained_params
    assert not torch.equal(dense.weight, before)
    batch = batch_of(tok, sentences[:16])
    with torch.no_grad():
        exact = float(distill._loss(student, teacher, batch, HealConfig()))
        half = float(distill._loss(student, teacher, batch, HealConfig(teacher_bf16=True)))
        both = float(distill._loss(student, teacher, batch,
                                   HealConfig(teacher_bf16=True, student_bf16=True)))
    assert math.isfinite(half) and abs(half - exact) < 0.05 * exact + 1e-3
    assert math.isfinite(both) and abs(both - exact) < 0.05 * exact + 1e-3
    assert HealConfig(teacher_bf16=None).teacher_bf16 is distill.fast_bf16()  # auto


# --------------------------------------------------------------------------- text
def test_split_sentences():
    sents = [f"sentence {i}." for i in range(20)] + ["sentence 3.", "sentence 4."]
    parts = split_sentences(sents, [3, 5, -1], seed=1)
    assert [len(p) for p in parts] == [3, 5, 12]
    flat = [s for p in parts for s in p]
    assert len(flat) == len(set(flat)) == 20 and set(flat) == set(sents)
    assert split_sentences(sents, [3, 5, -1], seed=1) == parts
    assert split_sentences(sents, [3, 5, -1], seed=2) != parts
    assert [len(p) for p in split_sentences(sents, [20])] == [20]
    with pytest.raises(ValueError, match="need 21 distinct sentences, got 20"):
        split_sentences(sents, [15, 6])


def test_read_sentences(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("First line.\n\n   \n  Second line.  \nThird.\n")
    assert read_sentences(p) == ["First line.", "Second line.", "Third."]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence\tlabel\na good film .\t1\na bad film .\t0\n\t1\n")
    assert read_sentences(tsv, column=0) == ["sentence", "a good film .", "a bad film ."]
    assert read_sentences(tsv, column=1) == ["label", "1", "0", "1"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_sentences(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError):
        read_sentences(tmp_path)  # a folder is not a text file
    empty = tmp_path / "empty.txt"
    for text in ("", "\n \n\t\n"):
        empty.write_text(text)
        with pytest.raises(ValueError, match="holds no sentences"):
            read_sentences(empty)
    with pytest.raises(ValueError, match="column"):
        read_sentences(tsv, column=2)


def test_docstring_sentences_are_plain_sentences():
    sents = docstring_sentences(max_files=50)
    assert len(sents) > 10 and len(set(sents)) == len(sents)
    for s in sents:
        words = s.split()
        assert s.endswith(".") and s[0].isupper() and 5 <= len(words) <= 40, s
        assert not set(s) & set("`()[]{}=_/\\*<>#|\"0123456789"), s
        assert s == " ".join(words)
    assert docstring_sentences(max_files=50) == sents  # deterministic for a seed


def test_reconstruct_blocks_lowers_block_errors_and_touches_only_blocks(tok, sentences):
    from tnlm.compress.reconstruct import reconstruct_blocks
    from tnlm.integration.architectures import find_blocks

    model = bert(seed=11)
    teacher = copy.deepcopy(model).eval()
    compress_model(model, tok, sentences[:24], CompressionConfig(TARGETS, budget=0.1, heal=None),
                   progress=False)
    emb_before = {k: v.clone() for k, v in model.state_dict().items() if "embeddings" in k}
    errs = reconstruct_blocks(model, teacher, tok, sentences[24:], 30, lr=3e-3)
    assert len(errs) == len(find_blocks(model)) == 2
    assert all(after < before for before, after in errs)  # every block fits its target better
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in emb_before.items())
    with pytest.raises(ValueError, match="sentences"):
        reconstruct_blocks(model, teacher, tok, [], 1)


def test_compress_model_with_reconstruction_and_sensitivity(tok, sentences):
    model = bert(seed=12)
    cfg = CompressionConfig(TARGETS, budget=0.5, allocation="sensitivity", probe_size=8,
                            reconstruct_steps=5, heal=None)
    res = compress_model(model, tok, sentences[:24], cfg, heal_text=sentences[24:],
                         progress=False)
    assert res.ratio <= 0.5 and len(res.block_errors) == 2
    dense = [n for n, r in res.ranks.items() if r is None]
    for n in dense:  # a layer the allocation keeps dense is the original nn.Linear
        assert isinstance(model.get_submodule(n), torch.nn.Linear)


def test_generated_sentences_are_distinct_deterministic_and_varied():
    from tnlm.compress.text import generated_sentences

    a = generated_sentences(2000, seed=3)
    assert len(a) == len(set(a)) == 2000
    assert a == generated_sentences(2000, seed=3) and a != generated_sentences(2000, seed=4)
    assert all(s.strip() == s and len(s.split()) >= 2 for s in a)
    words = {w.lower().strip(".,!?") for s in a for w in s.split()}
    assert len(words) > 400  # a lexicon, not a handful of templates
    assert any(s.endswith("?") for s in a) and any(s[0].islower() for s in a)
    assert any(" is being " in s for s in a)  # the captions' passive voice is in the mix


# ------------------------------------------- healing terms of experiments/heal_terms.py
def test_nearest_neighbours_is_the_most_similar_other_sentence(tok, sentences, damaged):
    teacher = damaged[0]
    near = ht.nearest_neighbours(teacher, tok, sentences, chunk=7)
    assert len(near) == len(sentences) and all(j != i for i, j in enumerate(near))
    with torch.no_grad():
        b = batch_of(tok, sentences)
        e = torch.nn.functional.normalize(
            distill.mean_pool(teacher(**b).last_hidden_state, b["attention_mask"]), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    assert near == sim.argmax(1).tolist()


def test_heal_with_neighbour_pairs_and_relational_loss(tok, sentences, damaged, monkeypatch):
    teacher, student = copy.deepcopy(damaged[0]), copy.deepcopy(damaged[1])
    seen = []
    real = distill._loss
    monkeypatch.setattr(distill, "_loss", lambda s, t, batch, cfg, positions=(): (
        seen.append(batch["input_ids"].shape[0]), real(s, t, batch, cfg, positions))[1])
    near = ht.nearest_neighbours(teacher, tok, sentences)
    calls = []
    monkeypatch.setattr(ht, "nearest_neighbours", lambda *a, **k: calls.append(1) or near)
    groups = []
    monkeypatch.setattr(distill, "rank_share", lambda draw, rank, world, group=1: (
        groups.append(group), list(draw))[1])
    term = ht.RelationalTerm(10.0, neighbours=True)
    rows, prepare = [], term.prepare

    def drawn(*a):
        rows.extend(prepare(*a))
        return rows

    monkeypatch.setattr(term, "prepare", drawn)
    cfg = HealConfig(steps=5, lr=1e-2, warmup=1, batch_size=8, term=term)
    res = heal(student, teacher, tok, sentences, cfg, progress=False)
    assert calls == [1] and seen == [8] * 5 and all(math.isfinite(v) for v in res.losses)
    assert groups == [2] * 5  # a rank takes whole pairs
    assert len(rows) == 5 and all(len(r) == 8 and r[1::2] == [near[i] for i in r[::2]]
                                  for r in rows)  # every anchor is followed by its neighbour
    b = batch_of(tok, sentences[:8])
    with torch.no_grad():
        plain = float(real(student, teacher, b, HealConfig()))
        rel = float(real(student, teacher, b, HealConfig(term=ht.RelationalTerm(10.0))))
    assert rel > plain  # the relational term adds a positive amount for a damaged student
    with pytest.raises(ValueError, match="^w_rel must"):
        ht.RelationalTerm(-1.0)


def test_swap_words_replaces_a_share_of_the_lower_case_words(tok):
    words = ht.vocabulary_words(tok)
    assert words == sorted(words) and all(w.isalpha() and w.islower() for w in words)
    s = "The cat sat on the mat near the old red door ."
    a = ht.swap_words(s, ["zz"], 0.3, random.Random(0))
    assert a == ht.swap_words(s, ["zz"], 0.3, random.Random(0))  # deterministic for a seed
    assert len(a.split()) == len(s.split()) and a.split()[0] == "The" and a.endswith(" .")
    assert sum(x != y for x, y in zip(a.split(), s.split())) == 3  # 30 % of 10, rounded
    assert ht.swap_words("Hello World .", ["zz"], 0.5, random.Random(0)) == "Hello World ."
    assert ht.swap_words("a b", ["zz"], 0.01, random.Random(0)).count("zz") == 1  # at least one


def test_heal_with_word_swapped_twins(tok, sentences, damaged, monkeypatch):
    teacher, student = copy.deepcopy(damaged[0]), copy.deepcopy(damaged[1])
    seen, real = [], distill._loss
    tok_call = tok.__class__.__call__

    def spy(s, t, batch, cfg, positions=()):
        seen.append((batch["input_ids"].shape[0], sum(p < 6 for p in positions) // 2))
        return real(s, t, batch, cfg, positions)

    texts = []
    monkeypatch.setattr(distill, "_loss", spy)
    monkeypatch.setattr(tok.__class__, "__call__",
                        lambda self, x, **kw: texts.append(list(x)) or tok_call(self, x, **kw))
    cfg = HealConfig(steps=3, lr=1e-2, warmup=1, batch_size=8, term=ht.TwinTerm(3))
    res = heal(student, teacher, tok, sentences, cfg, progress=False)
    monkeypatch.undo()
    assert seen == [(8, 3)] * 3 and all(math.isfinite(v) for v in res.losses)
    batches = [t for t in texts if len(t) == 8]
    assert len(batches) == 3
    for b in batches:
        assert all(b[2 * k] in sentences for k in range(3))
        assert all(b[2 * k + 1] != b[2 * k] for k in range(3))  # a twin differs by words
        assert all(len(b[2 * k + 1].split()) == len(b[2 * k].split()) for k in range(3))
    batch = batch_of(tok, [t for k in range(3) for t in batches[0][2 * k:2 * k + 2]])
    with torch.no_grad():
        plain = float(real(student, teacher, batch, cfg))  # no positions: no pairs
        twin = float(real(student, teacher, batch, cfg, range(6)))
    assert twin >= plain and twin - plain < cfg.term.w_twin * 4  # a squared cosine gap, >= 0
    with pytest.raises(ValueError, match="^twins must"):
        heal(student, teacher, tok, sentences,
             HealConfig(steps=1, batch_size=8, term=ht.TwinTerm(5)), progress=False)
    with pytest.raises(ValueError, match="^twins must"):
        ht.TwinTerm(0)
    with pytest.raises(ValueError, match="^twin_words must"):
        ht.TwinTerm(2, twin_words=0)


def test_rank_share_keeps_pairs_together_and_covers_the_draw():
    draw = list(range(10))
    parts = [distill.rank_share(draw, r, 2, group=2) for r in range(2)]
    assert parts == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7]]
    assert distill.rank_share(draw, 0, 1, group=2) == draw
    assert distill.rank_share(draw, 1, 3) == [1, 4, 7]
    assert distill.rank_share([5, 6], 3, 4, group=2) == [5, 6]  # an idle rank takes a pair
    with pytest.raises(ValueError, match="batch_size must be even"):
        ht.RelationalTerm(1.0, neighbours=True).prepare(
            None, None, ["a", "b"], HealConfig(batch_size=7), random.Random(0))


def test_nearest_neighbours_works_on_a_model_with_a_head(tok, sentences):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    clf = BertForSequenceClassification(bert().config).eval()
    assert ht.nearest_neighbours(clf, tok, sentences) == \
        ht.nearest_neighbours(clf.bert, tok, sentences)


def _attention_kl_from_the_models(student, teacher, batch):
    """The qk term from the attention probabilities the models report (eager attention)."""
    probs = []
    for m in (teacher, student):
        base = getattr(m, "base_model", m)
        old = base.config._attn_implementation
        base.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                probs.append(m(**batch, output_attentions=True).attentions)
        finally:
            base.set_attn_implementation(old)
    keep = batch["attention_mask"].bool()
    kls = []
    for pt, ps in zip(*probs):
        kl = (pt * (pt.clamp_min(1e-30).log() - ps.clamp_min(1e-30).log())).sum(-1)
        kls.append(kl[keep[:, None, :].expand_as(kl)].mean())
    return float(torch.stack(kls).mean())


def test_attention_relation_term_is_the_kl_of_the_models_attention(tok, sentences, damaged):
    teacher, student = damaged
    assert len(ht.attention_projections(teacher)) == 2
    assert len(ht.attention_projections(student)) == 2  # MPO layers found alike
    batch = batch_of(tok, sentences[:6])  # unequal lengths: padding is masked
    cfg0 = HealConfig(teacher_bf16=False)
    cfg = HealConfig(teacher_bf16=False, term=ht.AttentionTerm(1.0))
    with torch.no_grad():
        term = float(distill._loss(student, teacher, batch, cfg)
                     - distill._loss(student, teacher, batch, cfg0))
        same = float(distill._loss(teacher, teacher, batch, cfg))
    assert term > 1e-3
    assert term == pytest.approx(_attention_kl_from_the_models(student, teacher, batch),
                                 rel=1e-4, abs=1e-6)
    assert same == pytest.approx(0.0, abs=1e-6)
    # hooks are gone after the loss: a later forward records nothing
    assert all(not m._forward_hooks for qkv in ht.attention_projections(student)
               for m in qkv)


def test_relation_kl_ignores_padding_and_checks_the_width():
    torch.manual_seed(0)
    a_s, b_s, a_t, b_t = (torch.randn(1, 5, 8) for _ in range(4))
    one = ht.relation_kl(a_s, b_s, a_t, b_t, 2, torch.ones(1, 5))
    pad = [torch.cat([x, torch.randn(1, 3, 8)], 1) for x in (a_s, b_s, a_t, b_t)]
    mask = torch.tensor([[1.0] * 5 + [0.0] * 3])
    assert float(ht.relation_kl(*pad, 2, mask)) == pytest.approx(float(one), rel=1e-5)
    assert float(ht.relation_kl(a_t, b_t, a_t, b_t, 2, torch.ones(1, 5))) == 0.0
    with pytest.raises(ValueError, match="heads=3"):
        ht.relation_kl(a_s, b_s, a_t, b_t, 3, torch.ones(1, 5))


def test_heal_with_attention_relations_lowers_them(tok, sentences, damaged):
    teacher = damaged[0]
    student = compress_model(copy.deepcopy(teacher), tok, sentences,
                             CompressionConfig(TARGETS, budget=0.3, heal=None),
                             progress=False).model
    cfg = HealConfig(steps=20, lr=1e-2, warmup=1, batch_size=16, w_hidden=0.0, w_cos=0.0,
                     term=ht.AttentionTerm(1.0, ("qk", "vv")), teacher_bf16=False)
    batch = batch_of(tok, sentences[:16])
    only = HealConfig(w_hidden=0.0, w_cos=0.0, term=ht.AttentionTerm(1.0, ("qk", "vv")),
                      teacher_bf16=False)
    with torch.no_grad():
        before = float(distill._loss(student.eval(), teacher, batch, only))
    res = heal(student, teacher, tok, sentences, cfg, progress=False)
    with torch.no_grad():
        after = float(distill._loss(student, teacher, batch, only))
    assert all(math.isfinite(v) for v in res.losses) and after < 0.8 * before, (before, after)
    for bad in ((), ("qq",), "qk"):
        with pytest.raises(ValueError, match="^relations must"):
            ht.AttentionTerm(1.0, bad)
    with pytest.raises(ValueError, match="^w_attn must"):
        ht.AttentionTerm(-1.0)
    with pytest.raises(ValueError, match="query, key and value"):
        distill._loss(torch.nn.Identity(), teacher, batch, cfg)
    assert all(not m._forward_hooks for qkv in ht.attention_projections(teacher)
               for m in qkv)  # the teacher's hooks were removed too


def test_attention_relations_cover_every_call_of_a_shared_albert_layer():
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=64, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    teacher = AlbertModel(cfg).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    blocks = ht.attention_projections(teacher)
    assert len(blocks) == 1  # one shared layer ...
    rec = ht.Recorder(teacher)
    ids = torch.randint(5, 60, (2, 7))
    with torch.no_grad():
        teacher(input_ids=ids)
    rec.remove()
    assert len(rec.qkv()) == 3  # ... called by each of the 3 layers
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        term = float(distill._loss(student, teacher, batch,
                                   HealConfig(term=ht.AttentionTerm(1.0), teacher_bf16=False))
                     - distill._loss(student, teacher, batch, HealConfig(teacher_bf16=False)))
    assert term == pytest.approx(_attention_kl_from_the_models(student, teacher, batch),
                                 rel=1e-4, abs=1e-6)


def test_heal_settings_record_the_term():
    teacher = bert(seed=3)
    plain = heal_state.heal_settings(HealConfig(), ["a b ."], teacher)
    twins = heal_state.heal_settings(HealConfig(term=ht.TwinTerm(2)), ["a b ."], teacher)
    assert plain["term"] is None
    assert twins["term"] == {"name": "TwinTerm", "twins": 2, "twin_words": 0.15, "w_twin": 10.0}
    assert {k: v for k, v in twins.items() if k != "term"} == \
        {k: v for k, v in plain.items() if k != "term"}


def test_a_numpy_seed_is_a_seed_throughout(tok, sentences):
    """``CompressionConfig(seed=np.int64(1))`` passed the check and reached
    ``random.Random`` (TypeError after the truncation) and the healing state's JSON; it is
    kept as a Python int, and the greedy allocation's time is counted (it was in no
    phase once "truncation" no longer started at the beginning)."""
    import numpy as np

    cfg = CompressionConfig(TARGETS, budget=0.5, allocation="greedy", reconstruct_steps=1,
                            reconstruct_size=8, heal=None, seed=np.int64(1))
    assert type(cfg.seed) is int
    res = compress_model(bert(), tok, sentences, cfg, batch_size=4, progress=False)
    assert {"allocation", "truncation", "reconstruction"} <= res.seconds.keys()
