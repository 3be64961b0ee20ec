"""The dense-W cache of MPO layers is never stale (issue 20, item 2).

Fused optimizers (``AdamW(fused=True)``, transformers' default ``adamw_torch_fused``) and
writes through ``.data`` update the cores without bumping their version counters; the
cache checks the cores' values, so an eval forward always equals one without the cache.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from tnlm import MPOEmbedding, MPOLinear
from tnlm.bridge import set_dense_cache
from tnlm.integration import MPOConfig, MPOModel, get_mpo_model


def _layer(seed: int = 0) -> MPOLinear:
    torch.manual_seed(seed)
    layer = MPOLinear.from_linear(nn.Linear(24, 20), in_shape=(2, 3, 4), out_shape=(2, 5, 2))
    layer.mode = "dense"  # the path that caches W
    return layer


def _uncached(layer: MPOLinear, x: torch.Tensor) -> torch.Tensor:
    layer.cache_dense = False
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer.cache_dense = True


def _train_step(layer: MPOLinear, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    layer.train()
    opt.zero_grad()
    layer(x).square().sum().backward()
    opt.step()
    layer.eval()


def _optimizer_step(make):
    def modify(layer, x):
        _train_step(layer, make(layer.parameters()), x)
    return modify


def _data_write(layer, x):
    layer.cores[layer.central_index].data.mul_(1.5)  # bypasses the version counter


def _load_state_dict(layer, x):
    layer.load_state_dict(_layer(seed=1).state_dict())


def _no_grad_mul(layer, x):
    with torch.no_grad():
        layer.cores[0].mul_(-2.0)


MODIFICATIONS = {
    "SGD for-loop": _optimizer_step(lambda p: torch.optim.SGD(p, lr=0.5, foreach=False)),
    "SGD foreach": _optimizer_step(lambda p: torch.optim.SGD(p, lr=0.5, foreach=True)),
    "Adam foreach": _optimizer_step(lambda p: torch.optim.Adam(p, lr=0.1, foreach=True)),
    "AdamW fused": _optimizer_step(lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)),
    ".data write": _data_write,
    "load_state_dict": _load_state_dict,
    "mul_ under no_grad": _no_grad_mul,
}


def test_every_modification_is_seen_by_the_eval_forward():
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(0))
    for what, modify in MODIFICATIONS.items():
        layer = _layer().eval()
        with torch.no_grad():
            before = layer(x)  # fills the cache
        assert layer._dense_cache, what
        modify(layer, x)
        with torch.no_grad():
            after = layer(x)
        assert not torch.allclose(after, before), f"{what}: the cores did not change"
        assert torch.equal(after, _uncached(layer, x)), f"{what}: stale cached W"


def test_unchanged_cores_reuse_the_cached_w():
    layer = _layer().eval()
    x = torch.randn(3, 24)
    with torch.no_grad():
        layer(x)
        (W,) = [w for _, w in layer._dense_cache.values()]
        layer.load_state_dict(layer.state_dict())  # same values, new versions
        layer(x)
    (W2,) = [w for _, w in layer._dense_cache.values()]
    assert W2 is W


def test_fused_step_on_frozen_block_product_and_embedding_table():
    # the frozen-block product of the training path: a frozen core written through .data
    layer = _layer()
    c = layer.central_index
    for p in layer.cores[: c + 1]:
        p.requires_grad_(False)
    x = torch.randn(5, 24, dtype=torch.float32)
    layer.train()
    layer(x)
    assert layer._block_cache
    layer.cores[0].data.mul_(3.0)
    y = layer(x)
    layer.cache_dense = False
    layer.invalidate_cache()
    torch.testing.assert_close(y, layer(x), rtol=1e-6, atol=1e-6)
    # MPOEmbedding's cached table after a fused AdamW step
    torch.manual_seed(0)
    emb = MPOEmbedding.from_embedding(nn.Embedding(30, 12), in_shape=(5, 6), out_shape=(3, 4))
    ids = torch.tensor([[1, 5, 29], [0, 7, 7]])
    emb.eval()
    with torch.no_grad():
        before = emb(ids)
    assert emb._dense_cache
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, fused=True)
    emb.train()
    emb(ids).square().sum().backward()
    opt.step()
    emb.eval()
    with torch.no_grad():
        after = emb(ids)
        emb.cache_dense = False
        fresh = emb(ids)
    assert not torch.allclose(after, before)
    assert torch.equal(after, fresh)


def _tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, vocab_size=100, max_position_embeddings=16,
                     num_labels=2)
    return BertForSequenceClassification(cfg)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 100, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.labels[i]}


def _loss(model: torch.nn.Module, data: _Data) -> float:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=data.ids, attention_mask=torch.ones_like(data.ids),
                    labels=data.labels)
    return float(out.loss)


def test_trainer_evaluate_after_train_sees_the_trained_cores(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=5,
                             per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             learning_rate=5e-2, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True)
    # the default optimizer (adamw_torch_fused in transformers 5) leaves _version alone
    model = get_mpo_model(_tiny_bert(),
                          MPOConfig(target_modules=["query", "key", "value", "dense"],
                                    mode="dense"), progress=False)
    data = _Data()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]  # fills every layer's cache
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert abs(after - before) > 1e-4  # training changed the model
    assert set_dense_cache(model, False) > 0
    fresh = _loss(model, data)
    set_dense_cache(model, True)
    assert abs(after - fresh) <= 1e-6 * max(1.0, abs(fresh))
    # the checkpoint Trainer saves holds the trained cores: its loss is the same
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = MPOModel.from_pretrained(_tiny_bert(), str(tmp_path / "saved"),
                                        is_trainable=False)
    assert abs(_loss(reloaded, data) - fresh) <= 1e-6 * max(1.0, abs(fresh))
