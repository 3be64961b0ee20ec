"""Inputs of the core MPO and the torch layers that were once accepted silently (or failed
late with an obscure error): each is now refused early, naming the argument and what was
expected, or gives the correct result."""

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from tests.common import one_thread  # noqa: F401 - autouse: one intra-op thread
from tnlm.bridge.finetune import (
    make_optimizer,
    parameter_groups,
    set_trainable,
    train_lightweight,
)
from tnlm.bridge.kinds import dense_module
from tnlm.bridge.layer import MPOEmbedding, MPOLinear, MPOModule, set_dense_cache
from tnlm.bridge.pivoted import PivotedLinear, pivot_layers
from tnlm.core.budget import bond_bounds, max_bond_for_params, mpo_params, params_for_bonds
from tnlm.core.mpo import MPO
from tnlm.core.pivot import pivoted_rank_for_fraction
from tnlm.core.policy import TruncationPolicy
from tnlm.core.spec import DecompositionSpec
from tnlm.core.spectra import central_bond, spectrum_entropy

HALF = [torch.float16, torch.bfloat16]


def torch_cores(in_shape=(4, 4), out_shape=(3, 4), seed=0):
    """Exact cores of a random (prod(in_shape), prod(out_shape)) float32 matrix."""
    W = np.random.default_rng(seed).standard_normal((math.prod(in_shape), math.prod(out_shape)))
    mpo = MPO.from_matrix(W.astype(np.float32), in_shape, out_shape)
    return [torch.as_tensor(np.asarray(c)) for c in mpo.cores]


def low_rank_model(seed=0):
    """A model holding a 2-site low-rank MPOLinear (16 -> 12, rank 3) with a bias, and a
    3-site MPOLinear."""
    torch.manual_seed(seed)
    pair = MPOLinear.from_linear(nn.Linear(16, 12), (16, 1), (1, 12), max_bond=3, gauge="left")
    chain = MPOLinear.from_linear(nn.Linear(12, 8), (2, 3, 2), (2, 2, 2))
    return nn.Sequential(pair, nn.ReLU(), chain)


def dense64(layer):
    return layer.dense_matrix(torch.float64).detach()


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ------------------------------------------------------------------ 1. retruncate, half precision
@pytest.mark.parametrize("dtype", HALF)
def test_retruncate_of_a_half_precision_layer_reports_the_rounding_of_the_stored_cores(dtype):
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(64, 64).to(dtype), (4, 4, 4), (4, 4, 4),
                                  max_bond=16)
    before = dense64(layer)
    err = layer.retruncate(max_bond=1000)  # cuts nothing: only the rounding changes W
    measured = rel(dense64(layer), before)
    assert layer.cores[0].dtype == dtype
    assert measured > 1e-4
    assert err == pytest.approx(measured, rel=1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_retruncate_of_a_half_precision_layer_refuses_a_max_error_the_rounding_breaks(dtype):
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(64, 64).to(dtype), (4, 4, 4), (4, 4, 4),
                                  max_bond=16)
    cores = [c.detach().clone() for c in layer.cores]
    # float16 rounds to ~3e-4, bfloat16 to ~3e-3: both break 1e-5, which the float32 cut meets
    with pytest.raises(ValueError, match=r"max_error=1e-05 is not met by the stored "
                                         r"torch\.b?float16 cores.*layer\.float\(\)"):
        layer.retruncate(max_error=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(layer.cores, cores))  # left unchanged
    err = layer.retruncate(max_error=0.1)  # a bound the rounding keeps
    assert err <= 0.1


def test_retruncate_of_a_float32_layer_still_reports_its_cut():
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(64, 64), (4, 4, 4), (4, 4, 4))
    before = dense64(layer)
    err = layer.retruncate(max_bond=4)
    assert err == pytest.approx(rel(dense64(layer), before), rel=1e-4)


# ------------------------------------------------------------------ 2. layer dims
@pytest.mark.parametrize("build, name", [
    (lambda c: MPOLinear(c, None, True, 12), "in_features"),
    (lambda c: MPOLinear(c, None, 16, True), "out_features"),
    (lambda c: MPOLinear(c, None, 15.7, 12), "in_features"),
    (lambda c: MPOLinear(c, None, "15", 12), "in_features"),
    (lambda c: MPOEmbedding(c, True), "num_embeddings"),
    (lambda c: MPOEmbedding(c, 16, 11.0), "embedding_dim"),
    (lambda c: MPOModule(c, np.float64(16)), "in_dim"),
])
def test_mpo_layers_refuse_dims_that_are_not_ints(build, name):
    with pytest.raises(TypeError, match=f"^{name} must be an int"):
        build(torch_cores())


def test_mpo_layers_accept_int_dims_and_refuse_a_non_bool_cache_flag():
    cores = torch_cores()
    assert MPOLinear(cores, None, np.int64(15), 12).in_features == 15
    assert MPOEmbedding(cores, 16, 12).embedding_dim == 12
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        MPOLinear(cores, None, 0, 12)
    with pytest.raises(TypeError, match="cache_dense must be a bool"):
        MPOLinear(cores, cache_dense="false")


# ------------------------------------------------------------------ 3. optimizer settings
@pytest.mark.parametrize("kwargs, error, name", [
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(lr=True), TypeError, "lr"),
    (dict(lr="1e-3"), TypeError, "lr"),
    (dict(lr=1e-3, mpo_lr=float("nan")), ValueError, "mpo_lr"),
    (dict(lr=1e-3, mpo_lr=float("inf")), ValueError, "mpo_lr"),
    (dict(lr=1e-3, mpo_lr=False), TypeError, "mpo_lr"),
    (dict(lr=1e-3, weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(lr=1e-3, weight_decay=float("nan")), ValueError, "weight_decay"),
])
@pytest.mark.parametrize("build", [make_optimizer, parameter_groups])
def test_optimizer_settings_must_be_finite_positive_numbers(build, kwargs, error, name):
    with pytest.raises(error, match=f"^{name} must be a"):
        build(low_rank_model(), **kwargs)


