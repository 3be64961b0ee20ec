"""tnlm.integration.surgery: modules put in place by path, and changes undone together."""

import pytest
import torch
from torch import nn

from tnlm.integration.surgery import Swap, checkpointed, module_paths, set_module, temporary


class Boom(Exception):
    """The failure the tests raise inside a swap."""


def shared_model():
    """``a.lin`` and ``b.lin`` are one module (as ALBERT's shared layer); ``head`` is not."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    model = nn.Module()
    model.a, model.b = nn.Module(), nn.Module()
    model.a.lin = model.b.lin = lin
    model.head = nn.Linear(3, 2)
    return model


def snapshot(model):
    return dict(
        modules={n: id(m) for n, m in model.named_modules(remove_duplicate=False)},
        state={k: v.clone() for k, v in model.state_dict().items()},
        flags={n: p.requires_grad for n, p in model.named_parameters()},
        modes={n: m.training for n, m in model.named_modules()},
    )


def assert_same(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["flags"] == before["flags"]
    assert after["modes"] == before["modes"]


def test_module_paths_lists_every_path_of_a_shared_module():
    model = shared_model()
    assert module_paths(model)[id(model.a.lin)] == ["a.lin", "b.lin"]
    assert module_paths(model)[id(model.head)] == ["head"]


def test_set_module_puts_one_path_and_names_a_bad_one():
    model = shared_model()
    new = nn.Linear(3, 3)
    set_module(model, "a.lin", new)
    assert model.a.lin is new and model.b.lin is not new  # that path only
    for bad in ("a.nope", "nope.lin", "head.weight", ""):
        with pytest.raises(ValueError, match="^name "):
            set_module(model, bad, new)
    assert not hasattr(model.a, "nope")  # no attribute was added


def test_replace_covers_every_path_of_a_shared_module_and_undo_restores_it():
    model = shared_model()
    before = snapshot(model)
    old = model.a.lin
    new = nn.Linear(3, 3)
    swap = Swap(model)
    assert swap.replace({"b.lin": new}) == {"b.lin": old}
    assert model.a.lin is new and model.b.lin is new
    swap.undo()
    assert model.a.lin is old and model.b.lin is old
    assert_same(model, before)


def test_a_failure_inside_the_block_undoes_everything():
    model = shared_model()
    model.train()
    model.head.bias.requires_grad_(False)
    before = snapshot(model)
    calls = []
    with pytest.raises(Boom), Swap(model, modes=True) as swap:
        swap.on_undo(lambda: calls.append("first"))
        swap.replace({"a.lin": nn.Linear(3, 3)})
        with torch.no_grad():
            swap.save_value(model.head.weight)
            model.head.weight.add_(1.0)
        swap.on_undo(lambda: calls.append("last"))
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        raise Boom
    assert calls == ["last", "first"]  # in reverse order
    assert_same(model, before)


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_any_exception_undoes_and_propagates(exc):
    model = shared_model()
    before = snapshot(model)
    with pytest.raises(exc), Swap(model) as swap:
        swap.put("head", nn.Linear(3, 2))
        raise exc
    assert_same(model, before)


def test_changes_stay_when_the_block_succeeds():
    model = shared_model()
    new = nn.Linear(3, 2)
    with Swap(model) as swap:
        assert swap.put("head", new) is not new
        model.a.lin.weight.requires_grad_(False)
    assert model.head is new and not model.a.lin.weight.requires_grad


def test_state_restores_every_value():
    model = shared_model()
    before = snapshot(model)
    with pytest.raises(Boom), Swap(model, state=True):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)
        raise Boom
    assert_same(model, before)


def test_temporary_is_always_undone():
    model = shared_model()
    model.train()
    before = snapshot(model)
    new = nn.Linear(3, 3)
    with temporary(model, {"a.lin": new}, modes=True):
        assert model.a.lin is new and model.b.lin is new
        model.eval()
    assert_same(model, before)
    with pytest.raises(Boom), temporary(model, {"head": nn.Linear(3, 2)}):
        raise Boom
    assert_same(model, before)


def test_bad_names_are_refused_before_any_change():
    model = shared_model()
    before = snapshot(model)
    swap = Swap(model)
    with pytest.raises(ValueError, match=r"^new: the name 'nope' is not a module of Module"):
        swap.replace({"head": nn.Linear(3, 2), "nope": nn.Linear(3, 2)})
    with pytest.raises(ValueError, match="^path 'a.nope' is not a module"):
        swap.put("a.nope", nn.Linear(3, 3))
    with pytest.raises(ValueError, match="'a.lin' and 'b.lin' are one shared module"):
        swap.replace({"a.lin": nn.Linear(3, 3), "b.lin": nn.Linear(3, 3)})
    with pytest.raises(TypeError, match="new: 'head' must map to an nn.Module"):
        swap.replace({"head": torch.zeros(2)})
    with pytest.raises(TypeError, match="^new must be an nn.Module"):
        swap.put("head", 3)
    with pytest.raises(TypeError, match="^root must be an nn.Module"):
        Swap(torch.zeros(2))
    assert_same(model, before)
    same = nn.Linear(3, 3)  # both names of a shared module given one module: fine
    swap.replace({"a.lin": same, "b.lin": same})
    assert model.a.lin is same and model.b.lin is same


class Block(nn.Module):
    """A residual MLP block taking a keyword argument, as transformers' blocks do."""

    def __init__(self, d=8):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, *, scale=1.0):
        return x + scale * self.down(torch.tanh(self.up(x)))


