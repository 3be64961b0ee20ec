"""A PEFT user's workflow end to end (issue 12): what trains by default, lightweight task
checkpoints over a shared base, ``transformers.Trainer``.

Models are random-init MiniLM-like BERTs (hidden 32, 2 layers, feed-forward 4x hidden,
a vocabulary that dominates the parameter count as MiniLM's does) with MiniLM's 36-style
targets (12 MPO layers here).
"""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from tnlm.integration import MPOConfig, get_mpo_model

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
           "output.dense"]
IDS = torch.tensor([[5, 17, 42, 9, 63, 2], [7, 7, 90, 31, 1, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
LABELS = torch.tensor([0, 1])


def tiny_bert(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg).eval()


def config(**kw):
    kw.setdefault("modules_to_save", ["classifier"])
    return MPOConfig(target_modules=TARGETS, n_sites=3, **kw)


def wrap(seed=0, **kw):
    return get_mpo_model(tiny_bert(seed), config(**kw), progress=False)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def unique_params(model):
    seen = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


# ---------------------------------------------------------------------------------------
# 1. the training surface
# ---------------------------------------------------------------------------------------

def test_lightweight_default_trains_auxiliary_tensors_and_modules_to_save(capsys):
    model = wrap()
    assert model.mpo_config.train == "lightweight" == MPOConfig(["query"]).train
    mpo = dict(model.mpo_modules())
    assert len(mpo) == 12
    aux = {id(p) for m in mpo.values() for p in m.auxiliary_parameters()}
    head = {id(p) for p in model.base_model.classifier.parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in aux | head), name
    trainable, total = model.get_nb_trainable_parameters()
    assert total == sum(p.numel() for p in unique_params(model))
    assert trainable == sum(p.numel() for p in unique_params(model) if id(p) in aux | head)
    assert trainable / total <= 0.10  # measured 5.58 % (3,522 of 63,138)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: "
                                       f"{total:,d} || trainable%: {100 * trainable / total:.4f}\n")
    peft = pytest.importorskip("peft")
    assert peft.PeftModel.get_nb_trainable_parameters(model) == (trainable, total)


def test_a_training_step_changes_only_what_trains():
    model = wrap().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_auxiliary_and_all_modes():
    model = wrap(train="auxiliary")
    centrals = {id(m.cores[m.central_index]) for _, m in model.mpo_modules()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) not in centrals), name
    model.setup_training("all")
    assert all(p.requires_grad for p in model.parameters())
    assert model.mpo_config.train == "all"
    model.setup_training("lightweight")
    assert not model.base_model.bert.embeddings.word_embeddings.weight.requires_grad
    with pytest.raises(ValueError, match="train must be one of"):
        model.setup_training("central")


def test_modules_to_save_containing_mpo_layers_keep_their_central_frozen():
    model = wrap(modules_to_save=["layer.1.attention"])
    attn = model.base_model.bert.encoder.layer[1].attention
    q = attn.self.query
    assert not q.cores[q.central_index].requires_grad
    assert q.bias.requires_grad and attn.output.LayerNorm.weight.requires_grad
    assert not model.base_model.bert.encoder.layer[0].attention.self.query.bias.requires_grad
    assert not model.base_model.classifier.weight.requires_grad  # not in modules_to_save