def test_pivoted_coef_and_right_train_in_the_mpo_group_as_central_tensors():
    model = low_rank_model()
    plain = {id(p): g["name"] for g in parameter_groups(model, 1e-3, 1e-2, 0.01)
             for p in g["params"]}
    chain = model[2]
    assert all(plain[id(c)] == "mpo_cores" for c in chain.cores)
    assert plain[id(chain.bias)] == "other"  # MPO biases: unchanged, with lr and decay
    pivot_layers(model)
    new = model[0]
    assert isinstance(new, PivotedLinear)
    groups = {g["name"]: g for g in parameter_groups(model, 1e-3, 1e-2, 0.01)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert {id(new.coef), id(new.right)} <= ids["mpo_cores"]
    assert id(new.bias) in ids["other"] and id(chain.bias) in ids["other"]
    assert {id(c) for c in chain.cores} <= ids["mpo_cores"]
    assert groups["mpo_cores"]["lr"] == 1e-2 and groups["mpo_cores"]["weight_decay"] == 0.0
    opt = make_optimizer(model, 1e-3, 1e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


# ------------------------------------------------------------------ 4. dense_module
def test_dense_module_refuses_a_bias_of_the_wrong_shape_or_for_a_table():
    W = torch.randn(16, 12)
    with pytest.raises(ValueError, match=r"bias must have shape \(12,\)"):
        dense_module("linear", W, torch.tensor([5.0]))
    with pytest.raises(ValueError, match="bias must be None for kind 'embedding'"):
        dense_module("embedding", W, torch.zeros(12))
    with pytest.raises(ValueError, match=r"W must be a 2-D matrix \(in, out\), got shape "
                                         r"\(16,\)"):
        dense_module("linear", torch.randn(16), None)
    lin = dense_module("linear", W, torch.arange(12.0))
    assert torch.equal(lin.weight, W.T) and torch.equal(lin.bias, torch.arange(12.0))


# ------------------------------------------------------------------ 5. budget helpers
@pytest.mark.parametrize("call, error, match", [
    (lambda: params_for_bonds([4, 4, 4, 4, 4], (2, 2), (2, 2)), ValueError,
     r"bond_dims must have n_sites - 1 = 1 entries for 2 sites, got 5"),
    (lambda: params_for_bonds([], (2, 2), (2, 2)), ValueError, "got 0"),
    (lambda: params_for_bonds([4], (2, 2), (2, 2, 2)), ValueError, "same number of sites"),
    (lambda: params_for_bonds([-4], (2, 2), (2, 2)), ValueError, r"bond_dims\[0\] must be >= 1"),
    (lambda: params_for_bonds([2.5], (2, 2), (2, 2)), TypeError, r"bond_dims\[0\] must be an int"),
    (lambda: bond_bounds((-2, 2), (2, 2)), ValueError, r"in_shape\[0\] must be >= 1"),
    (lambda: bond_bounds((2, 2), (2,)), ValueError, "same number of sites"),
    (lambda: mpo_params((0, 2), (2, 2)), ValueError, r"in_shape\[0\] must be >= 1"),
    (lambda: max_bond_for_params((4, 4), (4, 4), float("nan")), ValueError,
     "budget must be a finite number"),
    (lambda: max_bond_for_params((4, 4), (4, 4), "100"), TypeError, "budget must be a number"),
    (lambda: max_bond_for_params((4, 4), (4, 4), True), TypeError, "budget must be a number"),
])
def test_budget_helpers_refuse_bonds_and_shapes_that_do_not_fit(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_budget_helpers_still_count_exactly():
    assert params_for_bonds([4], (2, 2), (2, 2)) == 4 * 4 + 4 * 4
    assert bond_bounds((2, 2, 2), (2, 2, 2)) == [4, 4]
    assert mpo_params((2, 2, 2), (2, 2, 2), max_bond=2) == 8 + 16 + 8
    assert max_bond_for_params((4, 4), (4, 4), 100) == 3


# ------------------------------------------------------------------ 6. half-precision MPO cores
@pytest.mark.parametrize("cores", [
    [np.ones((1, 2, 2, 1), np.float16)],
    [torch.ones(1, 2, 2, 1, dtype=torch.bfloat16)],
    [torch.ones(1, 2, 2, 1, dtype=torch.float16)],
])
def test_mpo_refuses_half_precision_cores(cores):
    with pytest.raises(TypeError, match=r"cores\[0\] has dtype b?float16; an MPO holds real "
                                        r"float32 or float64 cores"):
        MPO(cores)


@pytest.mark.parametrize("dtype", [np.float16, torch.bfloat16])
def test_mpo_astype_refuses_half_precision(dtype):
    mpo = MPO.from_matrix(np.ones((4, 4)), (2, 2), (2, 2))
    if dtype is torch.bfloat16:
        mpo = mpo.to_backend("pytorch")
    with pytest.raises(TypeError, match=r"cores\[0\] has dtype b?float16"):
        mpo.astype(dtype)
    assert mpo.astype(np.float32 if dtype is np.float16 else torch.float32).n_sites == 2


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_mpo_layers_still_build_and_convert(dtype):
    cores = [c.to(dtype) for c in torch_cores()]
    layer = MPOLinear(cores)
    assert layer.cores[0].dtype == dtype
    assert layer.to_mpo().dtype == torch.float32
    layer.set_cores([c.float() for c in cores])
    assert layer.cores[0].dtype == dtype
    with pytest.raises(TypeError, match=r"cores\[1\] has dtype torch.float32, cores\[0\] has "
                                        r"torch\.b?float16"):
        MPOLinear([cores[0], cores[1].float()])


# ------------------------------------------------------------------ 7. truncation_error, discarded
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(truncation_error=float("nan")), ValueError, "truncation_error must be a finite"),
    (dict(truncation_error=-1.0), ValueError, "truncation_error must be a finite number >= 0"),
    (dict(truncation_error="abc"), TypeError, "truncation_error must be a number"),
    (dict(discarded=[0.1, 0.2, 0.3, 0.4, 0.5]), ValueError,
     r"discarded must have one entry per bond \(1\), got 5"),
    (dict(discarded=[float("nan")]), ValueError, r"discarded\[0\] must be a finite number"),
    (dict(discarded=[-0.1]), ValueError, r"discarded\[0\] must be a finite number >= 0"),
    (dict(discarded="a"), TypeError, "discarded must be None or a sequence"),
])
def test_mpo_refuses_bad_truncation_error_and_discarded(kwargs, error, match):
    cores = MPO.from_matrix(np.ones((4, 4)), (2, 2), (2, 2)).cores
    with pytest.raises(error, match=match):
        MPO(cores, **kwargs)


def test_mpo_keeps_valid_truncation_error_and_discarded():
    cores = MPO.from_matrix(np.ones((4, 4)), (2, 2), (2, 2)).cores
    mpo = MPO(cores, truncation_error=np.float32(0.25), discarded=np.array([0.5]))
    assert mpo.truncation_error == 0.25 and mpo.discarded == (0.5,)


# ------------------------------------------------------------------ 8. measured_error
@pytest.mark.parametrize("shape", [(12,), (16, 1), (12, 16)])
def test_measured_error_requires_the_layer_shape(shape):
    layer = MPOLinear(torch_cores())  # W (16, 12)
    with pytest.raises(ValueError, match=r"W must have shape \(in_dim, out_dim\) = \(16, 12\), "
                                         r"got .*linear\.weight\.T"):
        layer.measured_error(torch.randn(shape))


def test_measured_error_refuses_non_finite_weights():
    layer = MPOLinear(torch_cores())
    W = layer.dense_matrix().detach().clone()
    assert layer.measured_error(W) < 1e-6
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        layer.measured_error(W)


# ------------------------------------------------------------------ 9. n_sites and shapes
def test_from_linear_and_from_embedding_refuse_n_sites_disagreeing_with_a_shape():
    lin, emb = nn.Linear(16, 12), nn.Embedding(16, 12)
    with pytest.raises(ValueError, match="n_sites=3 disagrees with in_shape, which has 2 sites"):
        MPOLinear.from_linear(lin, (4, 4), (3, 4), n_sites=3)
    with pytest.raises(ValueError, match="n_sites=3 disagrees with out_shape"):
        MPOEmbedding.from_embedding(emb, None, (3, 4), n_sites=3)
    assert MPOLinear.from_linear(lin, (4, 4), (3, 4), n_sites=2).in_shape == (4, 4)
    assert MPOLinear.from_linear(lin, None, (3, 4)).in_shape == (4, 4)
    assert MPOLinear.from_linear(lin, n_sites=2).n_sites == 2


