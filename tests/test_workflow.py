"""A PEFT user's workflow end to end (issue 12): what trains by default, lightweight task
checkpoints over a shared base, ``transformers.Trainer``.

Models are random-init MiniLM-like BERTs (hidden 32, 2 layers, feed-forward 4x hidden,
a vocabulary that dominates the parameter count as MiniLM's does) with MiniLM's 36-style
targets (12 MPO layers here).
"""

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from tnlm.integration import MPOConfig, MPOModel, get_mpo_model, io

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


# ---------------------------------------------------------------------------------------
# 2. lightweight task checkpoints
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base model saved as transformers saves it (loading it sets ``name_or_path``)."""
    d = tmp_path_factory.mktemp("base")
    tiny_bert(seed=0, dropout=0.0).save_pretrained(d)  # no dropout: Trainer runs reproducible
    return d


def load_base(d):
    return BertForSequenceClassification.from_pretrained(d).eval()


def train_steps(model, labels, steps=2, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=IDS, attention_mask=MASK, labels=labels).loss.backward()
        opt.step()
    return model.eval()


def checkpoint(d):
    """(meta, tensor names -> shapes, total bytes of config and weights) of a checkpoint."""
    meta = json.loads((d / io.CONFIG_NAME).read_text())
    weights = d / meta["weights"]
    size = weights.stat().st_size + (d / io.CONFIG_NAME).stat().st_size
    return meta, io.read_header(weights), size


def state(model):
    return {k: v.detach().clone() for k, v in model.base_model.state_dict().items()}


def test_two_lightweight_task_checkpoints_share_one_base(base_dir, tmp_path):
    dense = (base_dir / "model.safetensors").stat().st_size
    tasks = {}
    for task, labels in (("a", LABELS), ("b", 1 - LABELS)):
        model = train_steps(get_mpo_model(load_base(base_dir), config(), progress=False), labels)
        model.save_pretrained(tmp_path / task)  # lightweight: the default for a loaded base
        tasks[task] = (logits(model), state(model), model)
    metas = {}
    for task, (ref, ref_state, model) in tasks.items():
        meta, header, size = checkpoint(tmp_path / task)
        metas[task] = meta
        assert meta["lightweight"]["base_model_name_or_path"] == str(base_dir)
        # only what trains is saved: auxiliary cores and the classifier (measured: 16.9 kB
        # of weights + 9.8 kB of config = 11.0 % of the 243 kB dense model)
        trainable = {n.removeprefix("base_model.") for n, p in model.named_parameters()
                     if p.requires_grad}
        assert set(header) == trainable
        assert size <= 0.15 * dense, (size, dense)
        centrals = {f"{n}.cores.{m.central_index}" for n, m in model.mpo_modules()}
        assert centrals <= set(meta["lightweight"]["rebuilt"])
        assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in meta["modules"]
                       for k in header)  # never a dense weight of a replaced layer
        loaded = MPOModel.from_pretrained(load_base(base_dir), tmp_path / task).eval()
        assert torch.equal(logits(loaded), ref)
        got = state(loaded)
        assert got.keys() == ref_state.keys()
        assert all(torch.equal(got[k], ref_state[k]) for k in got)
        assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
            [n for n, p in model.named_parameters() if p.requires_grad]
    assert not torch.equal(tasks["a"][0], tasks["b"][0])
    # the two tasks leave the same central tensors to the base model
    ra, rb = (metas[t]["lightweight"]["rebuilt"] for t in "ab")
    assert {k: ra[k] for k in centrals} == {k: rb[k] for k in centrals}
    # a model loaded from a task checkpoint saves lightweight again, the same tensors
    loaded.save_pretrained(tmp_path / "again")
    assert checkpoint(tmp_path / "again")[1] == checkpoint(tmp_path / "b")[1]



def test_a_task_checkpoint_loads_where_the_base_decomposes_with_other_rounding(
        base_dir, tmp_path, monkeypatch):
    """The rebuilt central cores were compared bit for bit: decomposing the same base with
    another thread count (torchrun sets one) or BLAS changes float32 bits (measured: a
    384 x 1536 layer's central core differs by 5e-10 between one and two threads), and
    the task was refused as saved "on another base". The checkpoint now records a sketch
    of each rebuilt core; a core whose bits differ loads when its sketch agrees to 1e-5 of
    its norm / sqrt(numel). A change of 1e-4 is still refused, and a checkpoint without sketches names
    the thread count as a possible cause."""
    from tnlm.bridge import MPOModule
    from tnlm.integration import checkpoint as ck

    model = train_steps(get_mpo_model(load_base(base_dir), config(), progress=False), LABELS)
    model.save_pretrained(tmp_path / "task")
    meta = json.loads((tmp_path / "task" / io.CONFIG_NAME).read_text())
    assert set(meta["lightweight"]["sketches"]) >= {
        f"{n}.cores.{m.central_index}" for n, m in model.mpo_modules()}
    ref = logits(model)
    real = MPOModule.from_module

    def rounded(scale):
        def from_module(*a, **kw):
            layer = real(*a, **kw)
            with torch.no_grad():  # a random change of relative size `scale` (1e-7: what
                c = layer.cores[layer.central_index]  # other float rounding does)
                g = torch.randn(c.shape, generator=torch.Generator().manual_seed(1))
                c.add_(g * (scale * float(c.norm()) / float(g.norm())))
            return layer
        return staticmethod(from_module)

    monkeypatch.setattr(MPOModule, "from_module", rounded(1e-7))
    loaded = MPOModel.from_pretrained(load_base(base_dir), tmp_path / "task").eval()
    torch.testing.assert_close(logits(loaded), ref, rtol=1e-5, atol=1e-5)
    for scale in (1e-4, 1e-3):  # another base: a change far above rounding, any direction
        monkeypatch.setattr(MPOModule, "from_module", rounded(scale))
        with pytest.raises(ValueError, match="is not the one the task was saved on"):
            MPOModel.from_pretrained(load_base(base_dir), tmp_path / "task")
    del meta["lightweight"]["sketches"]  # saved before cores were sketched
    (tmp_path / "task" / io.CONFIG_NAME).write_text(json.dumps(meta))
    monkeypatch.setattr(MPOModule, "from_module", rounded(1e-7))
    with pytest.raises(ValueError, match="another thread count or BLAS"):
        MPOModel.from_pretrained(load_base(base_dir), tmp_path / "task")
    assert ck.SKETCH_RTOL == 1e-5

def test_task_checkpoint_on_another_base_is_refused_and_base_untouched(base_dir, tmp_path):
    train_steps(get_mpo_model(load_base(base_dir), config(), progress=False),
                LABELS).save_pretrained(tmp_path)
    other = tiny_bert(seed=1)
    before = state_of(other)
    with pytest.raises(ValueError, match=r"differ from what it recorded \(12 rebuilt central "
                                         r"cores.*is not the one the task was saved on"):
        MPOModel.from_pretrained(other, tmp_path)
    after = state_of(other)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert not any(isinstance(m, MPOModel) for m in other.modules())
    # another dtype is another base too
    with pytest.raises(ValueError, match="is not the one the task was saved on"):
        MPOModel.from_pretrained(load_base(base_dir).double(), tmp_path)


def state_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_changed_central_tensors_save_full_cores_never_dense_weights(base_dir, tmp_path):
    model = get_mpo_model(load_base(base_dir), config(), progress=False)
    name, layer = next(iter(model.mpo_modules()))
    layer.retruncate(max_bond=2)  # as squeezing or compression do: the central core changes
    ref = logits(model)
    with pytest.raises(ValueError, match=f"central tensor of '{name}' is not the decomposition"):
        model.save_pretrained(tmp_path / "light", lightweight=True)
    model.save_pretrained(tmp_path / "full")  # auto: every tensor
    meta, header, _ = checkpoint(tmp_path / "full")
    assert "lightweight" not in meta
    for n, m in model.mpo_modules():
        assert all(f"{n}.cores.{k}" in header for k in range(m.n_sites))
        assert f"{n}.weight" not in header
    # a full checkpoint needs only the architecture
    loaded = MPOModel.from_pretrained(tiny_bert(seed=3), tmp_path / "full").eval()
    assert torch.equal(logits(loaded), ref)
    # a model assembled without get_mpo_model (as compress_model does) saves full too
    direct = MPOModel(model.base_model, model.mpo_config)
    with pytest.raises(ValueError, match="not wrapped here by get_mpo_model"):
        direct.save_pretrained(tmp_path / "light", lightweight=True)
    # so does train="all" (the central tensors train)
    every = get_mpo_model(load_base(base_dir), config(train="all"), progress=False)
    with pytest.raises(ValueError, match="trains"):
        every.save_pretrained(tmp_path / "light", lightweight=True)
    every.save_pretrained(tmp_path / "all")
    assert "lightweight" not in checkpoint(tmp_path / "all")[0]


def test_truncated_by_config_is_rebuilt_and_changed_frozen_tensors_are_saved(base_dir, tmp_path):
    model = get_mpo_model(load_base(base_dir), config(max_bond=2), progress=False)
    with torch.no_grad():  # a frozen tensor changed after wrapping is task state: saved
        model.base_model.bert.embeddings.LayerNorm.weight.mul_(1.5)
    train_steps(model, LABELS, steps=1)
    model.save_pretrained(tmp_path)
    meta, header, _ = checkpoint(tmp_path)
    assert "lightweight" in meta and "bert.embeddings.LayerNorm.weight" in header
    loaded = MPOModel.from_pretrained(load_base(base_dir), tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))


def test_random_init_base_saves_full_unless_asked(tmp_path):
    model = wrap(seed=4)  # no name_or_path: nobody could rebuild this base elsewhere
    ref = logits(model)
    model.save_pretrained(tmp_path / "auto")
    assert "lightweight" not in checkpoint(tmp_path / "auto")[0]
    model.save_pretrained(tmp_path / "light", lightweight=True)
    meta, header, _ = checkpoint(tmp_path / "light")
    assert meta["lightweight"]["base_model_name_or_path"] == ""
    assert torch.equal(logits(MPOModel.from_pretrained(tiny_bert(seed=4), tmp_path / "light")), ref)
    with pytest.raises(TypeError, match="unexpected arguments"):
        model.save_pretrained(tmp_path, push_to_hub=True)
    # push_to_hub itself reached the base model's (an upload AutoModel loads at random)
    with pytest.raises(NotImplementedError, match="random weights"):
        model.push_to_hub("user/model")
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)


# ---------------------------------------------------------------------------------------
# 3. transformers.Trainer as with PEFT
# ---------------------------------------------------------------------------------------

class Pairs(torch.utils.data.Dataset):
    """8 labelled examples as dicts of tensors (no ``datasets`` needed)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": IDS[i % 2], "attention_mask": MASK[i % 2],
                "labels": torch.tensor(i % 2)}


