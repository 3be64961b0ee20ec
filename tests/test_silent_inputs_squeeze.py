"""Dimension squeezing and data-aware layers: inputs and paths that once gave a silently
wrong result (a non-greedy multi-cut, a stale cached norm, a half-precision error estimate
without the rounding, a float rank truncated) or failed late: each is now handled or refused
before any work, naming the argument."""

import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.common import one_thread  # noqa: F401 - one_thread: autouse, one intra-op thread
from tnlm.bridge import MPOLinear
from tnlm.compress import DimensionSqueezer, squeeze
from tnlm.compress.calibration import InputStats
from tnlm.compress.data_aware import WhitenedLayer, output_error


def two_site(sigma, seed):
    """A 2-site MPO layer (4x4 sites, 16 -> 16) whose bond-0 spectrum is exactly ``sigma``."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigma)
    A = torch.linalg.qr(torch.randn(16, r, generator=g))[0]       # orthonormal columns
    B = torch.linalg.qr(torch.randn(16, r, generator=g))[0].T     # orthonormal rows
    return MPOLinear([A.reshape(1, 4, 4, r), (torch.tensor(sigma)[:, None] * B).reshape(r, 4, 4, 1)])


def near_zero_and_flat():
    return nn.Sequential(two_site([1.0] * 2 + [1e-4] * 6, 0),   # 6 near-zero values
                         two_site([1.0] * 8, 1))                 # a flat spectrum


def test_several_cuts_per_iteration_follow_the_greedy_schedule():
    plan = DimensionSqueezer(near_zero_and_flat(), lambda m: 0.0, delta=math.inf,
                             log=None).schedule(2)
    assert [(n, b, d) for n, b, d, _ in plan] == [("0", 0, 7), ("0", 0, 6)]
    model = near_zero_and_flat()
    res = DimensionSqueezer(model, lambda m: 0.0, delta=math.inf, max_iters=1,
                            cuts_per_iter=2, log=None).run()
    # the near-zero bond is cut twice, the flat one (added error 1/8 per cut) never
    assert [(s.module, s.bond, s.old_dim, s.new_dim) for s in res.history] == [
        ("0", 0, 8, 7), ("0", 0, 7, 6)]
    assert [s.added_error for s in res.history] == pytest.approx([a for *_, a in plan])
    assert sum(s.added_error for s in res.history) < 1e-7
    assert model[0].bond_dims == (6,) and model[1].bond_dims == (8,)


def test_squeezer_sizes_are_documented_and_reported_as_core_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(MPOLinear.from_linear(nn.Linear(16, 16), (4, 4), (4, 4)))
    cores = sum(c.numel() for c in model[0].cores)
    assert sum(p.numel() for p in model[0].parameters()) == cores + 16  # the bias
    sq = DimensionSqueezer(model, lambda m: 0.0, delta=math.inf, target_params=cores,
                           log=None)
    assert sq.mpo_params() == cores
    res = sq.run()
    assert res.start_params == res.final_params == cores
    assert res.reason == f"target of {cores:,} core parameters reached"
    # every place naming these sizes says what they count
    for doc in (squeeze.__doc__, inspect.getdoc(DimensionSqueezer),
                inspect.getdoc(DimensionSqueezer.mpo_params)):
        assert "biases" in doc
    assert "core parameters" in inspect.getsource(squeeze.SqueezeStep)
    assert "core parameters" in inspect.getsource(squeeze.SqueezeResult)


@pytest.mark.parametrize("start", [float("nan"), float("inf")])
@pytest.mark.parametrize("delta", [0.1, math.inf])
def test_a_non_finite_starting_loss_is_refused_before_any_cut(start, delta):
    torch.manual_seed(0)
    model = nn.Sequential(MPOLinear.from_linear(nn.Linear(16, 16), (4, 4), (4, 4)))
    dims, calls = model[0].bond_dims, []
    sq = DimensionSqueezer(model, lambda m: start, lambda m: calls.append(1), delta=delta,
                           log=None)
    with pytest.raises(ValueError, match=r"evaluate returned a non-finite starting loss"):
        sq.run()
    assert calls == [] and model[0].bond_dims == dims


def test_a_rejected_refreshed_cut_restores_the_cached_norm():
    torch.manual_seed(0)
    model = nn.Sequential(MPOLinear.from_linear(nn.Linear(16, 16), (4, 4), (4, 4)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = iter([0.0, 1.0])  # the cut moves the loss by 1 > delta: undone
    sq = DimensionSqueezer(model, lambda m: next(losses), delta=0.5, step=6, log=None,
                           refresh_spectra=True)
    before = sq.candidates()
    res = sq.run()
    assert [s.accepted for s in res.history] == [False]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    fresh = DimensionSqueezer(model, lambda m: 0.0, delta=1.0, step=6, log=None).candidates()
    for got in (sq.candidates(), fresh):
        assert [c[1:] for c in got] == [c[1:] for c in before]
        assert [c[0] for c in got] == pytest.approx([c[0] for c in before], rel=1e-9)


@pytest.fixture(scope="module")
def whitened():
    torch.manual_seed(0)
    X = torch.randn(64, 8, dtype=torch.float64)
    return WhitenedLayer(torch.randn(8, 6, dtype=torch.float64), InputStats(X.T @ X, 64),
                         vectors=True)


def test_whitened_mpo_and_layer_refuse_a_rank_or_cap_that_is_not_an_int(whitened):
    lin = nn.Linear(8, 6)
    for bad in (2.9, True, "3"):
        for call in (whitened.mpo, lambda r: whitened.layer(r, lin), whitened.truncated):
            with pytest.raises(TypeError, match=r"rank must be an int"):
                call(bad)
    with pytest.raises(ValueError, match=r"rank must be >= 1, got 0"):
        whitened.mpo(0)
    with pytest.raises(TypeError, match=r"max_bond\[0\] must be an int, got 2\.5"):
        whitened.mpo(2, (2, 3), max_bond=[2.5])
    with pytest.raises(TypeError, match=r"max_bond must be an int, got 2\.5"):
        whitened.mpo(2, (2, 3), max_bond=2.5)
    with pytest.raises(ValueError, match=r"max_bond must be >= 1, got 0"):
        whitened.mpo(2, (2, 3), max_bond=0)
    # valid ranks and caps as before (numpy ints included)
    assert whitened.mpo(np.int64(2)).bond_dims == (2,)
    assert whitened.mpo(2, (2, 3), max_bond=1).bond_dims == (2, 1)
    assert whitened.mpo(2, (2, 3), max_bond=[np.int64(1)]).bond_dims == (2, 1)
    assert whitened.layer(3, lin).bond_dims == (3,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_whitened_layer_reports_the_stored_cores_error(dtype):
    torch.manual_seed(0)
    X = torch.randn(64, 16, dtype=torch.float64)
    stats = InputStats(X.T @ X, 64)
    lin = nn.Linear(16, 16).to(dtype)
    W = lin.weight.detach().T.double()
    wl = WhitenedLayer(W, stats)
    new = wl.layer(16, lin)  # full rank: the float64 truncation loses nothing
    assert new.cores[0].dtype == dtype
    measured = output_error(W, new.dense_matrix(torch.float64).detach(), stats)
    assert measured > 1e-4  # the rounding of the stored cores
    assert new.truncation_error == pytest.approx(measured, rel=1e-6)
    # float32 layers: the float64 truncation's error, as before
    lin32 = nn.Linear(16, 16)
    wl32 = WhitenedLayer(lin32.weight.detach().T.double(), stats)
    assert wl32.layer(8, lin32).truncation_error == pytest.approx(
        wl32.mpo(8).truncation_error, rel=1e-12)