def test_decomposition_spec_checks_shape_lengths_and_products():
    with pytest.raises(ValueError, match=r"in_shape \(4, 4\) and out_shape \(2, 2, 3\) must have "
                                         "the same number of sites"):
        DecompositionSpec(in_shape=(4, 4), out_shape=(2, 2, 3))
    spec = DecompositionSpec(in_shape=(4, 4), out_shape=(3, 4))
    assert spec.site_shapes(16, 12) == ((4, 4), (3, 4))
    with pytest.raises(ValueError, match=r"in_shape=\(4, 4\) has product 16, but I=100"):
        spec.site_shapes(100, 12)
    with pytest.raises(ValueError, match=r"out_shape=\(3, 4\) has product 12, but J=10; pass "
                                         "pad=True"):
        spec.site_shapes(16, 10)
    padded = DecompositionSpec(in_shape=(4, 4), out_shape=(3, 4), pad=True)
    assert padded.site_shapes(16, 10) == ((4, 4), (3, 4))
    with pytest.raises(ValueError, match=r"out_shape=\(3, 4\) has product 12, but J=13"):
        padded.site_shapes(16, 13)


# ------------------------------------------------------------------ 10. mode before the work
def test_from_module_checks_mode_before_decomposing(monkeypatch):
    calls = []
    original = DecompositionSpec.decompose
    monkeypatch.setattr(DecompositionSpec, "decompose",
                        lambda self, W: calls.append(1) or original(self, W))
    with pytest.raises(ValueError, match="mode must be one of"):
        MPOModule.from_module(nn.Linear(16, 12), DecompositionSpec(n_sites=2), mode="fast")
    assert not calls
    MPOModule.from_module(nn.Linear(16, 12), DecompositionSpec(n_sites=2), mode="dense")
    assert calls == [1]


# ------------------------------------------------------------------ 11. PivotedLinear
def pivoted():
    return PivotedLinear.from_mpo(low_rank_model()[0])


def test_pivoted_linear_load_state_dict_refuses_pivots_that_do_not_split_the_inputs():
    layer = pivoted()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = dict(state, pivots=torch.zeros_like(state["pivots"]))
    with pytest.raises(ValueError, match=r"pivots and rest must split range\(16\)"):
        layer.load_state_dict(bad)
    assert torch.equal(layer.pivots, state["pivots"])  # nothing copied
    model = nn.Sequential(layer)
    bad = {"0." + k: v for k, v in bad.items()}
    with pytest.raises(ValueError, match=r"state_dict for '0\.': pivots and rest must split"):
        model.load_state_dict(bad)
    other = pivoted()
    other.load_state_dict(state)  # a valid split loads
    assert torch.equal(other.dense_matrix(), layer.dense_matrix())


def test_pivoted_linear_refuses_mixed_dtypes_and_non_finite_factors():
    layer = pivoted()
    p, r, c, R = layer.pivots, layer.rest, layer.coef.detach(), layer.right.detach()
    with pytest.raises(TypeError, match="coef and right must have one floating-point dtype, got "
                                        "torch.float32 and torch.float64"):
        PivotedLinear(p, r, c, R.double())
    bad = c.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="coef holds NaN or infinite values"):
        PivotedLinear(p, r, bad, R)
    with pytest.raises(ValueError, match="right holds NaN or infinite values"):
        PivotedLinear(p, r, c, R * float("inf"))


# ------------------------------------------------------------------ 12. smaller ones
def test_pivot_layers_refuses_one_string_for_the_names():
    model = low_rank_model()
    with pytest.raises(TypeError, match="names must be a list of module names, got one str '00'"):
        pivot_layers(model, names="00")
    assert isinstance(model[0], MPOLinear)
    assert set(pivot_layers(model, names=["0"])) == {"0"}


@pytest.mark.parametrize("extra, match", [
    (nn.Linear(2, 2), "got one Linear: wrap it in a list"),
    ("head", "got one str"),
    ([nn.Linear(2, 2), "head"], r"extra\[1\] is a str"),
])
@pytest.mark.parametrize("call", [lambda m, e: set_trainable(m, "lightweight", extra=e),
                                  lambda m, e: train_lightweight(m, e)])
def test_set_trainable_refuses_a_module_or_str_as_extra(call, extra, match):
    with pytest.raises(TypeError, match=f"extra must be an iterable of nn.Module.*{match}"):
        call(low_rank_model(), extra)


def test_set_trainable_accepts_a_list_of_modules_to_save():
    model = nn.Sequential(low_rank_model(), nn.Linear(8, 2))
    set_trainable(model, "lightweight", extra=[model[1]])
    assert model[1].weight.requires_grad
    set_trainable(model, "lightweight", extra=nn.ModuleList([model[1]]))
    assert model[1].weight.requires_grad


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_bond=["2"]), TypeError, "max_bond entries must be numbers, got '2'"),
    (dict(cutoff=["0.5"]), TypeError, "cutoff entries must be numbers, got '0.5'"),
    (dict(max_error=[b"1"]), TypeError, "max_error entries must be numbers"),
    (dict(max_bond=np.array([[2]])), ValueError, r"1-D sequence .* shape \(1, 1\)"),
    (dict(max_bond=[[2]]), TypeError, r"max_bond entries must be numbers, got \[2\]"),
])
def test_per_bond_policies_refuse_strings_and_nested_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        TruncationPolicy.build(1, **kwargs)
    with pytest.raises(error, match=match):
        TruncationPolicy.check(**kwargs)
    with pytest.raises(error, match=match):
        MPO.from_matrix(np.ones((4, 4)), (2, 2), (2, 2), **kwargs)


def test_per_bond_policies_still_accept_numbers_and_arrays():
    policy = TruncationPolicy.build(2, max_bond=np.array([2, 3]), cutoff=[0.1, np.float32(0.2)])
    assert policy.max_bond == (2, 3) and policy.cutoff == pytest.approx((0.1, 0.2))
    assert TruncationPolicy.build(2, max_bond=np.int64(4)).max_bond == (4, 4)


def test_set_dense_cache_requires_a_bool():
    model = low_rank_model()
    assert set_dense_cache(model, False) == 2
    with pytest.raises(TypeError, match="enabled must be a bool, got 'false'"):
        set_dense_cache(model, "false")
    assert not model[0].cache_dense


@pytest.mark.parametrize("index, error", [(1.7, TypeError), (True, TypeError),
                                          ("1", TypeError), (5, ValueError)])
def test_central_bond_requires_an_int_site(index, error):
    with pytest.raises(error, match="central_index must be"):
        central_bond((2, 4, 3), index)
    assert central_bond((2, 4, 3), 1) == 1 and central_bond((2, 4, 3), np.int64(2)) == 1


