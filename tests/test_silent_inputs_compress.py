"""Inputs of the compression jobs, their configs and the CLI that were once accepted
silently (a wrong result, a setting ignored) or failed late: each is now refused before any
work, naming the argument, or handled."""

import copy
import json
import math

import pytest
import torch
from transformers import BertConfig, BertModel

from tests.common import (  # noqa: F401 - one_thread: autouse, one intra-op thread
    make_causal_lm,
    one_thread,
    save_llm_folder,
    short_sentences,
)
from tests.test_cli import model_dir, text_file  # noqa: F401  (fixtures)
from tnlm.cli import main
from tnlm.compress.decoder.heal import CausalHealConfig
from tnlm.compress.decoder.job import CausalLMRecipe
from tnlm.compress.distill import HealConfig, heal
from tnlm.compress.encoder import EncoderRecipe, split_text
from tnlm.compress.heal_state import STATE_FILE
from tnlm.compress.layerwise import LayerwiseConfig
from tnlm.compress.pipeline import CompressionConfig, compress_model, run_context, target_shapes
from tnlm.compress.squeeze import DimensionSqueezer

FAST = ["--calibration", "32", "--sick", "", "--quiet", "--reconstruct-steps", "0"]


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64)).eval()


def test_a_misspelled_target_is_refused_with_the_close_names():
    model = tiny_bert()
    ok = target_shapes(model, CompressionConfig(["query", "value"]))
    assert len(ok) == 4
    with pytest.raises(ValueError, match=r"pattern 'valeu' matches no .* did you mean \['value'\]"):
        target_shapes(model, CompressionConfig(["query", "valeu"]))
    # an embedding is no target of the data-aware compression: named, not left out
    with pytest.raises(ValueError, match="pattern 'word_embeddings' matches no"):
        target_shapes(model, CompressionConfig(["query", "word_embeddings"]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(whiten="no"), "whiten must be a bool"),
    (dict(sequential="no"), "sequential must be a bool"),
    (dict(probe_size=0), "probe_size must be an int >= 1"),
    (dict(probe_size=-5), "probe_size must be an int >= 1"),
    (dict(reconstruct_size=0), "reconstruct_size must be an int >= 1"),
    (dict(ridge=float("nan")), "ridge must be a finite number >= 0"),
    (dict(heal={"steps": 5}), "heal must be a HealConfig or None, got dict"),
])
def test_compression_config_refuses_bad_fields_when_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(["query"], **kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: EncoderRecipe(whiten="no"), "whiten must be a bool"),
    (lambda: LayerwiseConfig(["q_proj"], cross="no"), "cross must be a bool"),
    (lambda: LayerwiseConfig(["q_proj"], method="plain", cross=True),
     "cross applies to method 'tnlm' only"),
    (lambda: LayerwiseConfig(["q_proj"], ridge=float("nan")), "ridge must be a finite number"),
    (lambda: HealConfig(lr=0), "lr must be > 0 when healing runs"),
    (lambda: HealConfig(max_grad_norm=0), "max_grad_norm must be > 0"),
    (lambda: HealConfig(w_hidden=0, w_cos=0), "healing would have no loss"),
    (lambda: HealConfig(lr=True), "lr must be a finite number"),
    (lambda: HealConfig(warmup=-5), "warmup must be an int >= 0"),
    (lambda: HealConfig(warmup=2.5), "warmup must be an int >= 0"),
    (lambda: HealConfig(seed=2 ** 63), r"seed must be an int in \[0, 2\*\*63 - 1\]"),
    (lambda: HealConfig(seed=-1), "seed must be an int in"),
    (lambda: CausalHealConfig(lr=True), "lr must be a finite number > 0"),
    (lambda: CausalLMRecipe(seed=7, heal=CausalHealConfig(seed=3)),
     r"heal.seed \(3\) differs from seed \(7\)"),
    (lambda: CausalLMRecipe(text_source="mixed", n_texts=1), "n_texts must be at least 2"),
])
def test_configs_refuse_values_that_would_do_nothing_or_the_wrong_thing(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_configs_keep_what_is_valid_and_one_seed_seeds_a_causal_job():
    assert HealConfig(steps=0, lr=0).lr == 0  # nothing heals: no step to waste
    assert HealConfig(seed=2 ** 63 - 1).seed == 2 ** 63 - 1
    recipe = CausalLMRecipe(seed=7)
    assert recipe.resolved_heal().seed == 7  # was 0: every seed healed alike
    assert CausalLMRecipe(seed=7, heal=CausalHealConfig(seed=7)).resolved_heal().seed == 7
    import dataclasses

    assert dataclasses.replace(recipe, seed=2).resolved_heal().seed == 2  # a copy, reseeded


def test_one_string_is_not_taken_for_its_characters():
    text = "The quick brown fox jumps over the lazy dog. " * 4
    with pytest.raises(TypeError, match="text must be a sequence of strings"):
        split_text(text)
    model = tiny_bert()
    cfg = CompressionConfig(["query"], heal=None)
    with pytest.raises(TypeError, match="calibration must be a sequence of strings"):
        compress_model(model, None, text, cfg, progress=False)
    with pytest.raises(TypeError, match="heal_text must be a sequence of strings"):
        compress_model(model, None, [text], cfg, heal_text=text, progress=False)
    with pytest.raises(TypeError, match="sentences must be a sequence of strings"):
        heal(model, model, None, text, HealConfig(steps=1), progress=False)


def test_the_run_context_records_the_calibration_sentences():
    cfg = CompressionConfig(["query"])
    text = short_sentences(200)
    a, b = split_text(text, 64), split_text(text, 32)
    assert a.heal_text == b.heal_text and a.calibration != b.calibration
    ca, cb = run_context(cfg, a.calibration), run_context(cfg, b.calibration)
    assert (ca["calibration"], cb["calibration"]) == (64, 32)
    assert ca["calibration_sha256"] != cb["calibration_sha256"]
    assert run_context(cfg, a.calibration + ["  "]) == ca  # as compress_model keeps them
    assert "calibration" not in run_context(cfg)


def test_healing_resumes_from_the_tensors_own_step_when_the_json_is_one_save_behind(
        model_dir, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    teacher = BertModel.from_pretrained(model_dir).eval()
    sents = ["the cat sat", "a dog ran", "the big red dog", "a cat is red"] * 4
    student = compress_model(copy.deepcopy(teacher), tok, sents,
                             CompressionConfig(["query", "value"], budget=0.5, heal=None),
                             progress=False).model
    d = tmp_path / "h"
    cfg = HealConfig(steps=4, batch_size=4, warmup=1, checkpoint_dir=str(d), checkpoint_every=2)
    done = copy.deepcopy(student)
    heal(done, teacher, tok, sents, cfg, progress=False)
    state = json.loads((d / STATE_FILE).read_text())
    assert state["step"] == 4
    # a kill between the two renames: the tensors of step 4, the JSON of step 2
    (d / STATE_FILE).write_text(json.dumps(dict(state, step=2, losses=state["losses"][:2])))
    res = heal(copy.deepcopy(student), teacher, tok, sents, cfg, progress=False)
    assert res.resumed_from == 4 and len(res.losses) == 4


def test_squeezer_checks_its_arguments_before_any_evaluation():
    from tnlm.bridge import MPOLinear

    model = torch.nn.Sequential(MPOLinear.from_linear(torch.nn.Linear(16, 16), (4, 4), (4, 4)))
    calls = []

    def evaluate(m):
        calls.append(1)
        return 0.0

    for kwargs, match in ((dict(gauge="bogus"), "gauge must be one of"),
                          (dict(min_dim=0), "min_dim must be an int >= 1"),
                          (dict(max_iters=-1), "max_iters must be an int >= 0"),
                          (dict(target_params=-5), "target_params must be None or an int"),
                          (dict(delta=math.nan), "delta must be > 0"),
                          (dict(refresh_spectra="no"), "refresh_spectra must be a bool")):
        with pytest.raises(ValueError, match=match):
            DimensionSqueezer(model, evaluate, **{"delta": 0.1, **kwargs})
    assert not calls


# ------------------------------------------------------------------ the command line
def test_cli_refuses_flags_that_would_be_ignored_and_values_out_of_range(
        model_dir, text_file, tmp_path, capsys):  # noqa: F811
    base = ["compress", str(model_dir), "--text", str(text_file), *FAST]
    for extra, message in (
            (["--heal-steps", "0", "--heal-train", "cores"], "--heal-train sets healing"),
            (["--heal-steps", "0", "--teacher-bf16"], "--teacher-bf16 sets healing"),
            (["--dist-timeout", "5"], "--dist-timeout applies to causal LMs"),
            (["--seed", str(2 ** 64)], "--seed must be in [0, 2**63 - 1]")):
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["compress", str(model_dir), "--text", "", *FAST]) == 2
    assert "--text is empty" in capsys.readouterr().err
    llm, text = save_llm_folder(tmp_path)
    # an encoder's flag given at the encoder's default value is still an encoder's flag
    for flag, value in (("--calibration", "512"), ("--reconstruct-steps", "100"),
                        ("--heal-train", "cores+linears")):
        assert main(["compress", str(llm), flag, value, "--quiet"]) == 2
        assert f"{flag} applies to encoders" in capsys.readouterr().err
    # a text of one line repeated: what is held out would be healed on too
    same = tmp_path / "same.txt"
    same.write_text("the cat sat on the mat .\n" * 50)
    assert main(["compress", str(llm), "--text", str(same), "--quiet"]) == 2
    assert "holds 1 distinct line(s): at least 4 are needed" in capsys.readouterr().err


def test_weights_missing_from_a_models_blocks_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from tnlm.integration.loading import load_pretrained

    folder, _ = save_llm_folder(tmp_path)
    assert load_pretrained(folder)[0] is not None
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if ".layers.1." not in k}, str(weights),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights of the model's blocks are missing .*"
                                         r"model\.layers\.1\."):
        load_pretrained(folder)
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="model.safetensors is 0 bytes long"):
        load_pretrained(folder)


