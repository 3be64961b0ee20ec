"""``tnlm eval``: a saved model's perplexity (causal LMs) or embedding cosine (encoders)
against a reference, the same numbers the compress job reports; one-line errors before any
model is loaded."""

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel

from tests.common import (  # noqa: F401 - one_thread: autouse, one intra-op thread
    make_bert_tokenizer,
    one_thread,
    save_llm_folder,
)
from tnlm.cli import main


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A tiny Llama folder, a text file, and the folder ``tnlm compress`` wrote from them
    with its JSON summary."""
    from tnlm.cli.__init__ import main as run

    d = tmp_path_factory.mktemp("eval")
    folder, text = save_llm_folder(d)
    out = d / "out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert run(["compress", str(folder), "--budget", "0.5", "--heal-steps", "3", "--text",
                    str(text), "--out", str(out), "--json", "--quiet"]) == 0
    return folder, text, out, json.loads(buf.getvalue())


def _eval(capsys, *argv):
    rc = main(["eval", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def test_eval_gives_the_perplexities_the_compress_job_reported(llm, capsys):
    """The saved model scored alone, from its folder, on the job's default text: the job's
    compressed and dense perplexities (the same windows), and their ratio."""
    folder, _, out, summary = llm
    got = _eval(capsys, out, "--reference", folder)
    assert got["kind"] == "causal LM" and got["tokens"] == summary["eval_tokens"]
    assert got["perplexity"] == pytest.approx(summary["perplexity"], rel=1e-5)
    assert got["reference_perplexity"] == pytest.approx(summary["perplexity_dense"], rel=1e-5)
    assert got["perplexity_ratio"] == pytest.approx(summary["perplexity_ratio"], rel=1e-5)
    assert got["perplexity_ratio"] != pytest.approx(1.0, abs=1e-4)  # it was compressed


def test_eval_on_a_text_file_with_overlapping_windows_and_answers(llm, capsys):
    """``--text`` and ``--stride`` < ``--max-length``: every token after the first scored
    once; the model against itself has ratio 1 and all its answers identical."""
    from tnlm.compress.decoder.quality import perplexity
    from tnlm.integration.loading import load_pretrained

    folder, text, _, _ = llm
    got = _eval(capsys, folder, "--reference", folder, "--text", text, "--max-length", 32,
                "--stride", 8, "--answers")
    model, tok = load_pretrained(folder)
    want = perplexity(model, tok, text.read_text().strip("\n"), max_length=32, stride=8)
    assert got["perplexity"] == pytest.approx(want.ppl, rel=1e-6)
    assert got["tokens"] == want.n_tokens == len(tok(text.read_text().strip("\n"))["input_ids"]) - 1
    assert got["perplexity_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert got["questions"] == 50 and got["identical_answers"] == 50
    assert got["right_answers"] == got["reference_right_answers"]


def test_eval_prints_one_line_a_measure(llm, capsys):
    folder, text, out, _ = llm
    assert main(["eval", str(out), "--reference", str(folder), "--text", str(text)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("perplexity on ") and f"of {text} (windows of 256" in lines[0]
    assert lines[1].startswith(f"reference {folder}: ") and lines[1].endswith("x")


def test_eval_of_an_encoder_is_the_embedding_cosine(tmp_path, capsys):
    d = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)).save_pretrained(d)
    make_bert_tokenizer(tmp_path).save_pretrained(d)
    other = tmp_path / "bert2"
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)).save_pretrained(other)
    make_bert_tokenizer(tmp_path).save_pretrained(other)
    text = tmp_path / "s.txt"
    text.write_text("the cat is red.\n\nthe dog of the cat.\n  \na big mat\n")
    same = _eval(capsys, d, "--reference", d, "--text", text)
    diff = _eval(capsys, other, "--reference", d, "--text", text)
    assert same["kind"] == "encoder" and same["sentences"] == 3  # blank lines are not
    assert same["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert diff["cosine_min"] <= diff["cosine_mean"] < 0.999
    assert main(["eval", str(d), "--text", str(text)]) == 2
    assert "is an encoder: it has no perplexity; pass --reference" in capsys.readouterr().err
    assert main(["eval", str(d), "--reference", str(d), "--answers"]) == 2
    assert "--answers applies to causal LMs" in capsys.readouterr().err
    assert main(["eval", str(d), "--reference", str(d), "--stride", "64"]) == 2
    assert "--stride applies to causal LMs" in capsys.readouterr().err
    # the reference reads the lines into other tokens: not comparable, refused
    from transformers import BertTokenizerFast

    shuffled = tmp_path / "bert3"
    shutil.copytree(other, shuffled)
    for f in shuffled.glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    vocab = (tmp_path / "vocab.txt").read_text().splitlines()  # make_bert_tokenizer's
    vocab[5:31] = vocab[5:31][::-1]  # the letters a..z reversed
    (tmp_path / "reversed.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab=str(tmp_path / "reversed.txt")).save_pretrained(shuffled)
    assert main(["eval", str(d), "--reference", str(shuffled), "--text", str(text)]) == 2
    assert "cut the text into different tokens: their embeddings of it are not comparable" \
        in capsys.readouterr().err


def test_eval_goes_by_the_class_a_checkpoint_was_saved_from(tmp_path, capsys):
    """A causal LM of a type tnlm has no entry for, saved through the Python API, is
    scored by perplexity; a Llama saved without its head is refused (no perplexity)."""
    from transformers import AutoModel, GPTNeoXConfig, GPTNeoXForCausalLM

    from tests.common import make_word_tokenizer
    from tnlm.integration import MPOConfig, get_mpo_model

    cfg = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    neox = get_mpo_model(GPTNeoXForCausalLM(cfg).eval(), MPOConfig(
        target_modules=["dense_h_to_4h"], max_bond=4, n_sites=2), progress=False)
    d = tmp_path / "neox"
    neox.save_pretrained(d)
    neox.base_model.config.save_pretrained(d)
    make_word_tokenizer().save_pretrained(d)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat . " * 20)
    got = _eval(capsys, d, "--text", text)
    assert got["kind"] == "causal LM" and got["perplexity"] > 1
    from tests.common import make_causal_lm

    headless = AutoModel.from_config(make_causal_lm("llama").config)
    h = tmp_path / "headless"
    get_mpo_model(headless, MPOConfig(target_modules=["q_proj"], max_bond=4, n_sites=2),
                  progress=False).save_pretrained(h)
    headless.config.save_pretrained(h)
    make_word_tokenizer().save_pretrained(h)
    assert main(["eval", str(h), "--text", str(text)]) == 2
    assert "holds a LlamaModel: a llama model without its language-model head has no " \
        "perplexity" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "MODEL {missing} does not exist"),
    (["{llm}", "--max-length", "1"], "--max-length must be an int >= 2, got 1"),
    (["{llm}", "--stride", "0"], "--stride must be an int >= 1, got 0"),
    (["{llm}", "--max-length", "16", "--stride", "32"],
     "--stride must be at most --max-length (16), got 32"),
    (["{llm}", "--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
    (["{llm}", "--text", "{empty}"], "--text {empty} is empty"),
    (["{llm}", "--text", "{binary}"], "--text {binary} cannot be read as UTF-8 text"),
    (["{llm}", "--text", "{missing}"], "--text {missing} cannot be read as UTF-8 text"),
    (["{llm}", "--reference", "{bert}"],
     "--reference {bert} is an encoder but MODEL {llm} is a causal LM"),
    (["{notamodel}"], "MODEL: model folder {notamodel} has no config.json"),
    (["{llm}", "--reference", "{othertok}"], "cut the text into different tokens"),
])
def test_eval_refuses_bad_input_in_one_line(llm, tmp_path, capsys, monkeypatch, argv, message):
    import tnlm.cli.evaluate as ev

    folder, text, _, _ = llm
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=64)).save_pretrained(bert)
    othertok = tmp_path / "othertok"  # the same weights, another tokenizer
    shutil.copytree(folder, othertok)
    for f in othertok.glob("tokenizer*"):
        f.unlink()
    make_bert_tokenizer(tmp_path).save_pretrained(othertok)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "notamodel").mkdir()
    names = dict(missing=tmp_path / "missing", llm=folder, bert=bert, othertok=othertok,
                 empty=tmp_path / "empty.txt", binary=tmp_path / "binary.txt",
                 notamodel=tmp_path / "notamodel")
    loads = []
    real = ev._load
    monkeypatch.setattr(ev, "_load", lambda *a: loads.append(a) or real(*a))
    argv = [a.format(**names) for a in argv]
    if "--text" not in argv:
        argv += ["--text", str(text)]
    capsys.readouterr()  # the setup's progress bars
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tnlm: error: ") and message.format(**names) in err
    assert len(err.strip().splitlines()) == 1
    assert loads == []  # refused before any model was loaded


def test_eval_checks_windows_and_widths_against_the_loaded_models(tmp_path, capsys):
    """Windows beyond a learned table of positions (GPT-2's) were an IndexError, encoders
    of two widths a size mismatch; rotary positions (Llama) have no limit; an encoder
    with fewer than 128 positions truncates to them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.common import make_causal_lm, make_word_tokenizer

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(make_word_tokenizer()), n_positions=32,
                               n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt2)
    make_word_tokenizer().save_pretrained(gpt2)
    llama = tmp_path / "llama"
    m = make_causal_lm("llama")
    m.config.max_position_embeddings = 32  # rotary: not a limit
    m.save_pretrained(llama)
    make_word_tokenizer().save_pretrained(llama)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the cat sat on the mat ."] * 20))
    assert main(["eval", str(gpt2), "--text", str(text), "--max-length", "64", "--stride",
                 "64"]) == 2
    assert f"--max-length 64 exceeds the 32 positions of MODEL {gpt2}; give at most 32" \
        in capsys.readouterr().err
    assert _eval(capsys, gpt2, "--text", text, "--max-length", "32", "--stride",
                 "32")["tokens"] > 64
    assert _eval(capsys, llama, "--text", text, "--max-length", "64", "--stride",
                 "64")["perplexity"] > 0

    def bert(name, hidden, positions=512):
        d = tmp_path / name
        BertModel(BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=positions)).save_pretrained(d)
        make_bert_tokenizer(tmp_path).save_pretrained(d)
        return d

    lines = tmp_path / "long.txt"
    lines.write_text("the cat is on the mat and the dog is of the day\n" * 3)
    assert main(["eval", str(bert("wide", 48)), "--reference", str(bert("narrow", 32)),
                 "--text", str(lines)]) == 2
    assert "MODEL's embeddings have 48 dimensions and --reference" in capsys.readouterr().err
    short = bert("short", 32, positions=16)  # each line is over 40 character tokens
    same = _eval(capsys, short, "--reference", short, "--text", lines)
    assert same["sentences"] == 3 and same["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
