"""What trains: one table of named parameter sets (tnlm.bridge.finetune), the same set for a
name wherever it is accepted, and for every default path the same parameters as before the
sets got one home (the former selectors are kept below as references)."""

import json
import re

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from tnlm.bridge import TRAIN_SETS, MPOModule, mpo_modules, select_parameters, set_trainable
from tnlm.bridge.finetune import HEALING_RENAMED, check_train
from tnlm.compress import distill, heal_state
from tnlm.compress.decoder import heal as causal
from tnlm.compress.decoder.heal import CausalHealConfig
from tnlm.compress.distill import HealConfig
from tnlm.compress.encoder import EncoderRecipe
from tnlm.compress.layerwise import LayerwiseConfig, block_parameters, compress_layerwise
from tnlm.integration import MPOConfig, get_mpo_model
from tnlm.integration.architectures import blocks_of
from tnlm.integration.config import TRAIN_MODES

BERT_TARGETS = ["word_embeddings", "query", "value", "intermediate.dense"]


@pytest.fixture(scope="module")
def bert():
    """A tiny BERT classifier whose embedding table, query, value and intermediate layers
    are MPOs (key, attention.output.dense, output.dense, pooler, classifier stay dense)."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    return get_mpo_model(BertForSequenceClassification(cfg),
                         MPOConfig(target_modules=BERT_TARGETS, n_sites=3), progress=False)


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama compressed layer by layer (q, v and gate become MPOs)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    seqs = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    compress_layerwise(model, seqs, LayerwiseConfig(["q_proj", "v_proj", "gate_proj"],
                                                    budget=0.5, method="plain"), progress=False)
    return model


def names(pairs):
    return [n for n, _ in pairs]


def bert_expected(model):
    """The table's sets for the tiny BERT, by parameter name (relative to ``model``)."""
    every = [n for n, _ in model.named_parameters()]
    mpo = {n: m for n, m in mpo_modules(model)}
    central = {f"{n}.cores.{m.central_index}" for n, m in mpo.items()}
    cores = {f"{n}.cores.{k}" for n, m in mpo.items() for k in range(len(m.cores))}
    mpo_bias = {f"{n}.bias" for n, m in mpo.items() if getattr(m, "bias", None) is not None}
    layers = [f"bert.encoder.layer.{i}" for i in range(2)]
    norms = {f"{p}.LayerNorm.{w}" for p in ["bert.embeddings"] + [
        f"{layer}.{s}" for layer in layers for s in ("attention.output", "output")]
        for w in ("weight", "bias")}
    linears = {f"{p}.{w}" for p in ["bert.pooler.dense", "classifier"] + [
        f"{layer}.{s}" for layer in layers for s in ("attention.self.key",
                                                     "attention.output.dense", "output.dense")]
        for w in ("weight", "bias")}
    assert sorted(mpo) == sorted(["bert.embeddings.word_embeddings"] + [
        f"{layer}.{s}" for layer in layers
        for s in ("attention.self.query", "attention.self.value", "intermediate.dense")])
    assert len(cores) == 3 * 7 and len(mpo_bias) == 6 and len(norms) == 10 and len(linears) == 16
    assert not (norms | linears | mpo_bias | cores) - set(every)
    return {
        "all": set(every),
        "auxiliary": set(every) - central,
        "lightweight": (cores - central) | {"classifier.weight", "classifier.bias"},
        "cores": cores | mpo_bias | norms,
        "cores-central": (cores - central) | mpo_bias | norms,
        "cores+linears": cores | mpo_bias | norms | linears,
    }


