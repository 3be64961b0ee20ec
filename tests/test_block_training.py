"""The training path of MPOLinear's dense mode (``tnlm.bridge.training``, ``TrainCost``): exactness
and planning, no timing (speed is measured by ``benchmarks/bench_model.py``).

The reference is ``block_train = False``: autograd through the chain's einsums (the
chain-autograd reference). In float64, outputs and every gradient (input,
cores, bias) agree to 1e-10 relative to the reference's scale, for every trainable pattern,
every strategy (order, gradient route), padded layers and chains of 1 to 5 sites; frozen
cores get no gradient.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from tnlm.bridge import MPOLinear
from tnlm.bridge.cost import train_cost
from tnlm.core import plan as plan_module
from tnlm.core.mpo import central_site
from tnlm.core.plan import block_plan, dense_plan

TOL = 1e-10

#: (in_shape, out_shape, pad, in_dim, out_dim, bias)
LAYOUTS = {
    "3 sites": ((2, 3, 4), (3, 4, 3), False, 24, 36, True),
    "3 sites padded": ((2, 3, 4), (3, 4, 3), True, 22, 35, False),
    "5 sites (MiniLM query layout)": ((2, 4, 4, 4, 3), (2, 4, 4, 4, 3), False, 384, 384, True),
    "4 sites padded": ((2, 2, 3, 2), (3, 2, 2, 2), True, 20, 23, True),
    "2 sites": ((4, 6), (2, 8), False, 24, 16, True),
    "1 site": ((4,), (6,), False, 4, 6, True),
}

#: the default MPOConfig's layers of all-MiniLM-L6-v2 (query/key/value/attention output,
#: intermediate, output), untruncated
MINILM_SHAPES = (
    ((1, 2, 2, 4), (4, 4, 4, 64), (64, 4, 4, 144), (144, 4, 4, 9), (9, 3, 3, 1)),
    ((1, 2, 4, 8), (8, 4, 4, 128), (128, 4, 6, 192), (192, 4, 4, 12), (12, 3, 4, 1)),
    ((1, 4, 2, 8), (8, 4, 4, 128), (128, 6, 4, 192), (192, 4, 4, 12), (12, 4, 3, 1)),
)


def make(name, seed=0):
    in_shape, out_shape, pad, I, J, bias = LAYOUTS[name]
    torch.manual_seed(seed)
    dense = nn.Linear(I, J, bias=bias).double()
    layer = MPOLinear.from_linear(dense, in_shape, out_shape, n_sites=len(in_shape), pad=pad)
    layer.mode = "dense"
    return layer


def run(layer, x, dy):
    """``(y, {name: grad})`` of one forward/backward (grads of x and of every trainable
    parameter; ``None`` for frozen cores)."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x)
    y.backward(dy)
    grads = {"x": x.grad}
    grads.update({f"core {k}": p.grad for k, p in enumerate(layer.cores)})
    if layer.bias is not None:
        grads["bias"] = layer.bias.grad
    return y.detach(), grads


def assert_same(layer, x, dy, what=""):
    """The block path and the chain reference agree (float64, TOL); frozen cores: no grad."""
    ref = copy.deepcopy(layer)
    ref.block_train = False
    y_ref, g_ref = run(ref, x, dy)
    y, g = run(layer, x, dy)
    scale = float(y_ref.abs().max())
    torch.testing.assert_close(y, y_ref, atol=TOL * scale, rtol=0, msg=lambda m: f"{what} y: {m}")
    for name, want in g_ref.items():
        got = g[name]
        if want is None:
            assert got is None, f"{what}: {name} got a gradient"
            continue
        assert got is not None and got.dtype == want.dtype, f"{what}: {name}"
        scale = float(want.abs().max()) or 1.0
        torch.testing.assert_close(got, want, atol=TOL * scale, rtol=0,
                                   msg=lambda m, n=name: f"{what} grad of {n}: {m}")
    for k, p in enumerate(layer.cores):
        if not p.requires_grad:
            assert g[f"core {k}"] is None


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gradients_equal_the_chain_for_every_trainable_pattern(name):
    layer = make(name)
    I = layer.in_dim
    torch.manual_seed(1)
    for flags in itertools.product([False, True], repeat=layer.n_sites):
        if not any(flags):
            continue
        for x_grad in (False, True):
            m = copy.deepcopy(layer)
            for p, f in zip(m.cores, flags):
                p.requires_grad_(f)
            x = torch.randn(3, 5, I, dtype=torch.float64).requires_grad_(x_grad)
            dy = torch.randn(3, 5, m.out_dim, dtype=torch.float64)
            assert_same(m, x, dy, f"{name} {flags} x_grad={x_grad}")