def test_spectrum_entropy_refuses_non_finite_values_and_a_bool_alpha():
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        spectrum_entropy([1.0, float("nan")])
    with pytest.raises(TypeError, match="alpha must be a number > 0, got True"):
        spectrum_entropy([1.0, 1.0], alpha=True)
    with pytest.raises(TypeError, match="alpha must be a number"):
        spectrum_entropy([1.0, 1.0], alpha="2")
    assert spectrum_entropy([1.0, 1.0]) == pytest.approx(math.log(2))
    assert spectrum_entropy([1.0, 1.0], alpha=math.inf) == pytest.approx(math.log(2))


@pytest.mark.parametrize("in_dim, out_dim, error, match", [
    (0, 64, ValueError, "in_dim must be >= 1"),
    (-5, 64, ValueError, "in_dim must be >= 1"),
    (64, 0, ValueError, "out_dim must be >= 1"),
    (64.0, 64, TypeError, "in_dim must be an int"),
])
def test_pivoted_rank_for_fraction_refuses_dims_below_one(in_dim, out_dim, error, match):
    with pytest.raises(error, match=match):
        pivoted_rank_for_fraction(in_dim, out_dim, 0.5)
    assert pivoted_rank_for_fraction(64, 64, 0.5) >= 1


# ------------------------------------------------------------------ 13. a core replaced directly
def contract_layer():
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(16, 12), n_sites=2)
    layer.mode = "contract"
    return layer


@pytest.mark.parametrize("shape, match", [
    ((1, 4, 3, 1), r"cores\[1\] has left bond 1 \(shape \(1, 4, 3, 1\)\); expected 12, the right "
                   r"bond of cores\[0\]"),
    ((12, 2, 3, 1), r"cores\[1\] has site legs \(i, j\) = \(2, 3\) .*expected \(4, 3\)"),
    ((12, 4, 3, 2), r"cores\[1\] has right bond 2 .*the boundary bond must be 1"),
])
def test_a_core_replaced_by_one_of_another_shape_is_checked_when_the_layer_replans(shape, match):
    layer = contract_layer()
    assert layer.core_shapes == ((1, 4, 4, 12), (12, 4, 3, 1))
    layer.cores[1] = nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(5, 16))
    with pytest.raises(ValueError, match=match):
        layer.dense_matrix()


def test_a_core_replaced_by_a_chained_one_is_replanned():
    layer = contract_layer()
    new = [layer.cores[0].detach()[..., :5].clone(), torch.randn(5, 4, 3, 1)]
    layer.cores[0], layer.cores[1] = nn.Parameter(new[0]), nn.Parameter(new[1])
    x = torch.randn(5, 16)
    ref = MPOLinear(new, layer.bias.detach())
    torch.testing.assert_close(layer(x), ref(x))
    assert layer.core_shapes == ((1, 4, 4, 5), (5, 4, 3, 1))


@pytest.mark.parametrize("shapes, error, match", [
    (((1, 4, 4, 8), (1, 4, 3, 1)), ValueError, r"core_shapes\[1\] has left bond 1 .*expected 8"),
    (((2, 4, 4, 1),), ValueError, r"core_shapes\[0\] has left bond 2"),
    (((1, 4, 4),), ValueError, r"core_shapes\[0\] must be 4-d"),
    (((1, 4.0, 4, 1),), TypeError, r"core_shapes\[0\]\[1\] must be an int"),
    (((1, 0, 4, 1),), ValueError, r"core_shapes\[0\]\[1\] must be >= 1"),
    ((), ValueError, "core_shapes must hold at least one core shape"),
])
def test_chain_plans_refuse_cores_that_do_not_chain(shapes, error, match):
    from tnlm.core.plan import ChainPlans, chain_plans
    for build in (chain_plans, ChainPlans):
        with pytest.raises(error, match=match):
            build(shapes)
    assert chain_plans(((1, 4, 4, 8), (8, 4, 3, 1))).in_size == 16


# ------------------------------------------------------------------ 14. tied tables, extra, mpo_lr
def test_cores_plus_linears_leaves_out_a_table_tied_to_a_linear():
    from transformers import GPT2Config, GPT2LMHeadModel

    from tnlm.bridge.finetune import select_parameters

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # tied
    set_trainable(gpt, "cores+linears")
    assert not gpt.transformer.wte.weight.requires_grad
    assert gpt.transformer.h[0].attn.c_attn.weight.requires_grad  # a dense Conv1D trains
    assert gpt.transformer.ln_f.weight.requires_grad
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10)
    untied = nn.Sequential(emb, nn.LayerNorm(4), head)
    assert {n for n, _ in select_parameters(untied, "cores+linears")} == {
        "1.weight", "1.bias", "2.weight", "2.bias"}
    head.weight = emb.weight
    assert {n for n, _ in select_parameters(untied, "cores+linears")} == {
        "1.weight", "1.bias", "2.bias"}


def head_model():
    model = nn.Sequential(low_rank_model(), nn.Linear(8, 2))
    model.classifier = model[1]
    return model


def test_set_trainable_refuses_modules_to_save_outside_the_model():
    import copy

    model = head_model()
    for call in (lambda e: set_trainable(model, "lightweight", extra=e),
                 lambda e: train_lightweight(model, e)):
        with pytest.raises(ValueError, match=r"extra\[0\] \(a Linear\) is not a module of the "
                                             "model"):
            call([copy.deepcopy(model).classifier])
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    set_trainable(model, "lightweight", extra=[model.classifier])
    assert model.classifier.weight.requires_grad


@pytest.mark.parametrize("train", ["cores", "cores-central", "cores+linears", "auxiliary", "all"])
def test_set_trainable_refuses_extra_for_a_set_that_would_ignore_it(train):
    model = head_model()
    with pytest.raises(ValueError, match=r"extra .* is read by 'lightweight' only; "
                                         f"'{re.escape(train)}' would ignore it"):
        set_trainable(model, train, extra=[model.classifier])
    assert all(p.requires_grad for p in model.parameters())
    set_trainable(model, train, extra=[])  # no extra: the set as before


@pytest.mark.parametrize("build", [make_optimizer, parameter_groups])
def test_an_mpo_lr_no_parameter_takes_is_reported(build):
    plain = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match=r"mpo_lr=0\.01 is unused: the model has no trainable "
                                         r"MPO core \(every parameter takes lr=0\.0001\)"):
        build(plain, lr=1e-4, mpo_lr=1e-2)
    frozen = low_rank_model()
    for p in frozen.parameters():
        p.requires_grad_(p.ndim == 1)  # biases only
    with pytest.warns(UserWarning, match="mpo_lr=0.01 is unused"):
        build(frozen, lr=1e-4, mpo_lr=1e-2)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(plain, lr=1e-4)  # no mpo_lr: nothing to say
        build(low_rank_model(), lr=1e-4, mpo_lr=1e-2)  # the cores take it