def _saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs, and its output."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_checkpointed_same_gradients_less_saved_memory_and_restored():
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block() for _ in range(6))
    x = torch.randn(4, 16, 8)

    def run():
        h = x
        for b in blocks:
            h = b(h, scale=0.5)
        return h

    plain_bytes, out = _saved_bytes(run)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in blocks.parameters()]
    blocks.zero_grad(set_to_none=True)
    with checkpointed(list(blocks) + [blocks[0]]):  # a repeated module is wrapped once
        assert all("forward" in b.__dict__ for b in blocks)
        ckpt_bytes, out2 = _saved_bytes(run)
        out2.square().sum().backward()
        with torch.no_grad():
            assert torch.equal(run(), out)
    assert torch.equal(out2, out)
    for g, p in zip(grads, blocks.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6)
    # the six blocks' activations are recomputed: only their inputs are kept
    assert ckpt_bytes < plain_bytes / 3, (ckpt_bytes, plain_bytes)
    assert all("forward" not in b.__dict__ for b in blocks)


def test_checkpointed_restores_forward_when_the_block_raises():
    b = Block()
    with pytest.raises(Boom), checkpointed([b]):
        raise Boom
    assert "forward" not in b.__dict__
    with pytest.raises(TypeError, match=r"modules\[1\]"), checkpointed([b, "x"]):
        pass


def test_merge_factorized_merges_any_model_once_per_module_and_all_or_nothing():
    """merge_factorized on a plain nn.Module (no MPOModel): an MPO layer held under two
    paths merged once and still shared, a gauge-fixed layer merged, the rest untouched;
    outputs, train/eval modes and flags kept; safe_merge with NaN changes nothing."""
    from tnlm.bridge import MPOLinear
    from tnlm.bridge.pivoted import PivotedLinear
    from tnlm.integration.merge import factorized_modules, merge_factorized

    def build():
        torch.manual_seed(0)
        model = nn.Module()
        mpo = MPOLinear.from_linear(nn.Linear(12, 8), (3, 4), (2, 4), max_bond=3)
        model.a, model.b = nn.Module(), nn.Module()
        model.a.lin = model.b.lin = mpo
        low = MPOLinear.from_linear(nn.Linear(8, 6), (8, 1), (1, 6), max_bond=2)
        model.piv = PivotedLinear.from_mpo(low)
        model.head = nn.Linear(6, 2)
        return model

    x = torch.randn(5, 12)
    model = build()
    model.a.lin.eval()
    for c in model.a.lin.cores:
        c.requires_grad_(False)
    model.a.lin.cores[1].requires_grad_(True)  # one core trains: the weight trains
    model.piv.requires_grad_(False)
    assert len(factorized_modules(model)) == 2
    with torch.no_grad():
        ref = model.head(model.piv(model.a.lin(x)))
        assert merge_factorized(model) == 2
        assert model.a.lin is model.b.lin and type(model.a.lin) is nn.Linear
        assert type(model.piv) is nn.Linear and not factorized_modules(model)
        torch.testing.assert_close(model.head(model.piv(model.a.lin(x))), ref,
                                   rtol=1e-5, atol=1e-5)
    assert not model.a.lin.training and model.piv.training
    assert model.a.lin.weight.requires_grad and not model.piv.weight.requires_grad
    bad = build()
    with torch.no_grad():
        bad.piv.coef[0, 0] = float("nan")
    before = snapshot(bad)["modules"]
    with pytest.raises(ValueError, match=r"NaN or inf in the merged weights of \['piv'\]"):
        merge_factorized(bad, safe_merge=True)
    assert snapshot(bad)["modules"] == before and len(factorized_modules(bad)) == 2
    assert merge_factorized(nn.Linear(3, 3)) == 0  # nothing factorized: nothing to do
