"""Checkpoints whose tied tensors do not match the base model's ties: a file holding
separate values for names the base model ties together is refused before the base model
is touched; a tied checkpoint loads onto a base that holds those names separately."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from tests.common import one_thread  # noqa: F401 - autouse, one intra-op thread
from tnlm.export import load_compressed
from tnlm.integration import MPOConfig, MPOModel, get_mpo_model

IDS = torch.tensor([[1, 5, 9, 20, 3]])
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def llama_config(tie: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=tie)


def llama(tie: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(tie)).eval()


def mpo(model: LlamaForCausalLM) -> MPOModel:
    return get_mpo_model(model, MPOConfig(target_modules=["q_proj", "up_proj"], n_sites=2))


def untied_with_own_head() -> LlamaForCausalLM:
    model = llama(False)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight))
    return model


def tied_copy_of(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A tied Llama with ``model``'s tensors (its embedding also the head)."""
    base = llama(True, seed=1)
    own = model.state_dict()
    with torch.no_grad():
        for key, t in base.state_dict(keep_vars=True).items():
            if key != HEAD:
                t.copy_(own[key])
    assert base.lm_head.weight is base.model.embed_tokens.weight
    return base


def file_names(directory: Path) -> list[str]:
    weights = next(directory.glob("mpo_model-*.safetensors"))
    with safe_open(str(weights), "pt") as f:
        names = f.keys()
    return sorted(k for k in names if k in (HEAD, EMBED))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_untied_checkpoint_onto_a_tied_base_is_refused(tmp_path):
    saved = mpo(untied_with_own_head())
    saved.save_pretrained(tmp_path / "ck", lightweight=False)
    assert file_names(tmp_path / "ck") == [HEAD, EMBED]
    base = llama(True)
    before = state(base)
    with pytest.raises(ValueError, match="ties them together") as err:
        MPOModel.from_pretrained(base, tmp_path / "ck")
    assert HEAD in str(err.value) and EMBED in str(err.value)
    assert "tie_word_embeddings=False" in str(err.value)
    # transactional: the base model is as it was
    assert_unchanged(base, before)
    assert not any(type(m).__name__ == "MPOModule" for m in base.modules())
    # onto a base that does not tie them it loads, and computes what was saved
    loaded = MPOModel.from_pretrained(llama(False, seed=2), tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, saved(input_ids=IDS).logits)


def test_untied_checkpoint_onto_a_tied_base_is_refused_by_load_compressed(tmp_path):
    mpo(untied_with_own_head()).save_pretrained(tmp_path / "ck", lightweight=False)
    llama_config(True).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="ties them together"):
        load_compressed(tmp_path / "ck", base=tmp_path / "base")


def test_untied_checkpoint_with_equal_values_loads_onto_a_tied_base(tmp_path):
    untied = llama(False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(untied.model.embed_tokens.weight)
    saved = mpo(untied)
    saved.save_pretrained(tmp_path / "ck", lightweight=False)
    assert file_names(tmp_path / "ck") == [HEAD, EMBED]
    loaded = MPOModel.from_pretrained(llama(True, seed=3), tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, saved(input_ids=IDS).logits)


def test_tied_checkpoint_reloads_onto_a_tied_base(tmp_path):
    saved = mpo(llama(True))
    saved.save_pretrained(tmp_path / "ck", lightweight=False)
    assert len(file_names(tmp_path / "ck")) == 1
    loaded = MPOModel.from_pretrained(llama(True, seed=4), tmp_path / "ck")
    assert loaded.base_model.lm_head.weight is loaded.base_model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, saved(input_ids=IDS).logits)


def test_tied_checkpoint_loads_correctly_onto_an_untied_base(tmp_path):
    saved = mpo(llama(True))
    saved.save_pretrained(tmp_path / "ck", lightweight=False)
    assert len(file_names(tmp_path / "ck")) == 1  # the other name only in the metadata
    loaded = MPOModel.from_pretrained(llama(False, seed=5), tmp_path / "ck")
    head, embed = loaded.base_model.lm_head.weight, loaded.base_model.model.embed_tokens.weight
    assert head is not embed and torch.equal(head, embed)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, saved(input_ids=IDS).logits)


def assert_refused_as_tied(folder) -> None:
    """Loading ``folder`` onto a tied Llama is refused, naming both tensors and the tie,
    and leaves the base as it was."""
    base = tied_copy_of(llama(False))
    before = state(base)
    with pytest.raises(ValueError, match="ties them together") as err:
        MPOModel.from_pretrained(base, folder)
    assert HEAD in str(err.value) and EMBED in str(err.value)
    assert_unchanged(base, before)


def test_lightweight_untied_head_onto_a_tied_base_is_refused(tmp_path):
    # the head changed (saved), the embedding left to the base model (its SHA-256
    # recorded): on a tied base whose tensor is that embedding, loading would make the
    # embedding the saved head
    untied = llama(False)
    saved = mpo(untied)
    with torch.no_grad():
        saved.base_model.lm_head.weight.add_(torch.randn_like(untied.lm_head.weight))
    saved.save_pretrained(tmp_path / "ck", lightweight=True)
    assert file_names(tmp_path / "ck") == [HEAD]
    assert_refused_as_tied(tmp_path / "ck")


def test_lightweight_untied_checkpoint_leaving_both_to_a_tied_base_names_the_tie(tmp_path):
    untied = llama(False)
    mpo(untied).save_pretrained(tmp_path / "ck", lightweight=True)
    assert file_names(tmp_path / "ck") == []
    assert_refused_as_tied(tmp_path / "ck")