def accuracy(pred):
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def trainer_for(model, out, **kw):
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4,
                per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2,
                save_strategy="steps", save_steps=2, report_to=[], logging_strategy="no",
                use_cpu=True, learning_rate=1e-2, seed=0, disable_tqdm=True)
    args.update(kw)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=Pairs(),
                   eval_dataset=Pairs(), compute_metrics=accuracy)


def test_trainer_metrics_save_model_best_model_and_resume(base_dir, tmp_path):
    from safetensors.torch import load_file

    def fresh():
        return get_mpo_model(load_base(base_dir), config(), progress=False)

    model = fresh()
    assert type(model).__name__ == "MPOBertForSequenceClassification"
    centrals = [m.cores[m.central_index].detach().clone() for _, m in model.mpo_modules()]
    trainer = trainer_for(model, tmp_path / "run", load_best_model_at_end=True,
                          metric_for_best_model="accuracy")
    assert trainer.label_names == ["labels"]  # found on the class's forward, no label_names
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy"} <= set(metrics)
    assert all(torch.equal(c, m.cores[m.central_index])
               for c, (_, m) in zip(centrals, model.mpo_modules()))
    # save_model writes a checkpoint MPOModel.from_pretrained reads, bit-exact
    trainer.save_model(str(tmp_path / "final"))
    loaded = MPOModel.from_pretrained(load_base(base_dir), tmp_path / "final").eval()
    assert torch.equal(logits(loaded), logits(model.eval()))
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    # resuming from step 2 ends where the uninterrupted run was at step 4
    resumed = fresh()
    trainer_for(resumed, tmp_path / "resumed").train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    want = load_file(str(tmp_path / "run" / "checkpoint-4" / "model.safetensors"))
    got = resumed.state_dict()
    assert set(want) == set(got)
    for key in want:
        if key != io.STATE_META_KEY:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-7, msg=key)