def test_weights_missing_outside_the_blocks_are_refused(tmp_path):
    """An untied language-model head, the final norm or the embeddings missing from the
    files: transformers draws them at random and only warns."""
    from safetensors.torch import load_file, save_file

    from tnlm.integration.loading import check_block_weights, load_pretrained

    folder, _ = save_llm_folder(tmp_path)  # a Llama: head not tied to the embeddings
    assert not load_pretrained(folder)[0].config.tie_word_embeddings
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        save_file({k: v for k, v in tensors.items() if k != name}, str(weights),
                  metadata={"format": "pt"})
        with pytest.raises(ValueError, match=r"1 weights of the model outside its blocks "
                                             r".* are missing .*" + name.replace(".", r"\.")):
            load_pretrained(folder)
    # a pooler or a task head may be new; both kinds at once are counted
    check_block_weights("m", {"missing_keys": ["pooler.dense.weight", "score.weight"]})
    with pytest.raises(ValueError, match=r"1 weights of the model's blocks are missing, and 1 "
                                         r"outside them"):
        check_block_weights("m", {"missing_keys": ["model.layers.0.mlp.up_proj.weight",
                                                   "lm_head.weight"]})


def test_a_lightweight_task_checkpoint_loads_its_new_task_head(tmp_path):
    """A task model loaded from a base checkpoint: its head (DistilBERT's pre_classifier
    and classifier) is rightly missing from the base's files."""
    import transformers

    from tnlm.export import load_compressed
    from tnlm.integration import MPOConfig, get_mpo_model

    cfg = transformers.DistilBertConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4,
                                        hidden_dim=64, max_position_embeddings=32)
    transformers.DistilBertModel(cfg).save_pretrained(tmp_path / "base")
    model = transformers.DistilBertForSequenceClassification.from_pretrained(
        tmp_path / "base", num_labels=2)
    mpo = get_mpo_model(model, MPOConfig(target_modules=["q_lin"], n_sites=2), progress=False)
    mpo.save_pretrained(tmp_path / "light", lightweight=True)
    loaded = load_compressed(tmp_path / "light", base=tmp_path / "base")
    assert type(loaded.base_model).__name__ == "DistilBertForSequenceClassification"