def _forced(strategy):
    class Forced:
        blocks = None

        def choose(self, *args):
            return strategy
    return Forced()


@pytest.mark.parametrize("name, pattern", [
    (name, pattern)
    for name in ("5 sites (MiniLM query layout)", "3 sites padded", "2 sites")
    for pattern in ("lfa", "all", "left", "right", "central")
    if (name, pattern) != ("2 sites", "right")])  # its central core is the last one
def test_every_strategy_is_exact(name, pattern):
    """Each order (C·R or L·C kept), route (G projected or x, dy contracted with the
    blocks) and way of reaching the far block gives the chain's gradients."""
    layer = make(name)
    c = layer.central_index
    flags = {"lfa": [k != c for k in range(layer.n_sites)],
             "all": [True] * layer.n_sites,
             "left": [k < c for k in range(layer.n_sites)],
             "right": [k > c for k in range(layer.n_sites)],
             "central": [k == c for k in range(layer.n_sites)]}[pattern]
    assert any(flags)
    for p, f in zip(layer.cores, flags):
        p.requires_grad_(f)
    need = (True, any(flags[:c]), flags[c], any(flags[c + 1:]))
    torch.manual_seed(2)
    x = torch.randn(7, layer.in_dim, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, layer.out_dim, dtype=torch.float64)
    cands = layer._train.candidates(7, *need)
    # both ways to the far block, whichever is cheaper
    extra = [s._replace(via=v) for s in cands if s.route == "gemm" and s.via
             for v in (("h", "lc") if s.order == "cr" else ("k", "cr"))]
    seen = set()
    for s in cands + extra:
        if (s.order, s.route, s.via) in seen:
            continue
        seen.add((s.order, s.route, s.via))
        m = copy.deepcopy(layer)
        m._train = _forced(s)
        assert_same(m, x, dy, f"{name} {pattern} {s.order}/{s.route}/{s.via}")
    assert {s.route for s in cands} == {"gemm", "env"}


def test_lfa_of_minilm_layers_picks_projected_weight_gradient_and_fewer_flops():
    """For MiniLM's layers at 32 x 64 tokens, forming G = dy^T x and projecting it beats
    contracting x and dy with the environment (whose cheapest path forms G once per
    block), and the planned FLOPs are below autograd through the chain's einsums."""
    rows = 2048
    for shapes in MINILM_SHAPES:
        c = central_site([s[0] * s[1] * s[2] * s[3] for s in shapes])
        need = (True, True, False, True)  # x, L, C (frozen), R
        tc = train_cost(shapes, c)
        best = tc.choose(rows, *need)
        assert (best.order, best.route) == ("cr", "gemm")
        env = min((s for s in tc.candidates(rows, *need) if s.route == "env"),
                  key=lambda s: s.flops)
        assert env.flops > best.flops
        # one row: no GEMM to save, contracting with the environment wins
        assert tc.choose(1, *need).route == "env"
        assert best.flops < _chain_training_flops(shapes, c, rows)


def _chain_training_flops(shapes, centre, rows):
    """Planned FLOPs of one training call through the chain's einsums with the central core
    frozen: the rebuild, each step's backward for every operand needing a gradient, and
    the three GEMMs (forward, input gradient, weight gradient)."""
    plan = dense_plan(shapes)
    needs = [k != centre for k in range(len(shapes))]
    back = 0
    for (slots, _), flops in zip(plan.steps, plan.step_flops):
        back += flops * sum(needs[s] for s in slots)
        needs.append(any(needs[s] for s in slots))
    I = J = 1
    for s in shapes:
        I, J = I * s[1], J * s[2]
    return plan.flops + back + 3 * 2 * rows * I * J


def test_block_plan_shapes_and_flops():
    shapes = MINILM_SHAPES[0]
    bp = block_plan(shapes, 2)
    assert bp.dims == (8, 8, 4, 4, 12, 12, 64, 144)
    u = 2 * 384 * 384
    assert bp.flops["w_cr"] == u * 64 and bp.flops["w_lc"] == u * 144
    assert bp.flops["cr"] == 2 * 64 * 16 * 144 * 144 and bp.flops["lc"] == 2 * 64 * 64 * 16 * 144
    with pytest.raises(ValueError, match="centre"):
        block_plan(shapes, 5)


