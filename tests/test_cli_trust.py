"""Nothing a user of ``tnlm compress`` sees is silently wrong: the kept fraction, budgets,
reruns into one --out, healing that blows up, and inputs checked before any work
(docs/reliability.md). Tiny random-init BERTs saved to tmp folders, a few steps each."""

import copy
import json
import math
import re
import sys

import pytest
import torch
import transformers
from transformers import BertConfig, BertModel

from tnlm.cli import main
from tnlm.compress import distill
from tnlm.compress.distill import HealConfig, heal
from tnlm.compress.heal_state import read_heal_state
from tnlm.compress.pipeline import CompressionConfig, compress_model
from tnlm.integration.architectures import default_targets

from .test_cli import model_dir, text_file  # noqa: F401  (fixtures)

FAST = ["--calibration", "32", "--sick", "", "--quiet", "--reconstruct-steps", "0"]


def compress(model_dir, text_file, *extra):  # noqa: F811
    return ["compress", str(model_dir), "--text", str(text_file), *FAST, *extra]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def saved_tensors(out):
    from safetensors.torch import load_file

    (weights,) = out.glob("mpo_model-*.safetensors")
    return load_file(str(weights))


# ------------------------------------------------------------------ the kept fraction
def test_kept_line_json_and_saved_model_agree(model_dir, text_file, tmp_path, capsys):  # noqa: F811
    from tnlm.integration import MPOModel

    out = tmp_path / "m"
    argv = compress(model_dir, text_file, "--heal-steps", "0", "--out", str(out))
    assert main([a for a in argv if a != "--quiet"]) == 0
    printed = capsys.readouterr().out
    m = re.search(r"kept ([\d,]+) of ([\d,]+) parameters of the targeted layers \(([\d.]+)%; "
                  r"(\d+) MPO layers, (\d+) kept dense\)", printed)
    assert m, printed
    after, before = (int(g.replace(",", "")) for g in m.groups()[:2])
    summary = run_json(capsys, compress(model_dir, text_file, "--heal-steps", "0", "--out",
                                        "", "--json"))
    dense = [n for n, r in summary["ranks"].items() if r is None]
    assert dense and int(m.group(5)) == len(dense) == summary["dense_layers"]  # the case at issue
    assert (after, before) == (summary["params_after"], summary["params_before"])
    assert m.group(3) == f"{100 * summary['ratio']:.1f}" and summary["ratio"] <= 0.5
    # what the saved model holds: its MPO cores plus the targeted layers kept dense
    base = BertModel.from_pretrained(model_dir)
    loaded = MPOModel.from_pretrained(copy.deepcopy(base), out)
    cores = sum(sum(c.numel() for c in mod.cores) for _, mod in loaded.mpo_modules())
    kept_dense = sum(base.get_submodule(n).weight.numel() for n in dense)
    assert cores + kept_dense == after
    assert before == sum(base.get_submodule(n).weight.numel() for n in summary["ranks"])


# ------------------------------------------------------------------ budgets
@pytest.mark.parametrize("allocation", ["uniform", "greedy", "sensitivity"])
def test_budget_one_truncates_nothing(model_dir, text_file, capsys, allocation):  # noqa: F811
    s = run_json(capsys, compress(model_dir, text_file, "--budget", "1", "--heal-steps", "2",
                                  "--allocation", allocation, "--out", "", "--json"))
    assert s["ratio"] == 1.0 and s["params_after"] == s["params_before"]
    assert all(r is None for r in s["ranks"].values()) and s["dense_layers"] == 12
    assert all(e == 0.0 for e in s["calibration_errors"].values())
    assert s["healed"] is False and s["cosine_min"] > 1 - 1e-5
    # nothing truncated, nothing reconstructed: the summary said the recipe's 100 steps
    assert s["reconstruct_steps"] == 0 and s["block_errors"] is None