def test_trainer_with_gradient_checkpointing_and_bf16(base_dir, tmp_path):
    model = get_mpo_model(load_base(base_dir), config(), progress=False)
    aux = [m.cores[m.auxiliary_indices[0]].detach().clone() for _, m in model.mpo_modules()]
    trainer = trainer_for(model, tmp_path, max_steps=2, eval_strategy="no", save_strategy="no",
                          activation_checkpointing=True, bf16=True)
    result = trainer.train()
    assert result.global_step == 2 and result.training_loss == result.training_loss  # not NaN
    assert model.base_model.is_activation_checkpointing
    moved = [not torch.equal(a, m.cores[m.auxiliary_indices[0]])
             for a, (_, m) in zip(aux, model.mpo_modules())]
    assert all(moved)  # gradients reach every layer through the checkpointed blocks


def test_forward_signature_hooks_and_pickling():
    import inspect
    import pickle

    model = wrap(seed=5).eval()
    base = model.base_model
    assert inspect.signature(type(model).forward) == inspect.signature(type(base).forward)
    assert inspect.signature(model.forward) == inspect.signature(base.forward)
    assert model.config is base.config
    calls = []
    handle = base.register_forward_hook(lambda *a: calls.append(1))
    ref = logits(model)
    handle.remove()
    assert calls == [1]  # hooks on the base model fire
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy) is type(model) and torch.equal(logits(copy), ref)
    assert isinstance(copy, MPOModel)


