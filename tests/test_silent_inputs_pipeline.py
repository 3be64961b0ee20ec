"""Inputs of the encoder pipeline (compress_model, compress_encoder, its measures and
text) that were once taken silently (a wrong result, a setting ignored) or failed late:
each is now refused before any work, naming the argument, or handled."""

import inspect
import math

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from tests.common import (  # noqa: F401 - one_thread: autouse, one intra-op thread
    make_bert_tokenizer,
    one_thread,
    short_sentences,
)
from tnlm.compress import pipeline
from tnlm.compress.distill import HealConfig
from tnlm.compress.encoder import EncoderRecipe, compress_encoder, measure, split_text
from tnlm.compress.pipeline import CompressionConfig, compress_model
from tnlm.compress.quality import embed, embedding_cosine, spearman
from tnlm.compress.text import read_sentences

FAST = dict(budget=0.5, allocation="uniform", reconstruct_steps=2, heal_steps=3,
            calibration=16)


def tiny_bert(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64)
    return BertModel(BertConfig(**{**cfg, **kw})).eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_bert_tokenizer(tmp_path_factory.mktemp("vocab"))


def snapshot(model):
    return dict(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                types={n: type(m) for n, m in model.named_modules()},
                grad={n: p.requires_grad for n, p in model.named_parameters()},
                training={n: m.training for n, m in model.named_modules()})


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"] and after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def test_compress_model_refuses_a_target_tied_to_the_word_embeddings(tok):
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64)).eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    before = snapshot(model)
    cfg = CompressionConfig(["query", "decoder"], budget=0.5, heal=None)
    with pytest.raises(ValueError, match=r"'cls\.predictions\.decoder', which shares its "
                                         r"weight with \['bert\.embeddings\.word_embeddings'\]"
                                         r".*target_modules"):
        compress_model(model, tok, short_sentences(24), cfg, progress=False)
    assert_unchanged(model, before)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    # the untied targets alone still compress
    res = compress_model(model, tok, short_sentences(24),
                         CompressionConfig(["query"], budget=0.5, heal=None), progress=False)
    assert res.params_after < res.params_before


def test_compress_encoder_checks_what_it_measures_up_front_and_restores_the_model(
        tok, tmp_path, monkeypatch):
    text = short_sentences(48)
    log = []
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="no_such.tsv"):
        compress_encoder(model, tok, EncoderRecipe(**FAST), text=text,
                         sick=tmp_path / "no_such.tsv", progress=False, log=log.append)
    not_sick = tmp_path / "not_sick.tsv"
    not_sick.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="sick_train: .*not a SICK file"):
        compress_encoder(model, tok, EncoderRecipe(**FAST), text=text, sick_train=not_sick,
                         progress=False, log=log.append)
    assert log == []  # nothing calibrated, truncated or healed
    assert_unchanged(model, before)
    # fewer positions than the measured sentences' tokens: refused before the work
    short = tiny_bert(max_position_embeddings=96)
    before_short = snapshot(short)
    with pytest.raises(ValueError, match="cannot embed the sentences the job measures on"):
        compress_encoder(short, tok, EncoderRecipe(**FAST), text=text, progress=False,
                         log=log.append)
    assert log == []
    assert_unchanged(short, before_short)
    # a failure in the final measures leaves the model as it came in

    def broken(*args, **kwargs):
        raise RuntimeError("measure failed")

    monkeypatch.setattr("tnlm.compress.encoder.measure", broken)
    with pytest.raises(RuntimeError, match="measure failed"):
        compress_encoder(model, tok, EncoderRecipe(**FAST), text=text, progress=False,
                         log=log.append)
    assert log  # the work was done, then undone
    assert_unchanged(model, before)


def test_compress_encoder_refuses_an_mpo_model_first(tok):
    from tnlm.integration import MPOConfig, get_mpo_model

    mpo = get_mpo_model(tiny_bert(), MPOConfig(target_modules=["query"], n_sites=2),
                        progress=False)
    with pytest.raises(ValueError, match="model is already an MPOModel; compress the "
                                         "original model"):
        compress_encoder(mpo, tok, EncoderRecipe(budget=0.5), progress=False)