def test_frozen_block_product_is_cached_until_a_core_changes():
    layer = make("5 sites (MiniLM query layout)")
    c = layer.central_index
    for p in layer.cores[: c + 1]:  # L and C frozen: L·C is a constant
        p.requires_grad_(False)
    x = torch.randn(6, layer.in_dim, dtype=torch.float64)
    dy = torch.randn(6, layer.out_dim, dtype=torch.float64)
    assert_same(layer, x, dy, "first call")
    (entry,) = layer._block_cache
    assert entry == (torch.float64, "lc")
    product = layer._block_cache[entry][1]
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    opt.step()  # trainable cores change, the cached product stays
    layer.zero_grad()
    assert_same(layer, x, dy, "after a step")
    assert layer._block_cache[entry][1] is product
    with torch.no_grad():
        layer.cores[0].mul_(1.5)  # a frozen core changed in place: rebuilt
    layer.zero_grad()
    assert_same(layer, x, dy, "after editing a frozen core")
    assert layer._block_cache[entry][1] is not product
    layer.cache_dense = False
    layer.invalidate_cache()
    layer.zero_grad()
    assert_same(layer, x, dy, "no cache")
    assert not layer._block_cache
    # the LFA pattern caches nothing: every block next to the central tensor trains
    lfa = make("5 sites (MiniLM query layout)").train_auxiliary_only()
    run(lfa, x, dy)
    assert not lfa._block_cache and not lfa._dense_cache


def test_double_backward():
    layer = make("3 sites").train_auxiliary_only()
    x = torch.randn(4, layer.in_dim, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert torch.autograd.gradgradcheck(lambda x, *ps: layer(x), (x, *params))

    def grad_penalty(block):
        layer.block_train = block
        g = torch.autograd.grad(layer(x).pow(2).sum(), params, create_graph=True)
        return torch.autograd.grad(sum(t.pow(2).sum() for t in g), params)
    for a, b in zip(grad_penalty(True), grad_penalty(False)):
        torch.testing.assert_close(a, b, atol=TOL * float(b.abs().max()), rtol=0)


def test_autocast_and_float32():
    torch.manual_seed(3)
    dense = nn.Linear(24, 36)
    layer = MPOLinear.from_linear(dense, (2, 3, 4), (3, 4, 3)).train_auxiliary_only()
    layer.mode = "dense"
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert [p.grad is None for p in layer.cores] == [k == layer.central_index
                                                      for k in range(layer.n_sites)]
    assert all(p.grad.dtype == torch.float32 for p in layer.cores if p.grad is not None)
    # float32: as the chain to float32 rounding
    ref = copy.deepcopy(layer)
    ref.block_train = False
    layer.zero_grad()
    ref.zero_grad()
    layer(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    for p, q in zip(layer.cores, ref.cores):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * float(q.grad.abs().max()),
                                       rtol=0)


def test_training_forward_runs_no_path_search_and_takes_empty_batches(monkeypatch):
    layer = make("5 sites (MiniLM query layout)").train_auxiliary_only()
    calls = []
    real = plan_module.oe.contract_path
    monkeypatch.setattr(plan_module.oe, "contract_path",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for rows in (0, 1, 3, 64, 300):
        x = torch.randn(rows, layer.in_dim, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        assert y.shape == (rows, layer.out_dim)
        y.sum().backward()
    assert calls == []
    assert layer.cores[0].grad is not None and layer.cores[layer.central_index].grad is None


def test_compiled_layer_trains_with_the_same_gradients():
    """Under torch.compile the layer keeps the chain path (no autograd.Function traced)."""
    layer = make("3 sites").train_auxiliary_only()
    x = torch.randn(4, layer.in_dim, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(layer)
    y = compiled(x)
    y.sum().backward()
    torch._dynamo.reset()
    grads = [None if p.grad is None else p.grad.clone() for p in layer.cores]
    layer.zero_grad()
    layer(x).sum().backward()
    for g, p in zip(grads, layer.cores):
        assert (g is None) == (p.grad is None)
        if g is not None:
            torch.testing.assert_close(g, p.grad, atol=1e-9 * float(g.abs().max()), rtol=0)


def test_torch_func_transforms_use_the_chain():
    layer = make("3 sites").train_auxiliary_only()
    x = torch.randn(5, layer.in_dim, dtype=torch.float64)
    params = {k: v for k, v in layer.named_parameters() if v.requires_grad}
    g = torch.func.grad(
        lambda p: torch.func.functional_call(layer, p, (x,)).pow(2).sum())(params)
    layer(x).pow(2).sum().backward()
    for k, v in params.items():
        torch.testing.assert_close(g[k], v.grad, atol=TOL * float(v.grad.abs().max()), rtol=0)