def test_cli_refuses_an_encoder_whose_block_weights_are_missing(model_dir, text_file,  # noqa: F811
                                                                tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if ".layer.1." not in k}, str(weights),
              metadata={"format": "pt"})
    assert main(["compress", str(broken), "--text", str(text_file), *FAST,
                 "--out", str(tmp_path / "out")]) == 2
    assert "weights of the model's blocks are missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_healing_state_whose_optimizer_moments_do_not_fit_is_refused(tmp_path):
    """The optimizer's moments are stored by position: a state whose i-th moments have
    another shape than the i-th parameter (another set of parameters trained) is refused,
    naming the parameter, instead of shifting moments onto the wrong parameters."""
    from safetensors.torch import load_file, save_file

    from tnlm.compress.heal_state import STATE_TENSORS, load_heal_state, save_heal_state

    def setup():
        params = [("a", torch.nn.Parameter(torch.randn(2, 3))),
                  ("b", torch.nn.Parameter(torch.randn(4)))]
        opt = torch.optim.AdamW([p for _, p in params], lr=1e-3)
        sum(p.sum() for _, p in params).backward()
        opt.step()
        return params, opt

    settings = {"steps": 5}
    params, opt = setup()
    save_heal_state(tmp_path, 1, params, opt, [0.5], settings)
    fresh, fresh_opt = setup()
    assert load_heal_state(tmp_path, fresh, fresh_opt, settings) == (1, [0.5])
    path = tmp_path / STATE_TENSORS
    tensors = load_file(str(path))
    for k in ("exp_avg", "exp_avg_sq"):  # the two parameters' moments swapped
        tensors[f"opt.0.{k}"], tensors[f"opt.1.{k}"] = tensors[f"opt.1.{k}"], \
            tensors[f"opt.0.{k}"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"does not match this student \(the optimizer's "
                                         r"exp_avg of a\)"):
        load_heal_state(tmp_path, *setup(), settings)