# --------------------------------------------------------------------------- the former code
def former_heal_trainable(student, train):
    """HealConfig's selector before the rename (train: 'cores', 'auxiliary', 'all')."""
    chosen = {}
    for _, m in mpo_modules(student):
        for p in (m.auxiliary_parameters() if train == "auxiliary" else list(m.cores)):
            chosen[id(p)] = p
        if getattr(m, "bias", None) is not None:
            chosen[id(m.bias)] = m.bias
    for module in student.modules():
        if isinstance(module, nn.LayerNorm) or (train == "all" and isinstance(module, nn.Linear)):
            for p in module.parameters():
                chosen[id(p)] = p
    names_ = {id(p): n for n, p in student.named_parameters()}
    return [(names_[i], p) for i, p in chosen.items() if i in names_]


def former_block_parameters(root, linears=False):
    """layerwise.block_parameters before it read the table (CausalHealConfig's selector)."""
    from tnlm.bridge import kind_of

    ps = {}
    for _, m in mpo_modules(root):
        for p in m.cores:
            ps[id(p)] = p
        if getattr(m, "bias", None) is not None:
            ps[id(m.bias)] = m.bias
    for mod in root.modules():
        if list(mod.children()):
            continue
        kind = kind_of(mod)
        if (kind is None and "norm" in type(mod).__name__.lower()) or \
                (linears and kind in ("linear", "conv1d")):
            for p in mod.parameters(recurse=False):
                ps[id(p)] = p
    return list(ps.values())


def former_flags(model, train, extra=()):
    """MPOModel.setup_training's flags before it read the table."""
    if train == "lightweight":
        for p in model.parameters():
            p.requires_grad_(False)
        for _, m in mpo_modules(model):
            for p in m.auxiliary_parameters():
                p.requires_grad_(True)
        for module in extra:
            for p in module.parameters():
                p.requires_grad_(True)
            for _, m in mpo_modules(module):
                m.freeze_central()
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if train == "auxiliary":
            for _, m in mpo_modules(model):
                m.freeze_central()
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- tests
def test_every_set_of_the_table_on_a_tiny_bert(bert):
    base = bert.base_model
    expected = bert_expected(base)
    assert set(expected) == set(TRAIN_SETS)
    head = [base.classifier]
    for name in TRAIN_SETS:
        got = names(select_parameters(base, name, extra=head))
        assert len(got) == len(set(got)), name
        assert set(got) == expected[name], name
    # never an embedding table outside "all" / "auxiliary" (an MPO table's cores excepted)
    for name in ("cores", "cores-central", "cores+linears", "lightweight"):
        got = set(names(select_parameters(base, name, extra=head)))
        assert not any("position_embeddings" in n or "token_type" in n for n in got)


def test_the_model_modes_set_the_flags_they_set_before(bert):
    base = bert.base_model
    expected = bert_expected(base)
    try:
        for mode in TRAIN_MODES:
            was = former_flags(base, mode, [base.classifier])
            bert.mpo_config.modules_to_save = ["classifier"]
            bert.setup_training(mode)
            now = {n for n, p in base.named_parameters() if p.requires_grad}
            assert now == was == expected[mode], mode
    finally:
        bert.setup_training("lightweight")


def test_healing_selects_what_it_selected_before_under_the_new_names(bert):
    for old, new in (("cores", "cores"), ("auxiliary", "cores-central"),
                     ("all", "cores+linears")):
        before = former_heal_trainable(bert, old)
        now = distill._trainable(bert, new)
        assert names(now) == names(before), new  # the same parameters in the same order
        assert all(a is b for (_, a), (_, b) in zip(now, before))
        assert {n.removeprefix("base_model.") for n in names(now)} == \
            bert_expected(bert.base_model)[new]


