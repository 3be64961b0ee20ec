"""Gauge-fixed low-rank bonds: tnlm.core.pivot, PivotedLinear, their checkpoints and the
pivoted causal-LM job (exactness, counts, save/reload, merge, training sets, bad input)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.common import (
    TEXT,
    decaying_pivoted_layer,
    make_bert_tokenizer,
    make_causal_lm,
    make_word_tokenizer,
    short_sentences,
)
from tnlm.bridge import MPOLinear, select_parameters
from tnlm.bridge.pivoted import PivotedLinear, is_low_rank_pair, pivot_layers
from tnlm.compress.allocate import rank_for_fraction, spectrum_ranks
from tnlm.core.mpo import MPO
from tnlm.core.pivot import (
    pivot_low_rank,
    pivoted_params,
    pivoted_rank_for_fraction,
)
from tnlm.integration import MPOConfig, MPOModel

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("I,J,r", [(40, 30, 12), (30, 40, 12), (24, 24, 24), (9, 50, 9),
                                   (50, 9, 9), (64, 64, 1)])
def test_pivoted_factors_rebuild_the_product_in_fewer_numbers(I, J, r):
    g = torch.Generator().manual_seed(I * J + r)
    A, B = torch.randn(I, r, generator=g), torch.randn(r, J, generator=g)
    f = pivot_low_rank(A, B)
    W = A.double() @ B.double()
    assert f.rank == r
    assert float((f.matrix() - W).norm() / W.norm()) < 1e-12
    assert f.n_params == pivoted_params(I, J, r) == r * (I + J - r) <= I * J
    assert torch.equal(torch.sort(torch.cat([f.pivots, f.rest])).values, torch.arange(I))
    # pivoting on an orthonormal basis keeps the coefficients small (a bad pivot choice,
    # e.g. the first r rows of a rotated basis, gives entries in the hundreds)
    assert f.coef.numel() == 0 or float(f.coef.abs().max()) < 10


def test_a_lower_numerical_rank_is_stored_at_that_rank():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(30, 8, generator=g), torch.randn(8, 20, generator=g)
    A[:, 5:] = 0
    f = pivot_low_rank(A, B)
    assert f.rank == 5
    assert float((f.matrix() - A.double() @ B.double()).abs().max()) < 1e-12
    zero = pivot_low_rank(torch.zeros(6, 3), torch.randn(3, 4))
    assert zero.rank == 1 and float(zero.matrix().abs().max()) == 0.0


def test_pivot_low_rank_refuses_shapes_that_do_not_chain():
    with pytest.raises(ValueError, match="must chain"):
        pivot_low_rank(torch.randn(5, 3), torch.randn(4, 6))
    with pytest.raises(ValueError, match="exceeds min"):
        pivot_low_rank(torch.randn(5, 6), torch.randn(6, 8))


@pytest.mark.parametrize("I,J", [(576, 576), (576, 1536), (192, 576), (7, 3)])
@pytest.mark.parametrize("f", [0.05, 0.3, 0.5, 0.6, 0.8, 0.99, 1.0])
def test_pivoted_rank_for_fraction_is_the_largest_rank_within_the_budget(I, J, f):
    r = pivoted_rank_for_fraction(I, J, f)
    ok = [k for k in range(1, min(I, J) + 1) if pivoted_params(I, J, k) <= f * I * J]
    assert r == (max(ok) if ok else 1)
    assert r >= rank_for_fraction(I, J, f)  # the gauge-fixed bond never keeps less


def test_the_gauge_fixed_rank_at_60_and_80_percent_of_a_square_matrix():
    assert (pivoted_rank_for_fraction(576, 576, 0.6), rank_for_fraction(576, 576, 0.6)) == (211, 172)
    assert (pivoted_rank_for_fraction(576, 576, 0.8), rank_for_fraction(576, 576, 0.8)) == (318, 230)


def test_spectrum_ranks_pivoted_spends_at_most_the_budget_at_gauge_fixed_cost():
    rng = torch.Generator().manual_seed(3)
    spectra = {}
    for n, (i, j) in {"a": (48, 48), "b": (48, 96), "c": (96, 48)}.items():
        s = torch.sort(torch.rand(min(i, j), generator=rng), descending=True).values.numpy()
        tail = (s[::-1] ** 2).cumsum()[::-1]
        spectra[n] = (i, j, list(tail) + [0.0])
    total = sum(i * j for i, j, _ in spectra.values())
    for f in (0.3, 0.6, 0.8):
        plain = spectrum_ranks(spectra, f)
        piv = spectrum_ranks(spectra, f, pivoted=True)
        spent = sum(i * j if piv[n] is None else pivoted_params(i, j, piv[n])
                    for n, (i, j, _) in spectra.items())
        assert spent <= f * total

        def error(ranks):  # the objective: summed relative tails
            return sum(0.0 if ranks[n] is None else t[ranks[n]] / t[0]
                       for n, (_, _, t) in spectra.items())

        assert error(piv) < error(plain)  # the same budget buys more rank


def _low_rank_layer(kind, I=40, J=30, r=12, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(I, J) if kind == "linear" else Conv1D(J, I)
    W = (dense.weight.detach().T if kind == "linear" else dense.weight.detach()).double()
    mpo = MPO.from_matrix(W, (I, 1), (1, J), max_bond=[r])
    return MPOLinear.from_mpo(mpo, dense.bias, "auto", dtype=torch.float32, kind=kind)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_pivoted_linear_computes_the_mpo_layer_and_merges_back(kind):
    layer = _low_rank_layer(kind)
    assert is_low_rank_pair(layer)
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1))
    piv = PivotedLinear.from_mpo(layer)
    with torch.no_grad():
        y, y_piv = layer(x), piv(x)
        torch.testing.assert_close(y_piv, y, rtol=1e-5, atol=1e-5)
        dense = piv.merge()
        assert type(dense) is (nn.Linear if kind == "linear" else Conv1D)
        torch.testing.assert_close(dense(x), y, rtol=1e-5, atol=1e-5)
        # (out, in) for every kind, as MPOLinear's; a Conv1D stores (in, out)
        expected = dense.weight if kind == "linear" else dense.weight.T
        torch.testing.assert_close(torch.Tensor(piv.weight), expected.detach(), rtol=1e-6,
                                   atol=1e-6)
    assert piv.n_params == 12 * (40 + 30 - 12) < sum(c.numel() for c in layer.cores)
    piv(x).square().sum().backward()
    assert piv.coef.grad is not None and piv.right.grad is not None
    assert float(piv.coef.grad.abs().sum()) > 0


def test_pivoted_linear_refuses_other_layouts_and_bad_indices():
    three = MPOLinear.from_mpo(MPO.from_matrix(torch.randn(8, 12).double(), (2, 4), (3, 4)),
                               None, "auto")
    assert not is_low_rank_pair(three)
    with pytest.raises(TypeError, match=r"2-site low-rank MPOLinear.*cores"):
        PivotedLinear.from_mpo(three)
    with pytest.raises(TypeError, match="Linear"):
        PivotedLinear.from_mpo(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="split range"):
        PivotedLinear(torch.tensor([0, 1]), torch.tensor([1, 3]), torch.zeros(2, 2),
                      torch.zeros(2, 5))
    with pytest.raises(ValueError, match="coef must be"):
        PivotedLinear(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.zeros(3, 2),
                      torch.zeros(2, 5))
    with pytest.raises(ValueError, match="names must be"):
        pivot_layers(nn.Sequential(nn.Linear(3, 3)), ["0"])


def test_pivot_layers_keeps_a_shared_layer_shared():
    layer = _low_rank_layer("linear")
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(30, 40), layer)
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x)
    out = pivot_layers(model)
    assert set(out) == {"0", "3"} and model[0] is model[3]
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_training_sets_count_the_pivoted_tensors_as_central():
    model = nn.Sequential(_low_rank_layer("linear"), nn.LayerNorm(30))
    pivot_layers(model)
    piv = model[0]

    def chosen(train):
        return {id(p) for _, p in select_parameters(model, train)}

    for train in ("cores", "cores+linears", "all"):
        assert {id(piv.coef), id(piv.right), id(piv.bias)} <= chosen(train)
    for train in ("cores-central", "auxiliary", "lightweight"):
        assert not {id(piv.coef), id(piv.right)} & chosen(train)
    assert id(piv.bias) in chosen("cores-central")


def _pivoted_llama(budget=0.6):
    from tnlm.compress.layerwise import LayerwiseConfig, compress_layerwise

    model = make_causal_lm("llama")
    tok = make_word_tokenizer()
    ids = tok(" ".join([TEXT] * 4), return_tensors="pt")["input_ids"][:, :128].reshape(8, 16)
    cfg = LayerwiseConfig(LLAMA_TARGETS, budget=budget, fit_steps=2, pivoted=True,
                          allocation="spectrum")
    lw = compress_layerwise(model, ids, cfg, progress=False)
    return model, tok, ids, lw


def test_the_layerwise_count_is_what_the_pivoted_layers_store():
    from tnlm.compress.layerwise import LayerwiseConfig, compress_layerwise

    model, _, ids, lw = _pivoted_llama()
    assert lw.ratio <= 0.6
    converted = pivot_layers(model, [n for n, r in lw.ranks.items() if r is not None])
    assert converted and all(m.rank == lw.ranks[n] for n, m in converted.items())
    dense_kept = sum(model.get_submodule(n).weight.numel() for n, r in lw.ranks.items()
                     if r is None)
    assert dense_kept + sum(m.n_params for m in converted.values()) == lw.params_after
    plain = compress_layerwise(make_causal_lm("llama"), ids, LayerwiseConfig(
        LLAMA_TARGETS, budget=0.6, fit_steps=0, allocation="uniform"), progress=False)
    piv = compress_layerwise(make_causal_lm("llama"), ids, LayerwiseConfig(
        LLAMA_TARGETS, budget=0.6, fit_steps=0, allocation="uniform", pivoted=True),
        progress=False)
    assert all(piv.ranks[n] > r for n, r in plain.ranks.items() if r is not None)
    assert plain.ratio <= 0.6 and piv.ratio <= 0.6


def test_a_pivoted_causal_lm_saves_reloads_generates_and_merges(tmp_path):
    model, tok, ids, _ = _pivoted_llama()
    pivot_layers(model)
    with torch.no_grad():
        logits = model(ids).logits
    MPOModel(model, MPOConfig(target_modules=LLAMA_TARGETS)).save_pretrained(
        tmp_path, lightweight=False)
    meta = json.loads((tmp_path / "mpo_config.json").read_text())
    assert {e.get("layout") for e in meta["modules"].values()} == {"pivoted"}
    loaded = MPOModel.from_pretrained(make_causal_lm("llama", seed=5), tmp_path,
                                      is_trainable=False)
    assert isinstance(loaded.base_model.model.layers[0].mlp.up_proj, PivotedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    prompt = ids[:2, :6]
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt),
              pad_token_id=tok.pad_token_id)
    assert torch.equal(model.generate(prompt, **kw), loaded.base_model.generate(prompt, **kw))
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, PivotedLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_a_corrupted_pivot_vector_is_refused_on_loading(tmp_path):
    model, _, _, _ = _pivoted_llama()
    pivot_layers(model)
    wrapped = MPOModel(model, MPOConfig(target_modules=LLAMA_TARGETS))
    with pytest.raises(ValueError, match="gauge-fixed"):
        wrapped.save_pretrained(tmp_path / "light", lightweight=True)
    wrapped.save_pretrained(tmp_path, lightweight=False)
    meta = json.loads((tmp_path / "mpo_config.json").read_text())
    weights = tmp_path / meta["weights"]
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith(".pivots"))
    state[key] = torch.zeros_like(state[key])  # every pivot the same row
    save_file(state, str(weights))
    from tnlm.integration.io import sha256
    meta["sha256"] = sha256(weights)
    (tmp_path / "mpo_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"split range"):
        MPOModel.from_pretrained(make_causal_lm("llama"), tmp_path, is_trainable=False)


def test_a_pivoted_entry_with_a_rank_beyond_the_matrix_is_refused():
    from tnlm.integration.io import check_module_entry

    good = dict(kind="linear", layout="pivoted", in_dim=8, out_dim=6, rank=6, bias=False)
    assert check_module_entry("m", good)["rank"] == 6
    for bad, msg in ((dict(good, rank=7), "rank must be"), (dict(good, layout="x"), "layout"),
                     (dict(good, kind="embedding"), "kind must be")):
        with pytest.raises(ValueError, match=msg):
            check_module_entry("m", bad)


def test_the_pivoted_causal_job_ends_with_pivoted_layers_within_the_budget(monkeypatch):
    from tnlm.compress.decoder import job as llm
    from tnlm.compress.decoder.heal import CausalHealConfig
    from tnlm.compress.decoder.job import CausalLMRecipe, compress_causal_lm

    tok = make_word_tokenizer()
    model = make_causal_lm("llama")
    recipe = CausalLMRecipe(budget=0.5, seq_len=16, n_calibration=4, fit_steps=1, n_texts=4,
                            gen_tokens=40, gen_batch=4, pivoted=True, heal_pivoted=True,
                            allocation="residual",  # leaves healing something to do
                            heal=CausalHealConfig(steps=6, batch_size=2, lr=3e-3))
    seen = {}
    real_heal = llm.heal_causal

    def heal(student, *a, **kw):  # heal_pivoted: healing trains the gauge-fixed layers
        piv = [m for m in student.modules() if isinstance(m, PivotedLinear)]
        seen["before"] = [m.right.detach().clone() for m in piv]
        out = real_heal(student, *a, **kw)
        seen["changed"] = sum(not torch.equal(b, m.right) for b, m in zip(seen["before"], piv))
        return out

    monkeypatch.setattr(llm, "heal_causal", heal)
    res = compress_causal_lm(model, tok, recipe, text=[TEXT] * 6, progress=False)
    assert seen["before"] and seen["changed"] == len(seen["before"])
    assert res.heal is not None and min(res.heal.losses[-2:]) < res.heal.losses[0]
    piv = {n: m for n, m in model.named_modules() if isinstance(m, PivotedLinear)}
    assert piv and not any(is_low_rank_pair(m) for m in model.modules())
    assert res.ratio <= 0.5
    dense_kept = sum(model.get_submodule(n).weight.numel()
                     for n, r in res.layerwise.ranks.items() if r is None)
    assert dense_kept + sum(m.n_params for m in piv.values()) == res.layerwise.params_after
    with pytest.raises(ValueError, match="pivoted must be a bool"):
        CausalLMRecipe(pivoted="yes")


# ---------------------------------------------------------------- encoders
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"]


def _bert():
    from tests.test_export import bert

    return bert()


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    return make_bert_tokenizer(tmp_path_factory.mktemp("vocab"))


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_an_encoder_compressed_pivoted_keeps_more_rank_within_the_budget(bert_tok, allocation):
    from tnlm.compress.pipeline import CompressionConfig, compress_model

    sents = short_sentences()
    plain = compress_model(_bert(), bert_tok, sents, CompressionConfig(
        BERT_TARGETS, budget=0.5, allocation=allocation, heal=None), progress=False)
    piv = compress_model(_bert(), bert_tok, sents, CompressionConfig(
        BERT_TARGETS, budget=0.5, allocation=allocation, heal=None, pivoted=True),
        progress=False)
    layers = dict(piv.model.pivoted_modules())
    assert layers and not any(True for _ in piv.model.mpo_modules())
    assert piv.ratio <= 0.5 and plain.ratio <= 0.5
    assert piv.params_after == sum(m.n_params for m in layers.values())
    assert sum(piv.ranks.values()) > sum(plain.ranks.values())
    assert sum(piv.errors.values()) < sum(plain.errors.values())


def test_a_pivoted_encoder_exports_to_onnx_within_1e_4(bert_tok, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tnlm.compress.pipeline import CompressionConfig, compress_model
    from tnlm.export import OnnxEncoder, export_onnx

    sents = short_sentences()
    res = compress_model(_bert(), bert_tok, sents, CompressionConfig(
        BERT_TARGETS, budget=0.5, heal=None, pivoted=True), progress=False)
    student = res.model.eval()
    exported = export_onnx(student, bert_tok, tmp_path / "piv.onnx", pooling="mean")
    batch = bert_tok(sents[:7], padding=True, return_tensors="pt")
    out = OnnxEncoder(exported.path, bert_tok, threads=1).run(batch)
    with torch.no_grad():
        ref = student(**batch).last_hidden_state.numpy()
    assert float(abs(out["last_hidden_state"] - ref).max()) <= 1e-4
    # the gauge-fixed layers are written as (x @ B) @ R: no Gather on the feature axis
    import onnx

    graph = onnx.load(str(exported.path), load_external_data=False).graph
    index_tables = {t.name for t in graph.initializer if len(t.dims) == 1 and t.dims[0] > 1}
    index_tables |= {o for n in graph.node if n.op_type == "Constant" for o in n.output
                     for a in n.attribute if a.t and len(a.t.dims) == 1 and a.t.dims[0] > 1}
    assert not [n.name for n in graph.node
                if n.op_type == "Gather" and n.input[1] in index_tables]
    assert exported.mpo_layers == sum(isinstance(m, PivotedLinear) for m in student.modules())
    student.save_pretrained(tmp_path / "ck", lightweight=False)
    loaded = MPOModel.from_pretrained(_bert(), tmp_path / "ck", is_trainable=False)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, student(**batch).last_hidden_state)


def test_the_export_chain_of_a_pivoted_layer_is_the_same_function():
    from tnlm.export.factorized import PivotedChain

    for bias in (True, False):
        model = nn.Sequential(_low_rank_layer("linear"))
        if not bias:
            model[0].bias = None
        pivot_layers(model)
        layer = model[0]
        chain = PivotedChain(layer)
        x = torch.randn(3, 5, layer.in_dim)
        torch.testing.assert_close(chain(x), layer(x), rtol=1e-5, atol=1e-5)
        basis, right = chain.mats
        assert basis.shape == (layer.in_dim, layer.rank)
        assert right.shape == (layer.rank, layer.out_dim)
        # the balanced gauge: B^T B = R R^T = diag(singular values of W)
        s = layer.singular_values().float()
        torch.testing.assert_close(basis.T @ basis, torch.diag(s), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(right @ right.T, torch.diag(s), rtol=1e-4, atol=1e-4)
        assert not any(p.requires_grad for p in chain.parameters())


def test_the_export_chain_keeps_small_directions_under_ideal_int8_rounding():
    """One ideal int8 scale per tensor (rounding only; ONNX Runtime's kernels add the
    saturation of 8-bit pair sums, tests/test_export.py): the gauge-fixed factors
    (identity beside coefficients, every singular value in ``right``) lose W's small
    directions; the chain's balanced factors keep them as the plain symmetric-gauge
    layers do."""
    from tnlm.export.factorized import PivotedChain

    torch.manual_seed(0)
    plain, layer = decaying_pivoted_layer(96, 160, 40)

    def int8(a):
        scale = a.abs().max() / 127
        return torch.round(a / scale) * scale

    def error(left, right):
        with torch.no_grad():
            ref = layer.dense_matrix()
            return float((int8(left) @ int8(right) - ref).norm() / ref.norm())

    chain = PivotedChain(layer)
    fixed = error(layer.basis(), layer.right.detach())
    balanced = error(*chain.mats)
    sites = [c.detach().reshape(c.shape[0] * c.shape[1], -1) for c in plain.cores]
    assert balanced < 0.5 * fixed, (balanced, fixed)
    assert balanced < 1.5 * error(*sites), (balanced, error(*sites))


def test_naming_one_path_of_a_shared_layer_converts_it_everywhere():
    layer = _low_rank_layer("linear")
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(30, 40), layer)
    out = pivot_layers(model, ["0"])
    assert set(out) == {"0", "3"} and model[0] is model[3]
    assert isinstance(model[3], PivotedLinear)


def test_a_pivoted_layer_refuses_an_input_of_another_width_and_keeps_flags():
    layer = _low_rank_layer("linear")
    layer.bias.requires_grad_(False)
    model = nn.Sequential(layer)
    pivot_layers(model)
    assert not model[0].bias.requires_grad and model[0].coef.requires_grad
    with pytest.raises(ValueError, match="40 features"):
        model[0](torch.randn(2, 41))
    assert (model[0].in_features, model[0].out_features) == (40, 30)
    s = model[0].singular_values()
    ref = torch.linalg.svdvals(model[0].dense_matrix().double())[:12]
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-6)