# ------------------------------------------------------------------ 15. LoRA on MPO layers
def test_lora_config_for_mpo_refuses_a_lora_variant_before_any_training():
    peft = pytest.importorskip("peft")
    from tnlm.integration.peft import lora_config_for_mpo

    with pytest.raises(ValueError, match="config asks for the LoRA variant use_dora, which "
                                         "tnlm cannot merge into MPO layers"):
        lora_config_for_mpo(peft.LoraConfig(target_modules=["q"], use_dora=True))
    config = peft.LoraConfig(target_modules=["q"])
    assert lora_config_for_mpo(config) is config


class _QNet(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.q = MPOLinear.from_linear(nn.Linear(16, 12).to(dtype), n_sites=2)

    def forward(self, x):
        return self.q(x)


@pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")
def test_lora_merge_of_a_float64_layer_is_exact_in_float64():
    peft = pytest.importorskip("peft")
    from tnlm.integration.peft import lora_config_for_mpo

    torch.manual_seed(0)
    net = _QNet(torch.float64)
    W = net.q.dense_matrix().detach().clone()  # (in, out), float64
    bias = net.q.bias.detach().clone()
    model = peft.get_peft_model(net, lora_config_for_mpo(
        peft.LoraConfig(target_modules=["q"], r=2, init_lora_weights=False)))
    lora = net.q
    A, Bm = lora.lora_A["default"].weight.detach(), lora.lora_B["default"].weight.detach()
    assert A.dtype == torch.float64
    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        lora.merge()
        after = model(x)
    merged = lora.base_layer
    assert merged.weight.dtype == torch.float64
    expected = W.T + lora.scaling["default"] * (Bm @ A)
    torch.testing.assert_close(merged.weight.detach(), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(merged.bias.detach(), bias, atol=0, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-12, rtol=0)



@pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")
def test_lora_unmerge_over_a_merged_mpo_layer_takes_the_delta_out_and_flags_stay():
    """An MPO layer merged to dense first (merge_factorized) and LoRA then merged and
    unmerged: the delta stayed in the weight while the LoRA branch ran again (outputs off
    by 2.7). A merge over the MPO layer made the new dense weight and bias trainable while
    the frozen base had none. Now unmerge subtracts the delta from a dense base, and the
    merged layer keeps the MPO layer's flags."""
    peft = pytest.importorskip("peft")
    from tnlm.integration.merge import merge_factorized
    from tnlm.integration.peft import lora_config_for_mpo

    torch.manual_seed(0)
    for pre_merged in (True, False):
        net = _QNet(torch.float32)
        model = peft.get_peft_model(net, lora_config_for_mpo(
            peft.LoraConfig(target_modules=["q"], r=2, init_lora_weights=False)))
        x = torch.randn(5, 16)
        with torch.no_grad():
            before = model(x)
        if pre_merged:
            merge_factorized(model)
        frozen = [n for n, p in model.named_parameters() if "lora_" not in n]
        assert frozen and not any(p.requires_grad for n, p in model.named_parameters()
                                  if n in frozen)
        model.merge_adapter()
        assert not any(p.requires_grad for n, p in net.q.base_layer.named_parameters())
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
        model.unmerge_adapter()
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)

# ------------------------------------------------------------------ 16. plans on torch tensors
def torch_mpo():
    W = np.random.default_rng(0).standard_normal((16, 12))
    return W, MPO.from_matrix(W, (4, 4), (3, 4), backend="pytorch")


def test_a_plan_run_on_torch_refuses_a_leg_of_another_size():
    W, mpo = torch_mpo()
    plan = mpo.apply_plan(3)
    with pytest.raises(ValueError, match=r"operand 2 has shape \(3, 1, 4\), but the plan of .* "
                                         r"was made for \(3, 4, 4\)"):
        plan(*mpo.cores, torch.randn(3, 1, 4, dtype=torch.float64))
    five = torch.randn(5, 4, 4, dtype=torch.float64)  # another row count: the plan runs
    torch.testing.assert_close(plan(*mpo.cores, five).reshape(5, 12),
                               five.reshape(5, 16) @ torch.as_tensor(W))
    with pytest.raises(ValueError, match=r"operand 0 has shape \(1, 4, 3\)"):
        plan(mpo.cores[0][..., 0], *mpo.cores[1:], torch.randn(3, 4, 4, dtype=torch.float64))
    x = np.random.default_rng(1).standard_normal((3, 16))
    got = plan(*mpo.cores, torch.as_tensor(x).reshape(3, 4, 4)).reshape(3, 12)
    np.testing.assert_allclose(got.numpy(), x @ W, atol=1e-12)


def test_plans_reused_over_the_row_count_still_run_for_any_rows():
    from tnlm.core.plan import apply_plan, gather_plan

    W, mpo = torch_mpo()
    shapes = tuple(tuple(c.shape) for c in mpo.cores)
    plan = apply_plan(shapes, 3, (4, 4))
    for rows in (1, 7, 40):  # the row index is free
        x = torch.randn(rows, 16, dtype=torch.float64)
        torch.testing.assert_close(plan(*mpo.cores, x.reshape(rows, 4, 4)).reshape(rows, 12),
                                   x @ torch.as_tensor(W), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"any size in the row index"):
        plan(*mpo.cores, torch.randn(7, 1, 4, dtype=torch.float64))
    gather = gather_plan(shapes, 1)
    idx = torch.tensor([[0, 3, 2], [1, 1, 0]])  # (sites, rows)
    slices = [c[:, idx[k]].movedim(1, 0) for k, c in enumerate(mpo.cores)]
    got = gather(*slices).reshape(3, 12)
    torch.testing.assert_close(got, torch.as_tensor(W)[idx[0] * 4 + idx[1]], atol=1e-12, rtol=0)
    cores = torch_cores()  # the layers' apply and gather paths, for several row counts
    layer, emb = MPOLinear(cores), MPOEmbedding(cores)
    W = layer.dense_matrix().detach()
    for mode in ("contract", "dense"):
        layer.mode = emb.mode = mode
        for rows in (1, 5, 300):
            x, ids = torch.randn(rows, 16), torch.randint(0, 16, (rows,))
            torch.testing.assert_close(layer(x), x @ W, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(emb(ids), W[ids], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ 17. Swap with nested names
def nested():
    return nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2))


@pytest.mark.parametrize("order", ["inner first", "outer first"])
def test_swap_replace_refuses_a_name_inside_another_replaced_name(order):
    from tnlm.integration.surgery import Swap

    root = nested()
    before = list(root.modules())
    new = {"0.0": nn.Linear(2, 3), "0": nn.Sequential(nn.Linear(2, 4))}
    if order == "outer first":
        new = dict(reversed(list(new.items())))
    with pytest.raises(ValueError, match="new: '0.0' lies inside '0', which is replaced too"):
        Swap(root).replace(new)
    assert list(root.modules()) == before  # nothing changed


def test_swap_replace_refuses_a_shared_module_inside_another_replaced_name():
    from tnlm.integration.surgery import Swap

    shared = nn.Linear(2, 2)
    root = nn.ModuleDict({"a": nn.Sequential(shared), "b": shared})
    with pytest.raises(ValueError, match="new: 'b' lies inside 'a'"):
        Swap(root).replace({"a": nn.Identity(), "b": nn.Linear(2, 2)})
    assert root["a"][0] is shared and root["b"] is shared
    swap = Swap(root)
    swap.replace({"b": nn.Identity()})  # one name of the shared module: every path replaced
    assert isinstance(root["a"][0], nn.Identity) and isinstance(root["b"], nn.Identity)
    swap.undo()
    assert root["a"][0] is shared


# ------------------------------------------------------------------ 18. smaller: surgery, plans, costs
def test_set_module_refuses_a_value_that_is_not_a_module():
    from tnlm.integration.surgery import set_module

    root = nested()
    for value in (None, "linear", torch.zeros(2)):
        with pytest.raises(TypeError, match="new must be an nn.Module, got"):
            set_module(root, "1", value)
    assert isinstance(root[1], nn.Linear)
    set_module(root, "1", nn.Identity())
    assert isinstance(root[1], nn.Identity)


@pytest.mark.parametrize("shapes, error, match", [
    ([(2.7, 3), (3, 4)], TypeError, r"shapes\[0\]\[0\] must be an int, got 2\.7"),
    ([(True, 3), (3, 4)], TypeError, r"shapes\[0\]\[0\] must be an int, got True"),
    ([(-2, 3), (3, 4)], ValueError, r"shapes\[0\]\[0\] must be >= 0, got -2"),
    ([(2, 3), (3, "4")], TypeError, r"shapes\[1\]\[1\] must be an int"),
])
def test_get_plan_refuses_sizes_that_are_not_ints_or_negative(shapes, error, match):
    from tnlm.core.plan import ContractionPlan, get_plan

    for build in (get_plan, ContractionPlan):
        with pytest.raises(error, match=match):
            build("ab,bc->ac", shapes)
    assert get_plan("ab,bc->ac", [(np.int64(2), 3), (3, 4)]).flops == 2 * 2 * 3 * 4


SHAPES = ((1, 4, 3, 4), (4, 4, 4, 1))  # 16 x 12


@pytest.mark.parametrize("centre, error", [(0.99, TypeError), (1.9, TypeError), (True, TypeError),
                                           (-1, ValueError), (2, ValueError)])
def test_block_plan_and_train_cost_refuse_a_centre_that_is_not_a_site(centre, error):
    from tnlm.bridge.cost import train_cost
    from tnlm.core.plan import BlockPlan, block_plan

    for build in (block_plan, BlockPlan, train_cost):
        with pytest.raises(error, match="centre must be"):
            build(SHAPES, centre)
    assert block_plan(SHAPES, np.int64(1)).centre == train_cost(SHAPES, 1).blocks.centre == 1


def test_block_plan_refuses_cores_whose_bonds_do_not_match():
    from tnlm.bridge.cost import train_cost
    from tnlm.core.plan import BlockPlan, block_plan

    bad = ((1, 4, 3, 4), (5, 4, 4, 1))
    for build in (block_plan, BlockPlan, train_cost):
        with pytest.raises(ValueError, match=r"core_shapes\[1\] has left bond 5 .*expected 4"):
            build(bad, 0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rows=-1000), ValueError, "rows must be >= 0, got -1000"),
    (dict(rows=2.5), TypeError, "rows must be an int"),
    (dict(in_dim=1600, out_dim=1200), ValueError,
     r"in_dim=1600 does not fit the cores: their input legs \(4, 4\) hold 16"),
    (dict(out_dim=13), ValueError, r"out_dim=13 does not fit the cores: their output legs"),
    (dict(in_dim=0), ValueError, "in_dim must be >= 1"),
    (dict(in_dim=16.0), TypeError, "in_dim must be an int"),
])
def test_choose_mode_refuses_rows_and_dims_that_do_not_fit_the_cores(kwargs, error, match):
    from tnlm.bridge.cost import choose_mode, forward_cost

    args = {"rows": 10, "in_dim": 16, "out_dim": 12, **kwargs}
    with pytest.raises(error, match=match):
        choose_mode(SHAPES, args["rows"], (4, 4), args["in_dim"], args["out_dim"])
    if "rows" not in kwargs:
        with pytest.raises(error, match=match):
            forward_cost(SHAPES, args["in_dim"], args["out_dim"])
    mode, contract, dense = choose_mode(SHAPES, 10, (4, 4), 16, 12)
    assert dense == 2 * 10 * 16 * 12 + forward_cost(SHAPES, 16, 12).rebuild_flops
    assert choose_mode(SHAPES, 10, (4, 4), 15, 12)[2] < dense  # a padded layer's dims fit


