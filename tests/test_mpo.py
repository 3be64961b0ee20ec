"""The core MPO: round trips, canonical forms, truncation, entanglement, backends, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnlm import MPO
from tnlm.core.plan import (
    apply_equation,
    apply_plan,
    dense_equation,
    dense_plan,
    gather_equation,
    gather_plan,
)
from tnlm.core.spectra import central_bond, spectrum_entropy, tail_sums

from .conftest import rel_err

SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=4)


# ---------------------------------------------------------------- round trips
@settings(max_examples=40, deadline=None)
@given(
    in_shape=SHAPES,
    data=st.data(),
    dtype=st.sampled_from(["float64", "float32"]),
    method=st.sampled_from(["svd", "qr"]),
)
def test_untruncated_round_trip_random(in_shape, data, dtype, method):
    out_shape = data.draw(
        st.lists(st.integers(1, 4), min_size=len(in_shape), max_size=len(in_shape))
    )
    seed = data.draw(st.integers(0, 2**31))
    W = (
        np.random.default_rng(seed)
        .standard_normal((int(np.prod(in_shape)), int(np.prod(out_shape))))
        .astype(dtype)
    )
    mpo = MPO.from_matrix(W, in_shape, out_shape, method=method)
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert rel_err(mpo.to_matrix(), W) <= tol
    assert mpo.truncation_error == 0.0
    assert mpo.to_matrix().dtype == W.dtype
    assert mpo.is_canonical(mpo.n_sites - 1)


def test_graph_structure(rng):
    mpo = MPO.from_matrix(rng.standard_normal((48, 60)), (2, 4, 6), (3, 4, 5))
    nodes = mpo.nodes
    assert [n.name for n in nodes] == ["T0", "T1", "T2"]
    assert nodes[0]["right"] is nodes[1]["left"] and nodes[0]["right"].name == "bond0"
    assert not nodes[0]["right"].is_dangling()
    assert all(n["in"].is_dangling() and n["out"].is_dangling() for n in nodes)
    assert mpo.bond_dims == (6, 30)
    assert mpo.in_shape == (2, 4, 6) and mpo.out_shape == (3, 4, 5)
    assert mpo.num_params == sum(int(np.prod(c.shape)) for c in mpo.cores)
    assert mpo.compression_ratio == pytest.approx(48 * 60 / mpo.num_params)
    assert mpo.central_index == 1 and mpo.auxiliary_indices == (0, 2)
    assert "central" in mpo.summary() and "bond_dims=(6, 30)" in repr(mpo)


def test_central_index_even_sites(rng):
    mpo = MPO.from_matrix(rng.standard_normal((2 * 3 * 8 * 2, 16)), (2, 3, 8, 2), (2, 2, 2, 2))
    params = mpo.site_params
    assert params[2] > params[1] and mpo.central_index == 2


@pytest.mark.parametrize(
    "key, shape",
    [
        ("encoder.layer.0.attention.self.query.weight", (384, 384)),
        ("encoder.layer.3.intermediate.dense.weight", (1536, 384)),
        ("encoder.layer.5.output.dense.weight", (384, 1536)),
    ],
)
def test_round_trip_minilm(minilm_weights, key, shape):
    W = minilm_weights[key].T  # y = x @ W convention: W is linear.weight.T
    assert W.shape == shape[::-1]
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
        Wd = W.astype(dtype)
        mpo = MPO.from_matrix(Wd)
        assert rel_err(mpo.to_matrix(), Wd) <= tol


def test_round_trip_minilm_word_embedding_padded(minilm_weights):
    E = minilm_weights["embeddings.word_embeddings.weight"]  # (30522, 384)
    with pytest.raises(ValueError, match="I=30522.*pad=True"):
        MPO.from_matrix(E)
    mpo = MPO.from_matrix(E, pad=True)
    assert mpo.in_shape == (6, 8, 10, 8, 8) and mpo.padded and mpo.shape == (30522, 384)
    assert rel_err(mpo.to_matrix(), E) <= 1e-5
    x = np.zeros((2, 30522), np.float32)
    x[0, 17], x[1, 30521] = 1, 1
    assert np.allclose(mpo.apply(x), E[[17, 30521]], atol=1e-5)


def test_explicit_padding(rng):
    W = rng.standard_normal((10, 7))
    with pytest.raises(
        ValueError, match=r"in_shape=\(3, 4\) has product 12, but I=10; pass pad=True"
    ):
        MPO.from_matrix(W, (3, 4), (7, 1))
    mpo = MPO.from_matrix(W, (3, 4), (2, 4), pad=True)
    assert mpo.shape == (10, 7) and rel_err(mpo.to_matrix(), W) <= 1e-12
    x = rng.standard_normal((5, 10))
    assert np.allclose(mpo.apply(x), x @ W)


# ---------------------------------------------------------------- contraction
def test_apply_and_plans(rng):
    W = rng.standard_normal((64, 96))
    mpo = MPO.from_matrix(W, (4, 4, 4), (4, 6, 4))
    x = rng.standard_normal((3, 5, 64))
    assert np.allclose(mpo.apply(x), x @ W)
    plan = mpo.apply_plan(15)
    assert plan is mpo.apply_plan(15)  # cached
    assert plan.flops > 0 and plan.largest_intermediate > 0 and plan.flops <= plan.naive_flops
    dense = mpo.dense_plan()
    assert dense.largest_intermediate >= 64 * 96
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\)"):
        mpo.apply(rng.standard_normal((3, 63)))


def test_chain_plans_from_core_shapes(rng):
    """The shape-only chain plans (used by the torch modules) compute W, x @ W and rows of W,
    at the FLOPs of the graph plans of the MPO."""
    in_shape, out_shape = (4, 4, 4), (4, 6, 4)
    W = rng.standard_normal((64, 96))
    mpo = MPO.from_matrix(W, in_shape, out_shape)
    shapes = tuple(tuple(c.shape) for c in mpo.cores)
    assert dense_equation(3) == "aehb,bfic,cgjd->efghij"
    assert apply_equation(3) == "aehb,bfic,cgjd,kefg->khij"
    assert gather_equation(3) == "kahb,kbic,kcjd->khij"
    plan = dense_plan(shapes)
    assert plan is dense_plan(shapes) and plan.flops == mpo.dense_plan().flops
    np.testing.assert_allclose(plan(*mpo.cores).reshape(64, 96), W, atol=1e-12)
    x = rng.standard_normal((5, 64))
    plan = apply_plan(shapes, 5, in_shape)
    assert plan.flops == mpo.apply_plan(5).flops
    np.testing.assert_allclose(plan(*mpo.cores, x.reshape(5, *in_shape)).reshape(5, 96), x @ W,
                               atol=1e-12)
    rows = np.array([0, 17, 63, 17])
    idx = np.stack(np.unravel_index(rows, in_shape))  # (sites, rows): each row's input index
    slices = [np.moveaxis(c[:, idx[k]], 1, 0) for k, c in enumerate(mpo.cores)]
    got = gather_plan(shapes, len(rows))(*slices).reshape(len(rows), 96)
    np.testing.assert_allclose(got, W[rows], atol=1e-12)


def test_plan_torch_executor_matches_numpy(rng):
    W = rng.standard_normal((64, 96))
    mpo = MPO.from_matrix(W, (4, 4, 4), (4, 6, 4))
    x = rng.standard_normal((7, 64))
    y_np = mpo.apply(x)
    y_t = mpo.to_backend("pytorch").apply(torch.from_numpy(x))
    assert np.allclose(y_t.numpy(), y_np, atol=1e-12)


# ---------------------------------------------------------------- canonical forms
def test_canonicalize_every_center(rng):
    W = rng.standard_normal((96, 81))
    mpo = MPO.from_matrix(W, (2, 4, 3, 4), (3, 3, 3, 3))
    ref = mpo.entanglement_entropy()
    for c in range(mpo.n_sites):
        mc = mpo.canonicalize(c)
        assert mc.is_canonical(c, tol=1e-10) and mc.center == c
        assert rel_err(mc.to_matrix(), W) <= 1e-12
        mc._spectra = None  # force recomputation from this gauge
        assert np.allclose(mc.entanglement_entropy(), ref, atol=1e-10)
    # a chain canonical at 3 is not canonical at 0
    assert not mpo.canonicalize(3).is_canonical(0)


def test_singular_values_are_unfolding_spectra(rng):
    W = rng.standard_normal((24, 30))
    mpo = MPO.from_matrix(W, (2, 3, 4), (3, 2, 5), method="qr").symmetric_gauge()
    T = W.reshape(2, 3, 4, 3, 2, 5).transpose(0, 3, 1, 4, 2, 5)
    for bond in range(2):
        rows = int(np.prod(T.shape[: 2 * (bond + 1)]))
        s = np.linalg.svd(T.reshape(rows, -1), compute_uv=False)
        got = mpo.singular_values(bond)
        assert np.allclose(got, s[: len(got)], atol=1e-12)
        assert np.allclose(s[len(got) :], 0, atol=1e-12)


def test_symmetric_gauge(rng):
    W = rng.standard_normal((64, 64))
    mpo = MPO.from_matrix(W, (4, 4, 4), (4, 4, 4)).symmetric_gauge()
    assert mpo.gauge == "symmetric" and rel_err(mpo.to_matrix(), W) <= 1e-12
    c = mpo.cores
    for bond in range(2):
        s = mpo.singular_values(bond)
        left = c[0].reshape(-1, c[0].shape[3])
        for k in range(1, bond + 1):
            left = (left @ c[k].reshape(c[k].shape[0], -1)).reshape(-1, c[k].shape[3])
        right = c[-1].reshape(c[-1].shape[0], -1)
        for k in range(len(c) - 2, bond, -1):
            right = (c[k].reshape(-1, c[k].shape[3]) @ right).reshape(c[k].shape[0], -1)
        assert np.allclose(left.T @ left, np.diag(s), atol=1e-10)  # U √Λ
        assert np.allclose(right @ right.T, np.diag(s), atol=1e-10)  # √Λ V^T


def test_symmetric_gauge_guards_rank_deficient_bonds(rng):
    A = [rng.standard_normal((4, 4)) for _ in range(3)]
    W = np.kron(A[0], np.kron(A[1], A[2]))  # a product operator: every bond has rank 1
    mpo = MPO.from_matrix(W, (4, 4, 4), (4, 4, 4), method="qr")
    assert mpo.bond_dims == (16, 16)
    sym = mpo.symmetric_gauge()
    assert sym.bond_dims == (1, 1)
    assert all(np.isfinite(c).all() for c in sym.cores)
    assert rel_err(sym.to_matrix(), W) <= 1e-12


# ---------------------------------------------------------------- truncation
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_bond=5),
        dict(max_bond=[3, 20, 4]),
        dict(cutoff=0.08),
        dict(max_error=0.3),
        dict(max_error=[0.1, 0.2, 0.05]),
    ],
)
def test_truncation_error_is_measured_error(rng, kwargs):
    W = rng.standard_normal((128, 96))
    mpo = MPO.from_matrix(W, (2, 4, 4, 4), (2, 4, 4, 3))
    t = mpo.truncate(**kwargs)
    measured = rel_err(t.to_matrix(), W)
    assert t.truncation_error > 0
    assert t.truncation_error == pytest.approx(measured, rel=1e-9)
    assert t.is_canonical(t.n_sites - 1)
    # the same policies at decomposition time
    direct = MPO.from_matrix(W, (2, 4, 4, 4), (2, 4, 4, 3), **kwargs)
    assert direct.truncation_error == pytest.approx(rel_err(direct.to_matrix(), W), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(max_error=st.floats(0.01, 0.9), seed=st.integers(0, 10_000))
def test_max_error_bounds_whole_matrix(max_error, seed):
    W = np.random.default_rng(seed).standard_normal((64, 64))
    t = MPO.from_matrix(W, (4, 4, 4), (4, 4, 4)).truncate(max_error=max_error)
    assert rel_err(t.to_matrix(), W) <= max_error * (1 + 1e-9)


def test_truncation_policy_semantics(rng):
    W = rng.standard_normal((64, 64))
    mpo = MPO.from_matrix(W, (4, 4, 4), (4, 4, 4))
    assert mpo.truncate(max_bond=[2, 7]).bond_dims == (2, 7)
    # cutoff is relative to ||W||_F, not to s_max
    s = mpo.singular_values(0)
    norm = np.linalg.norm(W)
    c = float(s[3] / norm) * 1.0001
    assert mpo.truncate(cutoff=[c, 0.0]).bond_dims[0] == 3
    # per-bond max_error bounds each bond's discarded weight
    t = mpo.truncate(max_error=[0.2, 0.1])
    assert t.discarded[0] <= 0.2 * norm and t.discarded[1] <= 0.1 * norm * (1 + 1e-9)
    # truncating to the full bond is lossless
    assert mpo.truncate(max_bond=10_000).truncation_error == pytest.approx(0, abs=1e-12)


def test_truncation_float32(rng):
    W = rng.standard_normal((64, 64)).astype(np.float32)
    t = MPO.from_matrix(W, (4, 4, 4), (4, 4, 4)).truncate(max_bond=6)
    assert t.dtype == np.float32
    assert t.truncation_error == pytest.approx(rel_err(t.to_matrix(), W), rel=1e-4)


# ---------------------------------------------------------------- entanglement
def test_entropy_values():
    assert spectrum_entropy(np.array([3.0])) == 0.0
    assert spectrum_entropy(np.ones(8)) == pytest.approx(np.log(8))
    assert spectrum_entropy(np.ones(8), alpha=2) == pytest.approx(np.log(8))
    s = np.array([2.0, 1.0])
    p = np.array([0.8, 0.2])
    assert spectrum_entropy(s) == pytest.approx(-(p * np.log(p)).sum())
    assert spectrum_entropy(s, alpha=2) == pytest.approx(-np.log((p**2).sum()))
    assert spectrum_entropy(s, alpha=np.inf) == pytest.approx(-np.log(0.8))
    with pytest.raises(ValueError, match="alpha"):
        spectrum_entropy(s, alpha=0)


def test_tail_sums():
    s = np.array([3.0, 2.0, 1.0], dtype=np.float32)
    tail = tail_sums(s)
    assert tail.dtype == np.float64 and tail.tolist() == [14.0, 5.0, 1.0, 0.0]
    assert tail_sums(np.array([])).tolist() == [0.0]
    s = np.random.default_rng(0).random(50)
    np.testing.assert_allclose(tail_sums(s), [np.sum(s[r:] ** 2) for r in range(51)], rtol=1e-12)


@pytest.mark.parametrize(
    "bond_dims, central_index, expected",
    [
        ((9, 144, 256, 16), 2, 2),  # 768 x 768 on five sites: the larger right bond
        ((16, 12), 1, 0),  # the larger left bond
        ((16, 16), 1, 0),  # tie: the left one
        ((4, 8, 8), 1, 1),  # site 1 touches bonds 0 (4) and 1 (8)
        ((5, 3), 0, 0),  # an end site touches one bond
        ((5, 3), 2, 1),
    ],
)
def test_central_bond(bond_dims, central_index, expected):
    assert central_bond(bond_dims, central_index) == expected


def test_central_bond_needs_a_bond():
    with pytest.raises(ValueError, match="no bonds"):
        central_bond((), 0)
    single = MPO.from_matrix(np.eye(4), (4,), (4,))
    with pytest.raises(ValueError, match="no bonds"):
        _ = single.central_bond


def test_mpo_central_bond_and_entropy(rng):
    mpo = MPO.from_matrix(rng.standard_normal((64, 48)), (4, 4, 4), (4, 4, 3))
    assert mpo.bond_dims == (16, 12) and mpo.central_index == 1
    assert mpo.central_bond == 0
    assert mpo.central_entropy() == mpo.entanglement_entropy(0)
    assert mpo.central_entropy(alpha=2) == mpo.entanglement_entropy(0, alpha=2)
    assert mpo.central_entropy(alpha=2) < mpo.central_entropy()
    mpo = MPO.from_matrix(rng.standard_normal((48, 64)), (3, 4, 4), (4, 4, 4))
    assert mpo.bond_dims == (12, 16) and mpo.central_bond == 1


def test_entanglement_entropy_api(rng):
    A = [rng.standard_normal((4, 4)) for _ in range(3)]
    mpo = MPO.from_matrix(np.kron(A[0], np.kron(A[1], A[2])), (4, 4, 4), (4, 4, 4))
    assert np.allclose(mpo.entanglement_entropy(), 0, atol=1e-12)  # product operator
    W = rng.standard_normal((64, 64))
    mpo = MPO.from_matrix(W, (4, 4, 4), (4, 4, 4))
    ent = mpo.entanglement_entropy()
    assert ent.shape == (2,) and (ent > 0).all()
    assert mpo.entanglement_entropy(1) == pytest.approx(ent[1])
    assert mpo.entanglement_entropy(0, alpha=2) <= ent[0] + 1e-12  # Rényi-2 <= von Neumann
    with pytest.raises(ValueError, match="bond"):
        mpo.singular_values(2)


# ---------------------------------------------------------------- backends
def test_numpy_and_pytorch_backends_agree(rng):
    W = rng.standard_normal((96, 64))
    a = MPO.from_matrix(W, (2, 4, 3, 4), (4, 2, 2, 4), max_bond=6)
    b = MPO.from_matrix(torch.from_numpy(W), (2, 4, 3, 4), (4, 2, 2, 4), max_bond=6)
    assert b.backend == "pytorch" and a.backend == "numpy"
    assert b.bond_dims == a.bond_dims
    assert np.allclose(b.to_matrix().numpy(), a.to_matrix(), atol=1e-12)
    assert b.truncation_error == pytest.approx(a.truncation_error, rel=1e-10)
    assert np.allclose(b.entanglement_entropy(), a.entanglement_entropy(), atol=1e-10)
    for c in range(4):
        assert b.canonicalize(c).is_canonical(c)
    assert np.allclose(b.symmetric_gauge().to_matrix().numpy(), a.to_matrix(), atol=1e-12)
    c = MPO.from_matrix(W, (2, 4, 3, 4), (4, 2, 2, 4), max_bond=6, backend="pytorch")
    assert c.backend == "pytorch"
    assert a.to_backend("pytorch").backend == "pytorch"


def test_gradients_flow_through_cores(rng):
    W = torch.from_numpy(rng.standard_normal((32, 32)))
    mpo = MPO.from_matrix(W, (2, 4, 4), (4, 4, 2))
    cores = [c.clone().requires_grad_(True) for c in mpo.cores]
    m = MPO(cores)
    x = torch.randn(5, 32, dtype=torch.float64)
    (m.apply(x) ** 2).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cores)
    cores2 = [c.detach().clone().requires_grad_(True) for c in mpo.cores]
    MPO(cores2).to_matrix().sum().backward()
    assert all(c.grad is not None for c in cores2)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "W, exc, match",
    [
        (np.ones(16), ValueError, "W must be a 2-D matrix"),
        (np.ones((2, 4, 4)), ValueError, "W must be a 2-D matrix"),
        (np.full((4, 4), np.nan), ValueError, "W contains NaN or Inf"),
        (np.array([[1.0, np.inf], [0, 1]]), ValueError, "W contains NaN or Inf"),
        (np.ones((0, 4)), ValueError, "W must be non-empty"),
        (np.ones((4, 4), complex), TypeError, "W has complex dtype"),
        (np.ones((4, 4), bool), TypeError, "W has dtype bool"),
        (np.ones((4, 4), np.float16), TypeError, "float32 or float64"),
        (torch.ones(4, 4, dtype=torch.bfloat16), TypeError, "float32 or float64"),
        ("abc", TypeError, "W has dtype"),
    ],
)
def test_bad_matrix(W, exc, match):
    with pytest.raises(exc, match=match):
        MPO.from_matrix(W, (2, 2), (2, 2))


def test_bad_arguments(rng):
    W = rng.standard_normal((16, 16))
    with pytest.raises(ValueError, match=r"out_shape=\(4, 3\) has product 12, but J=16"):
        MPO.from_matrix(W, (4, 4), (4, 3))
    with pytest.raises(ValueError, match="same number of sites|has 3 sites"):
        MPO.from_matrix(W, (4, 4), (2, 2, 4))
    with pytest.raises(ValueError, match="max_bond must be >= 1"):
        MPO.from_matrix(W, (4, 4), (4, 4), max_bond=0)
    with pytest.raises(ValueError, match="max_bond must have one entry per bond"):
        MPO.from_matrix(W, (2, 2, 4), (4, 2, 2), max_bond=[3])
    with pytest.raises(TypeError, match="max_bond must be an int"):
        MPO.from_matrix(W, (4, 4), (4, 4), max_bond=2.5)
    with pytest.raises(ValueError, match="cutoff must be finite and >= 0"):
        MPO.from_matrix(W, (4, 4), (4, 4), cutoff=-1)
    with pytest.raises(ValueError, match="max_error must be finite"):
        MPO.from_matrix(W, (4, 4), (4, 4), max_error=float("nan"))
    with pytest.raises(ValueError, match=r"in_shape\[1\] must be >= 1"):
        MPO.from_matrix(W, (16, 0), (4, 4))
    with pytest.raises(TypeError, match="n_sites must be an int"):
        MPO.from_matrix(W, n_sites=2.0)
    with pytest.raises(ValueError, match="I=17"):
        MPO.from_matrix(rng.standard_normal((17, 16)), n_sites=2)
    with pytest.raises(ValueError, match="method='qr' gives exact"):
        MPO.from_matrix(W, (4, 4), (4, 4), max_bond=2, method="qr")
    with pytest.raises(ValueError, match="backend must be one of"):
        MPO.from_matrix(W, (4, 4), (4, 4), backend="jax")
    mpo = MPO.from_matrix(W, (4, 4), (4, 4))
    with pytest.raises(ValueError, match=r"center must be in \[0, 2\)"):
        mpo.canonicalize(2)
    with pytest.raises(TypeError, match="x is a pytorch array"):
        mpo.apply(torch.ones(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="bond 0"):
        MPO([np.ones((1, 2, 2, 3)), np.ones((2, 2, 2, 1))])
    with pytest.raises(ValueError, match="boundary bonds"):
        MPO([np.ones((2, 2, 2, 1))])


def test_symmetric_gauge_error_reference_and_zero_matrix(rng):
    W = rng.standard_normal((16, 16))
    mpo = MPO.from_matrix(W, (4, 4), (4, 4))
    sym = mpo.symmetric_gauge(rtol=0.5)
    assert sym.truncation_error == pytest.approx(rel_err(sym.to_matrix(), W), rel=1e-9)
    zero = MPO.from_matrix(np.zeros((8, 8)), (2, 2, 2), (2, 2, 2)).symmetric_gauge()
    assert all(np.isfinite(c).all() for c in zero.cores)
    assert np.array_equal(zero.to_matrix(), np.zeros((8, 8)))


def test_padded_truncation_error_is_an_upper_bound(rng):
    W = rng.standard_normal((30, 26))
    t = MPO.from_matrix(W, (2, 4, 4), (2, 4, 4), pad=True).truncate(max_bond=3)
    assert rel_err(t.to_matrix(), W) <= t.truncation_error * (1 + 1e-9)
    with pytest.raises(ValueError, match="max_bond must be >= 1"):
        MPO.from_matrix(W[:4, :4], (4,), (4,)).truncate(max_bond=-3)


def test_truncating_a_padded_mpo_whose_padding_holds_weight_keeps_the_bound(rng):
    """A trained padded layer carries weight in its padding: ``max_error`` and the
    reported error are the logical block's (measured), never the padded chain's."""
    W = rng.standard_normal((12, 12))
    m = MPO.from_matrix(W, (4, 4), (4, 4), pad=True)
    cores = m.cores
    cores[0] = cores[0] + 5.0 * rng.standard_normal(cores[0].shape)  # weight everywhere
    heavy = MPO(cores, in_dim=12, out_dim=12)
    assert heavy.norm() == pytest.approx(np.linalg.norm(heavy.to_matrix()), rel=1e-12)
    assert heavy._chain_norm() > 1.2 * heavy.norm()  # the padding holds weight
    for kw in (dict(max_error=0.3), dict(max_bond=2), dict(cutoff=0.2)):
        t = heavy.truncate(**kw)
        measured = rel_err(t.to_matrix(), heavy.to_matrix())
        assert t.truncation_error == pytest.approx(measured, rel=1e-9, abs=1e-12)
        if "max_error" in kw:
            assert measured <= 0.3


def test_cores_an_mpo_cannot_hold_are_refused_naming_them(rng):
    good = MPO.from_matrix(rng.standard_normal((4, 6)), (2, 2), (2, 3)).cores
    for bad, kind, match in [
            (good[1].astype(np.complex128), TypeError, r"cores\[1\] has dtype complex128"),
            (torch.as_tensor(good[1]).to(torch.complex128), TypeError, r"cores\[0\] .*complex"),
            (np.ones(good[1].shape, dtype=np.int64), TypeError, r"cores\[1\] has dtype int64"),
            (np.where(np.arange(good[1].size).reshape(good[1].shape) == 0, np.nan, good[1]),
             ValueError, r"cores\[1\] holds NaN or infinite"),
            (np.full(good[1].shape, np.inf), ValueError, r"cores\[1\] holds NaN or infinite")]:
        first = torch.as_tensor(good[0]) if torch.is_tensor(bad) else good[0]
        if torch.is_tensor(bad):
            first = first.to(bad.dtype)
        with pytest.raises(kind, match=match):
            MPO([first, bad])


def test_gauge_and_shape_arguments_are_checked(rng):
    m = MPO.from_matrix(rng.standard_normal((16, 16)), (4, 4), (4, 4))
    for rtol in (float("nan"), 1, 2.0, -1e-3):
        with pytest.raises(ValueError, match="rtol must be a number in"):
            m.symmetric_gauge(rtol)
    with pytest.raises(ValueError, match="tol must be a number >= 0"):
        m.is_canonical(1, tol=-1)
    with pytest.raises(ValueError, match=r"in_shape=\(64, 128\) has product 8192, more than"):
        MPO.from_matrix(np.ones((2, 2)), (64, 128), (2, 1), pad=True)
    with pytest.raises(TypeError, match="pad must be a bool"):
        MPO.from_matrix(np.ones((16, 16)), pad="no")
    with pytest.raises(ValueError, match="n_sites=5 disagrees with in_shape, which has 2"):
        MPO.from_matrix(np.ones((16, 16)), (4, 4), n_sites=5)
    with pytest.raises(ValueError, match="n_sites=3 disagrees with out_shape"):
        MPO.from_matrix(np.ones((16, 16)), out_shape=(4, 4), n_sites=3)
    assert MPO.from_matrix(np.ones((16, 16)), (4, 4), n_sites=2).n_sites == 2
    assert MPO.from_matrix(np.ones((32, 32))).n_sites == 5
    t = MPO.from_matrix(torch.randn(16, 16, dtype=torch.float32), (4, 4), (4, 4))
    with pytest.raises(TypeError, match="x has dtype torch.float64, the MPO's cores "
                                        "torch.float32"):
        t.apply(torch.randn(3, 16, dtype=torch.float64))


def test_budget_helpers_refuse_nonsense():
    from tnlm.core.budget import mpo_params
    from tnlm.core.pivot import pivoted_rank_for_fraction

    with pytest.raises(ValueError, match="max_bond"):
        mpo_params((4, 4), (4, 4), -3)
    for bad in (float("nan"), -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\]"):
            pivoted_rank_for_fraction(64, 64, bad)
    assert pivoted_rank_for_fraction(64, 64, 0.0) == 1  # the floor; budgets are checked above


def test_mpo_refuses_a_center_gauge_or_dims_it_would_only_record(rng):
    cores = MPO.from_matrix(rng.standard_normal((4, 6)), (2, 2), (2, 3)).cores
    with pytest.raises(ValueError, match=r"center must be in \[0, 2\), got 99"):
        MPO(cores, center=99)
    with pytest.raises(ValueError, match="gauge must be one of"):
        MPO(cores, gauge="bogus")
    with pytest.raises(TypeError, match="in_dim must be an int or None, got 3.7"):
        MPO(cores, in_dim=3.7)
    assert MPO(cores, center=-1, gauge="canonical", in_dim=np.int64(4)).center == 1