def test_every_set_on_a_layerwise_compressed_llama(llama):
    blocks = blocks_of(llama)
    mpo = {n: m for n, m in mpo_modules(blocks)}
    assert sorted(mpo) == [f"{i}.{s}" for i in range(2)
                           for s in ("mlp.gate_proj", "self_attn.q_proj", "self_attn.v_proj")]
    assert all(getattr(m, "bias", None) is None for m in mpo.values())
    cores = {f"{n}.cores.{k}" for n, m in mpo.items() for k in range(len(m.cores))}
    central = {f"{n}.cores.{m.central_index}" for n, m in mpo.items()}
    norms = {f"{i}.{s}.weight" for i in range(2)
             for s in ("input_layernorm", "post_attention_layernorm")}  # RMSNorm
    linears = {f"{i}.{s}.weight" for i in range(2)
               for s in ("self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    every = {n for n, _ in blocks.named_parameters()}
    expected = {"all": every, "auxiliary": every - central, "lightweight": cores - central,
                "cores": cores | norms, "cores-central": (cores - central) | norms,
                "cores+linears": cores | norms | linears}
    for name in TRAIN_SETS:
        assert set(names(select_parameters(blocks, name))) == expected[name], name
    # block fitting and causal healing (default "cores+linears") as before
    for linears_, train in ((False, "cores"), (True, "cores+linears")):
        before = former_block_parameters(blocks, linears=linears_)
        assert [id(p) for p in block_parameters(blocks, linears=linears_)] == \
            [id(p) for p in before]
        assert [id(p) for p in causal._trainable(llama, train)] == [id(p) for p in before]
    assert causal._trainable(llama, CausalHealConfig().train) == \
        former_block_parameters(blocks, linears=True)
    # over the whole model, the final norm is a norm too (embeddings and LM head are not)
    whole = set(names(select_parameters(llama, "cores+linears")))
    assert "model.norm.weight" in whole and "model.embed_tokens.weight" not in whole
    assert "lm_head.weight" in whole  # a dense linear (not tied here)


def test_defaults_keep_their_sets():
    assert MPOConfig(target_modules=["q"]).train == "lightweight"
    assert HealConfig().train == "cores"
    assert CausalHealConfig().train == "cores+linears"
    assert EncoderRecipe().heal_train == "cores+linears"
    assert EncoderRecipe().heal_config().train == "cores+linears"
    assert distill.TRAIN_CHOICES == ("cores", "cores-central", "cores+linears")
    assert causal.TRAIN == ("cores", "cores+linears")
    for accepted in (TRAIN_MODES, distill.TRAIN_CHOICES, causal.TRAIN):
        assert set(accepted) <= set(TRAIN_SETS)


@pytest.mark.parametrize("old,new", sorted(HEALING_RENAMED.items()))
def test_healing_refuses_its_former_names_naming_the_new_ones(old, new):
    spelled = re.escape(f"now spelled '{new}'")
    with pytest.raises(ValueError, match=f"train must be one of .*{spelled}"):
        HealConfig(train=old)
    with pytest.raises(ValueError, match=spelled):
        EncoderRecipe(heal_train=old)
    if new in causal.TRAIN:
        with pytest.raises(ValueError, match=spelled):
            CausalHealConfig(train=old)
    else:
        with pytest.raises(ValueError, match="train must be one of") as err:
            CausalHealConfig(train=old)
        assert "spelled" not in str(err.value)


def test_each_config_refuses_names_it_does_not_accept():
    for name in ("cores", "cores+linears", "cores-central"):
        with pytest.raises(ValueError, match="train must be one of"):
            MPOConfig(target_modules=["q"], train=name)
    with pytest.raises(ValueError, match="train must be one of"):
        HealConfig(train="lightweight")
    with pytest.raises(ValueError, match="train must be one of"):
        check_train("everything", tuple(TRAIN_SETS))
    with pytest.raises(ValueError, match="train must be one of"):
        select_parameters(nn.Linear(2, 2), "heads")


def test_set_trainable_needs_mpo_layers_for_the_mpo_sets():
    plain = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    for name in ("lightweight", "auxiliary"):
        with pytest.raises(ValueError, match="no MPO modules"):
            set_trainable(plain, name)
    set_trainable(plain, "cores")
    assert [p.requires_grad for p in plain.parameters()] == [False, False, True, True]
    assert not any(isinstance(m, MPOModule) for m in plain.modules())


def test_cli_heal_train_refuses_the_former_names(capsys):
    from tnlm.cli import HEAL_TRAIN_CHOICES, HEAL_TRAIN_RENAMED, build_parser

    assert HEAL_TRAIN_RENAMED == HEALING_RENAMED
    assert HEAL_TRAIN_CHOICES == distill.TRAIN_CHOICES
    for old, new in HEALING_RENAMED.items():
        with pytest.raises(SystemExit):
            build_parser().parse_args(["compress", "--heal-train", old])
        assert f"now spelled '{new}'" in capsys.readouterr().err
    args = build_parser().parse_args(["compress", "--heal-train", "cores-central"])
    assert args.heal_train == "cores-central"


def test_a_healing_state_saved_under_a_former_name_resumes_under_the_new_one(tmp_path):
    from safetensors.torch import save_file

    save_file({"param.x": torch.zeros(1)}, str(tmp_path / heal_state.STATE_TENSORS))
    saved = {"steps": 10, "lr": 5e-4, "train": "all"}
    (tmp_path / heal_state.STATE_FILE).write_text(json.dumps(
        {"step": 2, "losses": [1.0, 0.5], "settings": saved}))
    assert heal_state.check_resumable(tmp_path, dict(saved, train="cores+linears")) == 2
    with pytest.raises(ValueError, match="train: 'cores\\+linears' there, 'cores' now"):
        heal_state.check_resumable(tmp_path, dict(saved, train="cores"))


def test_a_healing_state_saved_with_the_former_term_fields_resumes_when_all_were_off(tmp_path):
    """A state written before the screened loss terms left the library records their
    fields and no ``term``: with every term off it resumes as term=None; with one on it is
    refused, naming ``term``."""
    from safetensors.torch import save_file

    save_file({"param.x": torch.zeros(1)}, str(tmp_path / heal_state.STATE_TENSORS))
    now = {"steps": 10, "lr": 5e-4, "train": "cores+linears", "term": None}
    former = {"w_rel": 0.0, "neighbours": False, "twins": 0, "twin_words": 0.15,
              "w_twin": 10.0, "w_attn": 0.0, "attn_relations": ["qk"]}
    for extra, ok in ((former, True), (dict(former, twins=4), False)):
        saved = dict({k: v for k, v in now.items() if k != "term"}, train="all", **extra)
        (tmp_path / heal_state.STATE_FILE).write_text(json.dumps(
            {"step": 2, "losses": [1.0, 0.5], "settings": saved}))
        if ok:
            assert heal_state.check_resumable(tmp_path, now) == 2
        else:
            with pytest.raises(ValueError, match="term: None there|twins"):
                heal_state.check_resumable(tmp_path, now)


def test_a_resume_with_fewer_steps_than_the_state_made_names_the_steps(tmp_path):
    """A state at step 5 of 10 resumed with 3 healing steps was called corrupt ("step 5 is
    not an int in [0, 3]"), and the CLI then suggested dropping --resume, which deletes a
    sound state. It is a settings mismatch, named as such; a step beyond the state's own
    steps is still corrupt."""
    from safetensors.torch import save_file

    save_file({"param.x": torch.zeros(1)}, str(tmp_path / heal_state.STATE_TENSORS))
    saved = {"steps": 10, "lr": 5e-4, "train": "cores+linears", "term": None}
    (tmp_path / heal_state.STATE_FILE).write_text(json.dumps(
        {"step": 5, "losses": [1.0] * 5, "settings": saved}))
    with pytest.raises(ValueError, match=r"other settings \(steps: 10 there, 3 now\)"):
        heal_state.check_resumable(tmp_path, dict(saved, steps=3))
    assert heal_state.check_resumable(tmp_path, saved) == 5
    (tmp_path / heal_state.STATE_FILE).write_text(json.dumps(
        {"step": 12, "losses": [1.0] * 12, "settings": saved}))
    with pytest.raises(ValueError, match=r"corrupt: step 12 is not an int in \[0, 10\]"):
        heal_state.check_resumable(tmp_path, saved)