@pytest.mark.parametrize("linalg", ["pytorch", "native"])
@pytest.mark.parametrize("method", ["svd", "qr"])
def test_a_big_endian_matrix_decomposes_exactly(linalg, method):
    from tnlm.core import backend as B

    W = np.random.default_rng(0).standard_normal((16, 12))
    big = W.astype(">f8")
    assert not big.dtype.isnative
    old = B.get_linalg()
    B.set_linalg(linalg)
    try:
        mpo = MPO.from_matrix(big, (2, 4, 2), (3, 2, 2), method=method)
    finally:
        B.set_linalg(old)
    np.testing.assert_allclose(mpo.to_matrix(), W, atol=1e-12, rtol=0)
    as_torch = MPO.from_matrix(big, (4, 4), (3, 4), backend="pytorch")
    assert as_torch.dtype == torch.float64
    np.testing.assert_allclose(as_torch.to_matrix().numpy(), W, atol=1e-12, rtol=0)


def test_convert_to_pytorch_takes_the_dtype_of_a_numpy_like():
    from tnlm.core.backend import convert

    x = np.arange(3.0)
    assert convert(x, "pytorch", like=np.ones(2, np.float32)).dtype == torch.float32
    assert convert(torch.ones(2, dtype=torch.float64), "pytorch",
                   like=np.ones(2, ">f4")).dtype == torch.float32
    assert convert(x, "pytorch").dtype == torch.float64  # no like: x's own dtype
    assert convert(x, "pytorch", like=torch.ones(1, dtype=torch.float32)).dtype == torch.float32
    assert convert(x.astype(">f8"), "pytorch").tolist() == [0.0, 1.0, 2.0]


# ------------------------------------------------------------------ audit C: core and pivoted layer
def _pivoted(kind="linear", I=16, J=24, r=4):
    torch.manual_seed(0)
    dense = nn.Linear(I, J) if kind == "linear" else dense_module("conv1d", torch.randn(I, J),
                                                                  torch.randn(J))
    spec = DecompositionSpec(in_shape=(I, 1), out_shape=(1, J), max_bond=r)
    layer = MPOModule.from_module(dense, spec)
    return dense, layer, PivotedLinear.from_mpo(layer)


