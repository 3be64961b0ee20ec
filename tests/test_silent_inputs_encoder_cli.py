# ruff: noqa: F811  (pytest fixtures imported from other test modules, used as arguments)
"""Inputs of ``tnlm compress`` / ``tnlm eval`` on an encoder and of the encoder pipeline
(compress_model, reconstruct_blocks, the quality measures) that were once taken silently
(a head dropped, a user's file deleted, a flag ignored, an error misreported) or failed
late: each is now refused up front naming the argument, or reported as measured. Tiny
random-init BERTs (hidden 32, 2 layers), a few seconds each."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertForMaskedLM, BertForSequenceClassification, BertTokenizerFast

from tests.common import one_thread, short_sentences  # noqa: F401 - one_thread: autouse
from tnlm.bridge import weight_xw
from tnlm.cli import main
from tnlm.compress import pipeline
from tnlm.compress.allocate import rank_params
from tnlm.compress.calibration import collect_input_stats
from tnlm.compress.data_aware import output_error
from tnlm.compress.pipeline import CompressionConfig, compress_model
from tnlm.compress.quality import embed, read_sick
from tnlm.compress.reconstruct import reconstruct_blocks
from tnlm.export.replace import _carried
from tnlm.integration import MPOConfig, get_mpo_model
from tnlm.integration.io import WEIGHTS_NAME

from .test_cli import model_dir, text_file  # noqa: F401  (fixtures)
from .test_silent_inputs_pipeline import assert_unchanged, snapshot, tiny_bert, tok  # noqa: F401

FAST = ["--calibration", "16", "--sick", "", "--quiet", "--reconstruct-steps", "0",
        "--heal-steps", "0"]
ALL = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]


def _task_folder(model_dir, tmp_path, cls, name):
    d = tmp_path / name
    torch.manual_seed(1)
    cfg = BertForSequenceClassification.config_class.from_pretrained(model_dir)
    cfg.num_labels = 3
    cls(cfg).save_pretrained(d)
    BertTokenizerFast.from_pretrained(model_dir).save_pretrained(d)
    return d


# 1 ----------------------------------------------------------------------------------------
def test_compress_refuses_an_encoder_with_a_task_head_before_loading(
        model_dir, text_file, tmp_path, capsys):
    cls = _task_folder(model_dir, tmp_path, BertForSequenceClassification, "cls")
    out = tmp_path / "out"
    capsys.readouterr()  # save_pretrained's progress bars
    assert main(["compress", str(cls), "--text", str(text_file), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "BertForSequenceClassification" in err and "task head" in err
    assert "bare encoder" in err and "*ForMaskedLM" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    # a pre-training checkpoint is still an encoder to make an embedding model of
    mlm = _task_folder(model_dir, tmp_path, BertForMaskedLM, "mlm")
    assert main(["compress", str(mlm), "--text", str(text_file), "--out", "", "--json",
                 *FAST]) == 0
    assert json.loads(capsys.readouterr().out)["ratio"] <= 0.5


# 2 ----------------------------------------------------------------------------------------
def test_a_rerun_into_out_keeps_the_users_own_safetensors(model_dir, text_file,
                                                         tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", str(model_dir), "--text", str(text_file), "--out", str(out), *FAST]
    assert main(argv) == 0
    (old,) = [p.name for p in out.iterdir() if WEIGHTS_NAME.fullmatch(p.name)]
    for name in ("mpo_model-best.safetensors", "my_probe_head.safetensors",
                 "model.safetensors"):  # the last: a dense export's weights
        save_file({"w": torch.ones(3)}, str(out / name))
    assert main([*argv, "--budget", "0.4"]) == 0
    capsys.readouterr()
    names = {p.name for p in out.iterdir()}
    assert {"mpo_model-best.safetensors", "my_probe_head.safetensors"} <= names
    assert "model.safetensors" not in names and old not in names
    weights = [n for n in names if WEIGHTS_NAME.fullmatch(n)]
    assert weights == [json.loads((out / "mpo_config.json").read_text())["weights"]]
    # the file an earlier mpo_config.json names goes, whatever its name
    assert not _carried("renamed.safetensors", (), "renamed.safetensors")
    assert _carried("renamed.safetensors", (), None)


# 3 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pivoted", [False, True])
def test_greedy_keeps_a_layer_dense_rather_than_an_mpo_as_large(tok, pivoted):
    model = tiny_bert()
    res = compress_model(model, tok, short_sentences(64),
                         CompressionConfig(ALL, budget=0.9, allocation="greedy", heal=None,
                                           pivoted=pivoted), progress=False)
    assert res.ratio <= 0.9
    for n, r in res.ranks.items():
        if r is not None:
            I, J = weight_xw(tiny_bert().get_submodule(n)).shape
            assert rank_params(I, J, r, pivoted=pivoted) < I * J, (n, r)
    if not pivoted:  # the budget is spent on dense layers (pivoted: rank 31 of 32 is smaller)
        assert any(r is None for r in res.ranks.values())


# 4 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", ["", ",", "query,", " "])
def test_compress_refuses_empty_targets(model_dir, text_file, capsys, targets):
    assert main(["compress", str(model_dir), "--text", str(text_file), "--out", "",
                 "--targets", targets, *FAST]) == 2
    err = capsys.readouterr().err
    assert "--targets" in err and "empty module pattern" in err


# 5 ----------------------------------------------------------------------------------------
def test_plain_svd_reports_the_calibration_output_error_and_sequential_needs_whiten(
        tok):
    with pytest.raises(ValueError, match="sequential=True needs whiten=True"):
        CompressionConfig(ALL, sequential=True, whiten=False)
    original = tiny_bert()
    model = tiny_bert()
    cal = short_sentences(48)
    res = compress_model(model, tok, cal, CompressionConfig(["intermediate.dense"],
                                                            budget=0.3, whiten=False,
                                                            heal=None), progress=False)
    batches = [dict(tok(cal[i:i + 32], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")) for i in range(0, len(cal), 32)]
    stats = collect_input_stats(original, batches, list(res.ranks))
    report = {r["name"]: r["truncation_error"] for r in res.model.compression_report()}
    for n, err in res.errors.items():
        W = weight_xw(original.get_submodule(n)).double()
        Wa = model.get_submodule(n).dense_matrix(torch.float64).detach()
        assert err == pytest.approx(output_error(W, Wa, stats[n]), rel=1e-6)
        assert report[n] == pytest.approx(err, rel=1e-6)
        weight = float(torch.linalg.norm(W - Wa) / torch.linalg.norm(W))
        assert abs(err - weight) > 1e-3  # was the weight error


# 6 ----------------------------------------------------------------------------------------
def test_block_errors_are_relative_errors_not_squared(tok):
    teacher = tiny_bert()
    student = get_mpo_model(copy.deepcopy(teacher),
                            MPOConfig(target_modules=["intermediate.dense"], n_sites=2,
                                      max_bond=2), progress=False)
    sents = short_sentences(16)
    report = reconstruct_blocks(student, teacher, tok, sents, 0, batch_size=16)
    b = tok(sents, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        y, t = student(**b).last_hidden_state, teacher(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1)
    rel = float((((y - t) ** 2) * m).sum().sqrt() / ((t ** 2) * m).sum().sqrt())
    assert report[-1][1] == pytest.approx(rel, rel=1e-4) and rel > 1e-3  # was rel ** 2


# 7 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, error, match", [
    (dict(sentences="the cat sat."), TypeError, "sentences must be a sequence of strings"),
    (dict(steps_per_block=1.5), TypeError, "steps_per_block must be an int"),
    (dict(steps_per_block=-1), ValueError, "steps_per_block must be >= 0"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(batch_size=2.5), TypeError, "batch_size must be an int"),
    (dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
    (dict(lr=math.nan), ValueError, "lr must be a finite number > 0"),
    (dict(lr=math.inf), ValueError, "lr must be a finite number > 0"),
    (dict(lr="1e-3"), TypeError, "lr must be a number"),
])
def test_reconstruct_blocks_refuses_a_string_and_bad_numbers(tok, kw, error,
                                                             match):
    teacher = tiny_bert()
    student = get_mpo_model(copy.deepcopy(teacher),
                            MPOConfig(target_modules=["intermediate.dense"], n_sites=2,
                                      max_bond=2), progress=False)
    before = snapshot(student)
    args = dict(sentences=short_sentences(8), steps_per_block=2)
    args.update(kw)
    sentences, steps = args.pop("sentences"), args.pop("steps_per_block")
    with pytest.raises(error, match=match):
        reconstruct_blocks(student, teacher, tok, sentences, steps, **args)
    assert_unchanged(student, before)


# 8 ----------------------------------------------------------------------------------------
def test_compress_model_refuses_blank_heal_text_before_any_work(tok, monkeypatch):
    def ran(*a, **k):
        raise AssertionError("calibration ran before heal_text was checked")

    monkeypatch.setattr(pipeline, "collect_input_stats", ran)
    model = tiny_bert()
    before = snapshot(model)
    cfg = CompressionConfig(ALL, budget=0.5, reconstruct_steps=2, heal=None)
    with pytest.raises(ValueError, match="heal_text holds 2 sentence.*all blank"):
        compress_model(model, tok, short_sentences(16), cfg, heal_text=["", "   "],
                       progress=False)
    assert_unchanged(model, before)


# 9 ----------------------------------------------------------------------------------------
def test_eval_reads_an_encoders_lines_as_compress_does_and_refuses_causal_flags(
        model_dir, tmp_path, capsys):
    from tnlm.compress.text import read_sentences

    text = tmp_path / "weird.txt"
    text.write_text("\ufeffthe cat sat.\u2028and then it slept.\nthe dog ran\x0cfast.\r\n"
                    "birds fly.\x85high up.\rend\n", encoding="utf-8")
    assert main(["eval", str(model_dir), "--reference", str(model_dir), "--text", str(text),
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["sentences"] == len(read_sentences(text)) == 4  # was 7 (split at U+2028 ...)
    for flag in ("--max-length", "--stride"):  # even at the causal default value
        assert main(["eval", str(model_dir), "--reference", str(model_dir), flag,
                     "256"]) == 2
        err = capsys.readouterr().err
        assert f"{flag} applies to causal LMs" in err


# 10 ---------------------------------------------------------------------------------------
def test_read_sick_takes_a_bom_and_batch_sizes_must_be_ints(tok, tmp_path):
    sick = tmp_path / "sick.tsv"
    sick.write_bytes(b"\xef\xbb\xbfsentence_A\tsentence_B\trelatedness_score\n"
                     b"a cat sits\ta cat sat\t4.5\na dog runs\tthe sky is blue\t1.2\n")
    rows = read_sick(sick)
    assert [r["sentence_A"] for r in rows] == ["a cat sits", "a dog runs"]
    model = tiny_bert()
    before = snapshot(model)
    cfg = CompressionConfig(["intermediate.dense"], budget=0.3, heal=None)
    for bs, error in ((0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="batch_size must be"):
            compress_model(model, tok, short_sentences(8), cfg, batch_size=bs,
                           progress=False)
        with pytest.raises(error, match="batch_size must be"):
            embed(model, tok, short_sentences(4), batch_size=bs)
    for n, error in ((0, ValueError), (16.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="max_length must be"):  # was run with it silently
            compress_model(model, tok, short_sentences(8), cfg, max_length=n,
                           progress=False)
    assert_unchanged(model, before)


def test_a_files_invalid_byte_is_named_at_its_offset_in_the_file_bom_or_not(tmp_path):
    """read_sick and read_sentences share one decoder: the offset counts the file's bytes,
    a byte-order mark included (Python's own counts from after it)."""
    from tnlm.compress.text import NotUtf8Error, decode_utf8, read_sentences

    body = b"sentence_A\tsentence_B\trelatedness_score\na caf\xe9\tb\t1\n"
    at = body.index(b"\xe9")
    for bom in (b"", b"\xef\xbb\xbf"):
        with pytest.raises(NotUtf8Error) as caught:
            decode_utf8(bom + body)
        assert caught.value.offset == len(bom) + at
        path = tmp_path / "x.tsv"
        path.write_bytes(bom + body)
        with pytest.raises(ValueError, match=f"not a SICK file \\(not UTF-8 text: byte offset "
                                             f"{len(bom) + at}\\)"):
            read_sick(path)
        with pytest.raises(ValueError, match=f"byte 0xe9 at byte offset {len(bom) + at} "):
            read_sentences(path)
    assert decode_utf8(b"\xef\xbb\xbfok") == "ok"