# ---------------------------------------------------------------------------------------
# 4. peft interop
# ---------------------------------------------------------------------------------------

def test_lora_on_mpo_layers_merges_exactly_and_unmerges_to_the_mpo_layer():
    peft = pytest.importorskip("peft")
    from tnlm import MPOLinear
    from tnlm.integration import lora_config_for_mpo

    model = wrap(seed=6).eval()
    plain = logits(model)
    cfg = lora_config_for_mpo(peft.LoraConfig(target_modules=["query", "value"], r=2,
                                              init_lora_weights=False))
    peft_model = peft.get_peft_model(model, cfg).eval()
    query = model.base_model.bert.encoder.layer[0].attention.self.query
    mpo = query.base_layer
    assert isinstance(mpo, MPOLinear)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    with_lora = logits(peft_model)
    assert (with_lora - plain).abs().max() > 1e-3  # the adapter matters
    query.merge()
    assert isinstance(query.base_layer, torch.nn.Linear)
    torch.testing.assert_close(logits(peft_model), with_lora, atol=1e-5, rtol=0)
    query.unmerge()
    assert query.base_layer is mpo and torch.equal(logits(peft_model), with_lora)
    merged = peft_model.merge_and_unload()
    assert merged is model
    assert type(model.base_model.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    torch.testing.assert_close(logits(model), with_lora, atol=1e-5, rtol=0)


def test_mpo_under_lora_and_mpo_config_in_peft_are_refused():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_bert(seed=7), peft.LoraConfig(target_modules=["query"], r=2))
    with pytest.raises(ValueError, match="inside the peft adapter layer .*merge the adapters "
                                         "first"):
        get_mpo_model(lora, MPOConfig(target_modules=["base_layer"], n_sites=3), progress=False)
    with pytest.raises(AttributeError, match="not a peft method config"):
        peft.get_peft_model(tiny_bert(seed=7), config())
    with pytest.raises(NotImplementedError, match="no separate adapter delta"):
        wrap(seed=7).disable_adapter()


# ---------------------------------------------------------------------------------------
# 5. vocabulary resizing with an MPO input embedding
# ---------------------------------------------------------------------------------------

def wrap_with_embeddings(model, **kw):
    kw.setdefault("modules_to_save", ["classifier"])
    cfg = MPOConfig(target_modules=TARGETS + ["word_embeddings"], n_sites=3, **kw)
    return get_mpo_model(model, cfg, progress=False)


def test_resize_token_embeddings_keeps_an_mpo_embedding_and_old_tokens(tmp_path):
    from tnlm import MPOEmbedding

    model = wrap_with_embeddings(tiny_bert(seed=8, dropout=0.0), train="auxiliary").eval()
    old = model.get_input_embeddings()
    assert isinstance(old, MPOEmbedding) and old.num_embeddings == 1000
    flags = {n: p.requires_grad for n, p in model.named_parameters() if "word_emb" not in n}
    ref = logits(model)
    table = old.weight.detach().clone()
    new = model.resize_token_embeddings(1010)
    assert isinstance(new, MPOEmbedding) and new is model.get_input_embeddings()
    assert new.num_embeddings == 1010 and new.embedding_dim == 32
    assert model.config.vocab_size == 1010 and new.mode == old.mode
    assert not new.cores[new.central_index].requires_grad  # train="auxiliary": roles kept
    assert all(new.cores[k].requires_grad for k in new.auxiliary_indices)
    assert {n: p.requires_grad for n, p in model.named_parameters() if "word_emb" not in n} == flags
    torch.testing.assert_close(new.weight[:1000].detach(), table, atol=1e-5, rtol=0)
    assert new.truncation_error < 1e-6  # exact config: the resized table, decomposed exactly
    torch.testing.assert_close(logits(model), ref, atol=1e-4, rtol=0)
    with torch.no_grad():  # the new tokens are usable
        out = model(input_ids=torch.tensor([[1005, 1009, 3]])).logits
    assert out.shape == (1, 2) and torch.isfinite(out).all()
    assert model.resize_token_embeddings(pad_to_multiple_of=64).num_embeddings == 1024
    assert model.resize_token_embeddings() is model.get_input_embeddings()
    # the resized model saves in full and loads onto a base of the new vocabulary size
    with pytest.raises(ValueError, match="compressed or resized"):
        model.save_pretrained(tmp_path / "light", lightweight=True)
    model.save_pretrained(tmp_path / "full", lightweight=False)
    loaded = MPOModel.from_pretrained(BertForSequenceClassification(model.config).eval(),
                                      tmp_path / "full")
    assert torch.equal(logits(loaded), logits(model))