@pytest.mark.parametrize("allocation", ["uniform", "greedy", "sensitivity"])
def test_a_budget_is_met_down_to_the_smallest_model(model_dir, text_file, capsys,  # noqa: F811
                                                   allocation):
    s = run_json(capsys, compress(model_dir, text_file, "--budget", "0.06", "--heal-steps",
                                  "0", "--allocation", allocation, "--out", "", "--json"))
    assert 0 < s["ratio"] <= 0.06


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_a_budget_below_the_smallest_model_is_refused_before_any_work(
        model_dir, text_file, tmp_path, capsys, monkeypatch, allocation):  # noqa: F811
    def boom(*a, **kw):
        raise AssertionError("compression started")

    monkeypatch.setattr("tnlm.compress.encoder.compress_model", boom)
    out = tmp_path / "new" / "out"
    assert main(compress(model_dir, text_file, "--budget", "1e-6", "--allocation", allocation,
                         "--out", str(out))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--budget 1e-06 cannot be met" in err
    # every layer at rank 1: 8 (32 + 32) + 4 (32 + 64) of 8 32² + 4 32·64
    assert f"{(8 * 64 + 4 * 96) / (8 * 1024 + 4 * 2048):.6g}" in err
    assert not (tmp_path / "new").exists()  # the folder it created is removed again


def test_compress_model_meets_or_refuses_a_budget(model_dir):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    sents = ["the cat sat", "a dog ran", "the big red dog", "a cat is red"] * 4
    model = BertModel.from_pretrained(model_dir).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="budget 1e-06 cannot be met.*0.0546875"):
        compress_model(model, tok, sents, CompressionConfig(default_targets(model), budget=1e-6,
                                                            heal=None), progress=False)
    res = compress_model(model, tok, sents, CompressionConfig(default_targets(model), budget=1.0,
                                                              heal=HealConfig(steps=2)),
                         progress=False)
    assert res.ratio == 1.0 and res.heal is None and not list(res.model.mpo_modules())
    for k, v in res.model.base_model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ reruns into one --out
def interrupted_run(model_dir, text_file, out, monkeypatch, capsys, *extra):  # noqa: F811
    """A run killed after healing, before saving: its healing state stays in out/healing."""
    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("tnlm.compress.encoder.embedding_cosine", interrupt)
        assert main(compress(model_dir, text_file, "--allocation", "uniform", "--heal-steps",
                             "3", "--out", str(out), *extra)) == 130
    assert "with --resume continues it" in capsys.readouterr().err
    assert read_heal_state(out / "healing")["step"] == 3



