"""The torch bridge: layer mechanics every MPO layer type passes (modes, gauges, state dicts,
freezing, autocast, torch.compile, the dense cache), plus specifics.

The invariants shared with the other kinds (exactness against the dense module, merge,
save/reload, merge_and_unload, truncation error, gradients) are in ``tests/common.py``
(``LayerInvariants``), run for every kind by ``tests/test_invariants.py``.

Tolerances: untruncated fp32 layers match the dense layer to 1e-5 absolute on
O(1) outputs (the decomposition runs in float64; the contraction in float32).
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tnlm import MPO
from tnlm.bridge import (
    MPOEmbedding,
    MPOLinear,
    cost,
    freeze_central,
    parameter_groups,
    parameter_report,
    train_auxiliary_only,
)
from tnlm.bridge.layer import set_dense_cache
from tnlm.core import plan as plan_module

ATOL = 1e-5


class LayerMechanics:
    """Shared checks; subclasses define ``make(gauge)`` -> (dense, mpo_layer, input)."""

    modes = ("contract", "dense", "auto")

    def make(self, gauge="central"):
        raise NotImplementedError

    def test_modes_agree_and_auto_picks_one(self):
        _, layer, x = self.make()
        outs = {}
        for mode in ("contract", "dense"):
            layer.mode = mode
            outs[mode] = layer(x)
            assert layer.last_mode == mode
        torch.testing.assert_close(outs["contract"], outs["dense"], atol=ATOL, rtol=0)
        layer.mode = "auto"
        layer(x)
        assert layer.last_mode in ("contract", "dense")

    def test_state_dict_round_trip_bit_exact(self, tmp_path):
        _, layer, x = self.make()
        keys = set(layer.state_dict())
        assert {f"cores.{k}" for k in range(layer.n_sites)} <= keys
        save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "l.st")
        _, fresh, _ = self.make(gauge="left")  # different values, same shapes? rebuild below
        fresh = type(layer)(*self.ctor_args(layer))
        fresh.load_state_dict(load_file(tmp_path / "l.st"))
        assert torch.equal(fresh(x), layer(x))

    def test_to_mpo_round_trip(self):
        dense, layer, _ = self.make()
        mpo = layer.to_mpo()
        assert isinstance(mpo, MPO) and mpo.bond_dims == layer.bond_dims
        W = mpo.to_matrix()
        ref = dense.weight.detach().T if isinstance(dense, nn.Linear) else dense.weight.detach()
        torch.testing.assert_close(W, ref, atol=ATOL, rtol=0)
        assert mpo.entanglement_entropy().shape == (layer.n_sites - 1,)

    def test_output_does_not_depend_on_gauge(self):
        outs = []
        for gauge in ("central", "symmetric", "left"):
            _, layer, x = self.make(gauge)
            outs.append(layer(x))
        for y in outs[1:]:
            torch.testing.assert_close(y, outs[0], atol=ATOL, rtol=0)

    def test_central_gauge_makes_auxiliaries_isometries(self):
        _, layer, _ = self.make("central")
        assert layer.to_mpo().is_canonical(layer.central_index, tol=1e-5)

    def test_freeze_central_really_freezes(self):
        _, layer, x = self.make()
        layer.train_auxiliary_only()
        c = layer.central_index
        assert not layer.cores[c].requires_grad
        assert all(layer.cores[k].requires_grad for k in layer.auxiliary_indices)
        before = [p.detach().clone() for p in layer.cores]
        opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
        for mode in ("contract", "dense"):
            layer.mode = mode
            opt.zero_grad()
            (layer(x) ** 2).sum().backward()
            opt.step()
        assert torch.equal(layer.cores[c], before[c])
        assert layer.cores[c].grad is None
        for k in layer.auxiliary_indices:
            assert not torch.equal(layer.cores[k], before[k])

    def test_no_grad(self):
        _, layer, x = self.make()
        with torch.no_grad():
            for mode in ("contract", "dense"):
                layer.mode = mode
                assert not layer(x).requires_grad

    #: output dtype under bf16 autocast (nn.Linear: bf16; nn.Embedding ignores autocast)
    autocast_dtype = torch.bfloat16

    def test_autocast_bfloat16(self):
        dense, layer, x = self.make()
        ref = dense(x)
        for mode in ("contract", "dense"):
            layer.mode = mode
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            assert y.dtype == self.autocast_dtype
            assert (y.float() - ref).abs().max() <= 0.05 * ref.abs().max()

    def test_torch_compile(self):
        dense, layer, x = self.make()
        for mode in ("contract", "dense"):
            layer.mode = mode
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = torch.compile(layer)
                y = compiled(x)
            torch.testing.assert_close(y, dense(x), atol=ATOL, rtol=0)
            y.float().sum().backward()
            assert all(p.grad is not None for p in layer.cores)
            layer.zero_grad()


    # ------------------------------------------------------------ speed machinery
    @pytest.mark.parametrize("mode", ["contract", "dense"])
    def test_no_graph_break(self, mode):
        _, layer, x = self.make()
        layer.mode = mode
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch._dynamo.explain(layer)(x).graph_break_count == 0
        torch._dynamo.reset()

    def test_dense_cache_reused_until_a_core_changes(self):
        _, layer, x = self.make()
        layer.mode = "dense"
        with torch.no_grad():
            layer.cache_dense = False
            ref = layer(x)
            assert not layer._dense_cache
            layer.cache_dense = True
            y1 = layer(x)
            (W1,) = [w for _, w in layer._dense_cache.values()]
            y2 = layer(x)
            (W2,) = [w for _, w in layer._dense_cache.values()]
            assert W2 is W1  # not rebuilt
            assert torch.equal(y1, ref) and torch.equal(y2, ref)
            layer.cores[layer.central_index].mul_(2.0)  # in place: bumps _version
            y3 = layer(x)
            layer.cache_dense = False
            assert torch.equal(y3, layer(x)) and not torch.allclose(y3, ref)
        layer.cache_dense = True
        # an optimizer step (in place, under no_grad) is seen as well
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        (layer(x).float() ** 2).sum().backward()
        opt.step()
        with torch.no_grad():
            y4 = layer(x)
            layer.cache_dense = False
            assert torch.equal(y4, layer(x)) and not torch.allclose(y4, y3)

    def test_dense_cache_invalidated_by_set_cores_retruncate_and_to(self):
        _, layer, x = self.make()
        layer.mode = "dense"
        with torch.no_grad():
            layer(x)
            assert layer._dense_cache
            assert not copy.deepcopy(layer)._dense_cache
            layer.retruncate(max_bond=2)
            assert not layer._dense_cache
            y = layer(x)
            layer.set_cores([c * 2 for c in layer.cores])
            assert not layer._dense_cache
            y2 = layer(x)
            layer.cache_dense = False
            assert torch.equal(y2, layer(x)) and not torch.allclose(y, y2)
            layer.cache_dense = True
            layer.double()
            assert not layer._dense_cache
            assert layer(x.double() if x.is_floating_point() else x).dtype == torch.float64

    def test_dense_cache_only_without_graph_through_the_cores(self):
        _, layer, x = self.make()
        layer.mode = "dense"
        layer(x).float().sum().backward()  # trainable cores, grad mode: rebuilt, never cached
        assert not layer._dense_cache
        assert all(c.grad is not None for c in layer.cores)
        for c in layer.cores:
            c.requires_grad_(False)
        with torch.inference_mode():
            ref = layer(x)
        assert layer._dense_cache  # built under inference_mode, usable outside it
        y = layer(x)  # grad mode, all cores frozen: cached W
        torch.testing.assert_close(y, ref, atol=0, rtol=0)


class TestMPOLinear(LayerMechanics):
    def make(self, gauge="central"):
        torch.manual_seed(0)
        dense = nn.Linear(24, 36)
        layer = MPOLinear.from_linear(dense, (2, 3, 4), (3, 4, 3), gauge=gauge)
        return dense, layer, torch.randn(2, 5, 24)

    @staticmethod
    def ctor_args(layer):
        return ([torch.zeros_like(c) for c in layer.cores], torch.zeros(layer.out_dim),
                layer.in_dim, layer.out_dim)


class TestMPOLinearPadded(TestMPOLinear):
    def make(self, gauge="central"):
        torch.manual_seed(1)
        dense = nn.Linear(22, 35, bias=False)
        layer = MPOLinear.from_linear(dense, (2, 3, 4), (3, 4, 3), gauge=gauge, pad=True)
        return dense, layer, torch.randn(7, 22)

    @staticmethod
    def ctor_args(layer):
        return ([torch.zeros_like(c) for c in layer.cores], None, layer.in_dim, layer.out_dim)


class TestMPOEmbedding(LayerMechanics):
    def make(self, gauge="central"):
        torch.manual_seed(2)
        dense = nn.Embedding(100, 24, padding_idx=0)
        layer = MPOEmbedding.from_embedding(dense, (2, 8, 7), (2, 4, 3), gauge=gauge)
        x = torch.tensor([[0, 5, 99, 5], [17, 42, 63, 1]])
        return dense, layer, x

    @staticmethod
    def ctor_args(layer):
        return ([torch.zeros_like(c) for c in layer.cores], layer.in_dim, layer.out_dim)

    autocast_dtype = torch.float32


# ---------------------------------------------------------------- specifics
def test_model_level_helpers_and_report():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0] = MPOLinear.from_linear(model[0], (4, 4), (4, 4))
    with pytest.raises(ValueError, match="no MPO modules"):
        freeze_central(nn.Sequential(nn.Linear(2, 2)))
    train_auxiliary_only(model)
    rep = parameter_report(model)
    layer = model[0]
    assert rep.central == layer.num_central_params
    assert rep.auxiliary == layer.num_auxiliary_params
    assert rep.total == sum(p.numel() for p in model.parameters())
    assert rep.trainable == rep.total - rep.central
    assert str(rep).startswith(f"trainable params: {rep.trainable:,} || all params: {rep.total:,}")
    groups = parameter_groups(model, lr=1e-3, mpo_lr=1e-2, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["mpo_cores"]["lr"] == 1e-2 and by_name["other"]["lr"] == 1e-3
    n_cores = sum(p.numel() for p in by_name["mpo_cores"]["params"])
    assert n_cores == layer.num_auxiliary_params


def test_choose_mode_follows_flops():
    torch.manual_seed(6)
    layer = MPOLinear.from_linear(nn.Linear(64, 64), (8, 8, 1), (1, 8, 8), max_bond=2)
    mode, contract, dense = layer.choose_mode(4096)
    assert contract < dense and mode == "contract"
    # untruncated, the rebuild plus one GEMM is cheaper than contracting the chain per row
    full = MPOLinear.from_linear(nn.Linear(64, 64), (4, 4, 4), (4, 4, 4))
    mode, contract, dense = full.choose_mode(4096)
    assert mode == "dense" and contract > dense / 1.5


def _low_rank(I, J, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(I, r, generator=g), torch.randn(r, J, generator=g)
    return MPOLinear([A.reshape(1, I, 1, r), B.reshape(r, 1, J, 1)], torch.randn(J)), A, B


def test_low_rank_layout_contracts_when_it_saves_flops():
    """A 2-site (1, I, 1, r), (r, 1, J, 1) layer runs x @ A @ B (two GEMMs, 2 r (I + J) FLOPs
    per row) exactly when r (I + J) < I J; with a cacheable W the dense path costs its GEMM."""
    I, J = 16, 24
    for r in (2, 5, 9, 10, 16):  # (r = 1 drops the bond: an outer product)
        layer, A, B = _low_rank(I, J, r)
        path = layer._cost.contract_path(7)
        assert path.const_flops == 0 and path.row_flops == 2 * r * (I + J)
        assert all(blas == "GEMM" for _, _, blas in path.step_cost)
        expect = "contract" if r * (I + J) < I * J else "dense"
        for rows in (1, 3, 64, 5000):
            assert layer.choose_mode(rows, rebuild=False)[0] == expect
        x = torch.randn(2, 3, I)
        with torch.no_grad():
            y = layer(x)
        assert layer.last_mode == expect
        torch.testing.assert_close(y, x @ A @ B + layer.bias, atol=1e-4, rtol=1e-5)
        # training (no cache): the rebuild counts on the dense side, contract wins more often
        assert layer.choose_mode(64)[0] == "contract" or r * (I + J) >= I * J


def test_low_rank_layer_padded_empty_and_compiled():
    layer, A, B = _low_rank(16, 24, 3)
    padded = MPOLinear([c.detach() for c in layer.cores], layer.bias[:20], 14, 20)
    x = torch.randn(5, 14)
    for mode in ("contract", "dense"):
        padded.mode = mode
        torch.testing.assert_close(padded(x), x @ A[:14] @ B[:, :20] + layer.bias[:20],
                                   atol=1e-4, rtol=1e-5)
        assert padded(torch.randn(0, 14)).shape == (0, 20)
    padded.mode = "contract"
    torch._dynamo.reset()
    assert torch._dynamo.explain(padded)(x).graph_break_count == 0
    torch._dynamo.reset()


def test_forward_runs_no_path_search(monkeypatch):
    """Plans are resolved when the cores are set; no batch length triggers a search."""
    layer, _, _ = _low_rank(16, 24, 3)
    full = MPOLinear.from_linear(nn.Linear(24, 36), (2, 3, 4), (3, 4, 3))
    emb = MPOEmbedding.from_embedding(nn.Embedding(100, 24), (2, 8, 7), (2, 4, 3))
    calls = []
    real = plan_module.oe.contract_path
    monkeypatch.setattr(plan_module.oe, "contract_path",
                        lambda *a, **k: calls.append(k.get("optimize")) or real(*a, **k))
    for rows in (1, 3, 17, 100, 257):
        for m in ("auto", "contract", "dense"):
            layer.mode = full.mode = emb.mode = m
            layer(torch.randn(rows, 16))
            full(torch.randn(rows, 24))
            emb(torch.randint(0, 100, (rows,)))
    assert calls == []
    # the shape-level API: one search per power-of-two bucket of rows
    shapes = full.core_shapes
    plans = [plan_module.apply_plan(shapes, rows, full.in_shape) for rows in (33, 40, 64)]
    assert len({p.path for p in plans}) == 1
    assert [o for o in calls if isinstance(o, str)] in ([], ["auto-hq"])
    assert [p.flops for p in plans] == [p.shapes[-1][0] * plans[-1].flops // 64 for p in plans] \
        or len(set(p.flops for p in plans)) == 3


def test_chain_plan_flops_are_linear_in_rows():
    full = MPOLinear.from_linear(nn.Linear(24, 36), (2, 3, 4), (3, 4, 3))
    plans = full._plans
    for path in plans.apply:
        for rows in (1, 5, 300):
            shapes = (*plans.core_views, (rows, *plans.x_view))
            again = plan_module.get_plan(path.plan.equation, shapes, path.plan.path)
            assert again.flops == path.flops(rows)
    assert plans.gather.flops * 9 == plan_module.gather_plan(full.core_shapes, 9).flops
    mode, contract, dense = cost.choose_mode(full.core_shapes, 4096, full.in_shape, 24, 36)
    assert (mode, contract, dense) == full.choose_mode(4096, rebuild=True)


def test_embedding_eval_lookup_is_a_cached_table_lookup():
    torch.manual_seed(13)
    dense = nn.Embedding(100, 24, padding_idx=0)
    emb = MPOEmbedding.from_embedding(dense, (2, 8, 7), (2, 4, 3))
    ids = torch.tensor([[0, 5, 99, 5], [17, 42, 63, 1]])
    with torch.no_grad():
        y = emb(ids)
        (table,) = [w for _, w in emb._dense_cache.values()]
        torch.testing.assert_close(y, dense(ids), atol=ATOL, rtol=0)
        assert emb.last_mode == "dense"
        assert torch.equal(emb(ids.int()), y)
        assert [w for _, w in emb._dense_cache.values()][0] is table
        with pytest.raises(IndexError, match=r"token ids must be in \[0, 100\)"):
            emb(torch.tensor([3, 100]))
        emb.mode = "contract"  # an explicit gather is respected
        torch.testing.assert_close(emb(ids), y, atol=ATOL, rtol=0)
        assert emb.last_mode == "contract"
    model = nn.Sequential(emb)
    assert set_dense_cache(model, False) == 1 and not emb._dense_cache and not emb.cache_dense


def test_set_cores_changes_shapes_and_keeps_flags():
    torch.manual_seed(7)
    layer = MPOLinear.from_linear(nn.Linear(64, 64), (4, 4, 4), (4, 4, 4)).train_auxiliary_only()
    small = layer.to_mpo().truncate(max_bond=3)
    layer.set_cores([torch.as_tensor(c) for c in small.cores])
    assert layer.bond_dims == (3, 3)
    assert not layer.cores[layer.central_index].requires_grad
    with pytest.raises(ValueError, match="site shapes"):
        layer.set_cores([torch.ones(1, 2, 4, 1), torch.ones(1, 8, 4, 1), torch.ones(1, 4, 4, 1)])


def test_bad_inputs():
    torch.manual_seed(8)
    dense = nn.Linear(24, 36)
    layer = MPOLinear.from_linear(dense, (2, 3, 4), (3, 4, 3))
    with pytest.raises(ValueError, match="last dimension in_features=24"):
        layer(torch.randn(3, 25))
    with pytest.raises(ValueError, match=r"in_shape=\(5, 5\) has product 25, but I=24"):
        MPOLinear.from_linear(dense, (5, 5), (6, 6))
    with pytest.raises(ValueError, match="mode must be one of"):
        MPOLinear.from_linear(dense, (2, 3, 4), (3, 4, 3), mode="fast")
    with pytest.raises(ValueError, match="gauge must be one of"):
        MPOLinear.from_linear(dense, (2, 3, 4), (3, 4, 3), gauge="vidal")
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        MPOLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"bias must have shape \(36,\)"):
        MPOLinear([torch.as_tensor(c) for c in layer.to_mpo().cores], torch.zeros(5))
    emb = MPOEmbedding.from_embedding(nn.Embedding(100, 24), (2, 8, 7), (2, 4, 3))
    with pytest.raises(IndexError, match=r"token ids must be in \[0, 100\)"):
        emb(torch.tensor([3, 100]))
    with pytest.raises(TypeError, match="integer token ids"):
        emb(torch.tensor([1.0]))


def test_minilm_layer_exact(minilm_weights):
    W = torch.from_numpy(minilm_weights["encoder.layer.0.intermediate.dense.weight"].copy())
    b = torch.from_numpy(minilm_weights["encoder.layer.0.intermediate.dense.bias"].copy())
    dense = nn.Linear(384, 1536)
    with torch.no_grad():
        dense.weight.copy_(W)
        dense.bias.copy_(b)
    layer = MPOLinear.from_linear(dense)
    x = torch.randn(4, 384)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-4, rtol=1e-4)
    assert np.isfinite(layer.to_mpo().entanglement_entropy()).all()


def test_empty_inputs():
    torch.manual_seed(9)
    layer = MPOLinear.from_linear(nn.Linear(24, 36), (2, 3, 4), (3, 4, 3))
    emb = MPOEmbedding.from_embedding(nn.Embedding(100, 24), (2, 8, 7), (2, 4, 3))
    for mode in ("contract", "dense"):
        layer.mode = emb.mode = mode
        assert layer(torch.randn(0, 24)).shape == (0, 36)
        assert emb(torch.empty(0, 3, dtype=torch.long)).shape == (0, 3, 24)


def test_embedding_padding_gradient_is_mode_independent():
    torch.manual_seed(10)
    emb = MPOEmbedding.from_embedding(nn.Embedding(100, 24, padding_idx=0), (2, 8, 7), (2, 4, 3))
    ids = torch.tensor([[0, 5, 0, 42]])
    grads = {}
    for mode in ("contract", "dense"):
        emb.mode = mode
        emb.zero_grad()
        (emb(ids) ** 2).sum().backward()
        grads[mode] = [c.grad.clone() for c in emb.cores]
    for a, b in zip(grads["contract"], grads["dense"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert emb(ids).dtype == torch.float32  # lookups ignore autocast, like nn.Embedding


def test_central_flag_follows_the_central_tensor_after_set_cores():
    torch.manual_seed(11)
    layer = MPOLinear.from_linear(nn.Linear(16, 16), (2, 2, 2, 2), (2, 2, 2, 2))
    layer.train_auxiliary_only()
    c0 = layer.central_index
    small = layer.to_mpo().truncate(max_bond=[3, 16, 4] if c0 == 1 else [4, 16, 3])
    layer.set_cores([torch.as_tensor(c) for c in small.cores])
    c1 = layer.central_index
    assert not layer.cores[c1].requires_grad
    assert all(layer.cores[k].requires_grad for k in layer.auxiliary_indices)
    assert all(c.is_contiguous() for c in layer.cores)


def test_half_precision_layers_can_be_analysed():
    torch.manual_seed(12)
    layer = MPOLinear.from_linear(nn.Linear(24, 36).to(torch.bfloat16), (2, 3, 4), (3, 4, 3))
    assert layer.cores[0].dtype == torch.bfloat16
    mpo = layer.to_mpo()
    assert mpo.dtype == torch.float32 and mpo.entanglement_entropy().shape == (2,)


def test_mpo_embedding_padding_idx_is_that_of_nn_embedding():
    """-1 means the last row (stored as n - 1) in both modes; out of range is refused."""
    from tnlm import MPO, MPOEmbedding

    torch.manual_seed(0)
    table = torch.randn(12, 8, dtype=torch.float64)
    mpo = MPO.from_matrix(table, (3, 4), (2, 4))
    ids = torch.tensor([[0, 11, 5, 11]])
    grads = {}
    for mode in ("dense", "contract"):
        for idx in (-1, 11):
            layer = MPOEmbedding.from_mpo(mpo, padding_idx=idx, mode=mode)
            assert layer.padding_idx == 11
            layer(ids).sum().backward()
            grads[mode, idx] = [c.grad.clone() for c in layer.cores]
    for key, g in grads.items():
        for a, b in zip(g, grads["dense", 11]):
            assert torch.allclose(a, b, atol=1e-12), key
    for bad in (12, -13, 1.5, True):
        with pytest.raises(ValueError, match=r"padding_idx must be None or an int in \[-12, 12\)"):
            MPOEmbedding.from_mpo(mpo, padding_idx=bad)