def test_embeddings_and_measures_run_a_train_mode_model_without_dropout(tok):
    text = short_sentences(48)
    m = tiny_bert(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3).train()
    cos = embedding_cosine(m, m, tok, text[:16])
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert all(x.training for x in m.modules())  # the caller's mode is put back
    # budget 1 and no healing: the student is the teacher, bit for bit
    res = compress_encoder(m, tok, EncoderRecipe(budget=1.0, allocation="uniform",
                                                 reconstruct_steps=0, heal_steps=0,
                                                 calibration=16), text=text, progress=False)
    assert res.measures["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert res.measures["cosine_natural_min"] == pytest.approx(1.0, abs=1e-5)


def test_embed_and_measure_refuse_one_string_for_their_sentences(tok):
    a, b = tiny_bert(0), tiny_bert(1)
    s = "the cat sat on the mat."
    with pytest.raises(TypeError, match="sentences must be a sequence of strings"):
        embed(a, tok, s)
    with pytest.raises(TypeError, match="sentences must be a sequence of strings"):
        embedding_cosine(a, b, tok, s)
    pair = ["the cat sat.", "a dog ran."]
    for kw, name in ((dict(held_out=s), "held_out"), (dict(held_out=pair, dev=s), "dev"),
                     (dict(held_out=pair, natural=s), "natural")):
        with pytest.raises(TypeError, match=f"{name} must be a sequence of strings"):
            measure(a, b, tok, **kw)
    assert embed(a, tok, [s]).shape == (1, 32)


def test_spearman_averages_tied_ranks_and_is_nan_when_undefined():
    rng = np.random.default_rng(0)
    gold = rng.integers(1, 6, 200).astype(float)  # 5 distinct values: heavily tied
    cos = gold + rng.normal(0, 1.5, 200)
    rho = spearman(cos, gold)
    order = rng.permutation(200)
    assert spearman(cos[order], gold[order]) == pytest.approx(rho, abs=1e-12)
    assert spearman(cos[::-1], gold[::-1]) == pytest.approx(rho, abs=1e-12)
    # the Pearson correlation of average ranks (scipy.stats.spearmanr's definition)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([0.5] * 5, [1, 2, 3, 4, 5]))
    assert math.isnan(spearman([0.1, float("nan"), 0.3], [1, 2, 3]))
    assert math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="a and b must be 1-D sequences of one length"):
        spearman([1, 2, 3], [1, 2])


def test_read_sentences_splits_lines_at_newlines_only(tmp_path):
    p = tmp_path / "u2028.txt"
    p.write_text("The first sentence\u2028continues here.\r\nA second\x85line.\nThird\x0cline.\n",
                 encoding="utf-8", newline="")
    assert read_sentences(p) == ["The first sentence\u2028continues here.", "A second\x85line.",
                                 "Third\x0cline."]
    cr = tmp_path / "mac.txt"  # a lone CR ends a line, as universal newlines read it
    cr.write_bytes(b"one line\rtwo lines\r\rthree\r")
    assert read_sentences(cr) == ["one line", "two lines", "three"]
    bad = tmp_path / "bad.txt"  # an invalid byte is named on its line, whatever the ends
    bad.write_bytes(b"one\rtwo\r\nthree \xff\n")
    with pytest.raises(ValueError, match=r"\(line 3\) is invalid"):
        read_sentences(bad)
    t = tmp_path / "u2028.tsv"
    t.write_text("1\tgood row\n2\tanother\u2028row\nthird row without a tab\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3 of .* has 1 tab-separated column"):
        read_sentences(t, column=1)


def test_compress_model_batch_size_and_max_length_reach_block_reconstruction(tok, monkeypatch):
    seen = {}
    real = pipeline.reconstruct_blocks

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "reconstruct_blocks", spy)
    cfg = CompressionConfig(["query"], budget=0.5, reconstruct_steps=1,
                            heal=HealConfig(steps=0))
    compress_model(tiny_bert(), tok, short_sentences(24), cfg, batch_size=4, max_length=16,
                   progress=False)
    assert (seen.get("batch_size"), seen.get("max_length")) == (4, 16)
    # compress_model's defaults are reconstruction's own: the default path is unchanged
    seen.clear()
    compress_model(tiny_bert(), tok, short_sentences(24), cfg, progress=False)
    own = inspect.signature(real).parameters
    assert (seen["batch_size"], seen["max_length"]) == (own["batch_size"].default,
                                                        own["max_length"].default)


@pytest.mark.parametrize("calibration", [True, 2.5, "8", 0, -3])
def test_split_text_refuses_a_calibration_that_is_not_an_int_of_at_least_1(calibration):
    text = short_sentences(40)
    with pytest.raises(ValueError, match=r"calibration must be an int >= 1 \(sentences\), got"):
        split_text(text, calibration=calibration)
    assert len(split_text(text, calibration=8).calibration) == 8
