"""Inputs the transformers integration used to accept silently (or fail on unclearly):
embedding subclasses with their own forward, two checkpoints in one folder, a random
pooler left to the base model (and an MPO pooler the base's files hold), resizing an MPO
head (a float size, an unchanged size), tied names with different values, Trainer's save
of a tied base (its state dict loaded through a parent or the base model), equally
specific overrides, GGUF architecture names, sentences longer than the model's positions, and checkpoints of another dtype."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tests.common import make_bert_tokenizer, one_thread  # noqa: F401 - autouse fixture
from tnlm.integration import MPOConfig, MPOModel, get_mpo_model, mean_pooled
from tnlm.integration.io import CONFIG_NAME

IDS = torch.tensor([[1, 5, 7, 9, 11, 2]])


def tiny_bert(seed: int = 0, cls: type = BertModel, **kw) -> torch.nn.Module:
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    cfg.update(kw)
    torch.manual_seed(seed)
    return cls(BertConfig(**cfg)).eval()


def tiny_llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2, vocab_size=96,
               max_position_embeddings=64)
    cfg.update(kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def wrap(model: torch.nn.Module, targets: list[str], **kw) -> MPOModel:
    return get_mpo_model(model, MPOConfig(targets, n_sites=2, **kw), progress=False)


# 1 ------------------------------------------------------------------------------------
def test_embedding_subclass_with_its_own_forward_is_refused():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64, max_position_embeddings=32,
        sliding_window=8, tie_word_embeddings=False)).eval()
    before = type(gemma.model.embed_tokens)
    with pytest.raises(ValueError, match=r"'model\.embed_tokens' is a "
                       r"Gemma3TextScaledWordEmbedding.*forward of its own"):
        wrap(gemma, ["embed_tokens"])
    assert type(gemma.model.embed_tokens) is before  # untouched
    # a subclass that keeps nn.Embedding's forward is still accepted
    class Plain(torch.nn.Embedding):
        pass

    model = torch.nn.Sequential()
    model.add_module("emb", Plain(16, 8))
    assert [n for n, _ in wrap(model, ["emb"]).mpo_modules()] == ["emb"]


def test_checkpoint_onto_an_embedding_subclass_with_its_own_forward_is_refused(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           vocab_size=64, max_position_embeddings=32, sliding_window=8,
                           tie_word_embeddings=False)
    plain = Gemma3ForCausalLM(cfg).eval()  # a checkpoint made on a plain embedding
    plain.model.embed_tokens = torch.nn.Embedding(64, 32)
    wrap(plain, ["embed_tokens"]).save_pretrained(tmp_path, lightweight=False)
    with pytest.raises(ValueError, match=r"Gemma3TextScaledWordEmbedding.*forward of its own"):
        MPOModel.from_pretrained(Gemma3ForCausalLM(cfg).eval(), tmp_path)


# 2 ------------------------------------------------------------------------------------
def test_folder_with_save_pretrained_and_trainer_checkpoints_is_refused(tmp_path):
    m = wrap(tiny_bert(), ["query"], train="all")
    m.save_pretrained(tmp_path, lightweight=False)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05)
    time.sleep(0.01)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"mpo_config\.json.*model\.safetensors.*"
                       r"model\.safetensors is the newer.*move"):
        MPOModel.from_pretrained(tiny_bert(seed=1), tmp_path)
    os.remove(tmp_path / CONFIG_NAME)  # the choice made: the Trainer's state dict
    loaded = MPOModel.from_pretrained(tiny_bert(seed=1), tmp_path)
    assert torch.equal(loaded(IDS).last_hidden_state, m(IDS).last_hidden_state)


# 3 ------------------------------------------------------------------------------------
def test_lightweight_checkpoint_saves_a_pooler_the_base_files_lack(tmp_path):
    src = tmp_path / "base"
    tiny_bert().save_pretrained(src)
    weights = src / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("pooler.")},
              str(weights), metadata={"format": "pt"})
    torch.manual_seed(0)
    m = wrap(BertModel.from_pretrained(src).eval(), ["query"])
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1)
    m.save_pretrained(tmp_path / "task")  # lightweight by default
    meta = json.loads((tmp_path / "task" / CONFIG_NAME).read_text())
    assert not any(k.startswith("pooler.") for k in meta["lightweight"]["rebuilt"])
    torch.manual_seed(1)  # another random pooler
    loaded = MPOModel.from_pretrained(BertModel.from_pretrained(src).eval(), tmp_path / "task")
    assert torch.equal(loaded(IDS).pooler_output, m(IDS).pooler_output)


def test_lightweight_checkpoint_rebuilds_an_mpo_pooler_the_base_files_hold(tmp_path):
    src = tmp_path / "base"
    tiny_bert().save_pretrained(src)  # the files hold the pooler
    m = wrap(BertModel.from_pretrained(src).eval(), ["query", "pooler.dense"])
    assert any(n == "pooler.dense" for n, _ in m.mpo_modules())
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1)
    m.save_pretrained(tmp_path / "full", lightweight=False)
    m.save_pretrained(tmp_path / "task")  # lightweight by default, as without the pooler
    m.save_pretrained(tmp_path / "task2", lightweight=True)  # no false refusal
    meta = json.loads((tmp_path / "task" / CONFIG_NAME).read_text())
    rebuilt = meta["lightweight"]["rebuilt"]
    central = next(m for n, m in m.mpo_modules() if n == "pooler.dense").central_index
    assert f"pooler.dense.cores.{central}" in rebuilt
    assert "pooler.dense.bias" in rebuilt
    def weights(d):
        return next((tmp_path / d).glob("mpo_model*.safetensors"))

    assert weights("task").stat().st_size * 10 < weights("full").stat().st_size
    assert not any(k.endswith(f"pooler.dense.cores.{central}")
                   for k in load_file(weights("task")))
    torch.manual_seed(1)
    loaded = MPOModel.from_pretrained(BertModel.from_pretrained(src).eval(), tmp_path / "task")
    assert torch.equal(loaded(IDS).pooler_output, m(IDS).pooler_output)
    assert torch.equal(loaded(IDS).last_hidden_state, m(IDS).last_hidden_state)


# 4 ------------------------------------------------------------------------------------
def test_resizing_with_an_mpo_lm_head_is_refused_before_any_change():
    m = wrap(tiny_llama(tie_word_embeddings=False), ["lm_head"])
    base = m.base_model
    with pytest.raises(ValueError, match=r"new_num_tokens=128.*'lm_head' is an MPO layer"):
        m.resize_token_embeddings(128)
    assert base.config.vocab_size == 96
    assert tuple(base.get_input_embeddings().weight.shape) == (96, 32)
    assert m(IDS).logits.shape[-1] == 96


def test_resizing_with_an_mpo_lm_head_checks_the_type_and_accepts_an_unchanged_size():
    m = wrap(tiny_llama(tie_word_embeddings=False), ["lm_head"])
    dense = wrap(tiny_llama(tie_word_embeddings=False), ["q_proj"])  # transformers' lm_head
    for model in (m, dense):
        for bad in (True, 2.5, 96.0):
            with pytest.raises(TypeError, match=rf"new_num_tokens must be an int, got {bad!r}"):
                model.resize_token_embeddings(bad)
    base = m.base_model
    emb, head, before = base.get_input_embeddings(), base.lm_head, m(IDS).logits
    for same in (96, None):  # len(tokenizer) equal to the vocabulary: nothing to do
        assert m.resize_token_embeddings(same) is emb
    assert base.get_input_embeddings() is emb and base.lm_head is head
    assert base.config.vocab_size == 96 and torch.equal(m(IDS).logits, before)
    with pytest.raises(ValueError, match=r"new_num_tokens=97.*'lm_head' is an MPO layer"):
        m.resize_token_embeddings(97)
    # the input embedding an MPO layer too: an unchanged size returns it
    both = wrap(tiny_llama(tie_word_embeddings=False), ["embed_tokens", "lm_head"])
    assert both.resize_token_embeddings(96) is both.base_model.get_input_embeddings()


# 5 ------------------------------------------------------------------------------------
def test_state_dict_with_different_values_under_tied_names_is_refused(tmp_path):
    m = wrap(tiny_bert(cls=BertForMaskedLM), ["query"], train="all")
    m.save_pretrained(tmp_path, lightweight=False)
    files = sorted(os.listdir(tmp_path))
    sd = {k: v.detach().clone() for k, v in super(MPOModel, m).state_dict().items()}
    sd["base_model.cls.predictions.decoder.weight"] += 0.01
    with pytest.raises(ValueError, match=r"'bert\.embeddings\.word_embeddings\.weight' and "
                       r"'cls\.predictions\.decoder\.weight' with different values"):
        m.save_pretrained(tmp_path, state_dict=sd)
    assert sorted(os.listdir(tmp_path)) == files  # the previous checkpoint is kept
    MPOModel.from_pretrained(tiny_bert(cls=BertForMaskedLM, seed=3), tmp_path)
    # equal values under both names are fine
    sd["base_model.cls.predictions.decoder.weight"] = sd[
        "base_model.bert.embeddings.word_embeddings.weight"].clone()
    m.save_pretrained(tmp_path, state_dict=sd)
    loaded = MPOModel.from_pretrained(tiny_bert(cls=BertForMaskedLM, seed=3), tmp_path)
    assert torch.equal(loaded(IDS).logits, m(IDS).logits)


# 6 ------------------------------------------------------------------------------------
def test_trainer_save_model_of_a_tied_base_saves_and_loads(tmp_path):
    from transformers import Trainer, TrainingArguments

    m = wrap(tiny_bert(cls=BertForMaskedLM), ["query"])
    trainer = Trainer(model=m, args=TrainingArguments(output_dir=str(tmp_path), report_to=[],
                                                      use_cpu=True))
    trainer.save_model(str(tmp_path))
    loaded = MPOModel.from_pretrained(tiny_bert(cls=BertForMaskedLM, seed=2), tmp_path)
    assert torch.equal(loaded(IDS).logits, m(IDS).logits)
    # the state dict round-trips through load_state_dict (the alias names refilled)
    other = wrap(tiny_bert(cls=BertForMaskedLM, seed=2), ["query"])
    assert not other.load_state_dict(m.state_dict()).missing_keys
    assert torch.equal(other(IDS).logits, m(IDS).logits)


def test_state_dict_of_a_tied_base_loads_through_a_parent_and_the_base_model():
    m = wrap(tiny_bert(cls=BertForMaskedLM), ["query"], train="all")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    sd = m.state_dict()  # the tied names left out
    aliases = m._alias_names()
    assert aliases and not set(aliases) & set(sd)
    # through a parent module (as DistributedDataParallel or a container): prefixed keys
    other = wrap(tiny_bert(cls=BertForMaskedLM, seed=2), ["query"], train="all")
    parent = torch.nn.ModuleDict({"module": other})
    assert not parent.load_state_dict({f"module.{k}": v for k, v in sd.items()}).missing_keys
    assert torch.equal(other(IDS).logits, m(IDS).logits)
    # through the base model, the "base_model." prefix stripped
    other = wrap(tiny_bert(cls=BertForMaskedLM, seed=3), ["query"], train="all")
    bare = {k[len("base_model."):]: v for k, v in sd.items() if k.startswith("base_model.")}
    assert not other.base_model.load_state_dict(bare).missing_keys
    assert torch.equal(other(IDS).logits, m(IDS).logits)
    assert other.base_model.cls.predictions.decoder.weight is (
        other.base_model.bert.embeddings.word_embeddings.weight)  # still tied
    # a dict holding every name (the tied ones too) loads strictly, as before
    full = super(MPOModel, m).state_dict()
    assert set(aliases) <= set(full)
    other = wrap(tiny_bert(cls=BertForMaskedLM, seed=4), ["query"], train="all")
    result = other.load_state_dict(full, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(other(IDS).logits, m(IDS).logits)
    # and a dict lacking the kept name too still reports it missing
    del bare["bert.embeddings.word_embeddings.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key.*word_embeddings\.weight"):
        other.base_model.load_state_dict(bare)


# 7 ------------------------------------------------------------------------------------
def test_equally_specific_overrides_that_disagree_are_refused_when_not_neighbours():
    a, b, c = r"encoder.layer.0.*query", r"encoder.layer.*f.query", r"encoder.*0.attention.*"
    assert len(a) == len(b) == len(c)
    cfg = MPOConfig(r".*query", n_sites=2, overrides={a: {"max_bond": 2}, b: {"cutoff": 0.0},
                                                       c: {"max_bond": 8}})
    with pytest.raises(ValueError, match=r"disagree on \['max_bond'\]"):
        cfg.options_for("encoder.layer.0.attention.self.query", 32, 32)


# 8 ------------------------------------------------------------------------------------
def test_gemma3_gguf_maps_to_gemma3_text(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from tnlm.integration.loading import check_model_source

    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert check_model_source(path).model_type == "gemma3_text"


# 9 ------------------------------------------------------------------------------------
def test_mean_pooled_refuses_a_max_length_beyond_the_model_positions(tmp_path):
    tok = make_bert_tokenizer(tmp_path)
    model = tiny_bert(vocab_size=len(tok), max_position_embeddings=16)
    with pytest.raises(ValueError, match=r"max_length=128 lets a sentence keep 42 tokens, but "
                       r"BertModel has 16 positions: pass max_length <= 16"):
        mean_pooled(model, tok, ["the", "the " * 40])
    emb = mean_pooled(model, tok, ["the", "the " * 40], max_length=16)
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    assert mean_pooled(model, tok, ["the"]).shape == (1, 32)  # short sentences: as before
    with pytest.raises(TypeError, match="max_length"):
        mean_pooled(model, tok, ["the"], max_length=2.5)


# 10 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_full_checkpoint_onto_a_base_of_another_dtype_is_refused(tmp_path, dtype):
    m = wrap(tiny_bert(), ["query"])
    m.save_pretrained(tmp_path, lightweight=False)
    with pytest.raises(ValueError, match=rf"is torch\.float32, but BertModel holds it as "
                       rf"{dtype}.*dtype=torch\.float32"):
        MPOModel.from_pretrained(tiny_bert(seed=1).to(dtype), tmp_path)
    loaded = MPOModel.from_pretrained(tiny_bert(seed=1), tmp_path)
    assert torch.equal(loaded(IDS).last_hidden_state, m(IDS).last_hidden_state)
