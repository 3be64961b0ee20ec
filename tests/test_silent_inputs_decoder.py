"""Inputs of the decoder measures, text and sampling, the data-aware truncation and
``tnlm eval`` that were once accepted silently (a string split into characters, a setting
ignored, a wrong number) or failed late: each is now refused before any work, naming the
argument, or handled."""

import math

import pytest
import torch

from tests.common import (  # noqa: F401 - one_thread: autouse, one intra-op thread
    QUESTIONS,
    TEXT,
    make_causal_lm,
    make_word_tokenizer,
    one_thread,
    save_llm_folder,
)
from tnlm.compress.calibration import InputStats
from tnlm.compress.data_aware import WhitenedLayer, output_error, whitening_factor
from tnlm.compress.decoder import job
from tnlm.compress.decoder.heal import CausalHealConfig
from tnlm.compress.decoder.job import CausalLMRecipe, compress_causal_lm
from tnlm.compress.decoder.kl import next_token_kl
from tnlm.compress.decoder.quality import (
    answer_agreement,
    answer_token_agreement,
    greedy_answers,
    natural_eval_text,
    perplexity,
)
from tnlm.compress.decoder.sampling import NucleusSampler
from tnlm.compress.decoder.text import self_generated_text, split_held_out, token_sequences
from tnlm.compress.layerwise import check_targets_and_budget

ONE_STRING = "must be a sequence of strings"


# --- 1, 2: the answer measures ------------------------------------------------------

def test_answer_measures_refuse_one_string():
    m, tok = make_causal_lm("llama"), make_word_tokenizer()
    with pytest.raises(TypeError, match=f"^questions {ONE_STRING}"):
        greedy_answers(m, tok, "what is the capital of france ?")
    with pytest.raises(TypeError, match=f"^a {ONE_STRING}"):
        answer_agreement("paris", "parsi")
    with pytest.raises(TypeError, match=f"^b {ONE_STRING}"):
        answer_agreement(["paris"], "p")
    with pytest.raises(TypeError, match=f"^questions {ONE_STRING}"):
        answer_token_agreement(m, tok, "ab", "cd")
    with pytest.raises(TypeError, match=f"^answers {ONE_STRING}"):
        answer_token_agreement(m, tok, ["the cat ?", "a dog ?"], "cd")
    for bad in (True, 2.5, 0):
        with pytest.raises(ValueError, match="^max_new_tokens must be an int >= 1"):
            greedy_answers(m, tok, ["the cat ?"], max_new_tokens=bad)
    # lists still work
    assert answer_agreement(["Paris"], ["paris"]) == 1.0
    assert len(greedy_answers(m, tok, ["the cat ?"], max_new_tokens=2)) == 1


def test_greedy_answers_are_argmax_whatever_the_generation_config():
    """A repetition penalty (or another logits-changing setting) in the model's
    generation_config is set aside: the answers are the argmax ones, and the dense model
    scores 1.0 on its own answer ids."""
    m, tok = make_causal_lm("llama"), make_word_tokenizer()
    plain, plain_ids = greedy_answers(m, tok, QUESTIONS, max_new_tokens=12, return_ids=True)
    m.generation_config.repetition_penalty = 1.3
    m.generation_config.no_repeat_ngram_size = 2
    answers, ids = greedy_answers(m, tok, QUESTIONS, max_new_tokens=12, return_ids=True)
    assert (answers, ids) == (plain, plain_ids)
    assert answer_token_agreement(m, tok, QUESTIONS, ids) == 1.0


# --- 3, 6: the causal job's recipe ----------------------------------------------------

