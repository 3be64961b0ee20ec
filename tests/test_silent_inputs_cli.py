"""Inputs of the command line and of the MPO model's own API that were once accepted
silently (a model compressed on unknown tokens, a checkpoint that cannot be loaded, a
setting ignored), failed late, or left a folder half rewritten: each is now refused
before any work, naming the argument, or handled."""

import os
import re
import shutil

import pytest
import torch
import transformers
from transformers import BertConfig, BertModel

from tests.common import (  # noqa: F401 - one_thread: autouse, one intra-op thread
    killed_save,
    make_causal_lm,
    make_word_tokenizer,
    one_thread,
)
from tests.test_cli import model_dir, text_file  # noqa: F401  (fixtures)
from tnlm.cli import main
from tnlm.integration import MPOConfig, MPOModel, get_mpo_model, load_tensors

FAST = ["--budget", "0.5", "--heal-steps", "0", "--calibration", "16", "--sick", "",
        "--quiet", "--reconstruct-steps", "0"]


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=4, intermediate_size=64)).eval()


def without_tokenizer(model_dir, folder):  # noqa: F811
    """``model_dir``'s config.json and weights alone in ``folder``."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, folder / name)
    return folder


def full_checkpoint(model_dir, folder, **cfg):  # noqa: F811
    model = get_mpo_model(BertModel.from_pretrained(model_dir),
                          MPOConfig(target_modules=["query"], n_sites=2, **cfg), progress=False)
    model.save_pretrained(folder, lightweight=False)
    return model


def listing(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ 1. no tokenizer
def test_compress_refuses_a_model_folder_without_a_tokenizer(model_dir, text_file, tmp_path,  # noqa: F811
                                                             capsys, monkeypatch):
    bare = without_tokenizer(model_dir, tmp_path / "bare")

    def loaded(*a, **kw):
        raise AssertionError("the model was loaded before its tokenizer was checked")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", loaded)
    out = tmp_path / "out"
    assert main(["compress", str(bare), "--text", str(text_file), "--out", str(out),
                 *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert f"MODEL_DIR {bare} holds no tokenizer" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_export_refuses_a_base_without_a_tokenizer_before_loading_the_model(
        model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    ckpt = tmp_path / "ckpt"  # no config.json, no tokenizer: --base gives both
    full_checkpoint(model_dir, ckpt)
    bare = without_tokenizer(model_dir, tmp_path / "bare")
    assert main(["export", str(ckpt), "--format", "st", "--out", str(tmp_path / "good"),
                 "--base", str(model_dir)]) == 0  # a base with its tokenizer still exports
    capsys.readouterr()

    def loaded(*a, **kw):
        raise AssertionError("the model was loaded before the tokenizer was checked")

    monkeypatch.setattr("tnlm.export.folder.load_compressed", loaded)
    for fmt, out in (("hf", "hf"), ("st", "st"), ("onnx", "m.onnx")):
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / out),
                     "--base", str(bare)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--base {bare} holds no tokenizer" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / out).exists()


def test_load_pretrained_refuses_a_causal_lm_folder_without_a_tokenizer(tmp_path, monkeypatch):
    from tnlm.integration.loading import load_pretrained

    folder = tmp_path / "gpt2"  # transformers builds an empty GPT2Tokenizer without its files
    make_causal_lm("gpt2").save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    model, tok = load_pretrained(folder)  # with its tokenizer: loads as before
    assert len(tok) == model.config.vocab_size
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()

    def loaded(*a, **kw):
        raise AssertionError("the model was loaded before its tokenizer was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    with pytest.raises(ValueError, match=f"{folder} holds no tokenizer: transformers built an "
                                         "empty one"):
        load_pretrained(folder)


def test_eval_refuses_a_model_folder_without_a_tokenizer_before_loading(tmp_path, capsys,
                                                                        monkeypatch):
    folder = tmp_path / "gpt2"
    make_causal_lm("gpt2").save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran in the park\n" * 4)
    capsys.readouterr()

    def loaded(*a, **kw):
        raise AssertionError("the model was loaded before its tokenizer was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    # ``tnlm eval`` measured perplexity on an empty tokenizer's unknown tokens
    assert main(["eval", str(folder), "--text", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{folder} holds no tokenizer" in err and len(err.splitlines()) == 1, err
    assert main(["eval", str(folder), "--reference", str(folder), "--text", str(text)]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------ 2. save with a state dict
def test_save_pretrained_checks_a_state_dict_before_writing(model_dir, tmp_path):  # noqa: F811
    d = tmp_path / "ckpt"
    model = full_checkpoint(model_dir, d)
    before = listing(d)
    trainable = {k: v for k, v in model.named_parameters() if v.requires_grad}
    with pytest.raises(ValueError, match=r"state_dict lacks tensors of the model: \["
                                         r"'embeddings.LayerNorm.bias'"):
        model.save_pretrained(d, state_dict=trainable)
    full = model.state_dict()
    key = "base_model.encoder.layer.0.attention.self.query.cores.1"
    wrong = dict(full, **{key: torch.zeros(3)})
    with pytest.raises(ValueError, match=r"another shape than the model's: \[\"encoder.layer.0"
                                         r".attention.self.query.cores.1 \[3\]"):
        model.save_pretrained(d, state_dict=wrong)
    with pytest.raises(TypeError, match=r"state_dict\['encoder.layer.0.attention.self.query"
                                        r".cores.1'\] must be a tensor"):
        model.save_pretrained(d, state_dict=dict(full, **{key: [0.0]}))
    assert listing(d) == before  # nothing written: the earlier checkpoint is whole
    MPOModel.from_pretrained(BertModel.from_pretrained(model_dir), d)
    model.save_pretrained(d, state_dict=full)  # the whole state dict (Trainer's) still saves
    loaded = MPOModel.from_pretrained(BertModel.from_pretrained(model_dir), d)
    for k, v in model.base_model.state_dict().items():
        assert torch.equal(v, loaded.base_model.state_dict()[k]), k


# ------------------------------------------------------------------ 3. --out staged
def test_an_interrupted_save_leaves_the_earlier_model_in_out_whole(model_dir, text_file,  # noqa: F811
                                                                   tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["compress", str(model_dir), "--text", str(text_file), "--out", str(out), *FAST]
    assert main(argv) == 0
    before = listing(out)

    def interrupt(*a, **kw):  # the final save, after the MPO weights were written
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PretrainedConfig, "save_pretrained", interrupt)
    assert main([*argv, "--budget", "0.4"]) == 130
    assert listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    MPOModel.from_pretrained(BertModel.from_pretrained(model_dir), out)


def test_a_new_model_in_out_keeps_no_file_of_the_earlier_one(model_dir, text_file,  # noqa: F811
                                                             tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    argv = ["compress", str(model_dir), "--text", str(text_file), "--out", str(out), *FAST]
    assert main(argv) == 0
    names = lambda: sorted(re.sub(r"-\w{12}\.", "-HASH.", p.name) for p in out.iterdir())  # noqa: E731
    fresh = names()
    # an earlier model's files that this one does not write: they would change its tokenizer
    (out / "added_tokens.json").write_text('{"zebra": 64}')
    (out / "chat_template.jinja").write_text("{{ messages }}")
    (out / "generation_config.json").write_text("{}")
    (out / ".keep").write_text("the user's")
    # the user's own files and folders stay (the earlier in-place save left them too)
    (out / "notes.txt").write_text("the user's")
    (out / "figures").mkdir()
    (out / "figures" / "a.png").write_bytes(b"png")
    assert main([*argv, "--budget", "0.4"]) == 0
    assert names() == sorted([*fresh, ".keep", "figures", "notes.txt"])
    assert (out / ".keep").read_text() == (out / "notes.txt").read_text() == "the user's"
    assert (out / "figures" / "a.png").read_bytes() == b"png"
    assert str(out) in (out / "README.md").read_text()  # names --out, not the staging folder
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(model_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------ 4. half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_an_encoder_stored_in_half_precision_compresses_in_float32(model_dir, text_file,  # noqa: F811
                                                                   tmp_path, capsys, dtype):
    half = tmp_path / "half"
    BertModel.from_pretrained(model_dir).to(dtype).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(model_dir / name, half / name)
    out = tmp_path / "out"
    assert main(["compress", str(half), "--text", str(text_file), "--out", str(out),
                 *FAST[:-2]]) == 0, capsys.readouterr().err
    _, tensors = load_tensors(out)
    assert {str(t.dtype) for t in tensors.values()} == {"float32"}
    assert main(["report", str(out), "--out", str(tmp_path / "figs"), "--modules", "1"]) == 0
    assert main(["inspect", str(half), "--quiet", "--json"]) == 0


def test_report_reads_a_bfloat16_checkpoint(model_dir, tmp_path, capsys):  # noqa: F811
    ckpt = tmp_path / "bf16"
    model = get_mpo_model(BertModel.from_pretrained(model_dir).to(torch.bfloat16),
                          MPOConfig(target_modules=["query", "key"], n_sites=2), progress=False)
    model.save_pretrained(ckpt, lightweight=False)
    _, tensors = load_tensors(ckpt)  # numpy has no bfloat16: float32, exact
    core = model.base_model.encoder.layer[0].attention.self.query.cores[0]
    assert torch.equal(torch.from_numpy(tensors["encoder.layer.0.attention.self.query.cores.0"]),
                       core.detach().float())
    figs = tmp_path / "figs"
    assert main(["report", str(ckpt), "--out", str(figs), "--modules", "1"]) == 0, \
        capsys.readouterr().err
    assert (figs / "entropy_heatmap.png").is_file()


# ------------------------------------------------------------------ 5. MPOConfig site shapes
def test_site_shape_keys_must_be_int_dimensions_of_a_target():
    for key in (32.9, True, 0):
        with pytest.raises((TypeError, ValueError), match=r"in_shapes key \(a dimension\) must"):
            MPOConfig(target_modules=["query"], in_shapes={key: (4, 8)})
    config = MPOConfig(target_modules=["query"], in_shapes={"32": [4, 8]})  # JSON's keys
    assert config.in_shapes == {32: (4, 8)}
    assert MPOConfig.from_dict(config.to_dict()).in_shapes == {32: (4, 8)}
    for field, message in (("in_shapes", r"in_shapes keys \[23\] are no target's input "
                                         r"dimension; the targets' input dimensions are \[32\]"),
                           ("out_shapes", r"out_shapes keys \[23\] are no target's output "
                                          r"dimension; the targets' output dimensions are "
                                          r"\[32\]")):
        model = tiny_bert()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            get_mpo_model(model, MPOConfig(target_modules=["query"], n_sites=2,
                                           **{field: {23: (2, 2, 2, 2, 2)}}), progress=False)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    wrapped = get_mpo_model(tiny_bert(), MPOConfig(target_modules=["query"], n_sites=2,
                                                   in_shapes={32: (8, 4)}), progress=False)
    assert {tuple(m.in_shape) for _, m in wrapped.mpo_modules()} == {(8, 4)}


# ------------------------------------------------------------------ 6. resize_token_embeddings
def test_resize_token_embeddings_takes_only_an_int_of_at_least_1():
    model = get_mpo_model(tiny_bert(), MPOConfig(target_modules=["word_embeddings"], n_sites=2),
                          progress=False)
    for size, error in ((True, TypeError), (70.9, TypeError), ("70", TypeError),
                        (0, ValueError), (-3, ValueError)):
        with pytest.raises(error, match="new_num_tokens must be"):
            model.resize_token_embeddings(size)
        assert model.get_input_embeddings().num_embeddings == 64
        assert model.config.vocab_size == 64
    assert model.resize_token_embeddings(70, mean_resizing=False).num_embeddings == 70


# ------------------------------------------------------------------ 7. --n-sites
@pytest.mark.parametrize("n_sites, message", [
    ("0", "--n-sites must be between 2 and 32 (a chain of one site has no bond to measure), "
          "got 0"), ("33", "--n-sites must be at most 32, got 33"),
    # one site has no bond: inspect and decompose failed after loading with a message not
    # naming the flag, report drew an all-zero heatmap
    ("1", "--n-sites must be between 2 and 32 (a chain of one site has no bond to measure), "
          "got 1")])
def test_n_sites_is_checked_before_the_model_is_loaded(model_dir, tmp_path, capsys,  # noqa: F811
                                                       monkeypatch, n_sites, message):
    def loaded(*a, **kw):
        raise AssertionError("the model was loaded before --n-sites was checked")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", loaded)
    figs = tmp_path / "figs"
    for argv in (["inspect", str(model_dir), "--quiet"], ["decompose", str(model_dir), "--quiet"],
                 ["report", str(model_dir), "--out", str(figs)]):
        assert main([*argv, "--n-sites", n_sites]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not figs.exists()


def test_report_refuses_n_sites_for_a_saved_mpo_model_and_makes_out_only_with_figures(
        model_dir, tmp_path, capsys):  # noqa: F811
    ckpt = tmp_path / "ckpt"
    full_checkpoint(model_dir, ckpt)
    figs = tmp_path / "figs"
    for given in ("3", "5"):  # the default too, when it is given
        assert main(["report", str(ckpt), "--out", str(figs), "--n-sites", given]) == 2
        err = capsys.readouterr().err.strip()
        assert f"DIR {ckpt} is a saved MPO model" in err and "leave --n-sites out" in err, err
    assert main(["report", str(tmp_path / "nothing"), "--out", str(figs)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not figs.exists()  # nothing to draw: no folder left behind
    assert main(["report", str(ckpt), "--out", str(figs), "--modules", "1"]) == 0
    assert len(list(figs.glob("*.png"))) == 3


def test_a_save_killed_by_a_signal_is_tidied_at_the_next_run(tmp_path, capsys):
    """What a replace_folder killed by SIGKILL leaves beside --out (its process gone) is
    tidied by the next make_out: a partial new model removed; the earlier folder, set
    aside, put back where --out is missing, with the hidden files already moved out of
    it; removed where the new model was already in place. A living process's are kept."""
    from tnlm.cli.common import make_out

    out, old, partial = killed_save(tmp_path)
    (partial / ".git").write_text("moved")  # carried over before the kill
    (partial / "notes.txt").write_text("mine")  # a user's file, carried over too (it was
    # deleted with the partial folder: only hidden entries went back)
    (partial / "config.json").write_text("{}")  # the new model's: not put back
    alive = tmp_path / f".out.partial-{os.getpid()}-ffff0000"
    alive.mkdir()
    assert make_out(str(out), own=("healing",))[0] == out
    err = capsys.readouterr().err
    assert "was put back" in err and "had not finished writing" in err, err
    assert sorted(p.name for p in out.iterdir()) == [".git", "mpo_config.json", "notes.txt"]
    assert not old.exists() and not partial.exists() and alive.is_dir()
    # killed after the new folder was in place: the earlier one is only removed
    old.mkdir()
    make_out(str(out), own=("healing",))
    assert "had already replaced" in capsys.readouterr().err
    assert not old.exists() and (out / "mpo_config.json").is_file()
