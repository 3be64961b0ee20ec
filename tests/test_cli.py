"""The tnlm command: compress / inspect / report on a small saved model; one-line errors."""

import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from tnlm.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)]
    vocab += [f"##{chr(c)}" for c in range(97, 123)] + [".", ",", "the", "is", "a", "of", "and"]
    (d / "vocab.txt").write_text("\n".join(vocab[:64]))
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    return d


def test_compress_inspect_report(model_dir, tmp_path, capsys):
    out = tmp_path / "mpo"
    assert main(["compress", str(model_dir), "--n-sites", "3", "--max-bond", "4", "--out",
                 str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "12 MPO modules" in text and "cosine similarity" in text
    assert (out / "mpo_config.json").is_file()
    assert main(["inspect", str(model_dir), "--n-sites", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "encoder.layer.1.output.dense" in text and "S_random" in text
    figs = tmp_path / "figs"
    assert main(["report", str(out), "--out", str(figs), "--modules", "1"]) == 0
    assert (figs / "entropy_heatmap.png").stat().st_size > 1000
    assert len(list(figs.glob("*.png"))) == 3


def test_budget_policy(model_dir, capsys):
    assert main(["compress", str(model_dir), "--n-sites", "3", "--budget", "0.5", "--out", "",
                 "--quiet"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "MPO modules" in ln][0]
    words = line.replace(",", "").split()
    after, before = int(words[3]), int(words[6])  # "N MPO modules: A parameters for B dense"
    assert 0 < after <= 0.5 * before


@pytest.mark.parametrize("argv, message", [
    (["compress", "/nonexistent"], "is not a transformers model folder"),
    (["compress", "--budget", "7"], "--budget must be a fraction"),
    (["inspect", "/nonexistent"], "is not a transformers model folder"),
])
def test_user_errors_are_one_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "tnlm", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