def test_resize_token_embeddings_resizes_an_untied_lm_head():
    from transformers import BertForMaskedLM

    torch.manual_seed(9)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = wrap_with_embeddings(BertForMaskedLM(cfg).eval(), modules_to_save=[]).eval()
    with torch.no_grad():
        ref = model(input_ids=IDS % 96).logits
    model.resize_token_embeddings(120, mean_resizing=False)
    with torch.no_grad():
        out = model(input_ids=IDS % 96).logits
    assert out.shape == (*IDS.shape, 120) and model.get_output_embeddings().out_features == 120
    torch.testing.assert_close(out[..., :96], ref, atol=1e-4, rtol=0)
    model.resize_token_embeddings(50)  # shrinking too
    assert model.get_input_embeddings().num_embeddings == 50 == model.config.vocab_size


# ---------------------------------------------------------------------------------------
# 6. adapter lifecycle: unload / merge_and_unload, inference loading
# ---------------------------------------------------------------------------------------

def _no_mpo_left(module):
    from tnlm.bridge import MPOModule

    return not any(isinstance(m, MPOModule) for m in module.modules())


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unload_gives_the_dense_base_with_the_same_outputs_and_flags(how):
    model = get_mpo_model(tiny_bert(seed=10, dropout=0.0), config(), progress=False)
    model = train_steps(model, LABELS)
    ref = logits(model)
    mpo = dict(model.mpo_modules())
    trains = {n: any(c.requires_grad for c in m.cores) for n, m in mpo.items()}
    base = model.base_model
    plain = getattr(model, how)()
    assert plain is base and _no_mpo_left(plain)
    for name in mpo:
        dense = plain.get_submodule(name)
        assert type(dense) is torch.nn.Linear and not dense.training
        assert dense.weight.requires_grad == trains[name]
        assert dense.bias.requires_grad == mpo[name].bias.requires_grad
    with torch.no_grad():
        out = plain(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_safe_merge_refuses_non_finite_weights_and_merges_nothing():
    model = wrap(seed=11)
    name, layer = next(iter(model.mpo_modules()))
    with torch.no_grad():
        layer.cores[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"NaN or inf in the merged weights of \['{name}'\]"):
        model.merge_and_unload(safe_merge=True)
    assert len(list(model.mpo_modules())) == 12  # nothing replaced
    with pytest.raises(ValueError, match="no named adapters"):
        model.merge_and_unload(adapter_names=["default"])


def test_from_pretrained_for_inference_freezes_everything_and_evaluates(base_dir, tmp_path):
    model = train_steps(wrap_loaded(base_dir), LABELS)
    model.save_pretrained(tmp_path)
    ref = logits(model)
    base = load_base(base_dir).train()
    with pytest.raises(ValueError, match="is_trainable=False loads for inference"):
        MPOModel.from_pretrained(base, tmp_path, train="all", is_trainable=False)
    assert base.training and all(p.requires_grad for p in base.parameters())  # untouched
    frozen = MPOModel.from_pretrained(base, tmp_path, is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not any(m.training for m in frozen.modules())
    assert torch.equal(logits(frozen), ref)
    trainable = MPOModel.from_pretrained(load_base(base_dir), tmp_path)  # the default
    assert any(p.requires_grad for p in trainable.parameters())
    assert torch.equal(logits(trainable), ref)
    # frozen for inference, it still saves the same task checkpoint
    frozen.save_pretrained(tmp_path / "again")
    again = MPOModel.from_pretrained(load_base(base_dir), tmp_path / "again")
    assert torch.equal(logits(again), ref)


def wrap_loaded(base_dir):
    return get_mpo_model(load_base(base_dir), config(), progress=False)