def test_a_kept_healing_state_is_advertised_only_when_this_run_saved_it(
        model_dir, text_file, tmp_path, monkeypatch, capsys):  # noqa: F811
    """With an earlier run's state in --out: a run refused before any work (an unmeetable
    --budget) said "the same command with --resume continues it", which fails the same
    way; and --resume with fewer --heal-steps than the state had made was called a
    corrupt state ("drop --resume"), which deletes a sound one. Now the notice comes only
    for a state this run saved, and fewer steps are named as other settings."""
    out = tmp_path / "out"
    interrupted_run(model_dir, text_file, out, monkeypatch, capsys)
    base = ["--allocation", "uniform", "--out", str(out)]
    assert main(compress(model_dir, text_file, *base, "--heal-steps", "3", "--budget",
                         "1e-6")) == 2
    err = capsys.readouterr().err
    assert "cannot be met" in err and "continues it" not in err, err
    assert main(compress(model_dir, text_file, *base, "--heal-steps", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "other settings (steps: 3 there, 2 now)" in err and "corrupt" not in err, err
    assert "pass the settings of that run" in err and "continues it" not in err, err
    assert read_heal_state(out / "healing")["step"] == 3  # kept
    # a resume the check let through, interrupted before healing saved again: the state
    # is sound, and the notice says so
    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("tnlm.compress.pipeline.uniform_ranks", interrupt)
        assert main(compress(model_dir, text_file, *base, "--heal-steps", "3",
                             "--resume")) == 130
    assert "with --resume continues it" in capsys.readouterr().err

def test_resume_only_when_asked_and_only_with_the_same_settings(model_dir, text_file,  # noqa: F811
                                                                tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    base = ["--allocation", "uniform", "--heal-steps", "3", "--out", str(out)]
    interrupted_run(model_dir, text_file, out, monkeypatch, capsys)
    state = out / "healing" / "heal_state.json"
    for flag, value in (("--lr", "0.001"), ("--seed", "1"), ("--budget", "0.25"),
                        ("--heal-steps", "4")):
        argv = compress(model_dir, text_file, *base, "--resume", flag, value)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--resume: healing state {state} was made with other settings" in err, err
        assert flag.lstrip("-").replace("-steps", "s").replace("heals", "steps") in err
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text().replace("cat", "cow"))
    assert main(["compress", str(model_dir), "--text", str(other), *FAST, *base,
                 "--resume"]) == 2
    assert "text_sha256" in capsys.readouterr().err
    # the same settings resume; the healing state is removed once the model is saved
    assert main(compress(model_dir, text_file, *base, "--resume")) == 0
    assert "resuming the healing" in capsys.readouterr().err
    assert (out / "mpo_config.json").is_file() and not (out / "healing").exists()
    resumed = saved_tensors(out)
    # nothing left to resume: refused, and the finished model is untouched
    assert main(compress(model_dir, text_file, *base, "--resume")) == 2
    assert "holds no healing state to resume" in capsys.readouterr().err
    assert saved_tensors(out).keys() == resumed.keys()
    # without --resume a leftover state is discarded, with a notice, and another seed
    # gives another model, which replaces the earlier one
    interrupted_run(model_dir, text_file, out, monkeypatch, capsys)
    assert main(compress(model_dir, text_file, *base, "--seed", "1")) == 0
    err = capsys.readouterr().err
    assert "discarding the healing state of an earlier run" in err
    assert "holds a model of an earlier run: this run replaces it" in err
    fresh = saved_tensors(out)
    assert any(not torch.equal(fresh[k], resumed[k]) for k in resumed if k in fresh)
    assert not (out / "healing").exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", "is corrupt (not JSON"),
    (json.dumps({"step": 10**9, "losses": []}), "step 1000000000 is not an int in [0, 3]"),
    (json.dumps({"step": 2, "losses": [0.1]}), "losses must be a list of 2 numbers"),
    (json.dumps([1, 2]), "is corrupt (not a JSON object)"),
    ("tensors", "heal_state.safetensors is corrupt"),
])
def test_a_bad_healing_state_is_named(model_dir, text_file, tmp_path, monkeypatch, capsys,  # noqa: F811
                                      content, message):
    out = tmp_path / "out"
    interrupted_run(model_dir, text_file, out, monkeypatch, capsys)
    state = out / "healing" / "heal_state.json"
    if content == "tensors":  # a truncated tensor file beside a good state
        state = out / "healing" / "heal_state.safetensors"
        state.write_bytes(state.read_bytes()[:40])
    else:
        state.write_text(content)
    assert main(compress(model_dir, text_file, "--allocation", "uniform", "--heal-steps", "3",
                         "--out", str(out), "--resume")) == 2
    err = capsys.readouterr().err
    assert str(state) in err and message in err and len(err.strip().splitlines()) == 1


def _truncated(folder, budget):
    """Tokenizer, dense teacher, 16 short sentences and the teacher truncated to ``budget``
    (not healed): what the healing tests start from."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    teacher = BertModel.from_pretrained(folder).eval()
    sents = ["the cat sat", "a dog ran", "the big red dog", "a cat is red"] * 4
    student = compress_model(copy.deepcopy(teacher), tok, sents,
                             CompressionConfig(default_targets(teacher), budget=budget,
                                               heal=None),
                             progress=False).model
    return tok, teacher, sents, student


def test_heal_names_a_corrupt_state_and_refuses_other_settings(tmp_path, model_dir):  # noqa: F811
    tok, teacher, sents, student = _truncated(model_dir, 0.5)
    d = tmp_path / "h"

    def cfg(**kw):
        return HealConfig(**dict(dict(steps=2, batch_size=4, warmup=1, checkpoint_dir=str(d)),
                                 **kw))

    heal(copy.deepcopy(student), teacher, tok, sents, cfg(), progress=False)
    with pytest.raises(ValueError, match="other settings.*lr: 0.0003 there, 0.001 now"):
        heal(copy.deepcopy(student), teacher, tok, sents, cfg(lr=1e-3), progress=False)
    res = heal(copy.deepcopy(student), teacher, tok, sents, cfg(), progress=False)
    assert res.resumed_from == 2  # the same settings: resumed (nothing left to do)
    (d / "heal_state.json").write_text(json.dumps({"step": 10**9, "losses": []}))
    with pytest.raises(ValueError, match=re.escape(str(d / "heal_state.json"))):
        heal(copy.deepcopy(student), teacher, tok, sents, cfg(), progress=False)


# ------------------------------------------------------------------ healing that blows up
def test_a_blow_up_restores_the_best_student_and_names_the_checkpoint(
        model_dir, tmp_path, monkeypatch):  # noqa: F811
    tok, teacher, sents, student = _truncated(model_dir, 0.25)
    real, states, losses = distill._loss, [], []

    def blowing_up(student, teacher, batch, cfg, positions=()):  # x 1e6 from the 6th step on
        states.append({k: v.detach().clone() for k, v in student.state_dict().items()})
        loss = real(student, teacher, batch, cfg, positions) * (1e6 if len(states) >= 6 else 1)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(distill, "_loss", blowing_up)
    d = tmp_path / "ckpt"
    cfg = HealConfig(steps=20, lr=1e-3, warmup=1, batch_size=4, checkpoint_dir=str(d),
                     checkpoint_every=4)
    with pytest.raises(FloatingPointError) as err:
        heal(student, teacher, tok, sents, cfg, progress=False)
    msg = str(err.value)
    best = min(range(len(losses)), key=losses.__getitem__)
    assert f"after step {best} " in msg and "diverged at step 6 of 20" in msg
    for k, v in student.state_dict().items():
        assert torch.equal(v, states[best][k]), k
    assert f"{d / 'heal_state.json'} holds this run's checkpoint of step 4" in msg
    assert read_heal_state(d)["step"] == 4  # the file the message names exists, at step 4
    # off: the same run goes on
    states.clear()
    losses.clear()
    res = heal(copy.deepcopy(student), teacher, tok, sents,
               HealConfig(steps=8, lr=1e-3, warmup=1, batch_size=4, max_loss_ratio=0),
               progress=False)
    assert res.steps == 8


def test_a_non_finite_loss_names_no_checkpoint_that_does_not_exist(model_dir, tmp_path):  # noqa: F811
    tok, teacher, sents, student = _truncated(model_dir, 0.25)
    d = tmp_path / "ckpt"
    with pytest.raises(FloatingPointError, match="no checkpoint was written"):
        heal(student, teacher, tok, sents, HealConfig(steps=5, lr=1e30, warmup=1, batch_size=4,
                                                      checkpoint_dir=str(d)), progress=False)
    assert not (d / "heal_state.json").exists()


def test_cli_healing_that_blows_up_exits_1_and_saves_nothing(model_dir, text_file,  # noqa: F811
                                                             tmp_path, capsys):
    out = tmp_path / "out"
    assert main(compress(model_dir, text_file, "--allocation", "uniform", "--heal-steps",
                         "40", "--lr", "10", "--out", str(out))) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tnlm: error: healing diverged")
    assert "nothing was saved as a model" in err and "lower lr (now 10)" in err
    assert not (out / "mpo_config.json").exists()
    for named in re.findall(r"(\S+heal_state\.json) holds", err):
        assert read_heal_state(named.rsplit("/", 1)[0])  # a named checkpoint exists
    if "no checkpoint was written" in err:
        assert not (out / "healing").exists()


# ------------------------------------------------------------------ inputs, before any work
@pytest.fixture
def no_model_loading(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", boom)


def write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case, message", [
    ("short", "has 3 distinct sentences: at least 4 are needed"),
    ("nul", "holds a NUL byte at byte offset 15 (line 2): a binary file"),
    ("latin1", "is not UTF-8: byte 0xe9 at byte offset 16 (line 2) is invalid"),
    ("dir", "is a directory, not a file"),
    ("column", "--text-column: column 5 is out of range: line 1 of"),
    ("calibration", "--calibration must be >= 1"),
    ("sick", "is not a SICK file (needs sentence_A"),
    ("sick-binary", "is not a SICK file (not UTF-8"),
    ("sick-score", "is not a SICK file: line 3 lacks"),
    ("out-file", "is a file, not a folder"),
    ("lr", "--lr must be a finite number > 0"),
    ("resume", "--resume continues the healing saved in --out DIR"),
])
def test_bad_inputs_fail_before_the_model_is_loaded(model_dir, text_file, tmp_path, capsys,  # noqa: F811
                                                    no_model_loading, case, message):
    text, extra = text_file, []
    if case == "short":
        text = write(tmp_path / "t.txt", b"one two\nthree four\nfive six\n")
    elif case == "nul":
        text = write(tmp_path / "t.bin", b"a fine line.\nab\x00cd\n")
    elif case == "latin1":
        text = write(tmp_path / "t.txt", "a fine line.\ncaf\u00e9 au lait\n".encode("latin-1"))
    elif case == "dir":
        text = tmp_path
    elif case == "column":
        extra = ["--text-column", "5"]
    elif case == "calibration":
        extra = ["--calibration", "0"]
    elif case.startswith("sick"):
        sick = {"sick": b"just a sentence\n",
                "sick-binary": b"\xff\xfe\x00\x01sentence_A",
                "sick-score": b"sentence_A\tsentence_B\trelatedness_score\na\tb\t4.5\nc\td\tx\n",
                }[case]
        extra = ["--sick", str(write(tmp_path / "sick.tsv", sick))]
    elif case == "out-file":
        extra = ["--out", str(write(tmp_path / "f", b"") / "sub")]
    elif case == "lr":
        extra = ["--lr", "nan"]
    elif case == "resume":
        extra = ["--resume", "--out", ""]
    argv = ["compress", str(model_dir), "--text", str(text), *FAST, *extra]
    if "--out" not in extra:
        argv += ["--out", str(tmp_path / "never")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    if case in ("nul", "latin1", "dir", "short"):
        assert str(text) in err  # the file is named
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="/proc refuses new folders, even to root")
def test_an_out_that_cannot_be_created_fails_before_the_model_is_loaded(
        model_dir, text_file, capsys, no_model_loading):  # noqa: F811
    assert main(compress(model_dir, text_file, "--out", "/proc/tnlm-cannot/out")) == 2
    assert "--out /proc/tnlm-cannot/out cannot be written" in capsys.readouterr().err


def test_report_modules_must_be_positive(tmp_path, capsys):
    for bad in ("-1", "0"):
        assert main(["report", "--modules", bad, "--out", str(tmp_path / "figs")]) == 2
        assert "--modules must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()


def test_report_on_a_lightweight_checkpoint_names_what_it_lacks(tmp_path, capsys):
    """A lightweight task checkpoint keeps its central cores in its base model: refused
    in one line naming that, before any figure folder is made."""
    from transformers import BertConfig

    from tnlm.integration import MPOConfig, get_mpo_model

    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)).eval()
    model = get_mpo_model(base, MPOConfig(target_modules=["query"], n_sites=3),
                          progress=False)
    model.save_pretrained(tmp_path / "light", lightweight=True)
    assert main(["report", str(tmp_path / "light"), "--out", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err
    assert "is a lightweight task checkpoint: its central cores are kept in its base" in err
    assert not (tmp_path / "figs").exists()


# ------------------------------------------------------------------ explicit site shapes
def test_explicit_shapes_keep_the_padding_limit():
    import numpy as np

    from tnlm import MPOLinear
    from tnlm.core.spec import DecompositionSpec
    from tnlm.integration import MPOConfig, get_mpo_model

    big = (1024, 1024, 1024)
    msg = r"in_shape=\(1024, 1024, 1024\) has product 1073741824, more than 16x I=32"
    with pytest.raises(ValueError, match=msg):
        DecompositionSpec(in_shape=big, out_shape=big, pad=True).decompose(np.ones((32, 32)))
    with pytest.raises(ValueError, match=msg):
        MPOLinear.from_linear(torch.nn.Linear(32, 32), in_shape=big, out_shape=big, pad=True)
    model = BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32,
                                              num_hidden_layers=1, num_attention_heads=4,
                                              intermediate_size=64))
    cfg = MPOConfig(target_modules=["query"], pad=True,
                    overrides={"query": dict(in_shape=big, out_shape=(4, 4, 2))})
    with pytest.raises(ValueError, match=msg):
        get_mpo_model(model, cfg, progress=False)
    # 16x is allowed: 32 -> 512 rows
    spec = DecompositionSpec(in_shape=(8, 8, 8), out_shape=(2, 4, 4), pad=True)
    W = np.random.default_rng(0).standard_normal((32, 32))
    assert math.isclose(float(np.abs(spec.decompose(W).to_matrix() - W).max()), 0, abs_tol=1e-9)


# ------------------------------------------------------------------ the table in the docs
def test_reliability_table_counts():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "reliability.md").read_text()
    section = doc.split("## The command line: `tnlm compress`")[1].split("\n## ")[0]
    table = [r for r in section.splitlines() if r.startswith("|")]
    # one header (and its rule) first; a header row pasted inside the table is an error,
    # not a row to skip
    assert table[0].startswith("| case ") and table[1].startswith("|---"), table[:2]
    rows = table[2:]
    stray = [r for r in rows if r.startswith(("| case ", "|---"))]
    assert not stray, f"header rows inside the table: {stray}"
    assert len(rows) >= 30
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(
        p.read_text() for p in (root / "tests").glob("test_*.py")), re.M))
    bad = {"silent wrong", "data lost", "hangs", "late error"}
    counts = dict.fromkeys(bad, 0)
    for row in rows:
        case, now, outcome, tests = (c.strip() for c in row.strip("|").split(" | "))
        assert outcome in {"clear error", "correct result", "notice", "stopped",
                           "recovered"} | bad, row
        counts[outcome] = counts.get(outcome, 0) + 1
        names = [n.split("[")[0] for n in re.findall(r"`(test_[^`]+)`", tests)]
        assert names and set(names) <= defined, row
    m = re.search(r"silent wrong: (\d+) · data lost: (\d+) · hangs: (\d+) · late errors: "
                  r"(\d+)", section)
    assert m and [int(g) for g in m.groups()] == [counts[k] for k in (
        "silent wrong", "data lost", "hangs", "late error")] == [0, 0, 0, 0]


def test_a_sharded_model_folder_is_a_model_folder(tmp_path):
    """``tnlm compress`` refused a sharded folder (``model-0000N-of-0000M.safetensors`` and
    their index) as holding "no model.safetensors", which ``tnlm eval`` and
    ``AutoModel.from_pretrained`` load."""
    from tnlm.cli.common import UserError, model_path

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64)
    d = tmp_path / "sharded"
    BertModel(cfg).save_pretrained(d, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file()
    assert not (d / "model.safetensors").exists()
    assert model_path(str(d)) == d
    (d / "model.safetensors.index.json").unlink()
    for shard in d.glob("model-*.safetensors"):
        shard.unlink()
    with pytest.raises(UserError, match=r"holds no model weights \(one of model\.safetensors"):
        model_path(str(d))
