"""Inputs that were once accepted silently and gave a wrong result: each is now refused in
one line naming the argument and what was expected (found by an audit of the causal-LM
and export paths)."""

import json
import shutil

import pytest
import torch

from tests.common import (  # noqa: F401 - one_thread: autouse, one intra-op thread
    make_causal_lm,
    make_word_tokenizer,
    one_thread,
    save_llm_folder,
)
from tnlm.cli import main

WORDS = ["the", "cat", "sat", "on", "mat", ".", "dog", "is", "blue", "and", "sky", "a", "day"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return save_llm_folder(tmp_path_factory.mktemp("silent"))


def test_token_sequences_refuses_one_string_for_a_list_of_documents():
    from tnlm.compress.decoder.text import token_sequences

    tok = make_word_tokenizer()
    text = " ".join(WORDS * 20)
    assert token_sequences(tok, [text], 16).shape[1] == 16
    with pytest.raises(TypeError, match="one str .wrap it in a list: each of its characters"):
        token_sequences(tok, text, 16)
    with pytest.raises(TypeError, match="items of type int"):
        token_sequences(tok, [text, 3], 16)
    # an iterator is read once: the check does not leave it empty for the cut
    assert torch.equal(token_sequences(tok, iter([text]), 16), token_sequences(tok, [text], 16))


def test_compress_causal_lm_refuses_a_string_as_its_text():
    from tnlm.compress.decoder.job import CausalLMRecipe, compress_causal_lm

    model, tok = make_causal_lm("llama"), make_word_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="^text must be a sequence of strings .* got one str"):
        compress_causal_lm(model, tok, CausalLMRecipe(budget=0.5), text=" ".join(WORDS * 40),
                           progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cls", ["LlamaModel", "LlamaForSequenceClassification"])
def test_a_causal_model_type_without_its_lm_head_is_refused_before_loading(tmp_path, llm, cls,
                                                                            capsys):
    """A Llama checkpoint that is not a causal LM would load with a random head and be
    healed towards it; it is refused, naming what it holds and what is expected."""
    import transformers

    from tnlm.integration.loading import check_model_source

    folder, text = llm
    d = tmp_path / cls
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cfg.num_labels = 2
    getattr(transformers, cls)(cfg).save_pretrained(d)
    make_word_tokenizer().save_pretrained(d)
    with pytest.raises(ValueError, match=f"holds a {cls}, not a causal LM with its "
                                         "language-model head"):
        check_model_source(d)
    capsys.readouterr()
    assert main(["compress", str(d), "--text", str(text), "--out", ""]) == 2
    err = capsys.readouterr().err
    assert f"holds a {cls}, not a causal LM" in err and len(err.strip().splitlines()) == 1
    assert check_model_source(folder).model_type == "llama"  # LlamaForCausalLM: fine


def test_a_head_tied_to_the_embeddings_or_saved_beside_them_is_not_refused(tmp_path):
    """GPT2Model with tied embeddings loads as GPT2LMHeadModel with the embeddings as its
    head; GPT2DoubleHeadsModel holds an lm_head tensor: neither is refused. Untied and
    without one, it is."""
    import transformers

    from tnlm.integration.loading import check_model_source

    kw = dict(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64, bos_token_id=2,
              eos_token_id=3)
    transformers.GPT2Model(transformers.GPT2Config(**kw)).save_pretrained(tmp_path / "tied")
    untied = transformers.GPT2Config(**kw, tie_word_embeddings=False)
    transformers.GPT2Model(untied).save_pretrained(tmp_path / "untied")
    transformers.GPT2DoubleHeadsModel(untied).save_pretrained(tmp_path / "double")
    assert check_model_source(tmp_path / "tied").model_type == "gpt2"
    assert check_model_source(tmp_path / "double").model_type == "gpt2"
    with pytest.raises(ValueError, match="holds a GPT2Model, not a causal LM"):
        check_model_source(tmp_path / "untied")


@pytest.mark.parametrize("flags", [["--lr", "5"], ["--heal-optimizer", "adamw"],
                                   ["--heal-chunk", "64"]])
def test_healing_flags_with_no_healing_are_refused(llm, capsys, flags):
    folder, text = llm
    assert main(["compress", str(folder), "--text", str(text), "--out", "", "--heal-steps", "0",
                 *flags]) == 2
    assert f"{flags[0]} sets healing; with --heal-steps 0 nothing heals" in \
        capsys.readouterr().err


def test_encoder_lr_with_no_healing_is_refused(capsys):
    assert main(["compress", "--heal-steps", "0", "--lr", "1e-3", "--out", ""]) == 2
    assert "--lr sets healing; with --heal-steps 0 nothing heals" in capsys.readouterr().err


def test_recipe_and_config_fields_that_did_nothing_or_failed_late_are_refused():
    from tnlm.compress.decoder.heal import CausalHealConfig
    from tnlm.compress.decoder.job import CausalLMRecipe
    from tnlm.compress.layerwise import LayerwiseConfig

    with pytest.raises(ValueError, match="heal_pivoted .* needs pivoted=True"):
        CausalLMRecipe(heal_pivoted=True)
    assert CausalLMRecipe(pivoted=True, heal_pivoted=True).heal_pivoted
    with pytest.raises(ValueError, match="teacher_bf16 must be a bool, got 'false'"):
        CausalHealConfig(teacher_bf16="false")
    for bad in (0, -1e-3, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="fit_lr must be a finite number > 0"):
            LayerwiseConfig(["q_proj"], fit_lr=bad)
    assert LayerwiseConfig(["q_proj"], fit_lr=1).fit_lr == 1


@pytest.fixture(scope="module")
def saved(llm, tmp_path_factory):
    """A compressed Llama saved by ``tnlm compress`` (config and tokenizer in the folder)."""
    import contextlib
    import io

    folder, text = llm
    out = tmp_path_factory.mktemp("saved") / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["compress", str(folder), "--budget", "0.5", "--heal-steps", "2", "--text",
                     str(text), "--out", str(out), "--json", "--quiet"]) == 0
    return out


