"""Every MPO layer kind passes the shared invariants of :class:`tests.common.LayerInvariants`
(exactness, merge, save/reload, merge_and_unload, truncation error, gradients).

One subclass per kind of :data:`tnlm.bridge.kinds.KINDS` (plus a padded, bias-free Linear);
``test_every_kind_is_covered`` fails when a kind is added without a subclass here.
"""

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2Model
from transformers.pytorch_utils import Conv1D

from tests.common import DTYPES, LayerInvariants, assert_close
from tnlm.bridge import KINDS, MPOModule
from tnlm.core.spec import DecompositionSpec


def tiny_bert(seed):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=8)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()




def x_rows(dtype, in_dim):
    return torch.randn(2, 5, in_dim, generator=torch.Generator().manual_seed(100), dtype=dtype)


class TestLinear(LayerInvariants):
    kind = "linear"
    in_shape, out_shape = (2, 3, 4), (3, 4, 3)
    targets = ["query", "key", "value", "dense"]

    def make_dense(self, dtype):
        torch.manual_seed(0)
        return nn.Linear(24, 36).to(dtype), x_rows(dtype, 24)

    def make_base(self, seed):
        return tiny_bert(seed)


class TestLinearPaddedNoBias(TestLinear):
    pad = True

    def make_dense(self, dtype):
        torch.manual_seed(1)
        return nn.Linear(22, 35, bias=False).to(dtype), x_rows(dtype, 22)



class TestConv1D(LayerInvariants):
    kind = "conv1d"
    in_shape, out_shape = (2, 3, 4), (3, 4, 3)
    targets = ["c_attn", "c_proj", "c_fc"]

    def make_dense(self, dtype):
        torch.manual_seed(2)
        conv = Conv1D(36, 24).to(dtype)  # nf=out, nx=in: weight (in, out)
        with torch.no_grad():
            conv.weight.normal_(0, 0.2)
            conv.bias.normal_(0, 0.2)  # (initialised to zeros)
        return conv, x_rows(dtype, 24)

    def make_base(self, seed):
        return tiny_gpt2(seed)


class TestEmbedding(LayerInvariants):
    kind = "embedding"
    in_shape, out_shape = (2, 8, 7), (2, 4, 3)  # vocabulary 100 padded to 112
    pad = True
    targets = ["word_embeddings", "position_embeddings"]

    def make_dense(self, dtype):
        torch.manual_seed(3)
        ids = torch.tensor([[0, 5, 99, 5], [17, 42, 63, 1]])  # the padding id, the last id
        return nn.Embedding(100, 24, padding_idx=0).to(dtype), ids


    def make_base(self, seed):
        return tiny_bert(seed)


def test_every_kind_is_covered():
    covered = {cls.kind for cls in LayerInvariants.__subclasses__()}
    assert covered == set(KINDS)


@DTYPES
def test_to_linear_and_to_embedding_are_merges(dtype):
    """The explicit merges: ``to_linear`` gives an ``nn.Linear`` whatever the kind it replaced
    (a Conv1D layer too), ``to_embedding`` is an embedding's ``merge``."""
    spec = DecompositionSpec((2, 3, 4), (3, 4, 3), max_bond=3)
    x = torch.randn(4, 24, dtype=dtype)
    for dense in (nn.Linear(24, 36), Conv1D(36, 24)):
        layer = MPOModule.from_module(dense.to(dtype), spec)
        linear = layer.to_linear()
        assert type(linear) is nn.Linear and linear.weight.dtype == dtype
        with torch.no_grad():
            assert_close(linear(x), layer(x), dtype, f"to_linear of a {layer.kind} layer")
    emb = TestEmbedding()
    _, layer, ids = emb.make(dtype, max_bond=3)
    table = layer.to_embedding()
    assert type(table) is nn.Embedding and table.padding_idx == layer.padding_idx == 0
    assert torch.equal(table.weight, layer.merge().weight)
    with torch.no_grad():
        assert_close(table(ids), layer(ids), dtype, "to_embedding")