def test_pivoted_linear_weight_is_read_only_as_an_mpo_layer_s():
    from tnlm.bridge.computed import ReadOnlyWeightError

    _, _, piv = _pivoted()
    x = torch.randn(3, 16)
    with torch.no_grad():
        y0 = piv(x).clone()
    writes = [lambda: nn.init.zeros_(piv.weight), lambda: piv.weight.data.mul_(0),
              lambda: piv.weight.__setitem__(slice(None), 0), lambda: piv.weight.add_(1)]
    for write in writes:
        with pytest.raises(ReadOnlyWeightError):
            write()
    with pytest.raises(ReadOnlyWeightError, match="cannot assign PivotedLinear.weight.*coef"):
        piv.weight = nn.Parameter(torch.zeros(24, 16))
    with torch.no_grad():
        assert torch.equal(piv(x), y0)
    # reading still works and is differentiable through coef and right
    piv.weight.square().sum().backward()
    assert piv.coef.grad is not None and piv.right.grad is not None
    copy = piv.weight.detach().clone()  # an independent copy is writable
    copy.zero_()
    assert float(piv.weight.detach().abs().sum()) > 0


def test_pivoted_linear_weight_has_the_mpo_layer_s_layout_for_conv1d():
    dense, layer, piv = _pivoted("conv1d", I=16, J=16, r=16)
    with torch.no_grad():
        assert piv.weight.shape == layer.weight.shape == (16, 16)
        torch.testing.assert_close(piv.weight, layer.weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(piv.weight, dense.weight.T, rtol=1e-5, atol=1e-5)
        x = torch.randn(3, 16)
        torch.testing.assert_close(x @ piv.weight.T + piv.bias, dense(x), rtol=1e-5, atol=1e-5)
        merged = piv.merge()  # the Conv1D layout stays the merged module's
        torch.testing.assert_close(merged.weight, dense.weight, rtol=1e-5, atol=1e-5)
    _, lin_layer, lin_piv = _pivoted("linear", I=16, J=24)
    assert lin_piv.weight.shape == lin_layer.weight.shape == (24, 16)


def test_symmetric_gauge_after_a_truncation_reports_a_bound_of_the_measured_error():
    from tnlm.core.mpo import combined_error

    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((24, 36))
    m1 = MPO.from_matrix(W0, in_shape=(2, 3, 4), out_shape=(3, 3, 4), max_bond=4)
    m2 = m1.symmetric_gauge(rtol=0.9)
    measured = np.linalg.norm(W0 - m2.to_matrix()) / np.linalg.norm(W0)
    assert measured <= m2.truncation_error + 1e-9
    assert m2.truncation_error < 1.2  # was 1.228, mixing the two references
    # several chains, cut by max_bond or max_error, then gauged with a large rtol
    for k, (ins, outs) in enumerate([((2, 2, 2, 2), (2, 2, 2, 2)), ((2, 2, 2, 2, 2), (3, 1, 3, 1, 3)),
                                     ((2, 3, 4), (3, 3, 4))]):
        W = rng.standard_normal((math.prod(ins), math.prod(outs)))
        for kw in (dict(max_bond=2), dict(max_error=0.4)):
            m = MPO.from_matrix(W, ins, outs, **kw)
            for rtol in (0.3, 0.7, 0.95):
                g = m.symmetric_gauge(rtol=rtol)
                meas = np.linalg.norm(W - g.to_matrix()) / np.linalg.norm(W)
                assert meas <= g.truncation_error + 1e-9, (k, kw, rtol)
                assert g.truncation_error <= m.truncation_error + (1 - m.truncation_error ** 2) \
                    ** 0.5 * 1.0 + 1e-12  # never above the triangle inequality
    # exact parts stay exact: nothing cut by the guard, or an exact MPO
    assert combined_error(0.3, 0.0) == 0.3 and combined_error(0.0, 0.2) == 0.2
    exact = MPO.from_matrix(W0, (2, 3, 4), (3, 3, 4)).symmetric_gauge(rtol=0.5)
    meas = np.linalg.norm(W0 - exact.to_matrix()) / np.linalg.norm(W0)
    assert abs(exact.truncation_error - meas) < 1e-9


@pytest.mark.parametrize("n", [17, 27])
def test_mpos_of_many_sites_run_on_torch_as_on_numpy(n):
    rng = np.random.default_rng(0)
    ins, outs = (2,) * 4 + (1,) * (n - 4), (1,) * (n - 4) + (2,) * 4
    W = rng.standard_normal((16, 16))
    x = rng.standard_normal((3, 16))
    m = MPO.from_matrix(W, ins, outs, max_bond=3)
    mt = m.to_backend("pytorch")
    np.testing.assert_allclose(mt.to_matrix().numpy(), m.to_matrix(), atol=1e-12, rtol=0)
    np.testing.assert_allclose(mt.apply(torch.from_numpy(x)).numpy(), m.apply(x), atol=1e-12,
                               rtol=0)
    for mode in ("contract", "dense"):
        layer = MPOLinear.from_mpo(mt, mode=mode, dtype=torch.float64)
        with torch.no_grad():
            np.testing.assert_allclose(layer(torch.from_numpy(x)).numpy(), m.apply(x),
                                       atol=1e-12, rtol=0)


def test_torch_steps_use_only_einsum_letters_and_squeeze_unit_legs_past_52():
    from tnlm.core.plan import EINSUM_LETTERS, torch_step

    syms = "".join(chr(0x100 + k) for k in range(60))
    eq = syms[:30] + "," + syms[29:60] + "->" + syms[:29] + syms[30:60]
    sizes = {ch: (2 if k < 10 else 1) for k, ch in enumerate(syms)}
    step, squeeze, unsqueeze = torch_step(eq, sizes, rows=syms[12])
    assert set(step) <= set(EINSUM_LETTERS + ",->")
    assert 12 not in squeeze[0] and 10 in squeeze[0] and len(unsqueeze) == 48
    short, sq, unsq = torch_step("\u0100\u0101,\u0101c->\u0100c", {})
    assert short == "ab,bc->ac" and sq == ((), ()) and unsq == ()


def test_mpo_apply_with_no_rows_gives_an_empty_result():
    W = np.random.default_rng(0).standard_normal((8, 12))
    m = MPO.from_matrix(W, n_sites=3)
    assert m.apply(np.zeros((0, 8))).shape == (0, 12)
    y = m.to_backend("pytorch").apply(torch.zeros(2, 0, 8, dtype=torch.float64))
    assert tuple(y.shape) == (2, 0, 12)
    padded = MPO.from_matrix(np.ones((7, 13)), n_sites=2, pad=True)
    assert padded.apply(np.zeros((0, 7))).shape == (0, 13)


def test_a_0_d_input_to_mpo_and_pivoted_layers_names_its_shape():
    _, layer, piv = _pivoted()
    for module in (layer, piv):
        with pytest.raises(ValueError, match=r"last dimension of size in_features=16.*0-d"):
            module(torch.tensor(1.0))
        with pytest.raises(ValueError, match=r"in_features=16 \(16 features\), got shape \(3, 5\)"):
            module(torch.randn(3, 5))
        assert tuple(module(torch.randn(16)).shape) == (24,)


def test_mpo_astype_takes_numpy_and_torch_dtypes_and_names_a_bad_one():
    m = MPO.from_matrix(np.random.default_rng(0).standard_normal((8, 12)), n_sites=3)
    mt = m.to_backend("pytorch")
    assert m.astype(torch.float32).dtype == np.float32
    assert mt.astype(np.float32).dtype == torch.float32
    assert mt.astype("float32").dtype == torch.float32
    assert m.astype("float32").dtype == np.float32
    assert mt.astype(np.dtype(">f8")).dtype == torch.float64
    for mpo in (m, mt):
        for bad in ("nonsense", None, object):
            with pytest.raises(TypeError, match="dtype"):
                mpo.astype(bad)
        with pytest.raises(TypeError, match=r"dtype=torch.bfloat16 would give cores\[0\]"):
            mpo.astype(torch.bfloat16)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_check_matrix_refuses_masks_and_meta_takes_np_matrix_and_detaches():
    from tnlm.core.validation import check_matrix

    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 12))
    mat = MPO.from_matrix(np.matrix(W), n_sites=3, max_bond=2)
    ref = MPO.from_matrix(W, n_sites=3, max_bond=2)
    assert mat.truncation_error == pytest.approx(ref.truncation_error, abs=1e-12)
    assert type(check_matrix(np.matrix(W))) is np.ndarray
    with pytest.raises(ValueError, match="masked array with 52 masked entries"):
        MPO.from_matrix(np.ma.masked_array(W, mask=W > 0), n_sites=3)
    unmasked = np.ma.masked_array(W, mask=np.zeros_like(W, dtype=bool))
    np.testing.assert_allclose(MPO.from_matrix(unmasked, n_sites=3).to_matrix(), W, atol=1e-12)
    with pytest.raises(ValueError, match="meta device"):
        MPO.from_matrix(torch.empty(8, 12, device="meta"), n_sites=3)
    Wt = torch.tensor(W, requires_grad=True)
    m = MPO.from_matrix(Wt, n_sites=3)
    assert all(c.grad_fn is None and not c.requires_grad for c in m.cores)
    assert not check_matrix(Wt).requires_grad


