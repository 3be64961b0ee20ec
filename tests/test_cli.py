"""The tnlm command: compress / inspect / report on a small saved model; one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from tnlm.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(d)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)]
    vocab += [f"##{chr(c)}" for c in range(97, 123)] + [".", ",", "the", "is", "a", "of", "and"]
    (d / "vocab.txt").write_text("\n".join(vocab[:64]))
    BertTokenizerFast(vocab=str(d / "vocab.txt")).save_pretrained(d)  # vocab_file= is ignored
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = ["the", "a", "is", "of", "and", "cat", "dog", "sat", "ran", "big", "red"]
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (6,), generator=gen))
             for _ in range(120)]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(lines))
    return path


def test_compress_inspect_report(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "mpo"
    assert main(["compress", str(model_dir), "--budget", "0.5", "--heal-steps", "3",
                 "--calibration", "32", "--text", str(text_file), "--out", str(out),
                 "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 < summary["ratio"] <= 0.5 and summary["params_before"] == 8 * 32 * 32 + 4 * 32 * 64
    assert len(summary["ranks"]) == 12 and -1 <= summary["cosine_min"] <= summary["cosine_mean"] <= 1
    assert all(0 <= e < 1 for e in summary["calibration_errors"].values())
    # natural prose shipped with tnlm, never in the text: measured besides the held-out text
    assert summary["natural_held_out"] == 256
    assert -1 <= summary["cosine_natural_min"] <= summary["cosine_natural_mean"] <= 1
    # the healing checkpoint is removed once the model is saved: nothing is left to resume
    assert (out / "mpo_config.json").is_file() and not (out / "healing").exists()
    # the saved compressed model reloads onto a fresh base, bit-exact
    from tnlm.integration import MPOModel
    loaded = MPOModel.from_pretrained(BertModel.from_pretrained(model_dir), out).eval()
    ids = torch.randint(5, 64, (2, 7))
    assert loaded(input_ids=ids).last_hidden_state.shape == (2, 7, 32)
    assert main(["inspect", str(model_dir), "--n-sites", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "encoder.layer.1.output.dense" in text and "S_random" in text
    figs = tmp_path / "figs"
    assert main(["report", str(out), "--out", str(figs), "--modules", "1"]) == 0
    assert (figs / "entropy_heatmap.png").stat().st_size > 1000
    assert len(list(figs.glob("*.png"))) == 3


def test_budget_is_model_wide_and_smaller_budget_keeps_less(model_dir, text_file, capsys):
    kept = []
    for budget in ("0.5", "0.25"):
        assert main(["compress", str(model_dir), "--budget", budget, "--heal-steps", "0",
                     "--calibration", "32", "--text", str(text_file), "--out", "", "--json",
                     "--quiet"]) == 0
        kept.append(json.loads(capsys.readouterr().out)["ratio"])
    assert 0 < kept[1] <= 0.25 < kept[0] <= 0.5


def test_with_default_text_adds_the_default_text(model_dir, text_file, capsys):
    from tnlm.compress.text import default_text

    assert main(["compress", str(model_dir), "--budget", "0.5", "--heal-steps", "0",
                 "--calibration", "32", "--text", str(text_file), "--with-default-text",
                 "--out", "", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    mine = set(text_file.read_text().splitlines())
    assert summary["text_sentences"] == len(set(default_text(seed=0)) | mine)
    assert summary["held_out"] == 256  # min(256, n // 4) of the union


@pytest.mark.parametrize("argv, message", [
    (["compress", "--with-default-text"], "--with-default-text adds the default text"),
    (["compress", "/nonexistent"], "model path /nonexistent does not exist"),
    (["compress", "--budget", "7"], "--budget must be a fraction"),
    (["compress", "--calibration", "0"], "--calibration must be >= 1"),
    (["report", "--modules", "-1"], "--modules must be >= 1"),
    (["inspect", "/nonexistent"], "is not a transformers model folder"),
])
def test_user_errors_are_one_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "tnlm", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_typo_version_and_json(model_dir, capsys):
    assert main(["inpsect"]) == 2
    assert "did you mean 'inspect'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("tnlm ")
    assert main(["inspect", str(model_dir), "--n-sites", "3", "--json", "--no-reference",
                 "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 12 + 1  # 12 linears and the word embedding table
    for r in rows:
        # the entropy is measured at the central bond and bounded by ln of its dimension
        assert 0 <= r["central_entropy"] <= r["max_central_entropy"] + 1e-9


def test_heal_train_choices_are_the_healing_ones():
    from tnlm.cli import HEAL_TRAIN_CHOICES, build_parser
    from tnlm.compress.distill import TRAIN_CHOICES

    assert HEAL_TRAIN_CHOICES == TRAIN_CHOICES
    args = build_parser().parse_args(["compress", "--heal-train", "cores"])
    assert args.heal_train == "cores"
    # not given: None, the encoder's job takes its recipe's ("cores+linears"); a causal
    # LM's job refuses the flag given, whatever its value
    assert build_parser().parse_args(["compress"]).heal_train is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--heal-train", "core"])


def test_the_cli_defaults_are_the_encoder_recipes():
    from tnlm.cli import build_parser
    from tnlm.compress.encoder import EncoderRecipe

    args = build_parser().parse_args(["compress"])
    job = EncoderRecipe()
    # --allocation's default is the job's, resolved by each job (an encoder: the recipe's)
    assert args.allocation is None
    for flag, field in (("teacher_bf16", "teacher_bf16"), ("seed", "seed")):
        assert getattr(args, flag) == getattr(job, field), flag
    # None on the command line: the encoder's or the causal LM's, decided on the model
    assert args.heal_steps is None and args.lr is None and args.budget is None
    # the encoder's own flags: None until its job takes the recipe's (a causal LM's job
    # refuses them given, even at the encoder's value)
    assert args.calibration is None and args.reconstruct_steps is None
    assert args.heal_train is None
    assert (job.heal_steps, job.lr) == (2500, 5e-4)


def test_compress_encoder_gives_what_the_cli_gives(model_dir, text_file, capsys):
    from transformers import AutoTokenizer

    from tnlm.compress.encoder import EncoderRecipe, compress_encoder
    from tnlm.compress.text import read_sentences

    assert main(["compress", str(model_dir), "--heal-steps", "3", "--reconstruct-steps", "2",
                 "--calibration", "32", "--text", str(text_file), "--sick", "", "--out", "",
                 "--json", "--quiet"]) == 0
    cli = json.loads(capsys.readouterr().out)
    model = BertModel.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    res = compress_encoder(model, tok, EncoderRecipe(heal_steps=3, reconstruct_steps=2,
                                                     calibration=32),
                           text=read_sentences(text_file), progress=False)
    mine = json.loads(json.dumps(res.summary()))
    assert cli.pop("seconds").keys() == mine.pop("seconds").keys()
    assert mine == cli
    assert res.split.n_sentences == cli["text_sentences"] and len(res.split.calibration) == 32


def test_the_encoder_job_split_and_text(tmp_path):
    from tnlm.compress.encoder import encoder_text, split_text

    text = [f"sentence {i}" for i in range(40)] + ["sentence 0"]
    split = split_text(text, calibration=8, seed=3)
    assert (len(split.held_out), len(split.calibration), len(split.rest)) == (10, 8, 22)
    assert split.n_sentences == 40 and split.heal_text == split.calibration + split.rest
    assert not set(split.held_out) & set(split.heal_text)
    assert split_text(text, calibration=8, seed=3) == split
    with pytest.raises(ValueError, match="3 distinct sentences: at least 4"):
        split_text(["a", "b", "c", "a"])
    (tmp_path / "t.tsv").write_text("x\tone\ny\ttwo\nz\tone\n")
    assert encoder_text(tmp_path / "t.tsv", column=1) == (["one", "two"], str(tmp_path / "t.tsv"))


def test_compress_pivoted_saves_gauge_fixed_layers_that_report_and_reload(
        model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "piv"
    assert main(["compress", str(model_dir), "--budget", "0.5", "--heal-steps", "2",
                 "--reconstruct-steps", "0", "--allocation", "uniform", "--pivoted",
                 "--calibration", "32", "--text", str(text_file), "--out", str(out),
                 "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pivoted"] is True and 0 < summary["ratio"] <= 0.5
    meta = json.loads((out / "mpo_config.json").read_text())
    assert {e.get("layout") for e in meta["modules"].values()} == {"pivoted"}
    from tnlm.bridge import PivotedLinear
    from tnlm.integration import MPOModel
    loaded = MPOModel.from_pretrained(BertModel.from_pretrained(model_dir), out,
                                      is_trainable=False)
    piv = [m for m in loaded.modules() if isinstance(m, PivotedLinear)]
    assert len(piv) == 12
    assert sum(m.n_params for m in piv) == round(summary["ratio"] * summary["params_before"])
    figs = tmp_path / "figs"  # tnlm report reads the gauge-fixed layers as 2-site MPOs
    assert main(["report", str(out), "--out", str(figs), "--modules", "1"]) == 0
    assert len(list(figs.glob("*.png"))) == 3
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    capsys.readouterr()
    # --per-tensor on gauge-fixed layers: 7 bits (their chains saturate at 8)
    for flags, said in (([], "7-bit, one scale per column"),
                        (["--per-tensor"], "7-bit, one scale per tensor")):
        onnx_file = tmp_path / f"piv{len(flags)}.onnx"
        assert main(["export", str(out), "--format", "onnx", "--int8", *flags, "--out",
                     str(onnx_file)]) == 0
        assert said in capsys.readouterr().out
        import onnx
        from onnx import numpy_helper

        codes = [int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
                 for t in onnx.load(str(onnx_file)).graph.initializer
                 if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT8]
        assert codes and max(codes) <= 64  # the file's codes are 7-bit, as said