def test_load_compressed_refuses_a_base_that_is_not_the_saved_model(llm, saved, tmp_path):
    """A full checkpoint's own config.json describes its model: a base whose configuration
    differs (same shapes, another RMSNorm epsilon and RoPE base) is refused, naming the
    fields; the same base, or none, gives the saved model."""
    from transformers import AutoConfig

    from tnlm.export import load_compressed

    folder, _ = llm
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(rms_norm_eps=0.1, rope_theta=5e5)
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"is not the model saved in .*differs in .*rms_norm_eps"):
        load_compressed(saved, base=other)
    ids = torch.tensor([[2, 6, 7, 8, 9]])
    with torch.no_grad():
        want = load_compressed(saved)(input_ids=ids).logits
        got = load_compressed(saved, base=folder)(input_ids=ids).logits
    assert torch.equal(got, want)
    assert AutoConfig.from_pretrained(saved).rms_norm_eps == AutoConfig.from_pretrained(
        folder).rms_norm_eps


def test_export_refuses_an_unused_base_and_a_causal_lm_without_a_tokenizer(llm, saved, tmp_path,
                                                                            capsys):
    folder, _ = llm
    assert main(["export", str(saved), "--format", "hf", "--out", str(tmp_path / "a"),
                 "--base", str(folder)]) == 2
    assert "holds its own config.json and tokenizer: pass no --base" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(saved, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    assert main(["export", str(bare), "--format", "hf", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "holds no tokenizer: the transformers folder would have none; pass --base" in err
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    assert main(["export", str(bare), "--format", "hf", "--out", str(tmp_path / "c"),
                 "--base", str(folder)]) == 0  # the tokenizer from --base
    assert (tmp_path / "c" / "tokenizer_config.json").is_file()


def test_compress_out_refuses_a_folder_of_other_files_and_keeps_them(llm, tmp_path, capsys):
    """``--out MODEL`` or a project folder: the saved model would have overwritten its
    config.json, README.md and tokenizer, and sat beside its dense weights."""
    folder, text = llm
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert main(["compress", str(folder), "--text", str(text), "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"--out {folder} holds other files (" in err and "no earlier tnlm model" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("mine")
    assert main(["compress", str(folder), "--text", str(text), "--out", str(project)]) == 2
    assert "holds other files (README.md)" in capsys.readouterr().err
    assert (project / "README.md").read_text() == "mine"


def test_make_out_accepts_new_empty_earlier_and_own_folders(tmp_path):
    from tnlm.cli.common import make_out

    own = ("layerwise",)
    assert make_out(str(tmp_path / "new" / "out"), own=own)[0] == tmp_path / "new" / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("")
    (tmp_path / "empty" / "layerwise").mkdir()  # a stopped run's checkpoint: --resume
    assert make_out(str(tmp_path / "empty"), own=own)[0] == tmp_path / "empty"
    (tmp_path / "empty" / "mpo_model-0123456789ab.safetensors").write_text("")  # a killed save
    assert make_out(str(tmp_path / "empty"), own=own)[0] == tmp_path / "empty"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("mpo_config.json", "config.json", "README.md"):
        (earlier / name).write_text("{}")
    assert make_out(str(earlier), own=own)[0] == earlier
    assert make_out(str(tmp_path), own=None)[0] == tmp_path  # no check asked (tnlm export)