def test_docs_say_a_padded_truncation_is_measured_on_the_logical_block():
    from pathlib import Path

    text = Path(__file__).resolve().parents[1].joinpath("docs", "concepts.md").read_text()
    assert "an upper bound of the error on the logical block" not in text
    assert "W is the logical (I, J) block" in text
    assert "padded chain" in MPO.singular_values.__doc__
    assert "padded chain" in MPO.entanglement_entropy.__doc__


def test_from_matrix_takes_32_sites_and_refuses_33_by_name():
    """numpy arrays hold at most 64 dimensions and the dense matrix of an n-site MPO is
    reshaped to 2n legs: 32 sites decompose exactly, 33 are refused up front (they failed
    inside numpy with "maximum supported dimension")."""
    import numpy as np

    from tnlm.core.mpo import MPO
    from tnlm.core.validation import MAX_SITES

    assert MAX_SITES == 32
    W = np.random.default_rng(0).standard_normal((16, 16))
    shape = [2] * 4 + [1] * 28
    m = MPO.from_matrix(W, shape, shape)
    assert len(m.cores) == 32 and np.abs(m.to_matrix() - W).max() < 1e-12
    with pytest.raises(ValueError, match="must have at most 32 sites, got 33"):
        MPO.from_matrix(W, shape + [1], shape + [1])
    with pytest.raises(ValueError, match="n_sites must be at most 32, got 33"):
        MPO.from_matrix(W, n_sites=33)


# ------------------------------------------------------------------ core and bridge audit
def test_an_embedding_with_max_norm_two_is_refused():
    """``max_norm=2.0`` (or 2, or 0.0) passed the check meant for ``norm_type``'s default
    2.0 and was dropped: rows of norm about 8 where the original renormalizes to 2."""
    for max_norm in (2.0, 2, 0.0, 1.5):
        with pytest.raises(ValueError, match="max_norm"):
            MPOEmbedding.from_embedding(nn.Embedding(30, 6, max_norm=max_norm), n_sites=2)
    MPOEmbedding.from_embedding(nn.Embedding(30, 6, norm_type=3.0), n_sites=2)  # unused


def test_pivoting_freezes_both_tensors_as_central_whatever_the_central_site():
    """``pivot_layers`` gave ``coef`` site 0's flag and ``right`` site 1's: with the central
    core at site 0 and the lightweight set (auxiliary cores train), ``right`` trained
    although both count as central."""
    from tnlm.bridge.finetune import set_trainable

    torch.manual_seed(0)
    net = nn.Sequential(MPOLinear.from_linear(nn.Linear(16, 12), (16, 1), (1, 12),
                                              max_bond=4))
    m = net[0]
    assert m.central_index == 0
    set_trainable(net, "lightweight")
    assert not m.cores[0].requires_grad and m.cores[1].requires_grad
    new = pivot_layers(net)["0"]
    assert not new.coef.requires_grad and not new.right.requires_grad


def test_spectra_after_a_cut_in_symmetric_gauge_are_those_of_the_cut_cores():
    """``symmetric_gauge`` with a cut cached the spectra it recorded before the cuts at
    lower bonds, which change the matrix: bond 1 reported 7.819 where the cores give
    7.764. Without a cut the cached spectra are kept (exact)."""
    from tnlm.core import sweeps

    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    W = (u * 0.8 ** np.arange(64)) @ v.T  # bond spectra of about 2:1: rtol 0.6 cuts
    mpo = MPO.from_matrix(W, (4, 4, 4), (4, 4, 4))
    for rtol, cut in ((0.6, True), (None, False)):
        out = mpo.symmetric_gauge(rtol=rtol)
        fresh = sweeps.bond_spectra(out.cores)[0]
        assert (out.bond_dims != mpo.bond_dims) == cut
        for a, b in zip(out.bond_spectra(), fresh):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out.entanglement_entropy(),
                                   [spectrum_entropy(s) for s in fresh], rtol=1e-10)


def test_choose_mode_refuses_a_row_count_that_is_not_a_size():
    """``choose_mode(-50)`` returned negative FLOPs, ``choose_mode(2.9)`` counted 2 rows and
    ``True`` 1; both layer kinds now raise, naming ``rows``."""
    lin = MPOLinear.from_linear(nn.Linear(16, 12), n_sites=2)
    emb = MPOEmbedding.from_embedding(nn.Embedding(30, 6), n_sites=2)
    for layer in (lin, emb):
        with pytest.raises(ValueError, match="rows must be >= 0"):
            layer.choose_mode(-50)
        for bad in (2.9, True):
            with pytest.raises(TypeError, match="rows must be an int"):
                layer.choose_mode(bad)
        assert layer.choose_mode(8)[0] in ("contract", "dense", "gather")


def test_a_numpy_view_of_an_mpo_weight_is_read_only():
    """``layer.weight.detach().numpy()[:] = 0`` zeroed the array and nothing else: the
    layer's weight is computed from its cores, so the write was lost without a word.
    Every other alias refuses writes; the numpy view is now read-only as well."""
    layer = MPOLinear.from_linear(nn.Linear(8, 6), n_sites=2)
    w = layer.weight.detach()
    for a in (w.numpy(), np.asarray(w), np.array(w, copy=False)):
        with pytest.raises(ValueError, match="read-only"):
            a[:] = 0
    b = np.array(w)  # a copy: the user's own, writable
    b[:] = 0
    assert float(np.abs(layer.weight.detach().numpy()).sum()) > 0
