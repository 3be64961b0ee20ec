"""Fault suite: failures injected into model surgery, loading, squeezing and saving,
bad checkpoints and bad arguments. Every case either raises a clear error or
recovers, and no model, checkpoint or file is lost (see docs/reliability.md).

Models are random-init BERTs (hidden 32, 2 layers) so that each case runs in well
under a second; injected failures raise :class:`Injected` on the k-th call of a
patched function, for several k.
"""

import json
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from tnlm.bridge import MPOModule
from tnlm.compress import DimensionSqueezer
from tnlm.integration import MPOConfig, MPOModel, get_mpo_model, surgery
from tnlm.integration.io import CONFIG_NAME

IDS = torch.tensor([[5, 17, 42, 9, 63, 2], [7, 7, 90, 31, 1, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
LABELS = torch.tensor([0, 1])
TARGETS = ["query", "value", "intermediate.dense"]  # 6 modules in 2 layers


class Injected(Exception):
    """The failure the tests inject."""


def fail_on(k, fn, exc=Injected):
    """``fn`` that raises ``exc`` on its k-th call (counting from 1)."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise exc(f"injected failure on call {k}")
        return fn(*args, **kwargs)

    wrapper.calls = calls
    return wrapper


def counting(fn):
    return fail_on(0, fn)


def tiny_bert(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                     num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def config(**kw):
    return MPOConfig(target_modules=TARGETS, n_sites=3, **kw)


def outputs(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def fingerprint(model):
    """Module objects, state, requires_grad flags, train flags and outputs of ``model``."""
    return dict(
        modules={n: id(m) for n, m in model.named_modules(remove_duplicate=False)},
        params={n: id(p) for n, p in model.named_parameters(remove_duplicate=False)},
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        flags={n: p.requires_grad for n, p in model.named_parameters()},
        training={n: m.training for n, m in model.named_modules()},
        out=outputs(model),
    )


def assert_unchanged(model, before):
    after = fingerprint(model)
    assert after["modules"] == before["modules"], "module objects changed"
    assert after["params"] == before["params"], "parameter objects changed"
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k in before["state"] if not torch.equal(after["state"][k], before["state"][k])]
    assert not changed, f"values changed: {changed[:5]}"
    assert after["flags"] == before["flags"], "requires_grad flags changed"
    assert after["training"] == before["training"], "train/eval modes changed"
    assert torch.equal(after["out"], before["out"]), "outputs changed"


# ---------------------------------------------------------------------------------------
# 1. transactional model surgery: get_mpo_model
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_wrap_decomposition_failure_leaves_model_unchanged(k, monkeypatch):
    model = tiny_bert()
    before = fingerprint(model)
    patched = fail_on(k, MPOModule.from_module)
    monkeypatch.setattr(MPOModule, "from_module", staticmethod(patched))
    with pytest.raises(Injected):
        get_mpo_model(model, config(max_bond=2), progress=False)
    assert patched.calls["n"] == k
    assert_unchanged(model, before)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_wrap_swap_failure_leaves_model_unchanged(k, monkeypatch):
    model = tiny_bert()
    before = fingerprint(model)
    monkeypatch.setattr(surgery, "set_module", fail_on(k, surgery.set_module))
    with pytest.raises(Injected):
        get_mpo_model(model, config(max_bond=2), progress=False)
    assert_unchanged(model, before)


def test_wrap_interrupt_and_training_setup_failure_leave_model_unchanged(monkeypatch):
    model = tiny_bert()
    before = fingerprint(model)
    with monkeypatch.context() as m:
        m.setattr(surgery, "set_module", fail_on(4, surgery.set_module, KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            get_mpo_model(model, config(), progress=False)
    assert_unchanged(model, before)
    with monkeypatch.context() as m:
        m.setattr(MPOModel, "setup_training", fail_on(1, MPOModel.setup_training))
        with pytest.raises(Injected):
            get_mpo_model(model, config(modules_to_save=["classifier"]), progress=False)
    assert_unchanged(model, before)
    # and the untouched model still converts
    wrapped = get_mpo_model(model, config(), progress=False)
    assert len(list(wrapped.mpo_modules())) == 6


def test_wrap_bad_spec_of_last_module_fails_before_any_decomposition(monkeypatch):
    model = tiny_bert()
    before = fingerprint(model)
    patched = counting(MPOModule.from_module)
    monkeypatch.setattr(MPOModule, "from_module", staticmethod(patched))
    bad = config(overrides={"intermediate.dense": {"out_shape": (2, 2, 2)}})
    with pytest.raises(ValueError, match=r"module 'bert.encoder.layer.0.intermediate.dense' \(32x64\): "
                                         r"out_shape=\(2, 2, 2\) has product 8"):
        get_mpo_model(model, bad, progress=False)
    assert patched.calls["n"] == 0
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------
# 1. transactional model surgery: MPOModel.from_pretrained
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved 2-layer checkpoint and the outputs of the saved model."""
    d = tmp_path_factory.mktemp("ckpt")
    model = get_mpo_model(tiny_bert(), config(max_bond=3), progress=False).eval()
    model.save_pretrained(d)
    return d, outputs(model)


def copy_checkpoint(src, dst, edit=None):
    """A copy of checkpoint ``src`` in ``dst``, its config changed by ``edit(meta)``."""
    dst.mkdir(exist_ok=True)
    meta = json.loads((src / CONFIG_NAME).read_text())
    (dst / meta["weights"]).write_bytes((src / meta["weights"]).read_bytes())
    if edit is not None:
        edit(meta)
    (dst / CONFIG_NAME).write_text(json.dumps(meta))
    return dst


def test_load_round_trip_after_checks(saved):
    d, ref = saved
    loaded = MPOModel.from_pretrained(tiny_bert(seed=1), d).eval()
    assert torch.equal(outputs(loaded), ref)


Q0 = "bert.encoder.layer.0.attention.self.query"


def _set(path, value):
    def edit(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _drop_module(meta):
    del meta["modules"][Q0]


def _add_module(meta):
    meta["modules"]["bert.encoder.layer.0.attention.self.key"] = dict(meta["modules"][Q0])


def _foreign_weights(tmp_path):
    """Weights of a max_bond=2 model under the max_bond=3 structure, hash updated."""
    other = get_mpo_model(tiny_bert(), config(max_bond=2), progress=False)
    other.save_pretrained(tmp_path / "other")
    om = json.loads((tmp_path / "other" / CONFIG_NAME).read_text())

    def edit(meta):
        meta["weights"], meta["sha256"] = om["weights"], om["sha256"]
    return edit, tmp_path / "other" / om["weights"]


BAD_CHECKPOINTS = {
    "in_dim edited": (_set(["modules", Q0, "in_dim"], 30), r"is 30x32 \(in x out\) but the base"),
    "out_dim edited": (_set(["modules", Q0, "out_dim"], 31), r"is 32x31 .* base model's is 32x32"),
    "bond edited": (_set(["modules", Q0, "core_shapes", 0, 3], 2), "ends with bond 2"),
    "outer bond edited": (_set(["modules", Q0, "core_shapes", 0, 0], 2), "outer bonds"),
    "kind edited": (_set(["modules", Q0, "kind"], "conv1d"), "is a conv1d but .* has Linear"),
    "embedding with bias": (_set(["modules", Q0, "kind"], "embedding"), "false for an embedding"),
    "unknown kind": (_set(["modules", Q0, "kind"], "lstm"), "kind must be one of"),
    "bias edited": (_set(["modules", Q0, "bias"], False), "bias=False"),
    "mode edited": (_set(["modules", Q0, "mode"], "fast"), "mode must be one of"),
    "negative dim": (_set(["modules", Q0, "in_dim"], -1), "in_dim must be an int >= 1"),
    "shapes not a list": (_set(["modules", Q0, "core_shapes"], "x"), "core_shapes must be"),
    "module dropped": (_drop_module, r"missing \['.*query.weight'\], unexpected \['.*query.cores.0'"),
    "module added": (_add_module, r"missing \['.*key.cores.0', .*unexpected \['.*key.weight'\]"),
    "unknown module": (_set(["modules", "bert.encoder.layer.5.output.dense"],
                            {"kind": "linear", "in_dim": 64, "out_dim": 32,
                             "core_shapes": [[1, 64, 32, 1]], "bias": True}),
                       "does not exist in the base model"),
    "config n_sites": (_set(["config", "n_sites"], 0), "invalid config.*n_sites"),
    "config field": (_set(["config", "lora_r"], 8), "invalid config.*unknown MPOConfig fields"),
    "config not object": (_set(["config"], []), "'config' must be an object"),
    "modules not object": (_set(["modules"], []), "'modules' must be an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_and_base_untouched(case, saved, tmp_path):
    edit, match = BAD_CHECKPOINTS[case]
    d = copy_checkpoint(saved[0], tmp_path / "bad", edit)
    base = tiny_bert(seed=1)
    before = fingerprint(base)
    with pytest.raises(ValueError, match=match):
        MPOModel.from_pretrained(base, d)
    assert_unchanged(base, before)


def test_foreign_weights_with_fixed_hash_are_refused(saved, tmp_path):
    edit, weights = _foreign_weights(tmp_path)
    d = copy_checkpoint(saved[0], tmp_path / "bad", edit)
    (d / weights.name).write_bytes(weights.read_bytes())
    base = tiny_bert(seed=1)
    before = fingerprint(base)
    with pytest.raises(ValueError, match=r"has shape \[.*\], but .* needs"):
        MPOModel.from_pretrained(base, d)
    assert_unchanged(base, before)


def test_deeper_checkpoint_into_shallower_model_leaves_it_untouched(tmp_path):
    deep = get_mpo_model(tiny_bert(layers=3), config(max_bond=3), progress=False)
    deep.save_pretrained(tmp_path)
    base = tiny_bert(layers=2, seed=1)
    before = fingerprint(base)
    with pytest.raises(ValueError, match="layer.2.* does not exist in the base model"):
        MPOModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)
    with pytest.raises(ValueError, match="already an MPOModel"):
        MPOModel.from_pretrained(deep, tmp_path)
    with pytest.raises(ValueError, match="train must be one of"):
        MPOModel.from_pretrained(base, tmp_path, train="central")


def _clean_copy_count(directory):
    """Number of Tensor.copy_ calls in a successful load (to inject at each of them)."""
    base = tiny_bert(seed=1)
    orig = torch.Tensor.copy_
    counter = counting(orig)
    torch.Tensor.copy_ = counter
    try:
        MPOModel.from_pretrained(base, directory)
    finally:
        torch.Tensor.copy_ = orig
    return counter.calls["n"]


def test_load_failure_injected_at_every_step_leaves_base_untouched(saved, monkeypatch):
    d, ref = saved
    n_copies = _clean_copy_count(d)
    assert n_copies > 10
    injections = [
        *[(MPOModule, "from_structure", k, True) for k in (1, 3, 6)],
        *[(surgery, "set_module", k, False) for k in (1, 2, 4, 6)],
        *[(torch.Tensor, "copy_", k, False)
          for k in (1, 7, 13, n_copies // 2, n_copies - 1, n_copies)],
        (MPOModel, "setup_training", 1, False),
    ]
    base = tiny_bert(seed=1)
    before = fingerprint(base)
    for owner, attr, k, static in injections:
        orig = getattr(owner, attr)
        patched = fail_on(k, orig)
        with monkeypatch.context() as m:
            m.setattr(owner, attr, staticmethod(patched) if static else patched)
            # load_state_dict of a new layer reports a failed copy as a RuntimeError
            with pytest.raises((Injected, ValueError), match="injected failure"):
                MPOModel.from_pretrained(base, d)
        assert patched.calls["n"] >= k, (attr, k)
        assert_unchanged(base, before)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "copy_", fail_on(n_copies // 2, torch.Tensor.copy_,
                                                 KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            MPOModel.from_pretrained(base, d)
    assert_unchanged(base, before)
    # the untouched base still loads, bit-exact
    assert torch.equal(outputs(MPOModel.from_pretrained(base, d).eval()), ref)


# ---------------------------------------------------------------------------------------
# 1. transactional model surgery: DimensionSqueezer
# ---------------------------------------------------------------------------------------

def squeezable():
    return get_mpo_model(tiny_bert(), config(), progress=False)


def loss_of(model):
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss)


def nudge(model):
    """A deterministic 'recovery fine-tuning': moves every trainable parameter."""
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1e-3)


def squeeze_state(model, sq):
    return dict(shapes={n: m.core_shapes for n, m in model.mpo_modules()},
                errors={n: m.truncation_error for n, m in model.mpo_modules()},
                candidates=sq.candidates())


def reference_after(iters, **kw):
    """Model fingerprint and squeezer state after ``iters`` clean iterations."""
    model = squeezable()
    sq = DimensionSqueezer(model, loss_of, kw.get("finetune"), delta=math.inf,
                           max_iters=iters, cuts_per_iter=kw.get("cuts", 1), log=None)
    if iters:
        sq.run()
    model.eval()
    return fingerprint(model), squeeze_state(model, sq)


@pytest.mark.parametrize(("where", "k", "cuts"), [
    ("evaluate", 2, 1), ("evaluate", 3, 1), ("evaluate", 4, 2),
    ("finetune", 1, 1), ("finetune", 3, 1), ("finetune", 2, 2),
    ("cut", 2, 2), ("cut", 5, 2), ("log", 3, 1),
])
def test_squeeze_failure_restores_last_accepted_state(where, k, cuts, monkeypatch):
    model = squeezable()
    evaluate, finetune, log = loss_of, nudge, (lambda step: None)
    if where == "evaluate":
        evaluate = fail_on(k, loss_of)
        done = k - 2              # call 1 is the starting loss; call k ends iteration k-1
    elif where == "finetune":
        finetune = fail_on(k, nudge)
        done = k - 1
    elif where == "log":
        log = fail_on(k, log)     # one log line per cut
        done = (k - 1) // cuts
    else:
        monkeypatch.setattr(MPOModule, "retruncate", fail_on(k, MPOModule.retruncate))
        done = (k - 1) // cuts
    sq = DimensionSqueezer(model, evaluate, finetune, delta=math.inf, max_iters=10,
                           cuts_per_iter=cuts, log=log)
    with pytest.raises(Injected):
        sq.run()
    monkeypatch.undo()
    model.eval()
    ref_fp, ref_sq = reference_after(done, finetune=nudge, cuts=cuts)
    got_sq = squeeze_state(model, sq)
    assert got_sq == ref_sq
    ref_fp["modules"] = ref_fp["params"] = None  # another model: compare values only
    got = fingerprint(model)
    got["modules"] = got["params"] = None
    assert got.keys() == ref_fp.keys()
    assert all(torch.equal(got["state"][key], ref_fp["state"][key]) for key in ref_fp["state"])
    assert got["flags"] == ref_fp["flags"] and torch.equal(got["out"], ref_fp["out"])
    # and squeezing goes on from there
    res = DimensionSqueezer(model, loss_of, nudge, delta=math.inf, max_iters=1, log=None).run()
    assert len(res.history) == 1 and res.history[0].accepted


# ---------------------------------------------------------------------------------------
# 2. overrides and arguments: validated before any work
# ---------------------------------------------------------------------------------------

AO = "bert.encoder.layer.0.attention.output.dense"
OD = "bert.encoder.layer.0.output.dense"


@pytest.mark.parametrize("order", ["short first", "long first"])
def test_most_specific_override_wins_whatever_the_order(order):
    pairs = [("dense", {"max_bond": 3}), ("attention.output.dense", {"max_bond": 2})]
    if order == "long first":
        pairs.reverse()
    cfg = MPOConfig(target_modules=["dense"], n_sites=3, overrides=dict(pairs))
    assert cfg.options_for(AO, 32, 32)["max_bond"] == 2
    assert cfg.options_for(OD, 64, 32)["max_bond"] == 3
    assert cfg.overrides_for(AO) == ["dense", "attention.output.dense"]
    wrapped = dict(get_mpo_model(tiny_bert(), cfg, progress=False).mpo_modules())
    assert max(wrapped[AO].bond_dims) == 2 and max(wrapped[OD].bond_dims) == 3


def test_equally_specific_conflicting_overrides_raise():
    cfg = MPOConfig(target_modules=r".*dense", n_sites=3,
                    overrides={r".*output\.dense": {"max_bond": 2}, r"bert\..*\.dense": {"max_bond": 3}})
    model = tiny_bert()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="equally specific and disagree on \\['max_bond'\\]"):
        get_mpo_model(model, cfg, progress=False)
    assert_unchanged(model, before)


def test_override_matching_no_target_raises_with_suggestion(monkeypatch):
    model = tiny_bert()
    before = fingerprint(model)
    patched = counting(MPOModule.from_module)
    monkeypatch.setattr(MPOModule, "from_module", staticmethod(patched))
    with pytest.raises(ValueError, match=r"overrides pattern 'intermediate.dens' matches none "
                                         r"of the 6 target.*did you mean \['intermediate.dense'"):
        get_mpo_model(model, config(overrides={"intermediate.dens": {"max_bond": 2}}),
                      progress=False)
    # a module that exists but is not a target is also a mistake
    with pytest.raises(ValueError, match="overrides pattern 'key' matches none"):
        get_mpo_model(model, config(overrides={"key": {"max_bond": 2}}), progress=False)
    assert patched.calls["n"] == 0
    assert_unchanged(model, before)


def test_unknown_override_key_suggests_the_right_one():
    with pytest.raises(ValueError, match="unknown keys \\['max_bnd'\\].*did you mean 'max_bond'"):
        MPOConfig(target_modules=["query"], overrides={"query": {"max_bnd": 2}})
    with pytest.raises(TypeError, match=r"overrides\['query'\] must be a dict"):
        MPOConfig(target_modules=["query"], overrides={"query": 2})


def test_modules_to_save_string_is_one_pattern():
    cfg = config(modules_to_save="classifier")
    assert cfg.modules_to_save == ["classifier"]
    wrapped = get_mpo_model(tiny_bert(), cfg, progress=False)
    assert all(p.requires_grad for p in wrapped.base_model.classifier.parameters())
    with pytest.raises(ValueError, match="modules_to_save must be"):
        config(modules_to_save=["classifier", 3])


BAD_ARGUMENTS = {
    "n_sites 10**9": (dict(n_sites=10**9), ValueError, "n_sites must be at most 32"),
    "n_sites 1000": (dict(n_sites=1000), ValueError, "n_sites must be at most 32"),
    "n_sites 33": (dict(n_sites=33), ValueError, "n_sites must be at most 32"),
    "n_sites 0": (dict(n_sites=0), ValueError, "n_sites must be >= 1"),
    "n_sites float": (dict(n_sites=3.0), TypeError, "n_sites must be an int"),
    "cutoff 1": (dict(cutoff=1.0), ValueError, "cutoff must be .* < 1, got 1.0"),
    "cutoff 1.5": (dict(cutoff=1.5), ValueError, "cutoff must be .* < 1"),
    "cutoff -0.1": (dict(cutoff=-0.1), ValueError, "cutoff must be finite and >= 0"),
    "cutoff per bond": (dict(cutoff=[0.1, 2.0]), ValueError, "cutoff must be .* got 2.0"),
    "max_error 1.01": (dict(max_error=1.01), ValueError, "max_error must be .* <= 1"),
    "max_error nan": (dict(max_error=float("nan")), ValueError, "max_error must be finite"),
    "max_bond 0": (dict(max_bond=0), ValueError, "max_bond must be >= 1"),
    "max_bond str": (dict(max_bond="8"), TypeError, "max_bond must be a number"),
    "override cutoff": (dict(overrides={"query": {"cutoff": 3}}), ValueError,
                        r"overrides\['query'\]: cutoff must be"),
    "override n_sites": (dict(overrides={"query": {"n_sites": 1000}}), ValueError,
                         r"overrides\['query'\]: n_sites must be at most 32"),
    "override gauge": (dict(overrides={"query": {"gauge": "right"}}), ValueError,
                       r"overrides\['query'\]: gauge must be one of"),
    "in_shapes 33 sites": (dict(in_shapes={32: (1,) * 33}), ValueError,
                           r"in_shapes\[32\] must have at most 32 sites"),
    "pad not bool": (dict(pad="yes"), TypeError, "pad must be a bool"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_config_ranges_checked_before_any_work(case):
    kw, exc, match = BAD_ARGUMENTS[case]
    args = dict(target_modules=["query"]) | kw
    with pytest.raises(exc, match=match):
        MPOConfig(**args)


def test_core_entry_points_check_sites_and_ranges():
    import numpy as np

    from tnlm import MPO, factorize, padded_dim
    from tnlm.core.policy import TruncationPolicy

    W = np.random.default_rng(0).standard_normal((32, 32))
    for n in (10**9, 1000, 33):  # 10**9 used to hang, 1000 to raise RecursionError
        with pytest.raises(ValueError, match="n_sites must be at most 32"):
            MPO.from_matrix(W, n_sites=n)
        with pytest.raises(ValueError, match="n_sites must be at most 32"):
            factorize(32, n)
        with pytest.raises(ValueError, match="n_sites must be at most 32"):
            padded_dim(32, n)
    # too many sites for a small dimension: padding would be mostly zeros (2**20 rows)
    with pytest.raises(ValueError, match="n_sites=20 is too many for dim=32"):
        MPO.from_matrix(W, n_sites=20, pad=True)
    with pytest.raises(ValueError, match="no balanced factorization into 20 sites.*fewer sites"):
        factorize(32, 20)
    with pytest.raises(ValueError, match="in_shape must have at most 32 sites"):
        MPO.from_matrix(W, (1,) * 65, (1,) * 65)
    mpo = MPO.from_matrix(W, (4, 8), (8, 4))
    with pytest.raises(ValueError, match="cutoff must be .* < 1"):
        mpo.truncate(cutoff=1.0)
    with pytest.raises(ValueError, match="max_error must be .* <= 1"):
        mpo.truncate(max_error=1.5)
    assert mpo.truncate(max_error=1.0).bond_dims == (1,)  # the extreme allowed value
    with pytest.raises(ValueError, match="cutoff"):
        TruncationPolicy.check(cutoff=[0.5, 1.0])


# ---------------------------------------------------------------------------------------
# 3. saving owns its files: concurrent writers, kill -9 at every step and at random times
# ---------------------------------------------------------------------------------------

# Run in fresh interpreters (no transformers import: ~2 s each). The writers save a
# small MPO model; each prints JSON results on its last line. Killed saves run in a
# forked grandchild (single-threaded) that kills itself with SIGKILL at a chosen
# point, or is killed by the child after a delay.
CHILD = r'''
import json, os, signal, sys, tempfile, time
import torch
torch.set_num_threads(1)
from torch import nn
import safetensors.torch
from tnlm.integration import MPOConfig, get_mpo_model
from tnlm.integration import io


def build(seed):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    return get_mpo_model(base, MPOConfig(target_modules=["0", "2"], n_sites=3), progress=False)


def digest(model):
    with tempfile.TemporaryDirectory() as t:
        safetensors.torch.save_model(model.base_model, t + "/w")
        return io.sha256(t + "/w")


def nudge(model, i):
    with torch.no_grad():
        next(model.parameters()).add_(1e-3 * (i + 1))


def arm(owner, attr, k, when):
    orig = getattr(owner, attr)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = orig(*args, **kwargs)
        if calls[0] == k and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, attr, wrapper)


OWNERS = {"io": io, "os": os, "safetensors": safetensors.torch, "Path": io.Path}
mode, root = sys.argv[1], sys.argv[2]
if mode == "writer":                        # writer ROOT SEED N GO
    seed, n, go = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    model = build(seed)
    open(go + f".ready{seed}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    for i in range(n):
        nudge(model, i)
        model.save_pretrained(root)
    print(json.dumps({"last": digest(model)}))
elif mode == "points":                      # points ROOT JSON-LIST-OF-POINTS
    points = json.loads(sys.argv[3])
    a, b = build(1), build(2)
    out = {"a": digest(a), "b": digest(b), "status": []}
    for j, (owner, attr, k, when) in enumerate(points):
        d = os.path.join(root, str(j))
        a.save_pretrained(d)
        pid = os.fork()
        if pid == 0:
            arm(OWNERS[owner], attr, k, when)
            b.save_pretrained(d)
            os._exit(0)
        out["status"].append(os.waitpid(pid, 0)[1])
    print(json.dumps(out))
elif mode == "timed":                       # timed ROOT JSON-LIST-OF-DELAYS
    delays = json.loads(sys.argv[3])
    a, b = build(1), build(2)
    out = {"status": []}
    for j, delay in enumerate(delays):
        d = os.path.join(root, str(j))
        a.save_pretrained(d)
        pid = os.fork()
        if pid == 0:
            for i in range(10**6):
                nudge(b, i)
                b.save_pretrained(d)
            os._exit(0)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        out["status"].append(os.waitpid(pid, 0)[1])
    print(json.dumps(out))
'''

SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def spawn(*args):
    import os
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | SINGLE_THREAD)


def result(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def plain_base():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 64))


BEST = b"the user's own weights, not named by any config"


def check_folder(d):
    """The folder holds a complete checkpoint that loads; return its SHA-256."""
    from tnlm.integration import io

    meta = io.read_meta(d)
    io.verified_weights(d, meta)
    MPOModel.from_pretrained(plain_base(), d)
    return meta["sha256"]


def check_clean_after_next_save(d):
    """A following save leaves exactly: the config, its weights, the lock file and the
    user's file (no temporary file, journal or orphaned weights)."""
    from tnlm.integration import io

    model = get_mpo_model(plain_base(), MPOConfig(target_modules=["0", "2"], n_sites=3),
                          progress=False)
    model.save_pretrained(d)
    meta = io.read_meta(d)
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted([CONFIG_NAME, meta["weights"], io.LOCK_NAME,
                            "mpo_model-best.safetensors"]), names
    assert (d / "mpo_model-best.safetensors").read_bytes() == BEST
    check_folder(d)


def test_two_concurrent_writers_leave_one_checkpoint(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    (d / "mpo_model-best.safetensors").write_bytes(BEST)
    go = tmp_path / "go"
    procs = [spawn("writer", d, seed, 5, go) for seed in (1, 2)]
    import time

    while not all((tmp_path / f"go.ready{seed}").exists() for seed in (1, 2)):
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
        time.sleep(0.02)
    go.touch()  # both start saving at once
    lasts = {result(p)["last"] for p in procs}
    weights = sorted(p.name for p in d.glob("mpo_model-*.safetensors"))
    assert len(weights) == 2 and "mpo_model-best.safetensors" in weights, weights
    assert not list(d.glob(".*.tmp")) and not list(d.glob(".*pending"))
    # the last save of the writer that finished last is the checkpoint, intact
    assert check_folder(d) in lasts
    assert (d / "mpo_model-best.safetensors").read_bytes() == BEST
    check_clean_after_next_save(d)


# (owner, attribute, k-th call, kill before/after it): every step of a save, in order
KILL_POINTS = [
    ("safetensors", "save_model", 1, "before"),   # empty temporary weights
    ("safetensors", "save_model", 1, "after"),    # full temporary weights, not flushed
    ("io", "_fsync", 1, "after"),                 # weights flushed
    ("io", "sha256", 1, "after"),                 # hashed
    ("os", "replace", 1, "before"),               # journal written, not renamed
    ("os", "replace", 1, "after"),                # journal in place
    ("os", "replace", 2, "before"),               # weights not yet renamed
    ("os", "replace", 2, "after"),                # new weights in place, old config
    ("io", "_fsync", 3, "after"),                 # new config flushed, not renamed
    ("os", "replace", 3, "before"),
    ("os", "replace", 3, "after"),                # new config in place
    ("io", "_fsync_dir", 1, "after"),
    ("Path", "unlink", 1, "before"),              # previous weights not yet removed
    ("Path", "unlink", 1, "after"),               # journal not yet removed
    ("Path", "unlink", 2, "after"),               # done (journal removed)
]
# the new config is in place from ("os", "replace", 3, "after") on
NEW_FROM = KILL_POINTS.index(("os", "replace", 3, "after"))


def test_kill_at_every_step_of_a_save_leaves_a_loadable_checkpoint(tmp_path):
    for j in range(len(KILL_POINTS)):
        (tmp_path / str(j)).mkdir()
        (tmp_path / str(j) / "mpo_model-best.safetensors").write_bytes(BEST)
    out = result(spawn("points", tmp_path, json.dumps(KILL_POINTS)))
    import signal

    for j, point in enumerate(KILL_POINTS):
        d = tmp_path / str(j)
        assert out["status"][j] == signal.SIGKILL, (point, out["status"][j])  # it was killed
        assert check_folder(d) == (out["b"] if j >= NEW_FROM else out["a"]), point
        assert (d / "mpo_model-best.safetensors").read_bytes() == BEST
        check_clean_after_next_save(d)


def test_kill_at_random_times_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    delays = [0.0, 0.003, 0.01, 0.03, 0.06, 0.1, 0.2]
    for j in range(len(delays)):
        (tmp_path / str(j)).mkdir()
        (tmp_path / str(j) / "mpo_model-best.safetensors").write_bytes(BEST)
    out = result(spawn("timed", tmp_path, json.dumps(delays)))
    import signal

    assert out["status"] == [signal.SIGKILL] * len(delays)
    for j in range(len(delays)):
        d = tmp_path / str(j)
        check_folder(d)
        check_clean_after_next_save(d)


def test_a_failed_config_write_removes_the_new_weights(tmp_path, monkeypatch):
    from tnlm.integration import io

    model = get_mpo_model(plain_base(), MPOConfig(target_modules=["0", "2"], n_sites=3),
                          progress=False)
    model.save_pretrained(tmp_path)
    (tmp_path / "mpo_model-best.safetensors").write_bytes(BEST)
    before = sorted(p.name for p in tmp_path.iterdir())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    monkeypatch.setattr(io, "atomic_write", fail_on(2, io.atomic_write))  # 1: journal
    with pytest.raises(Injected):
        model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    check_folder(tmp_path)


def test_stale_temporary_files_are_removed_but_fresh_ones_are_not(tmp_path):
    import os

    from tnlm.integration import io

    stale = [tmp_path / ".weights.abc.tmp", tmp_path / ".mpo_config.json.x1.tmp"]
    for p in stale:
        p.write_bytes(b"x" * 100)
        os.utime(p, (1, 1))
    # the weights writer's directory, with what a killed safetensors writer leaves in it
    stale_dir = tmp_path / ".weights.dir.tmp"
    stale_dir.mkdir()
    (stale_dir / ".tmpQwErTy").write_bytes(b"z" * 100)
    os.utime(stale_dir, (1, 1))
    stale.append(stale_dir)
    other = tmp_path / "notes.tmp"  # not ours
    other.write_text("keep")
    with io.locked(tmp_path) as t:
        fresh = tmp_path / ".weights.new.tmp"
        fresh.write_bytes(b"y")
        os.utime(fresh, (t + 1, t + 1))
        assert sorted(io.remove_stale_temps(tmp_path, t)) == sorted(stale)
    assert fresh.exists() and other.exists() and not stale_dir.exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("scale", [1e300, 1e160, 1e-300])
def test_norm_overflow_or_underflow_is_an_error_not_a_silent_cut(scale):
    import numpy as np

    from tnlm import MPO

    W = np.random.default_rng(0).standard_normal((16, 16)) * scale
    for kw in (dict(max_error=0.1), dict(max_bond=2), dict(cutoff=0.01)):
        with pytest.raises(ValueError, match=r"\|\|W\|\|_F = .* (overflows|underflows)"):
            MPO.from_matrix(W, (4, 4), (4, 4), **kw)
    exact = MPO.from_matrix(W, (4, 4), (4, 4))  # nothing to truncate: still exact
    assert exact.truncation_error == 0.0
    with pytest.raises(ValueError, match="rescale W first"):
        exact.truncate(max_bond=2)
    small = MPO.from_matrix(W / np.abs(W).max(), (4, 4), (4, 4), max_bond=2)
    assert _rel(small.to_matrix(), W / np.abs(W).max()) == pytest.approx(small.truncation_error)


# ---------------------------------------------------------------------------------------
# 4. property tests: exactness, error accounting, gauge invariance (hypothesis)
# ---------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def matrices(draw, max_sites=4, max_factor=4):
    """(W float64, in_shape, out_shape) with random site shapes (factors 1..max_factor)."""
    import numpy as np

    n = draw(st.integers(1, max_sites))
    ins = tuple(draw(st.lists(st.integers(1, max_factor), min_size=n, max_size=n)))
    outs = tuple(draw(st.lists(st.integers(1, max_factor), min_size=n, max_size=n)))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((math.prod(ins), math.prod(outs))) * scale
    if draw(st.booleans()):  # a low-rank matrix: bonds with zero singular values
        r = draw(st.integers(1, 3))
        W = (rng.standard_normal((W.shape[0], r)) @ rng.standard_normal((r, W.shape[1]))) * scale
    return W, ins, outs


def _rel(a, b):
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))


@PROPERTY
@given(matrices(), st.sampled_from(["svd", "qr", "auto"]))
def test_property_from_matrix_is_exact(case, method):
    from tnlm import MPO

    W, ins, outs = case
    mpo = MPO.from_matrix(W, ins, outs, method=method)
    assert mpo.in_shape == ins and mpo.out_shape == outs
    assert _rel(mpo.to_matrix(), W) <= 1e-10
    assert mpo.truncation_error == 0.0


@PROPERTY
@given(matrices(), st.data())
def test_property_reported_truncation_error_is_the_measured_one(case, data):
    from tnlm import MPO

    W, ins, outs = case
    n_bonds = len(ins) - 1
    max_bond = data.draw(st.sampled_from([None, 1, 2, 3]))
    max_error = data.draw(st.sampled_from([None, 0.05, 0.3, 1.0]))
    exact = MPO.from_matrix(W, ins, outs)
    for mpo in (MPO.from_matrix(W, ins, outs, max_bond=max_bond, max_error=max_error),
                exact.truncate(max_bond=max_bond, max_error=max_error)):
        measured = _rel(mpo.to_matrix(), W)
        assert abs(mpo.truncation_error - measured) <= 1e-10 + 1e-8 * measured
        if max_error is not None and max_bond is None:  # a binding max_bond may exceed it
            assert mpo.truncation_error <= max_error + 1e-12
        if max_bond is not None:
            assert all(b <= max_bond for b in mpo.bond_dims) or n_bonds == 0


@PROPERTY
@given(matrices(), st.data())
def test_property_gauges_leave_the_matrix_unchanged(case, data):
    from tnlm import MPO
    from tnlm.core.spec import GAUGES, apply_gauge

    W, ins, outs = case
    mpo = MPO.from_matrix(W, ins, outs)
    if data.draw(st.booleans()):
        mpo = mpo.truncate(max_bond=data.draw(st.integers(1, 3)))
    ref = mpo.to_matrix()
    for gauge in GAUGES:
        g = apply_gauge(mpo, gauge)
        # (the symmetric gauge may drop bonds whose singular values are zero)
        assert all(a <= b for a, b in zip(g.bond_dims, mpo.bond_dims))
        assert _rel(g.to_matrix(), ref) <= 1e-10, gauge
    center = data.draw(st.integers(0, len(ins) - 1))
    c = mpo.canonicalize(center)
    assert _rel(c.to_matrix(), ref) <= 1e-10 and c.is_canonical(center)


# ---------------------------------------------------------------------------------------
# 5. dtype rules of MPO layers: those of nn.Linear / nn.Embedding, no silent casts
# ---------------------------------------------------------------------------------------

from torch import nn  # noqa: E402

from tnlm.bridge import MPOEmbedding, MPOLinear  # noqa: E402
from tnlm.bridge.layer import MPODtypeError  # noqa: E402

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INPUT_DTYPES = FLOAT_DTYPES + (torch.int64, torch.bool, torch.complex64)


def _pair(kind, dtype):
    """(dense module, its MPO layer) of ``kind`` ("linear" or "conv1d") in ``dtype``."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(20)
    dense = nn.Linear(12, 8) if kind == "linear" else Conv1D(8, 12)
    from tnlm.core.spec import DecompositionSpec

    layer = MPOModule.from_module(dense.float(), DecompositionSpec((2, 2, 3), (2, 2, 2))).to(dtype)
    return dense.to(dtype), layer


def _run(module, x, autocast):
    """``module(x)``'s dtype (outside or under cpu autocast to ``autocast``), or the
    exception type it raised."""
    try:
        if autocast is None:
            return module(x).dtype
        with torch.autocast("cpu", dtype=autocast):
            return module(x).dtype
    except RuntimeError:
        return RuntimeError


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("param_dtype", FLOAT_DTYPES)
def test_mpo_linear_follows_the_dense_layers_dtype_rules(kind, param_dtype):
    dense, layer = _pair(kind, param_dtype)
    for x_dtype in INPUT_DTYPES:
        x = (torch.randn(3, 12) * 3).to(x_dtype)
        for autocast in (None, torch.bfloat16, torch.float16):
            for mode in ("contract", "dense"):
                layer.mode = mode
                want, got = _run(dense, x, autocast), _run(layer, x, autocast)
                assert got == want, (x_dtype, autocast, mode)
    if param_dtype != torch.float64:  # (float64 layers refuse float32 input there)
        x = torch.randn(3, 12)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the values too, not only the dtype
            y, ref = layer(x), dense(x)
        assert (y.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()


def test_dtype_mismatch_message_names_the_layer_both_dtypes_and_the_fix():
    _, layer = _pair("linear", torch.float32)
    for x in (torch.randn(2, 12, dtype=torch.float64), torch.ones(2, 12, dtype=torch.int64),
              torch.randn(2, 12, dtype=torch.complex64), torch.ones(2, 12, dtype=torch.bool)):
        with pytest.raises(MPODtypeError) as err:
            layer(x)
        msg = str(err.value)
        assert "MPOLinear" in msg and str(x.dtype) in msg and "torch.float32" in msg
        assert ".to(torch.float32) on the input" in msg and f".to({x.dtype}) on the module" in msg
        assert isinstance(err.value, RuntimeError)  # what nn.Linear raises
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(MPODtypeError,
                                                                    match="autocast"):
        layer(torch.randn(2, 12, dtype=torch.float64))
    # after the fix the message suggests, the results are nn.Linear's
    dense, _ = _pair("linear", torch.float64)
    x = torch.randn(2, 12, dtype=torch.float64)
    torch.testing.assert_close(layer.to(torch.float64)(x), dense(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["contract", "dense"])
def test_mpo_embedding_takes_the_indices_nn_embedding_takes(mode):
    torch.manual_seed(21)
    dense = nn.Embedding(24, 6)
    emb = MPOEmbedding.from_embedding(dense, (2, 3, 4), (1, 2, 3), mode=mode)
    ids = torch.tensor([[0, 5, 23], [7, 7, 1]])
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32,
                  torch.float64, torch.bool):
        x = ids.to(dtype)
        for grad in (True, False):  # the gather path and the cached-table path
            with torch.set_grad_enabled(grad):
                try:
                    want = dense(x)
                except RuntimeError:
                    with pytest.raises(MPODtypeError, match=f"integer token ids.*{dtype}"):
                        emb(x)
                    continue
                torch.testing.assert_close(emb(x), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# 6. half precision: truncation_error is that of the stored cores; max_error is kept
# ---------------------------------------------------------------------------------------

def _half_modules(dtype):
    """name -> (a module in ``dtype``, its weight (in, out) as float64, site shapes)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(22)
    return {
        "linear": (nn.Linear(24, 36).to(dtype), ((2, 3, 4), (3, 4, 3))),
        "conv1d": (Conv1D(36, 24).to(dtype), ((2, 3, 4), (3, 4, 3))),
        "embedding": (nn.Embedding(100, 24).to(dtype), ((2, 8, 7), (2, 4, 3))),
    }


def _stored_error(module, layer):
    """||W - W(stored cores)||_F / ||W||_F, computed here independently (einsum, float64)."""
    from tnlm.bridge import weight_xw

    W = weight_xw(module).detach().double()
    cores = [c.detach().double() for c in layer.cores]
    full = torch.einsum("aijb,bklc,cmnd->ikmjln", *cores).reshape(
        math.prod(layer.in_shape), math.prod(layer.out_shape))[: W.shape[0], : W.shape[1]]
    return float((W - full).norm() / W.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_half_precision_truncation_error_is_that_of_the_stored_cores(kind, dtype):
    from tnlm.core.spec import DecompositionSpec

    module, (ins, outs) = _half_modules(dtype)[kind]
    for max_bond in (None, 3):
        spec = DecompositionSpec(ins, outs, max_bond=max_bond, pad=True)
        layer = MPOModule.from_module(module, spec)
        assert layer.cores[0].dtype == dtype
        measured = _stored_error(module, layer)
        assert layer.truncation_error == pytest.approx(measured, rel=1e-9, abs=1e-15)
        exact64 = spec.decompose(_stored_weight(module)).truncation_error
        assert layer.truncation_error != exact64  # not the float64 decomposition's number
        if max_bond is None:
            assert exact64 < 1e-12 and layer.truncation_error > 1e-4  # exact, not once rounded


def _stored_weight(module):
    from tnlm.bridge import weight_xw

    return weight_xw(module).detach().double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_max_error_broken_by_the_half_precision_cast_raises(dtype):
    linear = _half_modules(dtype)["linear"][0]
    emb = _half_modules(dtype)["embedding"][0]
    with pytest.raises(ValueError, match=rf"max_error=1e-05 is not met by the stored {dtype} "
                                         r"cores.*pass max_error >= .*module\.float\(\)"):
        MPOLinear.from_linear(linear, (2, 3, 4), (3, 4, 3), max_error=1e-5)
    with pytest.raises(ValueError, match="is not met by the stored"):
        MPOEmbedding.from_embedding(emb, (2, 8, 7), (2, 4, 3), max_error=1e-5)
    # the way out the message gives works: a looser bound, or a float32 copy
    loose = MPOLinear.from_linear(linear, (2, 3, 4), (3, 4, 3), max_error=0.9)
    assert loose.truncation_error <= 0.9
    exact = MPOLinear.from_linear(linear, (2, 3, 4), (3, 4, 3))  # no bound: nothing to break
    try:
        MPOLinear.from_linear(linear, (2, 3, 4), (3, 4, 3), max_error=exact.truncation_error / 2)
    except ValueError as err:
        suggested = float(str(err).split("pass max_error >= ")[1].split(",")[0])
        ok = MPOLinear.from_linear(linear, (2, 3, 4), (3, 4, 3), max_error=suggested)
        assert ok.truncation_error <= suggested
    else:
        raise AssertionError("a bound below the rounding error was accepted")
    f32 = MPOLinear.from_linear(linear.float(), (2, 3, 4), (3, 4, 3), max_error=1e-5)
    assert f32.truncation_error <= 1e-5
    # float32 modules keep their bounds as before (rounding ~1e-7 is within them)
    layer = MPOLinear.from_linear(nn.Linear(24, 36), (2, 3, 4), (3, 4, 3), max_error=0.3)
    assert 0 < layer.truncation_error <= 0.3


# ---------------------------------------------------------------------------------------
# 7. `tnlm report` names the matrices it leaves out (NaN / inf), never silently
# ---------------------------------------------------------------------------------------

def _poison(module, value, at=(0, 0)):
    with torch.no_grad():
        module.weight[at] = value


def _report(directory, out, capsys):
    from tnlm.cli import main

    code = main(["report", str(directory), "--out", str(out), "--modules", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_names_each_matrix_left_out_for_nan_or_inf(tmp_path, capsys):
    from transformers import BertModel

    torch.manual_seed(23)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    model = BertModel(cfg)
    _poison(model.encoder.layer[0].attention.self.query, float("nan"))
    _poison(model.encoder.layer[1].intermediate.dense, float("inf"), (3, 5))
    _poison(model.encoder.layer[1].intermediate.dense, float("-inf"), (4, 5))
    _poison(model.encoder.layer[1].intermediate.dense, float("nan"), (5, 5))
    model.save_pretrained(tmp_path / "model")
    code, out, err = _report(tmp_path / "model", tmp_path / "figs", capsys)
    assert code == 0
    lines = [ln for ln in err.splitlines() if ln.startswith("tnlm report: skipped")]
    assert lines == [
        "tnlm report: skipped encoder.layer.0.attention.self.query: contains 1 NaN of 1024 "
        "entries",
        "tnlm report: skipped encoder.layer.1.intermediate.dense: contains 1 NaN and 2 inf of "
        "2048 entries",
    ]
    assert "2 matrices left out" in out
    assert (tmp_path / "figs" / "entropy_heatmap.png").is_file()


def test_report_of_a_saved_mpo_model_names_poisoned_layers(tmp_path, capsys):
    model = get_mpo_model(tiny_bert(), config(), progress=False)
    clean = tmp_path / "clean"
    model.save_pretrained(clean, lightweight=False)
    assert _report(clean, tmp_path / "f0", capsys)[2] == ""  # nothing left out: nothing said
    mods = dict(model.mpo_modules())
    with torch.no_grad():
        mods["bert.encoder.layer.1.attention.self.value"].cores[0][0, 0, 0, 0] = float("nan")
    model.save_pretrained(tmp_path / "one", lightweight=False)
    code, out, err = _report(tmp_path / "one", tmp_path / "f1", capsys)
    assert code == 0 and "1 matrices left out" in out
    assert err.splitlines() == ["tnlm report: skipped bert.encoder.layer.1.attention.self.value: "
                                "its MPO cores hold 1 NaN of " + str(sum(
                                    c.numel() for c in mods["bert.encoder.layer.1.attention."
                                                            "self.value"].cores)) + " entries"]
    with torch.no_grad():  # nothing left to report on: a one-line error naming them
        for m in mods.values():
            m.cores[-1].fill_(float("inf"))
    model.save_pretrained(tmp_path / "all", lightweight=False)
    code, out, err = _report(tmp_path / "all", tmp_path / "f2", capsys)
    assert code == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("tnlm: error:")]
    assert len(errors) == 1 and "no MPO could be profiled" in errors[0]
    assert "bert.encoder.layer.0.attention.self.query: its MPO cores hold" in errors[0]


def test_model_profile_lists_nonfinite_matrices_and_names_them_when_all_are():
    import numpy as np

    from tnlm.analysis import model_profile

    rng = np.random.default_rng(0)
    good, bad = rng.standard_normal((16, 8)), rng.standard_normal((16, 8))
    bad[2, 3] = np.inf
    prof = model_profile({"a.query": good, "a.key": bad, "a.bias": np.ones(3)}, n_sites=2)
    assert [r["name"] for r in prof["rows"]] == ["a.query"]
    assert prof["skipped"] == [("a.key", "contains 1 inf of 128 entries")]
    with pytest.raises(ValueError, match=r"could be profiled; skipped a\.key: contains 1 inf"):
        model_profile({"a.key": bad}, n_sites=2)


# ---------------------------------------------------------------------------------------
# 8. writes to an MPO layer's computed .weight are refused, never silently lost
# ---------------------------------------------------------------------------------------

from tnlm.bridge.layer import ReadOnlyWeightError  # noqa: E402


def _mpo_layers():
    torch.manual_seed(24)
    return [MPOLinear.from_linear(nn.Linear(24, 36), (2, 3, 4), (3, 4, 3)),
            MPOEmbedding.from_embedding(nn.Embedding(100, 24), (2, 8, 7), (2, 4, 3))]


WEIGHT_WRITES = {
    "assign a Parameter": lambda m: setattr(m, "weight", nn.Parameter(torch.zeros_like(m.weight))),
    "assign a tensor": lambda m: setattr(m, "weight", torch.zeros_like(m.weight)),
    "weight.data =": lambda m: setattr(m.weight, "data", torch.zeros_like(m.weight)),
    "weight.data.copy_": lambda m: m.weight.data.copy_(torch.zeros_like(m.weight)),
    "weight.copy_": lambda m: m.weight.copy_(torch.zeros_like(m.weight)),
    "weight[:] = 0": lambda m: m.weight.__setitem__(slice(None), 0.0),
    "weight += 1": lambda m: m.weight.__iadd__(1.0),
    "weight.detach().zero_()": lambda m: m.weight.detach().zero_(),
    "weight[0].fill_": lambda m: m.weight[0].fill_(1.0),
    "weight.T.mul_": lambda m: m.weight.T.mul_(2.0),
    "nn.init.normal_": lambda m: nn.init.normal_(m.weight),
    "out=weight": lambda m: torch.add(torch.zeros_like(m.weight), 1.0, out=m.weight),
}


@pytest.mark.parametrize("write", list(WEIGHT_WRITES))
def test_writes_to_the_computed_weight_raise_and_change_nothing(write):
    for layer in _mpo_layers():
        before = [c.detach().clone() for c in layer.cores]
        W = layer.weight.detach().clone()
        for grad in (False, True):
            with torch.set_grad_enabled(grad), pytest.raises(ReadOnlyWeightError) as err:
                WEIGHT_WRITES[write](layer)
            msg = str(err.value)
            assert "computed from the MPO cores" in msg and "layer.merge()" in msg
            assert "from_linear" in msg and isinstance(err.value, RuntimeError)
        assert all(torch.equal(a, b) for a, b in zip(before, layer.cores))
        assert torch.equal(layer.weight, W)


def test_the_computed_weight_still_reads_and_differentiates_like_a_tensor():
    layer, emb = _mpo_layers()
    x = torch.randn(3, 24)
    w = layer.weight
    torch.testing.assert_close(torch.nn.functional.linear(x, w, layer.bias), layer(x))
    assert type(w * 2) is torch.Tensor and type(w.clone()) is torch.Tensor  # new storage: plain
    plain = torch.zeros(36, 24)
    plain.copy_(w)  # writing *from* it into another tensor is fine
    plain[:] = w
    plain += w
    torch.testing.assert_close(plain, 2 * w.detach())
    w.sum().backward()  # autograd reaches the cores
    assert all(c.grad is not None for c in layer.cores)
    merged = layer.merge()  # the documented way to a weight one can edit
    with torch.no_grad():
        merged.weight.zero_()
    assert not torch.equal(layer.weight, merged.weight)
    assert emb.weight.shape == (100, 24) and emb.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# 9. resize_token_embeddings with an MPO embedding: checked first, undone on failure
# ---------------------------------------------------------------------------------------

def _with_mpo_embedding(**kw):
    cfg = MPOConfig(target_modules=TARGETS + ["word_embeddings"], n_sites=3, **kw)
    return get_mpo_model(tiny_bert(), cfg, progress=False)


def test_resize_that_cannot_fit_the_config_fails_before_any_change():
    model = _with_mpo_embedding(overrides={"word_embeddings": {"in_shape": [4, 4, 6],
                                                               "pad": False}})
    before = fingerprint(model.base_model)
    with pytest.raises(ValueError, match=r"cannot resize 'bert\.embeddings\.word_embeddings' "
                                         r"to 100 tokens: in_shape=\(4, 4, 6\) has product 96"):
        model.resize_token_embeddings(100)
    assert_unchanged(model.base_model, before)
    assert model.config.vocab_size == 96


@pytest.mark.parametrize("step", ["decompose", "after resizing"])
def test_resize_failure_after_the_merge_puts_everything_back(step, monkeypatch):
    model = _with_mpo_embedding()
    before = fingerprint(model.base_model)
    if step == "decompose":  # the re-decomposition of the resized table fails
        monkeypatch.setattr(MPOModule, "from_module",
                            fail_on(1, MPOModule.from_module))
    else:  # the check that follows the base model's resize fails
        original = type(model.base_model).get_output_embeddings

        def get_output_embeddings(self):
            if self.config.vocab_size == 100:  # resized already
                raise Injected("injected failure after resizing")
            return original(self)

        monkeypatch.setattr(type(model.base_model), "get_output_embeddings",
                            get_output_embeddings)
    with pytest.raises(Injected):
        model.resize_token_embeddings(100)
    monkeypatch.undo()
    assert_unchanged(model.base_model, before)
    assert model.config.vocab_size == 96 and "vocab_size" not in model.base_model.__dict__
    assert model.resize_token_embeddings(100).num_embeddings == 100  # and it works afterwards



def test_resize_under_a_truncating_config_says_how_far_the_old_rows_moved():
    """Under a truncating config the resized table is truncated afresh with other site
    shapes: the existing tokens' rows moved (81 % relative in a 1000 -> 1010 case) with no
    word. The change is now measured and warned about; an exact config warns nothing."""
    import warnings

    model = _with_mpo_embedding(max_bond=4)
    old = model.base_model.get_input_embeddings().merge().weight.detach().clone()
    with pytest.warns(UserWarning, match=r"the 96 existing tokens' rows moved by (\S+) "):
        emb = model.resize_token_embeddings(100)
    new = emb.merge().weight.detach()[:96]
    moved = float((new.double() - old.double()).norm() / old.double().norm())
    assert moved > 1e-5
    exact = _with_mpo_embedding()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact.resize_token_embeddings(100)

def test_float32_layers_take_a_tight_max_error_and_report_the_stored_error():
    import copy

    torch.manual_seed(0)
    lin = nn.Linear(24, 36)
    layer = MPOLinear.from_linear(lin, n_sites=2, max_error=1e-9)  # float32 rounding: no error
    W = lin.weight.detach().double()
    exact = copy.deepcopy(layer).double().weight.detach()  # the stored cores, contracted in f64
    measured = float(torch.linalg.norm(exact - W) / torch.linalg.norm(W))
    assert layer.truncation_error == pytest.approx(measured, rel=1e-6, abs=1e-12)


def test_copies_of_the_computed_weight_are_plain_tensors(tmp_path):
    import copy

    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(8, 6), n_sites=2)
    w = layer.weight.detach()
    torch.save({"w": w}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt")  # weights_only=True: plain tensors only
    assert type(loaded["w"]) is torch.Tensor and torch.equal(loaded["w"], w)
    c = copy.deepcopy(w)
    assert type(c) is torch.Tensor
    c += 1  # a copy owns its storage and is writable
    assert torch.equal(layer.weight.detach(), w)
    p = nn.Parameter(w.clone())
    p.grad = torch.ones_like(p)
    torch.optim.SGD([p], lr=0.1).step()  # the message's advice works
    with pytest.raises(Exception, match=r"detach\(\)\.clone\(\)"):
        q = nn.Parameter(w)  # shares the computed weight's storage: read-only
        q.grad = torch.ones_like(q)
        torch.optim.SGD([q], lr=0.1).step()


def test_nonfinite_reason_reads_bfloat16():
    from tnlm.analysis.profile import nonfinite_reason

    t = torch.ones(4, 4, dtype=torch.bfloat16)
    t[0, 0] = float("nan")
    t[1, 1] = float("inf")
    assert nonfinite_reason(t) == "1 NaN and 1 inf of 16 entries"
    assert nonfinite_reason(torch.ones(3, dtype=torch.bfloat16)) is None


# ---------------------------------------------------------------------------------------
# saving removes only the weights files the writer generates (issue 20, item 4)
# ---------------------------------------------------------------------------------------

from tnlm.integration.io import JOURNAL_NAME  # noqa: E402


def _edit_json(path, **entries):
    meta = json.loads(path.read_text())
    meta.update(entries)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("where", ["config", "journal"])
def test_a_config_or_journal_naming_a_user_file_does_not_delete_it(where, tmp_path):
    d = tmp_path / "ckpt"
    model = get_mpo_model(tiny_bert(), config(max_bond=3), progress=False).eval()
    model.save_pretrained(d, lightweight=False)
    first = json.loads((d / CONFIG_NAME).read_text())["weights"]
    (d / "notes.txt").write_text("my notes")
    (tmp_path / "outside.txt").write_text("not the checkpoint's")
    if where == "config":  # the writer removes the weights the previous config names
        _edit_json(d / CONFIG_NAME, weights="notes.txt")
    else:  # a crashed writer's journal: the files it owned that the config does not name
        (d / JOURNAL_NAME).write_text(json.dumps({"new": "notes.txt",
                                                  "previous": "../outside.txt"}))
    with torch.no_grad():
        model.base_model.classifier.weight.add_(1.0)  # new weights, a new file name
    with pytest.warns(UserWarning, match="not a name this writer generates") as caught:
        model.save_pretrained(d, lightweight=False)
    named = {str(w.message).split(" names ")[1].split(" ")[0] for w in caught}
    assert named == ({"'notes.txt'"} if where == "config" else {"'notes.txt'",
                                                                 "'../outside.txt'"})
    assert (d / "notes.txt").read_text() == "my notes"
    assert (tmp_path / "outside.txt").read_text() == "not the checkpoint's"
    meta = json.loads((d / CONFIG_NAME).read_text())
    assert meta["weights"] != first and not (d / JOURNAL_NAME).exists()
    if where == "journal":  # the config named the first weights: replaced as usual
        assert not (d / first).exists()
    loaded = MPOModel.from_pretrained(tiny_bert(seed=1), d).eval()
    assert torch.equal(outputs(loaded), outputs(model))
    # a config naming a path outside the folder is left alone as well
    _edit_json(d / CONFIG_NAME, weights="../outside.txt")
    with torch.no_grad():
        model.base_model.classifier.weight.add_(1.0)
    with pytest.warns(UserWarning, match="outside.txt"):
        model.save_pretrained(d, lightweight=False)
    assert (tmp_path / "outside.txt").exists() and (d / "notes.txt").exists()
    assert torch.equal(outputs(MPOModel.from_pretrained(tiny_bert(seed=1), d).eval()),
                       outputs(model))