@pytest.mark.parametrize("source", ["chat", "mixed"])
def test_chat_text_sources_without_a_chat_template_are_refused_before_sampling(
        source, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(job, "self_generated_text",
                        lambda *a, **k: calls.append(k) or ["the cat sat on the mat ."] * a[2])
    m, tok = make_causal_lm("llama"), make_word_tokenizer(chat_template=False)
    recipe = CausalLMRecipe(text_source=source, n_texts=4, gen_tokens=4, seq_len=4,
                            n_calibration=2, sensitivity_sequences=1, prose_fraction=0,
                            heal=CausalHealConfig(steps=0))
    with pytest.raises(ValueError, match=f"^text_source '{source}' .* no chat template"):
        compress_causal_lm(m, tok, recipe, progress=False)
    assert calls == []  # nothing was sampled
    # a resume on the text kept needs no template; text given neither
    (tmp_path / job.TEXT_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a calibration text"):
        compress_causal_lm(m, tok, recipe, progress=False, checkpoint_dir=tmp_path,
                           resume=True)
    assert calls == []


def test_recipe_target_modules_string_is_one_regex_and_an_empty_list_is_refused():
    m = make_causal_lm("llama")
    recipe = CausalLMRecipe(target_modules=r"self_attn\.(q|v)_proj")
    cfg = recipe.layerwise_config(m)
    assert cfg.target_modules == r"self_attn\.(q|v)_proj"  # not split into characters
    check_targets_and_budget(m, cfg)
    assert CausalLMRecipe(target_modules=("q_proj",)).target_modules == ["q_proj"]
    for bad in ([], [3]):
        with pytest.raises(ValueError, match="^target_modules must be a non-empty list"):
            CausalLMRecipe(target_modules=bad)
    with pytest.raises(ValueError, match="^target_modules is not a valid regex"):
        CausalLMRecipe(target_modules="q_proj(")


# --- 4: the natural evaluation text --------------------------------------------------

def test_natural_eval_text_reads_glue_cola_and_an_sst2_file_without_header(tmp_path):
    (tmp_path / "cola").mkdir()
    (tmp_path / "sst2").mkdir()
    cola = tmp_path / "cola" / "dev.tsv"
    cola.write_text("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                    "gj04\t0\t*\tThe more we study verbs, the crazier they get get.\n"
                    "\n"
                    "bc01\t1\t\tThey drank the pub.\n")
    (tmp_path / "sst2" / "dev.tsv").write_text("a fine film . \t1\ndull \t0\n")
    assert natural_eval_text(tmp_path) == [
        "a fine film .\ndull", "The sailors rode the breeze clear of the rocks.\nThey drank "
        "the pub."]
    cola.write_text("the cat sat .\t1\ngj04\t1\t\tThe sailors rode.\n")
    with pytest.raises(ValueError, match=r"dev\.tsv: line 2 has 4 tab-separated columns"):
        natural_eval_text(tmp_path)
    cola.write_text("the cat\tsat .\t1\n")
    with pytest.raises(ValueError, match=r"dev\.tsv: line 1 has 3 tab-separated columns"):
        natural_eval_text(tmp_path)


def test_the_default_folders_unreadable_cola_file_is_left_out_with_a_warning(
        tmp_path, monkeypatch):
    """The folder the caller did not name (../shared/data beside the working directory):
    a CoLA file of another layout is left out, said in a warning, and the other
    documents are still measured; named, it is refused (above)."""
    data = tmp_path / "shared" / "data"
    (data / "cola").mkdir(parents=True)
    (data / "sst2").mkdir()
    (data / "cola" / "dev.tsv").write_text("the cat\tsat .\t1\n")
    (data / "sst2" / "dev.tsv").write_text("a fine film .\t1\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.warns(UserWarning, match="the document is left out"):
        assert natural_eval_text() == ["a fine film ."]
    # any of its files: a Latin-1 SST-2 file (was a bare UnicodeDecodeError naming no file,
    # after the model had loaded) or a SICK file without its columns
    (data / "cola" / "dev.tsv").write_text("the cat sat .\t1\n")
    (data / "sst2" / "dev.tsv").write_bytes("un caf\u00e9 .\t1\n".encode("latin-1"))
    (data / "sick").mkdir()
    (data / "sick" / "trial.tsv").write_text("a\tb\n")
    with pytest.warns(UserWarning) as caught:
        assert natural_eval_text() == ["the cat sat ."]
    said = [str(w.message) for w in caught]
    assert any("sst2/dev.tsv" in m and "left out" in m for m in said), said
    assert any("is not a SICK file" in m and "left out" in m for m in said), said
    with pytest.raises(ValueError, match=r"sst2/dev\.tsv: 'utf-8' codec can't decode"):
        natural_eval_text(data)  # a folder named: refused, naming the file


# --- 5 and the minor ones: the decoder's text -----------------------------------------

@pytest.mark.parametrize("bad", [0, -1, 2.7, True, "2"])
def test_token_sequences_refuses_a_max_sequences_that_is_not_an_int_of_at_least_1(bad):
    tok = make_word_tokenizer()
    texts = ["the cat sat on the mat . " * 10]
    with pytest.raises(ValueError, match="^max_sequences must be None or an int >= 1"):
        token_sequences(tok, texts, 4, max_sequences=bad)
    assert token_sequences(tok, texts, 4, max_sequences=2).shape == (2, 4)
    assert token_sequences(tok, texts, 4).shape == (17, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=-1), "^seed must be an int in"),
    (dict(seed=1.5), "^seed must be an int in"),
    (dict(max_new_tokens=True), "^max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=2.5), "^max_new_tokens must be an int >= 1"),
])
def test_self_generated_text_checks_seed_and_max_new_tokens(kwargs, match):
    with pytest.raises(ValueError, match=match):
        self_generated_text(make_causal_lm("llama"), make_word_tokenizer(), 1, **kwargs)


def test_split_held_out_refuses_a_fraction_that_is_not_a_number():
    with pytest.raises(ValueError, match=r"^fraction must be in \(0, 1\), got '0.5'"):
        split_held_out(["a", "b", "c"], fraction="0.5")
    assert split_held_out(["a", "b", "c"], fraction=0.5) == (["a"], ["b", "c"])


# --- 7: tnlm eval -----------------------------------------------------------------------

def test_eval_refuses_a_text_of_one_token_before_loading_the_models(tmp_path, capsys,
                                                                     monkeypatch):
    import tnlm.cli.evaluate as ev
    from tnlm.cli import main

    folder, _ = save_llm_folder(tmp_path)
    one = tmp_path / "one.txt"
    one.write_text("the\n")
    loads = []
    monkeypatch.setattr(ev, "_load", lambda *a: loads.append(a))
    capsys.readouterr()
    assert main(["eval", str(folder), "--reference", str(folder), "--text", str(one)]) == 2
    err = capsys.readouterr().err
    assert f"--text {one} holds 1 token(s) of MODEL's tokenizer" in err
    assert len(err.strip().splitlines()) == 1
    assert loads == []  # refused before any model was loaded


# --- 8: perplexity ----------------------------------------------------------------------

class Confident(torch.nn.Module):
    """Predicts token 0 with a logit margin of 1e4: any other token costs 1e4 nats."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, 128)
        logits[..., 0] = 1e4
        return type("Out", (), {"logits": logits})()


def test_perplexity_is_inf_when_the_mean_nll_overflows_exp():
    res = perplexity(Confident(), make_word_tokenizer(), "the cat sat on the mat")
    assert res.mean_nll > 710 and math.isfinite(res.nll)
    assert res.ppl == math.inf


# --- 9: data-aware truncation -----------------------------------------------------------

def whitened():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    stats = InputStats(X.T @ X, 50)
    return W, stats, WhitenedLayer(W, stats, vectors=True)


def test_whitened_layer_refuses_ranks_that_are_not_ints_in_range():
    W, stats, wl = whitened()
    with pytest.raises(ValueError, match="^rank must be >= 0, got -1"):
        wl.rank_error(-1)
    with pytest.raises(TypeError, match="^rank must be an int"):
        wl.rank_error(True)
    assert wl.rank_error(0) == 1.0 and wl.rank_error(4) == wl.rank_error(99) == 0.0
    for bad in (0, -3):
        with pytest.raises(ValueError, match="^rank must be >= 1"):
            wl.truncated(bad)
    for bad in (True, 2.9):
        with pytest.raises(TypeError, match="^rank must be an int"):
            wl.truncated(bad)
    assert int(torch.linalg.matrix_rank(wl.truncated(2))) == 2
    assert torch.allclose(wl.truncated(99), W)


def test_output_error_refuses_a_non_finite_weight_and_whitening_a_bad_ridge():
    W, stats, _ = whitened()
    bad = W.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="^W holds NaN or infinite values"):
        output_error(bad, W, stats)
    assert output_error(W, W, stats) < 1e-12
    with pytest.raises(TypeError, match="^ridge must be a number, got True"):
        whitening_factor(stats.gram, ridge=True)
    with pytest.raises(TypeError, match="^ridge must be a number"):
        WhitenedLayer(W, stats, ridge="1e-6")
    with pytest.raises(ValueError, match="^ridge must be a finite number >= 0"):
        whitening_factor(stats.gram, ridge=-1.0)
    assert torch.equal(whitening_factor(stats.gram, ridge=1), whitening_factor(stats.gram, 1.0))


# --- 10: the nucleus sampler ------------------------------------------------------------

@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_nucleus_sampler_refuses_scores_it_cannot_draw_from(top_p):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 128, generator=g)
    with pytest.raises(ValueError, match="^temperature 1e-40 makes the scores overflow"):
        NucleusSampler(1e-40, top_p, g)(None, scores)
    with pytest.raises(ValueError, match="^temperature 1e-40 makes the scores overflow"):
        NucleusSampler(1e-40, top_p, g)(None, -scores.abs() - 1)  # every one to -inf
    sampler = NucleusSampler(1.0, top_p, g)
    for poison in (math.nan, math.inf):
        bad = scores.clone()
        bad[0, 5] = poison
        with pytest.raises(ValueError, match=r"^scores hold NaN or \+inf"):
            sampler(None, bad)
    masked = scores.clone()
    masked[1] = -math.inf
    with pytest.raises(ValueError, match="every token is masked"):
        sampler(None, masked)
    # -inf (masked tokens) stays allowed: the draw is among the others
    masked = scores.clone()
    masked[:, 3:] = -math.inf
    for _ in range(5):
        out = sampler(None, masked)
        assert (out == 0).sum() == 2 and int(out.argmax(-1).max()) < 3


# ------------------------------------------------------------------ the user's start lines
def test_a_text_kept_from_start_lines_is_not_resumed_without_them(tmp_path):
    from tnlm.compress.decoder.job import CausalLMRecipe, _save_text, read_saved_text

    m = make_causal_lm("llama")
    with_lines = CausalLMRecipe(starts=("the cat sat .", "the dog is blue ."))
    _save_text(tmp_path, with_lines, m, ["the cat sat . on the mat", "the dog is blue . and"])
    assert read_saved_text(tmp_path, with_lines, m) is not None  # the same lines resume
    for other in (CausalLMRecipe(), CausalLMRecipe(starts=("a b",))):
        with pytest.raises(ValueError, match=r"cannot resume .*starts: 2 in the checkpoint"):
            read_saved_text(tmp_path, other, m)
    _save_text(tmp_path, CausalLMRecipe(), m, ["the cat sat on the mat"])  # and the converse
    with pytest.raises(ValueError, match=r"starts: None in the checkpoint, 2 now"):
        read_saved_text(tmp_path, with_lines, m)


def test_mixed_text_draws_the_start_lines_once_for_both_halves():
    from tnlm.compress.decoder.job import CausalLMRecipe, recipe_text

    m, tok = make_causal_lm("llama"), make_word_tokenizer()
    lines = ["the cat sat .", "the dog is blue .", "the sky is a day .", "what is the mat ?"]
    r = CausalLMRecipe(text_source="mixed", n_texts=4, starts=lines, gen_tokens=2,
                       prose_fraction=0, gen_batch=4)
    used = [next(x for x in lines if x in t) for t in recipe_text(m, tok, r)]
    # both halves took the same order: continuation i and answer i shared a line, 2 unused
    assert sorted(used) == sorted(lines)
    for n_texts, seed in ((10, 8), (11, 3)):  # more texts than lines: each line as often
        r = CausalLMRecipe(text_source="mixed", n_texts=n_texts, starts=lines[:3],
                           gen_tokens=2, prose_fraction=0, gen_batch=8, seed=seed)
        used = [next(x for x in lines if x in t) for t in recipe_text(m, tok, r)]
        counts = [used.count(x) for x in lines[:3]]
        assert len(used) == n_texts and max(counts) - min(counts) <= 1, counts


def test_start_lines_count_a_repeated_line_once():
    from tnlm.compress.decoder.job import CausalLMRecipe
    from tnlm.compress.decoder.text import start_lines, start_order

    lines = ["the cat sat .", "the cat sat .", "the cat sat .  ", "the dog is blue ."]
    assert start_lines(lines) == ["the cat sat .", "the dog is blue ."]
    for seed in range(6):  # the repeated line took 3 of every 4 slots
        assert sorted(start_order(lines, 2, seed)) == ["the cat sat .", "the dog is blue ."]
    assert CausalLMRecipe(starts=lines).text_settings()["starts"] == 2


def test_a_start_line_longer_than_the_model_s_positions_is_refused_before_sampling():
    from tnlm.compress.decoder.text import self_generated_text

    tok = make_word_tokenizer()
    long = " ".join(["the cat sat on the mat ."] * 40)  # 280 tokens
    for kind in ("gpt2", "llama"):  # a learned table (fails inside), rotary (runs past)
        m = make_causal_lm(kind)
        limit = (m.config.n_positions if kind == "gpt2" else m.config.max_position_embeddings)
        with pytest.raises(ValueError, match=rf"starts: the line 'the cat .*is 280 tokens; "
                                             rf"with max_new_tokens=8 .* model's {limit} "
                                             rf"positions \(at most {limit - 8} tokens"):
            self_generated_text(m, tok, 2, max_new_tokens=8, starts=["the dog", long])
    assert len(self_generated_text(m, tok, 1, max_new_tokens=2, starts=["the dog"])) == 1


def test_recipe_starts_with_text_given_is_refused():
    from tnlm.compress.decoder.job import CausalLMRecipe, compress_causal_lm

    m, tok = make_causal_lm("llama"), make_word_tokenizer()
    with pytest.raises(ValueError, match="recipe.starts steer the model's own samples; with "
                                         "text given nothing is sampled"):
        compress_causal_lm(m, tok, CausalLMRecipe(starts=["the cat"]),
                           text=["the cat sat on the mat"] * 8, progress=False)


def _peaked_llama():
    """A tiny Llama whose head is scaled 20x: peaked next-token distributions, as a real
    LM's, so that a too-large learning rate makes healing blow up within its warm-up."""
    m = make_causal_lm("llama")
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


def test_causal_healing_stops_a_blow_up_within_the_warm_up():
    """The blow-up test compared with the mean of the warm-up steps and ran only after
    them: a KL climbing from 0.004 to 1.04 within the 10 warm-up steps raised its own
    reference and was never stopped (healed 17x worse than not healing, exit 0). It now
    compares with the first loss from the first step, and restores the best state."""
    tok = make_word_tokenizer()
    text = TEXT.split(" . ") * 8
    seqs = token_sequences(tok, text, 16)
    dense = _peaked_llama()
    with torch.no_grad():
        t_logits = dense(input_ids=seqs).logits

    def kl(m):
        with torch.no_grad():
            return float(next_token_kl(m(input_ids=seqs).logits, t_logits))

    def run(lr, steps):
        m = _peaked_llama()
        recipe = CausalLMRecipe(budget=0.5, seq_len=16, n_calibration=8, fit_steps=2,
                                heal=CausalHealConfig(steps=steps, lr=lr, optimizer="adafactor",
                                                      chunk=32))
        return m, compress_causal_lm(m, tok, recipe, text=text, progress=False).heal

    unhealed, _ = run(2e-2, 0)
    m, res = run(2e-2, 30)
    assert res.stopped is not None and "restored" in res.stopped
    assert len(res.losses) < 10  # within the warm-up
    assert kl(m) <= kl(unhealed) * 1.05  # the best state: no worse than not healing
    _, fine = run(2e-4, 30)  # a learning rate that heals is not stopped
    assert fine.stopped is None and len(fine.losses) == 30


def test_block_term_on_a_model_that_scales_its_logits_is_refused_before_any_work():
    """hidden_weight with a model whose logits are not head(hidden) (Cohere's
    logit_scale, Gemma-2's soft cap) failed at healing's first step, after the text was
    sampled and every block compressed, leaving the model compressed. Refused first."""
    from tests.test_architectures_causal import tiny
    from tnlm.bridge import MPOLinear

    tok = make_word_tokenizer()
    m = tiny("cohere")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    logged = []
    recipe = CausalLMRecipe(budget=0.5, seq_len=16, n_calibration=8, fit_steps=2, n_texts=8,
                            gen_tokens=16, gen_batch=4,
                            heal=CausalHealConfig(steps=5, chunk=32, hidden_weight=1.0))
    with pytest.raises(ValueError, match="hidden_weight needs a model whose logits"):
        compress_causal_lm(m, tok, recipe, progress=False, log=logged.append)
    assert logged == []  # nothing sampled
    assert not any(isinstance(x, MPOLinear) for x in m.modules())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_check_starts_fit_names_the_users_line_in_chat_form_too():
    """check_starts_fit: what self_generated_text refuses before sampling, for the CLI to
    check right after loading; in chat form the error names the user's line, not the
    templated prompt."""
    from tests.common import make_causal_lm
    from tnlm.compress.decoder.text import check_starts_fit

    model, tok = make_causal_lm("llama"), make_word_tokenizer()  # 256 positions
    ok = ["the cat sat .", "the dog is blue ."]
    for chat in (False, True):
        check_starts_fit(model, tok, ok, 128, chat)
        with pytest.raises(ValueError, match=r"^starts: the line 'the dog the dog"):
            check_starts_fit(model, tok, [*ok, " ".join(["the dog"] * 100)], 128, chat)
    with pytest.raises(ValueError, match=r"in the chat template; with max_new_tokens=250"):
        check_starts_fit(model, tok, ok, 250, True)  # the template's own tokens count
