"""tnlm.export: matmul-chain stand-ins for the MPO layers, the ONNX graph that keeps the
factors (ONNX Runtime against torch), int8 weights, self-contained folders with
sentence-transformers files, the dense transformers folder, and ``tnlm export``.

Everything runs on random-init models of width 32 (a 2-layer BERT compressed by the
data-aware pipeline into 2-site layers, a 2-layer Llama); ONNX and sentence-transformers
tests skip when those packages are absent.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tests.common import (
    make_bert_tokenizer,
    one_thread,  # noqa: F401  (module-scoped autouse fixture)
    short_sentences,
)
from tnlm.bridge import MPOEmbedding, MPOLinear, MPOModule
from tnlm.cli.export import ExportError, add_export_parser, cmd_export
from tnlm.compress.pipeline import CompressionConfig, compress_model
from tnlm.export import (
    FactorizedEmbedding,
    FactorizedLinear,
    export_hf,
    factorized_copy,
    factorized_params,
    load_compressed,
    save_self_contained,
)
from tnlm.integration import MPOConfig, MPOModel, get_mpo_model, mean_pooled

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
           "output.dense"]




def bert(seed=0, vocab_size=64):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_bert_tokenizer(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def sentences():
    return short_sentences()


@pytest.fixture(scope="module")
def compressed(tok, sentences):
    """A BERT whose 12 encoder linears are data-aware 2-site layers at 50 %."""
    res = compress_model(bert(), tok, sentences, CompressionConfig(TARGETS, budget=0.5,
                                                                   heal=None), progress=False)
    return res.model.eval()


# ---------------------------------------------------------------- matmul chains
@pytest.mark.parametrize("I,J,kw", [
    (32, 64, dict(n_sites=2)), (30, 50, dict(n_sites=3, pad=True)),
    (96, 160, dict(n_sites=5, max_bond=6)), (24, 40, dict(n_sites=4))])
def test_factorized_linear_equals_the_mpo_layer(I, J, kw):
    torch.manual_seed(I)
    layer = MPOLinear.from_linear(torch.nn.Linear(I, J), **kw)
    f = FactorizedLinear(layer)
    assert not f.matrix_chain  # legs > 1 on several cores: the reshaping sweep
    x = torch.randn(3, 5, I)
    with torch.no_grad():
        assert torch.allclose(f(x), layer(x), atol=1e-5)
        assert f(x[0, 0]).shape == (J,)
    assert [tuple(m.shape) for m in f.mats] == [(s[0] * s[1], s[2] * s[3])
                                                for s in layer.core_shapes]
    assert factorized_params(f) == sum(c.numel() for c in layer.cores) + J


def test_matrix_chain_layer_multiplies_without_reshapes():
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(torch.nn.Linear(24, 40), in_shape=(24, 1, 1),
                                  out_shape=(1, 1, 40), n_sites=3, max_bond=6)
    f = FactorizedLinear(layer)
    assert f.matrix_chain and [tuple(m.shape) for m in f.mats] == [(24, 6), (6, 6), (6, 40)]
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        assert torch.allclose(f(x), layer(x), atol=1e-5)
        assert torch.allclose(f(x), x @ f.mats[0] @ f.mats[1] @ f.mats[2] + layer.bias, atol=1e-6)


def test_low_rank_layer_is_two_matmuls(compressed):
    layer = compressed.base_model.encoder.layer[0].intermediate.dense
    assert isinstance(layer, MPOLinear) and layer.n_sites == 2
    f = FactorizedLinear(layer)
    assert f.matrix_chain  # forward: x @ A @ B + b, no reshape
    r = layer.bond_dims[0]
    assert [tuple(m.shape) for m in f.mats] == [(32, r), (r, 64)]
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.allclose(f(x), x @ f.mats[0] @ f.mats[1] + layer.bias, atol=1e-6)


def test_factorized_embedding_gathers_rows():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 24)
    layer = MPOEmbedding.from_embedding(emb, n_sites=3, max_bond=5)
    f = FactorizedEmbedding(layer)
    ids = torch.randint(0, 100, (4, 7))
    with torch.no_grad():
        assert torch.allclose(f(ids), layer(ids), atol=1e-5)
    assert f(ids).shape == (4, 7, 24)


def test_factorized_copy_leaves_the_model_alone(compressed, tok, sentences):
    copy, n = factorized_copy(compressed)
    assert n == 12
    assert not any(isinstance(m, MPOModule) for m in copy.modules())
    assert sum(isinstance(m, MPOModule) for m in compressed.modules()) == 12
    a = mean_pooled(copy, tok, sentences)
    b = mean_pooled(compressed, tok, sentences)
    assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def exported(compressed, tok, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tnlm.export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "compressed.onnx"
    # each factor its own MatMul (as by default; fuse=True fuses query/key/value's first
    # factors: test_fused_shared_matmuls_give_the_same_outputs)
    return export_onnx(compressed, tok, path, pooling="mean", fuse=False)


def test_onnx_runtime_matches_torch(exported, compressed, tok, sentences):
    from tnlm.export import OnnxEncoder

    assert exported.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert exported.outputs == ["last_hidden_state", "sentence_embedding"]
    from tnlm.export.onnx_graph import file_opset

    assert exported.opset == file_opset(exported.path) == 20
    import onnx

    ops = {n.op_type for n in onnx.load(str(exported.path)).graph.node}
    assert "Gelu" in ops and "Erf" not in ops  # GELU as one operator at opset 20
    enc = OnnxEncoder(exported.path, tok, threads=1)
    for batch_sents in (sentences[:1], sentences[:7], sentences[5:30]):  # dynamic axes
        batch = tok(batch_sents, padding=True, return_tensors="pt")
        out = enc.run(batch)
        with torch.no_grad():
            ref = compressed(**batch).last_hidden_state.numpy()
        assert out["last_hidden_state"].shape == ref.shape
        assert np.abs(out["last_hidden_state"] - ref).max() <= 1e-4
    emb = enc.encode(sentences, batch_size=16)
    assert np.abs(emb - mean_pooled(compressed, tok, sentences).numpy()).max() <= 1e-4
    # a batch without attention_mask / token_type_ids: filled as transformers fills them
    # (the mask was zeros: every token masked, the pooled embedding a zero vector)
    ids = tok(sentences[:3], padding=True, return_tensors="pt")["input_ids"][:, :5]  # unpadded
    out = enc.run({"input_ids": ids})
    with torch.no_grad():
        ref = compressed(input_ids=ids).last_hidden_state.numpy()
    assert np.abs(out["last_hidden_state"] - ref).max() <= 1e-4
    assert np.linalg.norm(out["sentence_embedding"], axis=-1).min() > 0.5


def test_onnx_graph_holds_the_factors_not_w(exported, compressed):
    import onnx

    from tnlm.export import onnx_weights

    w = onnx_weights(exported.path)
    assert exported.mpo_layers == 12
    # the file stores at most the compressed model's numbers (the unused pooler and
    # duplicate zero biases are left out): far fewer than the dense linears would take
    dense_linears = sum(m.in_dim * m.out_dim for _, m in compressed.mpo_modules())
    assert w["total"] <= factorized_params(compressed)
    assert w["total"] < factorized_params(bert()) - dense_linears // 3
    graph = onnx.load(str(exported.path))
    factors = {n for n in w["shapes"] if ".mats." in n}
    matmuls = [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in factors]
    assert len(factors) == len(matmuls) == 24  # x @ A @ B: two MatMuls per 2-site layer
    made_by = {o: n for n in graph.graph.node for o in n.output}
    for n in matmuls:  # B multiplies A's product directly: no Reshape between the factors
        if n.input[1].endswith(".mats.1"):
            assert made_by[n.input[0]].op_type == "MatMul"
            assert made_by[n.input[0]].input[1] == n.input[1].replace(".mats.1", ".mats.0")
    for name, m in compressed.mpo_modules():
        r = m.bond_dims[0]
        assert w["shapes"][f"model.{name}.mats.0"] == (m.in_dim, r)
        assert w["shapes"][f"model.{name}.mats.1"] == (r, m.out_dim)
        assert (m.in_dim, m.out_dim) not in {s for n, s in w["shapes"].items() if name in n}


def test_export_leaves_out_the_trace_metadata(exported, compressed, tok, sentences, tmp_path):
    import onnx

    from tnlm.export import OnnxEncoder, export_onnx
    from tnlm.export.onnx_graph import strip_node_metadata

    data = exported.path.read_bytes()
    assert b"pkg.torch.onnx.stack_trace" not in data and b"modeling_bert.py" not in data
    assert not any(n.metadata_props for n in onnx.load(str(exported.path)).graph.node)
    traced = export_onnx(compressed, tok, tmp_path / "traced.onnx", pooling="mean",
                         trace_metadata=True)
    assert b"pkg.torch.onnx.stack_trace" in traced.path.read_bytes()
    saved = strip_node_metadata(traced.path)
    assert saved > 0 and traced.path.stat().st_size == traced.bytes - saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traced.onnx"]
    a = OnnxEncoder(exported.path, tok).encode(sentences)
    b = OnnxEncoder(traced.path, tok).encode(sentences)
    assert np.array_equal(a, b)


def test_int8_factors_keep_the_embedding(exported, tok, sentences, tmp_path):
    from tnlm.export import OnnxEncoder, quantize_int8

    size = quantize_int8(exported.path, tmp_path / "int8.onnx")
    assert 0 < size == (tmp_path / "int8.onnx").stat().st_size
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    a = OnnxEncoder(exported.path, tok).encode(sentences)
    b = OnnxEncoder(tmp_path / "int8.onnx", tok).encode(sentences)
    assert float((a * b).sum(1).min()) > 0.99
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "x.onnx")


def test_weight_only_factors_keep_the_embedding_and_bad_arguments_are_named(
        exported, tok, sentences, tmp_path):
    import onnx

    from tnlm.export import OnnxEncoder, quantize_int8, quantize_weights

    a = OnnxEncoder(exported.path, tok).encode(sentences)
    quantize_int8(exported.path, tmp_path / "int8.onnx")
    c8 = OnnxEncoder(tmp_path / "int8.onnx", tok).encode(sentences)
    cos = {}
    for bits in (8, 4):
        out = tmp_path / f"w{bits}.onnx"
        size = quantize_weights(exported.path, out, bits=bits, block_size=16)
        assert 0 < size == out.stat().st_size < exported.path.stat().st_size
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert "MatMulNBits" in ops and "MatMulInteger" not in ops
        cos[bits] = float((a * OnnxEncoder(out, tok).encode(sentences)).sum(1).min())
    # float activations: 8-bit weights lose less than dynamic int8 (weights and activations)
    assert cos[8] > 0.999 and 1 - cos[8] < (1 - float((a * c8).sum(1).min())) / 2
    assert 0.9 < cos[4] < cos[8]
    e4 = tmp_path / "w8e4.onnx"
    quantize_weights(exported.path, e4, embedding_bits=4, embedding_block=16)
    names = {t.name for t in onnx.load(str(e4)).graph.initializer}
    table = "model.embeddings.word_embeddings.weight"
    assert f"{table}.q4" in names and table not in names  # the float table replaced
    cos_e4 = float((a * OnnxEncoder(e4, tok).encode(sentences)).sum(1).min())
    assert 0.99 < cos_e4 < cos[8] + 1e-6
    for kw, match in ((dict(embedding_bits=8), "embedding_bits must be None .* or 4, got 8"),
                      (dict(embedding_bits=4, embedding_block=7),
                       "embedding_block must be an even integer >= 2, got 7"),
                      (dict(bits=3), r"bits must be one of \(8, 4\), got 3"),
                      (dict(bits=True), "bits must be one of"),
                      (dict(block_size=24), r"block_size must be one of \(16, 32, 64, "
                                            r"128, 256\) .*got 24"),
                      (dict(block_size=8), "got 8"), (dict(block_size=512), "got 512"),
                      (dict(bits=8.0), "bits must be one of"),
                      (dict(compute=2), r"compute must be None, 1 \(float32\) or 4 \(int8\), "
                                        "got 2"),
                      (dict(symmetric="yes"), "symmetric must be a bool")):
        with pytest.raises(ValueError, match=match):
            quantize_weights(exported.path, tmp_path / "bad.onnx", **kw)
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        quantize_weights(tmp_path / "missing.onnx", tmp_path / "bad.onnx")
    keys = [p.key for p in onnx.load(str(tmp_path / "w8.onnx")).metadata_props]
    assert keys.count("tnlm.weight_bits") == 1 and "tnlm.gauge_fixed_chains" in keys
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "w8.onnx")).metadata_props}
    assert meta["tnlm.weight_compute"] == "int8"  # 8 bits: int8 compute by default
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "w4.onnx")).metadata_props}[
        "tnlm.weight_compute"] == "float32"
    f8 = tmp_path / "w8f.onnx"  # 8 bits with float compute: at least as close
    quantize_weights(exported.path, f8, bits=8, block_size=16, compute=1)
    assert float((a * OnnxEncoder(f8, tok).encode(sentences)).sum(1).min()) >= cos[8] - 1e-4
    with pytest.raises(ValueError, match="is quantized already"):
        quantize_weights(tmp_path / "w8.onnx", tmp_path / "bad.onnx")
    with pytest.raises(ValueError, match="is quantized already"):
        quantize_weights(tmp_path / "int8.onnx", tmp_path / "bad.onnx")
    for quantized in ("w8.onnx", "int8.onnx"):  # int8 over weight-only or int8 codes
        with pytest.raises(ValueError, match="is quantized already"):
            quantize_int8(tmp_path / quantized, tmp_path / "bad.onnx")
    for kw, match in ((dict(per_channel="no"), "per_channel must be a bool"),
                      (dict(reduce_range="yes"), "reduce_range must be None or a bool"),
                      (dict(embedding_bits=8.0), "embedding_bits must be one of"),
                      (dict(embedding_bits=True), "embedding_bits must be one of")):
        with pytest.raises(ValueError, match=match):
            quantize_int8(exported.path, tmp_path / "bad.onnx", **kw)
    with pytest.raises(ValueError, match="is a folder; expected the file to write"):
        quantize_int8(exported.path, tmp_path)
    assert not (tmp_path / "bad.onnx").exists()

    def broken(*a, **k):
        raise OSError("disk full")

    with mock.patch.object(onnx, "save", broken), pytest.raises(OSError, match="disk full"):
        quantize_weights(exported.path, tmp_path / "bad.onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])],
                                                  "g", [x], [y])), str(tmp_path / "add.onnx"))
    with pytest.raises(ValueError, match="no MatMul of a constant weight"):
        quantize_weights(tmp_path / "add.onnx", tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad.onnx")]


def test_weight_only_past_the_protobuf_limit_writes_its_data_beside_and_cleans_up(
        exported, tok, sentences, tmp_path, monkeypatch):
    """Above 2 GB of weights the file keeps them in ``{name}.data`` (here forced with a
    limit of 0 bytes): the same outputs; a later export to the same name that fits in
    one file removes the data file nothing names any more."""
    from tnlm.export import OnnxEncoder, quantize_weights

    inline = tmp_path / "inline.onnx"
    quantize_weights(exported.path, inline, block_size=16)
    out = tmp_path / "w8.onnx"
    monkeypatch.setattr("tnlm.export.weight_only._PROTOBUF_LIMIT", 0)
    size = quantize_weights(exported.path, out, block_size=16)
    data = tmp_path / "w8.onnx.data"
    assert data.is_file() and size == out.stat().st_size + data.stat().st_size
    assert out.stat().st_size < inline.stat().st_size  # (tensors under 1 KB stay inline)
    a = OnnxEncoder(inline, tok).encode(sentences)
    assert np.array_equal(OnnxEncoder(out, tok).encode(sentences), a)
    monkeypatch.undo()
    assert quantize_weights(exported.path, out, block_size=16) == out.stat().st_size
    assert not data.exists()
    assert np.array_equal(OnnxEncoder(out, tok).encode(sentences), a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inline.onnx", "w8.onnx"]


def test_untie_transposed_weights_keeps_the_outputs():
    """MatMul(x, Transpose(W)) beside Gather(W): the MatMul gets its own W^T; the outputs
    are the same and the Transpose is gone."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tnlm.export.weight_only import untie_transposed_weights

    w = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["e"]),
             helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["e", "Wt"], ["logits"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 10])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ids = np.array([1, 5, 9], np.int64)

    def run(m):
        return ort.InferenceSession(m.SerializeToString()).run(None, {"ids": ids})[0]

    want = run(model)
    assert untie_transposed_weights(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Gather", "MatMul"]
    assert model.graph.node[1].input[1] == "W.T"
    np.testing.assert_array_equal(run(model), want)
    assert untie_transposed_weights(model) == 0  # nothing left to untie


def test_fused_shared_matmuls_give_the_same_outputs(exported, compressed, tok, sentences,
                                                    tmp_path):
    import onnx

    from tnlm.export import OnnxEncoder, fuse_shared_matmuls, onnx_weights, quantize_int8

    out = tmp_path / "fused.onnx"
    removed = fuse_shared_matmuls(exported.path, out)
    # query, key and value read the same states: their first factors fuse, 2 of 3 gone a layer
    assert removed == 4
    before, after = onnx.load(str(exported.path)).graph, onnx.load(str(out)).graph
    count = lambda g, op: sum(n.op_type == op for n in g.node)  # noqa: E731
    assert count(after, "MatMul") == count(before, "MatMul") - 4
    assert count(after, "Split") == count(before, "Split") + 2
    assert onnx_weights(out)["total"] == onnx_weights(exported.path)["total"] + 2 * 3
    onnx.checker.check_model(str(out))
    batch = tok(sentences[:9], padding=True, return_tensors="pt")
    a, b = OnnxEncoder(exported.path, tok).run(batch), OnnxEncoder(out, tok).run(batch)
    assert np.abs(a["last_hidden_state"] - b["last_hidden_state"]).max() <= 1e-5
    with torch.no_grad():
        ref = compressed(**batch).last_hidden_state.numpy()
    assert np.abs(b["last_hidden_state"] - ref).max() <= 1e-4
    # int8 per column quantizes each column alone: the fused weight gives the same graph
    quantize_int8(exported.path, tmp_path / "a8.onnx")
    quantize_int8(out, tmp_path / "b8.onnx")
    a8 = OnnxEncoder(tmp_path / "a8.onnx", tok).encode(sentences)
    b8 = OnnxEncoder(tmp_path / "b8.onnx", tok).encode(sentences)
    assert np.abs(a8 - b8).max() <= 1e-5
    assert fuse_shared_matmuls(out, tmp_path / "again.onnx") == 0  # nothing left to fuse
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a8.onnx", "again.onnx", "b8.onnx", "fused.onnx"]
    from tnlm.export import export_onnx

    fused = export_onnx(compressed, tok, tmp_path / "exported_fused.onnx", pooling="mean",
                        fuse=True)
    assert fused.fused_matmuls == 4 and exported.fused_matmuls == 0
    assert count(onnx.load(str(fused.path)).graph, "MatMul") == count(after, "MatMul")
    c = OnnxEncoder(fused.path, tok).run(batch)
    assert np.abs(c["last_hidden_state"] - ref).max() <= 1e-4


def test_tnlm_sessions_leave_out_onnx_runtime_s_skip_layer_norm_fusion(exported, tok,
                                                                       sentences, tmp_path):
    """The runners' sessions run Add + LayerNormalization, not ONNX Runtime's slower
    SkipLayerNormalization (docs/export.md); the outputs agree either way."""
    import onnx

    from tnlm.export import OnnxEncoder
    from tnlm.export.onnx_graph import SLOW_FUSIONS, ort_session

    assert SLOW_FUSIONS == ("SkipLayerNormFusion",)
    ops = {}
    for name, disabled in (("tnlm", SLOW_FUSIONS), ("ort", ())):
        ort_session(exported.path, 1, disabled, optimized_path=tmp_path / f"{name}.onnx")
        ops[name] = {n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node}
    assert "SkipLayerNormalization" in ops["ort"]
    assert "SkipLayerNormalization" not in ops["tnlm"] and "LayerNormalization" in ops["tnlm"]
    a = OnnxEncoder(exported.path, tok).encode(sentences)
    b = OnnxEncoder(exported.path, tok, disabled_optimizers=()).encode(sentences)
    assert np.abs(a - b).max() <= 1e-5


def test_fusing_leaves_a_weight_used_twice_and_refuses_a_bad_group(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tnlm.export import fuse_shared_matmuls

    rng = np.random.default_rng(0)
    w = {k: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), k)
         for k, s in [("A", (8, 3)), ("B", (8, 5)), ("C", (8, 4)), ("D", (8, 2))]}
    nodes = [helper.make_node("MatMul", ["x", "A"], ["a"]),
             helper.make_node("MatMul", ["x", "B"], ["b"]),
             helper.make_node("MatMul", ["x", "C"], ["c"]),
             helper.make_node("MatMul", ["y", "C"], ["c2"]),  # C used twice: not fused
             helper.make_node("MatMul", ["y", "D"], ["d"])]  # alone on y: not fused
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
                     helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
         for n in ("a", "b", "c", "c2", "d")], list(w.values()))
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    assert fuse_shared_matmuls(path, tmp_path / "f.onnx") == 1  # A and B only
    assert fuse_shared_matmuls(path, tmp_path / "f3.onnx", min_group=3) == 0
    ort = pytest.importorskip("onnxruntime")
    feed = {"x": rng.standard_normal((2, 8)).astype(np.float32),
            "y": rng.standard_normal((2, 8)).astype(np.float32)}
    a = ort.InferenceSession(str(path)).run(None, feed)
    b = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, feed)
    for u, v in zip(a, b):
        assert np.abs(u - v).max() <= 1e-6
    with pytest.raises(ValueError, match="min_group must be an int >= 2"):
        fuse_shared_matmuls(path, min_group=1)
    # a weight that is also a graph input stays (a file of the legacy exporter lists them)
    graph.input.append(helper.make_tensor_value_info("B", TensorProto.FLOAT, [8, 5]))
    listed = tmp_path / "listed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]),
              str(listed))
    assert fuse_shared_matmuls(listed, tmp_path / "l.onnx") == 0
    old = tmp_path / "op11.onnx"  # Split's sizes were an attribute before opset 13
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(old))
    with pytest.raises(ValueError, match="is opset 11; fuse_shared_matmuls writes the Split"):
        fuse_shared_matmuls(old)


def _low_rank_chain(path, seed=0, factors=None):
    """x (1, 8, 64) @ A (64 x 12) @ B (12 x 64), B's rows scaled over two decades (the
    factor that int8 per column saturated on AVX2 CPUs); or the given (A, B)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((64, 12)).astype(np.float32)
    b = (rng.standard_normal((12, 64)) * np.logspace(0, -2, 12)[:, None]).astype(np.float32)
    if factors is not None:
        a, b = (np.ascontiguousarray(f, dtype=np.float32) for f in factors)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"],
                                                                         ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 64])],
        [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return rng.standard_normal((1, 8, 64)).astype(np.float32)


def test_int8_is_per_channel_seven_bit_by_default_and_no_worse_than_per_tensor(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from tnlm.export import quantize_int8

    x = _low_rank_chain(tmp_path / "f.onnx")

    def run(name):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    ref = run("f.onnx")

    def error(name, **kw):
        quantize_int8(tmp_path / "f.onnx", tmp_path / name, **kw)
        return float(np.linalg.norm(run(name) - ref) / np.linalg.norm(ref))

    def quantized(name):  # the largest |code| of each int8 weight of the file
        return {i.name: int(np.abs(numpy_helper.to_array(i).astype(np.int32)).max())
                for i in onnx.load(str(tmp_path / name)).graph.initializer
                if i.name.endswith("_quantized")}

    per_tensor, per_channel = error("t.onnx", per_channel=False), error("c.onnx")
    assert per_channel <= 1.5 * per_tensor, (per_channel, per_tensor)
    weights = quantized("c.onnx")  # the default: per column, 7-bit
    assert weights and all(m <= 64 for m in weights.values())
    assert max(quantized("t.onnx").values()) > 64  # per tensor: 8 bits
    error("c8.onnx", per_channel=True, reduce_range=False)  # 8 bits on request
    assert max(quantized("c8.onnx").values()) > 64


def test_int8_of_a_gauge_fixed_layer_export_keeps_its_small_directions(tmp_path):
    """A gauge-fixed layer of a decaying spectrum, exported as its balanced chain and
    quantized with the defaults (per column, 7-bit); and, at one 7-bit scale a tensor,
    against the former export (the identity beside the coefficients, and ``right``):
    ONNX Runtime's outputs, relative error."""
    import onnxruntime as ort

    from tests.common import decaying_pivoted_layer
    from tnlm.export import quantize_int8
    from tnlm.export.factorized import PivotedChain

    torch.manual_seed(0)
    _, layer = decaying_pivoted_layer(64, 64, 12)
    chain = PivotedChain(layer)

    def error(name, factors, **kw):
        x = _low_rank_chain(tmp_path / f"{name}.onnx", factors=factors)
        quantize_int8(tmp_path / f"{name}.onnx", tmp_path / f"{name}.q.onnx", **kw)
        ref, out = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"])
                    .run(None, {"x": x})[0] for f in (f"{name}.onnx", f"{name}.q.onnx"))
        return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    balanced = [m.detach().numpy() for m in chain.mats]
    fixed = (layer.basis().numpy(), layer.right.detach().numpy())
    assert error("balanced", balanced) < 0.05  # the default: per column, 7-bit
    # one 7-bit scale a tensor (no saturation on any CPU): the gauge alone decides
    now = error("balanced7", balanced, per_channel=False, reduce_range=True)
    before = error("fixed7", fixed, per_channel=False, reduce_range=True)
    assert now < before, (now, before)  # measured 0.022 vs 0.029 (MiniLM: 0.693 vs 0.251)


def test_an_export_records_its_gauge_fixed_chains_and_int8_per_tensor_keeps_them_7_bit(
        tmp_path, tok, compressed):
    """The exporter writes how many gauge-fixed chains a graph holds; quantize_int8 per
    tensor then uses 7 bits for such a file (8-bit codes saturate ONNX Runtime's sums),
    8 bits for one without, and warns when 8 bits are forced on it."""
    import copy
    import warnings

    import onnx
    from onnx import numpy_helper

    from tnlm.bridge.pivoted import pivot_layers
    from tnlm.export import export_onnx, quantize_int8
    from tnlm.export.onnx_graph import gauge_fixed_chains

    fixed = copy.deepcopy(compressed)
    n = len(pivot_layers(fixed))
    assert n > 0
    export_onnx(fixed, tok, tmp_path / "fixed.onnx")
    export_onnx(compressed, tok, tmp_path / "plain.onnx")
    assert gauge_fixed_chains(tmp_path / "fixed.onnx") == n
    assert gauge_fixed_chains(tmp_path / "plain.onnx") == 0
    _low_rank_chain(tmp_path / "foreign.onnx")  # not written by tnlm: no record
    assert gauge_fixed_chains(tmp_path / "foreign.onnx") is None

    def largest_code(name):
        return max(int(np.abs(numpy_helper.to_array(i).astype(np.int32)).max())
                   for i in onnx.load(str(tmp_path / name)).graph.initializer
                   if i.name.endswith("_quantized") and i.data_type == onnx.TensorProto.INT8)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default choice says nothing
        quantize_int8(tmp_path / "fixed.onnx", tmp_path / "fixed.q.onnx", per_channel=False)
        quantize_int8(tmp_path / "plain.onnx", tmp_path / "plain.q.onnx", per_channel=False)
    assert largest_code("fixed.q.onnx") <= 64  # 7 bits
    assert largest_code("plain.q.onnx") > 64  # 8 bits
    with pytest.warns(UserWarning, match="gauge-fixed layers' chains"):
        quantize_int8(tmp_path / "fixed.onnx", tmp_path / "fixed8.onnx", per_channel=False,
                      reduce_range=False)
    assert largest_code("fixed8.onnx") > 64  # as asked


# ---------------------------------------------------------------- 4-bit word embeddings
@pytest.mark.parametrize("shape,block", [((50, 32), 16), ((50, 40), 16), ((7, 6), 2)])
def test_table4_round_trip_error_is_half_a_step(shape, block):
    from tnlm.export.table4 import dequantize_table_4bit, quantize_table_4bit, table4_bytes

    rng = np.random.default_rng(0)
    table = rng.normal(size=shape).astype(np.float32)
    table[3] = 0.25  # a constant row is exact
    t = quantize_table_4bit(table, block)
    blocks = -(-shape[1] // block)
    assert t.packed.shape == (shape[0], blocks * block // 2) and t.packed.dtype == np.uint8
    assert t.scale.shape == t.offset.shape == (shape[0], blocks)
    assert t.scale.dtype == np.float16
    assert t.nbytes == table4_bytes(*shape, block)
    back = dequantize_table_4bit(t)
    assert back.shape == shape and back.dtype == np.float32
    assert np.array_equal(back[3], table[3])
    step = np.repeat(t.scale.astype(np.float32), block, axis=1)[:, : shape[1]]
    assert (np.abs(back - table) <= step / 2 * 1.01 + 1e-3 * np.abs(table)).all()


def test_table4_bytes_of_minilm():
    from tnlm.export.table4 import table4_bytes

    # 30522 x 384 at 4 bits + float16 scale and offset per 64 columns: 6.59 MB
    # (int8: 11.72 MB; float32: 46.9 MB)
    assert table4_bytes(30522, 384, 64) == 30522 * (192 + 6 * 4) == 6_592_752


@pytest.mark.parametrize("block,bad", [(3, "block_size"), (0, "block_size"),
                                       (10, r"wider than the table \(8 columns\)")])
def test_table4_refuses_a_bad_block(block, bad):
    from tnlm.export.table4 import quantize_table_4bit

    with pytest.raises(ValueError, match=bad):
        quantize_table_4bit(np.ones((4, 8), np.float32), block)
    with pytest.raises(ValueError, match="2-D float"):
        quantize_table_4bit(np.ones(8, np.float32), 4)


def gather_graph(table, tied=False):
    """An ONNX graph ``out = table[input_ids]`` (and ``tied``: ``x @ table``)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["out"], name="lookup")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, None)]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    if tied:
        nodes.append(helper.make_node("MatMul", ["x", "table"], ["logits"], name="head"))
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("width,block", [(32, 16), (40, 16), (32, 32)])
def test_gather_4bit_decodes_the_gathered_rows(width, block):
    ort = pytest.importorskip("onnxruntime")
    from tnlm.export.table4 import dequantize_table_4bit, embedding_gathers, gather_4bit

    table = np.random.default_rng(1).normal(size=(300, width)).astype(np.float32)
    model = gather_graph(table)
    assert embedding_gathers(model) == ["lookup"]
    tables = gather_4bit(model, ["lookup"], block)
    assert "table" not in {t.name for t in model.graph.initializer}
    want_table = dequantize_table_4bit(tables["table"])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for ids in (np.array([0, 299, 7, 7]), np.arange(300).reshape(3, 4, 25), np.array([[5]])):
        got = sess.run(None, {"input_ids": ids})[0]
        assert got.shape == (*ids.shape, width) and got.dtype == np.float32
        assert np.abs(got - want_table[ids]).max() <= 1e-6


def test_gather_4bit_refuses_a_tied_table():
    from tnlm.export.table4 import gather_4bit

    model = gather_graph(np.ones((10, 4), np.float32), tied=True)
    with pytest.raises(ValueError, match="tied"):
        gather_4bit(model, ["lookup"], 2)
    with pytest.raises(ValueError, match="not a Gather"):
        gather_4bit(model, ["head"], 2)


@pytest.fixture(scope="module")
def big_vocab(tok, sentences, tmp_path_factory):
    """A compressed BERT with a 4096 x 32 word-embedding table (the table is then most of
    the int8 bytes, as in MiniLM) and its float32 ONNX file."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tnlm.export import export_onnx

    res = compress_model(bert(vocab_size=4096), tok, sentences,
                         CompressionConfig(TARGETS, budget=0.5, heal=None), progress=False)
    path = tmp_path_factory.mktemp("big_vocab") / "model.onnx"
    export_onnx(res.model.eval(), tok, path, pooling="mean")
    return res.model.eval(), path


def test_int8_with_4bit_embeddings_bytes_and_outputs(big_vocab, tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from tnlm.export import quantize_int8
    from tnlm.export.table4 import (
        dequantize_table_4bit,
        gather_4bit,
        quantize_table_4bit,
        table4_bytes,
    )

    _, path = big_vocab
    name = "model.embeddings.word_embeddings.weight"
    size8 = quantize_int8(path, tmp_path / "int8.onnx")
    size4 = quantize_int8(path, tmp_path / "int8e4.onnx", embedding_bits=4, block_size=16)
    assert size4 == (tmp_path / "int8e4.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx", "int8e4.onnx"]
    graph = onnx.load(str(tmp_path / "int8e4.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert inits[f"{name}.q4"].shape == (4096, 16) and inits[f"{name}.q4"].dtype == np.uint8
    assert inits[f"{name}.q4_scale"].shape == (4096, 2)
    assert not any(a.shape == (4096, 32) for a in inits.values())  # no int8 / float table
    # the file: int8 file - int8 table (4096 x 32 bytes) + 4-bit table, + < 4 kB of nodes
    saved = 4096 * 32 - table4_bytes(4096, 32, 16)
    assert saved == 32_768 and size8 - saved - 200 <= size4 <= size8 - saved + 4096

    ids = np.random.default_rng(0).integers(0, 4096, size=(6, 20))
    ids[:, 0], ids[:, -1] = 2, 3
    mask = np.ones_like(ids)
    mask[3:, 12:] = 0
    feed = dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))

    def run(p):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))

    # the 4-bit lookup alone, on the float graph: equal to the float graph whose table
    # is the decoded 4-bit table
    model = onnx.load(str(path))
    gather_4bit(model, ["node_embedding"], 16)
    onnx.save(model, str(tmp_path / "f32e4.onnx"))
    ref = onnx.load(str(path))
    t = next(t for t in ref.graph.initializer if t.name == name)
    table = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(dequantize_table_4bit(quantize_table_4bit(table, 16)),
                                       name))
    onnx.save(ref, str(tmp_path / "f32dec.onnx"))
    a, b = run(tmp_path / "f32e4.onnx"), run(tmp_path / "f32dec.onnx")
    assert np.abs(a["last_hidden_state"] - b["last_hidden_state"]).max() <= 1e-5
    # against the float graph: the 4-bit table costs about as much as int8 activations
    f32, q8, q4 = run(path), run(tmp_path / "int8.onnx"), run(tmp_path / "int8e4.onnx")
    cos8 = (q8["sentence_embedding"] * f32["sentence_embedding"]).sum(1)
    cos4 = (q4["sentence_embedding"] * f32["sentence_embedding"]).sum(1)
    assert float(cos4.min()) > 0.99 and float(cos8.min()) > 0.99


def test_quantize_int8_4bit_needs_a_word_embedding_gather(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from tnlm.export import quantize_int8

    model = gather_graph(np.ones((10, 4), np.float32))
    model.graph.input[0].name = "ids"
    model.graph.node[0].input[1] = "ids"
    onnx.save(model, str(tmp_path / "g.onnx"))
    with pytest.raises(ValueError, match="input_ids"):
        quantize_int8(tmp_path / "g.onnx", tmp_path / "q.onnx", embedding_bits=4)
    with pytest.raises(ValueError, match="embedding_bits"):
        quantize_int8(tmp_path / "g.onnx", tmp_path / "q.onnx", embedding_bits=2)
    with pytest.raises(ValueError, match="block_size"):
        quantize_int8(tmp_path / "g.onnx", tmp_path / "q.onnx", embedding_bits=4, block_size=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]


def test_export_onnx_refuses_unknown_pooling(compressed, tok, tmp_path):
    pytest.importorskip("onnxscript")
    from tnlm.export import export_onnx

    with pytest.raises(ValueError, match="pooling"):
        export_onnx(compressed, tok, tmp_path / "x.onnx", pooling="cls")
    assert not (tmp_path / "x.onnx").exists()


def test_export_onnx_refuses_pooling_logits_and_task_heads(tok, tmp_path):
    """A masked LM's logits are not pooled as hidden states; a classifier's outputs are
    neither: both refused before anything is written."""
    pytest.importorskip("onnxscript")
    from transformers import BertForMaskedLM, BertForSequenceClassification

    from tnlm.export import export_onnx

    cfg = bert().config
    with pytest.raises(ValueError, match=r"pooling='mean' pools hidden states.*logits"):
        export_onnx(BertForMaskedLM(cfg).eval(), tok, tmp_path / "m.onnx", pooling="mean")
    with pytest.raises(ValueError, match="task head"):
        export_onnx(BertForSequenceClassification(cfg).eval(), tok, tmp_path / "c.onnx")
    assert not list(tmp_path.iterdir())


def test_cli_no_pooling_is_refused_for_a_model_with_an_output_head(tok, tmp_path, capsys):
    """--no-pooling on a masked LM's checkpoint was accepted and did nothing (its graph
    pools nothing either way); refused now, naming the head. Its folder gets no
    sentence-transformers files by default."""
    from transformers import BertForMaskedLM

    from tnlm.cli import main
    from tnlm.export import save_self_contained
    from tnlm.integration import MPOConfig, get_mpo_model

    mlm = get_mpo_model(BertForMaskedLM(bert().config).eval(),
                        MPOConfig(target_modules=["query"], n_sites=2, max_bond=4),
                        progress=False)
    # nor are sentence-transformers files written for it by default (they failed at
    # encode: no hidden states to pool); asked for, refused
    ckpt = save_self_contained(mlm, tok, tmp_path / "mlm")
    assert not (ckpt / "modules.json").exists() and (ckpt / "mpo_config.json").is_file()
    with pytest.raises(ValueError, match=r"sentence_transformers=True: BertForMaskedLM has a "
                                         r"head"):
        save_self_contained(mlm, tok, tmp_path / "st", sentence_transformers=True)
    assert main(["export", str(ckpt), "--format", "onnx", "--no-pooling", "--out",
                 str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--no-pooling: " in err and "BertForMaskedLM), whose graph has no pooled" in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_module_reached_by_two_paths_is_replaced_on_both(compressed):
    """One MPO layer under two names (shared weights): the copy holds one factorized
    layer under both, no MPO module left, counted once."""
    layer = next(m for m in compressed.modules() if isinstance(m, MPOLinear))
    holder = torch.nn.Module()
    holder.a, holder.b = layer, layer
    copy, n = factorized_copy(holder)
    assert n == 1 and copy.a is copy.b and isinstance(copy.a, FactorizedLinear)
    assert not any(isinstance(m, MPOModule) for m in copy.modules())
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(copy.a(x), layer(x), atol=1e-5)


# ---------------------------------------------------------------- folders
@pytest.fixture(scope="module")
def folder(compressed, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("self_contained") / "model"
    save_self_contained(compressed, tok, d)
    return d


def test_self_contained_folder_rebuilds_the_model(folder, compressed, tok, sentences):
    for f in ("config.json", "mpo_config.json", "tokenizer.json", "modules.json",
              "sentence_bert_config.json", "1_Pooling/config.json", "README.md"):
        assert (folder / f).is_file(), f
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == 32
    assert not (folder / "model.safetensors").exists()
    model = load_compressed(folder)
    assert isinstance(model, MPOModel) and not model.training
    assert sum(isinstance(m, MPOLinear) for m in model.modules()) == 12
    assert torch.equal(mean_pooled(model, tok, sentences), mean_pooled(compressed, tok, sentences))
    with pytest.raises(OSError):  # no dense weights: transformers alone refuses the folder
        AutoModel.from_pretrained(str(folder))


def test_sentence_transformer_encodes_like_tnlm(folder, compressed, tok, sentences):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from tnlm.export import sentence_transformer

    ref = mean_pooled(compressed, tok, sentences)
    st = sentence_transformer(folder)
    got = st.encode(sentences, convert_to_tensor=True)
    assert (got - ref).abs().max().item() <= 1e-5
    trusted = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert (trusted.encode(sentences, convert_to_tensor=True) - ref).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(folder), device="cpu")


def test_sentence_transformer_save_round_trip(folder, compressed, tok, sentences, tmp_path):
    pytest.importorskip("sentence_transformers")
    from tnlm.export import sentence_transformer

    sentence_transformer(folder).save(str(tmp_path / "again"))
    again = sentence_transformer(tmp_path / "again")
    ref = mean_pooled(compressed, tok, sentences)
    assert (again.encode(sentences, convert_to_tensor=True) - ref).abs().max().item() <= 1e-5


def test_sentence_transformer_keeps_the_folder_s_prompts_through_load_and_save(
        folder, sentences, tmp_path):
    """config_sentence_transformers.json's prompts and similarity are the model's: read by
    sentence_transformer() as by SentenceTransformer(trust_remote_code=True), and kept by
    saving, also over the folder it was loaded from."""
    pytest.importorskip("sentence_transformers")
    import shutil

    from sentence_transformers import SentenceTransformer

    from tnlm.export import sentence_transformer

    d = tmp_path / "prompted"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config_sentence_transformers.json").read_text())
    cfg.update(prompts={"query": "query: "}, default_prompt_name="query",
               similarity_fn_name="dot")
    (d / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    st = sentence_transformer(d)
    assert st.prompts["query"] == "query: " and st.default_prompt_name == "query"
    assert st.similarity_fn_name == "dot"
    trusted = SentenceTransformer(str(d), trust_remote_code=True, device="cpu")
    got = st.encode(sentences, convert_to_tensor=True)
    assert (got - trusted.encode(sentences, convert_to_tensor=True)).abs().max().item() <= 1e-6
    plain = st.encode(sentences, convert_to_tensor=True, prompt="")
    assert (got - plain).abs().max().item() > 1e-3  # the default prompt is in the encoding
    for where in (tmp_path / "saved", d):  # a new folder, and the folder itself
        st.save(str(where))
        again = sentence_transformer(where)
        assert again.prompts["query"] == "query: " and again.default_prompt_name == "query"
        assert (again.encode(sentences, convert_to_tensor=True) - got).abs().max().item() <= 1e-6


def test_save_self_contained_keep_sentence_files_refuses_writing_them(compressed, tok,
                                                                      tmp_path):
    with pytest.raises(ValueError, match="keep_sentence_files"):
        save_self_contained(compressed, tok, tmp_path / "x", sentence_transformers=True,
                            keep_sentence_files=True)
    assert not (tmp_path / "x").exists()


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_causal_lm_generates_the_same_after_reload(tmp_path):
    model = get_mpo_model(llama(), MPOConfig(target_modules=["q_proj", "v_proj", "up_proj"],
                                             max_bond=4, n_sites=3), progress=False).eval()
    save_self_contained(model, None, tmp_path / "lm", sentence_transformers=False)
    assert not (tmp_path / "lm" / "modules.json").exists()
    loaded = load_compressed(tmp_path / "lm")
    assert type(loaded.base_model) is LlamaForCausalLM
    prompt = torch.tensor([[1, 17, 23, 42, 5]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(prompt, **kw)
        got = loaded.generate(prompt, **kw)
    assert got.shape == (1, 13) and torch.equal(got, want)


def test_a_causal_lm_saved_over_an_encoder_leaves_no_sentence_transformers_files(
        folder, tmp_path):
    """The encoder's folder (its sentence-transformers files) overwritten by a causal LM:
    nothing says sentence-transformers any more; a modules.json of the user's own stays."""
    import shutil

    d = tmp_path / "out"
    shutil.copytree(folder, d)
    assert (d / "modules.json").is_file() and (d / "1_Pooling" / "config.json").is_file()
    lm = get_mpo_model(llama(), MPOConfig(target_modules=["q_proj"], max_bond=4, n_sites=2),
                       progress=False).eval()
    save_self_contained(lm, None, d)
    for name in ("modules.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "1_Pooling", "2_Normalize"):
        assert not (d / name).exists(), name
    assert type(load_compressed(d).base_model) is LlamaForCausalLM
    own = tmp_path / "own"
    own.mkdir()
    (own / "modules.json").write_text('[{"idx": 0, "type": "my.Module"}]')
    save_self_contained(lm, None, own)
    assert (own / "modules.json").is_file()


def test_save_self_contained_needs_an_mpo_model(tok, tmp_path):
    with pytest.raises(TypeError, match="MPOModel"):
        save_self_contained(bert(), tok, tmp_path / "x")


def test_hf_folder_loads_without_tnlm(compressed, tok, sentences, tmp_path, capsys):
    res = export_hf(compressed, tmp_path / "hf", tok)
    line = capsys.readouterr().out
    assert "as big as the uncompressed model" in line and f"{res['params']:,}" in line
    assert "as big as the uncompressed dense model" in (tmp_path / "hf" / "README.md").read_text()
    assert res["params"] > res["mpo_params"]
    assert sum(isinstance(m, MPOModule) for m in compressed.modules()) == 12  # unchanged
    dense = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert not any(isinstance(m, MPOModule) for m in dense.modules())
    a, b = mean_pooled(dense, tok, sentences), mean_pooled(compressed, tok, sentences)
    assert (a - b).abs().max().item() <= 1e-5
    code = ("import sys; sys.modules['tnlm'] = None\n"
            "from transformers import AutoModel\n"
            f"m = AutoModel.from_pretrained({str(tmp_path / 'hf')!r})\n"
            "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True).stdout
    assert out.split()[-2:] == ["BertModel", str(sum(p.numel() for p in dense.parameters()))]


# ---------------------------------------------------------------- tnlm export
def parse(argv):
    ap = argparse.ArgumentParser(prog="tnlm")
    add_export_parser(ap.add_subparsers(dest="command"))
    return ap.parse_args(["export", *argv])


@pytest.fixture(scope="module")
def checkpoint(compressed, tok, tmp_path_factory):
    """What ``tnlm compress --out`` writes (MPO weights only) and the base model folder."""
    root = tmp_path_factory.mktemp("cli")
    compressed.save_pretrained(root / "ckpt", lightweight=False)
    base = bert()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "ckpt", root / "base"


def test_cli_st_from_a_compress_checkpoint(checkpoint, compressed, tok, sentences, tmp_path,
                                           capsys):
    ckpt, base = checkpoint
    args = parse([str(ckpt), "--format", "st", "--base", str(base), "--out",
                  str(tmp_path / "st")])
    assert args.func is cmd_export and cmd_export(args) == 0
    assert "self-contained" in capsys.readouterr().out
    model = load_compressed(tmp_path / "st")
    assert torch.equal(mean_pooled(model, tok, sentences), mean_pooled(compressed, tok, sentences))


def test_cli_onnx_int8(checkpoint, compressed, tok, sentences, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tnlm.export import OnnxEncoder

    ckpt, base = checkpoint
    out = tmp_path / "m.int8.onnx"
    assert cmd_export(parse([str(ckpt), "--format", "onnx", "--int8", "--base", str(base),
                             "--out", str(out)])) == 0
    assert "int8 weights (7-bit, one scale per column)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx"]  # no leftovers
    enc = OnnxEncoder(out, tok)
    assert enc.output_names == ["last_hidden_state", "sentence_embedding"]
    cos = (enc.encode(sentences) * mean_pooled(compressed, tok, sentences).numpy()).sum(1)
    assert float(cos.min()) > 0.99
    tensor = tmp_path / "t.int8.onnx"
    assert cmd_export(parse([str(ckpt), "--format", "onnx", "--int8", "--per-tensor",
                             "--base", str(base), "--out", str(tensor)])) == 0
    assert "int8 weights (one scale per tensor)" in capsys.readouterr().out
    cos = (OnnxEncoder(tensor, tok).encode(sentences)
           * mean_pooled(compressed, tok, sentences).numpy()).sum(1)
    assert float(cos.min()) > 0.99
    with pytest.raises(ExportError, match="--per-tensor applies with --int8 only"):
        cmd_export(parse([str(ckpt), "--format", "onnx", "--per-tensor", "--base", str(base),
                          "--out", str(tmp_path / "x.onnx")]))
    import onnx

    plain = tmp_path / "plain.onnx"  # by default each projection its own MatMul
    assert cmd_export(parse([str(ckpt), "--format", "onnx", "--base", str(base),
                             "--out", str(plain)])) == 0
    fused = tmp_path / "fused.onnx"
    assert cmd_export(parse([str(ckpt), "--format", "onnx", "--fuse", "--base", str(base),
                             "--out", str(fused)])) == 0
    splits = [sum(n.op_type == "Split" for n in onnx.load(str(f)).graph.node)
              for f in (plain, fused)]
    assert splits[1] == splits[0] + 2  # one a layer: query/key/value's first factors
    a, b = OnnxEncoder(plain, tok).encode(sentences), OnnxEncoder(fused, tok).encode(sentences)
    assert np.abs(a - b).max() <= 1e-5


def test_cli_onnx_weight_bits(checkpoint, compressed, tok, sentences, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tnlm.export import OnnxEncoder

    ckpt, base = checkpoint
    out = tmp_path / "m.w4.onnx"
    assert cmd_export(parse([str(ckpt), "--format", "onnx", "--weight-bits", "4",
                             "--weight-block", "16", "--embedding-bits", "4", "--base",
                             str(base), "--out", str(out)])) == 0
    said = capsys.readouterr().out
    assert "4-bit weights (weight-only, a scale per 16 rows; float32 products)" in said
    assert "and 4-bit word embeddings (blocks of 32)" in said  # 64, or the 32-wide table
    import onnx

    names = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert "model.embeddings.word_embeddings.weight.q4" in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.w4.onnx"]  # no leftovers
    cos = (OnnxEncoder(out, tok).encode(sentences)
           * mean_pooled(compressed, tok, sentences).numpy()).sum(1)
    assert float(cos.min()) > 0.9
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["tnlm.weight_compute"] == "float32"  # 4 bits: float products by default
    out8 = tmp_path / "m.w4i.onnx"
    assert cmd_export(parse([str(ckpt), "--format", "onnx", "--weight-bits", "4",
                             "--weight-block", "16", "--weight-compute", "int8", "--base",
                             str(base), "--out", str(out8)])) == 0
    assert "int8 products, the activations quantized per block" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out8)).metadata_props}
    assert meta["tnlm.weight_compute"] == "int8"
    cos8 = (OnnxEncoder(out8, tok).encode(sentences)
            * mean_pooled(compressed, tok, sentences).numpy()).sum(1)
    assert float(cos8.min()) > 0.9


def test_a_rewrite_to_the_same_name_removes_the_data_file_nothing_names(
        checkpoint, compressed, tok, sentences, tmp_path, monkeypatch):
    """An export whose weights went to external data (the limits forced to 0 here), then
    one to the same name that fits in one file: the earlier data file goes, through the
    exporter itself, the command line (which writes in a folder of its own first) and
    ``quantize_int8``; nothing else in the folder is touched."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tnlm.export import export_onnx, quantize_int8

    ckpt, base = checkpoint
    keep = tmp_path / "notes.data"
    keep.write_text("mine")
    out = tmp_path / "m.onnx"
    monkeypatch.setattr("tnlm.export.onnx_graph._EXTERNAL_BYTES", 0)
    export_onnx(compressed, tok, out, pooling="mean")
    data = {p.name for p in tmp_path.iterdir()} - {"m.onnx", "notes.data"}
    assert data  # the weights beside the file
    monkeypatch.undo()
    export_onnx(compressed, tok, out, pooling="mean")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "notes.data"]

    w8 = tmp_path / "w8.onnx"
    argv = [str(ckpt), "--format", "onnx", "--weight-bits", "8", "--weight-block", "16",
            "--base", str(base), "--out", str(w8)]
    monkeypatch.setattr("tnlm.export.weight_only._PROTOBUF_LIMIT", 0)
    assert cmd_export(parse(argv)) == 0
    assert (tmp_path / "w8.onnx.data").is_file()
    monkeypatch.undo()
    assert cmd_export(parse(argv)) == 0
    assert not (tmp_path / "w8.onnx.data").exists()

    int8 = tmp_path / "int8.onnx"
    monkeypatch.setattr("tnlm.export.weight_only._PROTOBUF_LIMIT", 0)
    from tnlm.export import quantize_weights

    quantize_weights(out, int8, block_size=16)  # an external file of that name first
    monkeypatch.undo()
    assert (tmp_path / "int8.onnx.data").is_file()
    quantize_int8(out, int8)
    assert not (tmp_path / "int8.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "int8.onnx", "m.onnx", "notes.data", "w8.onnx"]
    assert keep.read_text() == "mine"


def _external_model(path, location):
    """A one-initializer ONNX file at ``path`` whose weights sit in ``location``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]))
    onnx.save(model, str(path), save_as_external_data=True, location=location,
              size_threshold=0)
    return path


def _weights_of(path):
    """The one initializer of a :func:`_external_model`-like file, read through its data."""
    import onnx
    from onnx import numpy_helper

    return numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])


def _external_model_of(path, location, value):
    """:func:`_external_model` with every weight ``value``."""
    import onnx
    from onnx import numpy_helper

    _external_model(path, location)
    model = onnx.load(str(path))
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.full((64, 64), value, np.float32), "w"))
    (path.parent / location).unlink()
    onnx.save(model, str(path), save_as_external_data=True, location=location,
              size_threshold=0)
    return path


def test_replace_onnx_overwrites_no_data_file_and_a_failed_rename_keeps_the_former_file(
        tmp_path, monkeypatch):
    """An external export over one whose data file has the same name: the new data goes
    under a fresh name, so the former file keeps its data until the final rename; when that
    rename fails the former file is whole and nothing new is left. A user's own file that
    has the data's name is never overwritten."""
    pytest.importorskip("onnx")
    import tnlm.export.onnx_graph as og

    out = tmp_path / "out"
    out.mkdir()
    stage = tmp_path / "stage"
    stage.mkdir()
    _external_model_of(out / "m.onnx", "m.onnx.data", 1.0)
    _external_model_of(stage / "m.onnx", "m.onnx.data", 2.0)
    real = os.replace

    def failing(src, dst):
        if Path(src) == stage / "m.onnx":
            raise OSError(5, "the disk went away")
        return real(src, dst)

    monkeypatch.setattr(og.os, "replace", failing)
    with pytest.raises(OSError, match="the disk went away"):
        og.replace_onnx(stage / "m.onnx", out / "m.onnx")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (_weights_of(out / "m.onnx") == 1.0).all()  # the former file, with its own data
    assert (_weights_of(stage / "m.onnx") == 2.0).all()  # and the staged one, whole

    og.replace_onnx(stage / "m.onnx", out / "m.onnx")  # now it succeeds
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and names[0] == "m.onnx" and re.fullmatch(
        r"m\.onnx\.[0-9a-f]{8}\.data", names[1])  # the former data removed, the new renamed
    assert (_weights_of(out / "m.onnx") == 2.0).all()

    mine = out / "n.onnx.data"  # a user's file that has the name the new data wants
    mine.write_text("mine")
    _external_model_of(stage / "n.onnx", "n.onnx.data", 3.0)
    og.replace_onnx(stage / "n.onnx", out / "n.onnx")
    assert mine.read_text() == "mine" and (_weights_of(out / "n.onnx") == 3.0).all()


def test_replace_onnx_removes_only_its_own_orphans(tmp_path):
    """Overwriting a file removes the data file the former one named in its own folder;
    not through a symbolic link (its target still needs it), not a location outside the
    folder, not the source's (``keep``)."""
    pytest.importorskip("onnx")
    from tnlm.export.onnx_graph import external_files, replace_onnx

    def staged_inline(name):
        stage = tmp_path / "stage"
        stage.mkdir(exist_ok=True)
        import onnx

        model = onnx.load(str(_external_model(stage / "x.onnx", "x.onnx.data")))
        (stage / "x.onnx").unlink()
        (stage / "x.onnx.data").unlink()
        onnx.save(model, str(stage / name))  # all inside the file
        return stage / name

    out = tmp_path / "out"
    out.mkdir()
    _external_model(out / "m.onnx", "m.onnx.data")
    replace_onnx(staged_inline("m.onnx"), out / "m.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]

    _external_model(out / "v1.onnx", "v1.onnx.data")  # a link to a model that stays
    (out / "latest.onnx").symlink_to("v1.onnx")
    replace_onnx(staged_inline("latest.onnx"), out / "latest.onnx")
    assert (out / "v1.onnx.data").is_file() and external_files(out / "v1.onnx")

    (tmp_path / "shared.data").write_bytes(b"0" * 16)
    _external_model(tmp_path / "shared.onnx", "shared.data")  # another model's data
    import onnx

    _external_model(out / "f.onnx", "f.onnx.data")  # then pointed outside its folder
    foreign = onnx.load(str(out / "f.onnx"), load_external_data=False)
    for e in foreign.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../shared.data"
    onnx.save(foreign, str(out / "f.onnx"))
    (out / "f.onnx.data").unlink()
    replace_onnx(staged_inline("f.onnx"), out / "f.onnx")
    assert (tmp_path / "shared.data").is_file()

    _external_model(out / "src.onnx", "g.onnx.data")  # the source names dst's data
    import shutil

    shutil.copy(out / "src.onnx", out / "g.onnx")
    replace_onnx(staged_inline("g.onnx"), out / "g.onnx", keep=[out / "src.onnx",
                                                                *external_files(out / "src.onnx")])
    assert (out / "g.onnx.data").is_file()


def test_cli_onnx_int8_4bit_embeddings(checkpoint, compressed, tok, sentences, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from tnlm.export import OnnxEncoder

    ckpt, base = checkpoint
    out = tmp_path / "m.int8e4.onnx"
    assert cmd_export(parse([str(ckpt), "--format", "onnx", "--int8", "--embedding-bits", "4",
                             "--embedding-block", "16", "--base", str(base), "--out",
                             str(out)])) == 0
    assert "4-bit word embeddings (blocks of 16)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8e4.onnx"]
    names = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert "model.embeddings.word_embeddings.weight.q4" in names
    cos = (OnnxEncoder(out, tok).encode(sentences)
           * mean_pooled(compressed, tok, sentences).numpy()).sum(1)
    assert float(cos.min()) > 0.99


@pytest.mark.parametrize("argv,match", [
    (["{tmp}", "--format", "onnx", "--out", "{tmp}/m.onnx"], r"^DIR: .* is not a tnlm checkpoint"),
    (["{ckpt}", "--format", "hf", "--int8", "--out", "{tmp}/hf"], r"^--int8 applies to --format "
                                                                   "onnx only"),
    (["{ckpt}", "--format", "onnx", "--out", "{tmp}/m.bin"], r"^--out must be a file name "
                                                              "ending in .onnx"),
    (["{ckpt}", "--format", "onnx", "--embedding-bits", "4", "--out", "{tmp}/m.onnx"],
     r"^--embedding-bits 4 applies with --int8 or --weight-bits only"),
    (["{ckpt}", "--format", "onnx", "--int8", "--embedding-bits", "4", "--embedding-block", "7",
      "--out", "{tmp}/m.onnx"], r"^--embedding-block must be an even number"),
    (["{ckpt}", "--format", "st", "--base", "{tmp}", "--out", "{tmp}/st"],
     r"^--base .* is not a transformers model folder"),
    (["{ckpt}", "--format", "st", "--out", "{ckpt}"], r"^--out must differ from DIR"),
    (["{ckpt}", "--format", "hf", "--fuse", "--out", "{tmp}/hf"],
     r"^--fuse applies to --format onnx only"),
    (["{ckpt}", "--format", "onnx", "--fuse", "--int8", "--per-tensor", "--out", "{tmp}/m.onnx"],
     r"^--fuse with --per-tensor would give query, key and value one int8 scale"),
    (["{ckpt}", "--format", "hf", "--opset", "18", "--out", "{tmp}/hf"],
     r"^--opset applies to --format onnx only"),
    (["{ckpt}", "--format", "onnx", "--opset", "7", "--base", "{base}", "--out",
      "{tmp}/m.onnx"],
     r"^--opset 7: the exporter could not convert the graph to it, only to opset \d+; "
     r"nothing was written"),
    (["{ckpt}", "--format", "onnx", "--opset", "999", "--out", "{tmp}/m.onnx"],
     r"^--opset must be an ONNX opset between 7 and \d+ \(the installed onnx's newest\), "
     r"got 999"),
    (["{ckpt}", "--format", "onnx", "--opset", "6", "--out", "{tmp}/m.onnx"],
     r"^--opset must be an ONNX opset between 7 and"),
    (["{ckpt}", "--format", "st", "--no-pooling", "--out", "{tmp}/st"],
     r"^--no-pooling applies to --format onnx only"),
    (["{ckpt}", "--format", "onnx", "--int8", "--embedding-block", "16", "--out", "{tmp}/m.onnx"],
     r"^--embedding-block applies with --embedding-bits 4 only"),
    (["{ckpt}", "--format", "onnx", "--int8", "--weight-bits", "8", "--out", "{tmp}/m.onnx"],
     r"^--weight-bits quantizes the weights \(a scale per block of rows\).* pass one of them"),
    (["{ckpt}", "--format", "onnx", "--weight-block", "32", "--out", "{tmp}/m.onnx"],
     r"^--weight-block applies with --weight-bits only"),
    (["{ckpt}", "--format", "onnx", "--int8", "--weight-compute", "int8", "--out",
      "{tmp}/m.onnx"], r"^--weight-compute int8 applies with --weight-bits only"),
    (["{ckpt}", "--format", "onnx", "--weight-bits", "8", "--weight-block", "24", "--out",
      "{tmp}/m.onnx"], r"^--weight-block must be one of 16, 32, 64, 128, 256 .*got 24"),
    (["{ckpt}", "--format", "onnx", "--weight-bits", "8", "--embedding-bits", "8", "--out",
      "{tmp}/m.onnx"], r"^--embedding-bits 8 applies with --int8 only"),
    (["{ckpt}", "--format", "hf", "--weight-bits", "8", "--out", "{tmp}/hf"],
     r"^--weight-bits applies to --format onnx only"),
    (["{ckpt}", "--format", "hf", "--base", "{base}", "--out", "{base}"],
     r"^--out .* is a folder that is not empty; expected a new or empty folder"),
    (["{ckpt}", "--format", "st", "--base", "{base}", "--out", "/proc/tnlm-nope/st"],
     r"^--out /proc/tnlm-nope/st cannot be written"),
    (["{ckpt}", "--format", "onnx", "--base", "{base}", "--out", "/proc/tnlm-nope/m.onnx"],
     r"^--out /proc/tnlm-nope/m.onnx cannot be written"),
])
def test_cli_errors_name_the_argument(checkpoint, tmp_path, argv, match):
    ckpt, base = checkpoint
    if "/proc/" in " ".join(argv) and sys.platform != "linux":
        pytest.skip("/proc refuses new files, even to root, on Linux")
    argv = [a.format(tmp=tmp_path, ckpt=ckpt, base=base) for a in argv]
    with pytest.raises(ExportError, match=match) as err:
        cmd_export(parse(argv))
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)  # tnlm's main prints ValueErrors in one line
    assert not (tmp_path / "st").exists() and not (tmp_path / "hf").exists()
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_never_mixes_two_models_in_one_folder(checkpoint, tmp_path):
    """An export over a folder holding another export is refused (files of the first
    would be read with the second); a failed export leaves no folder and no partial
    files; a successful one leaves only its folder."""
    ckpt, base = checkpoint
    out = tmp_path / "out"
    assert cmd_export(parse([str(ckpt), "--format", "st", "--base", str(base),
                             "--out", str(out)])) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for fmt in ("hf", "st"):
        with pytest.raises(ExportError, match="is a folder that is not empty"):
            cmd_export(parse([str(ckpt), "--format", fmt, "--base", str(base),
                              "--out", str(out)]))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert "load_compressed(" in (out / "README.md").read_text()
    assert str(out) in (out / "README.md").read_text()  # the final folder, not the staging one
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ExportError, match="is a folder that is not empty"):  # again: the same
        cmd_export(parse([str(ckpt), "--format", "hf", "--base", str(base), "--out", str(out)]))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cmd_export(parse([str(ckpt), "--format", "hf", "--base", str(base),
                             "--out", str(empty)])) == 0  # an empty folder is taken
    assert (empty / "model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~umask)  # not the staging folder's 0700
    assert (empty / "README.md").read_text().startswith("# empty\n")


def test_cli_export_removes_what_a_killed_export_left(checkpoint, tmp_path):
    """``tnlm export`` stages in a folder named as the library's staging folders: the
    next export to the same --out removes what a killed one left there (its process
    gone), and keeps a running process's."""
    import subprocess

    ckpt, base = checkpoint
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tmp_path / f".st.tnlm-staging.{child.pid}.0123abcd"
    alive = tmp_path / f".st.tnlm-staging.{os.getpid()}.89abcdef"
    for d in (dead, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half a model")
    assert cmd_export(parse([str(ckpt), "--format", "st", "--base", str(base),
                             "--out", str(tmp_path / "st")])) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "st"]


def test_cli_export_that_fails_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    import tnlm.export.folder as folder_module

    def broken(model, tok, folder, **k):
        (Path(folder) / "half-written.safetensors").write_bytes(b"x")
        raise RuntimeError("disk full")

    ckpt, base = checkpoint
    monkeypatch.setattr(folder_module, "save_self_contained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        cmd_export(parse([str(ckpt), "--format", "st", "--base", str(base),
                          "--out", str(tmp_path / "new" / "sub" / "st")]))
    assert list(tmp_path.iterdir()) == []  # nor the parent folders it made
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="disk full"):  # an empty folder: emptied again
        cmd_export(parse([str(ckpt), "--format", "st", "--base", str(base),
                          "--out", str(tmp_path / "empty")]))
    assert list((tmp_path / "empty").iterdir()) == []


def test_cli_export_refuses_a_tokenizer_that_is_not_the_model_s(compressed, tok, checkpoint,
                                                               tmp_path):
    """A folder without its tokenizer is not given MiniLM's, and a --base whose config.json
    is not the folder's own is refused: its tokenizer would not be this model's."""
    _, base = checkpoint
    bare = tmp_path / "bare"
    save_self_contained(compressed, None, bare)  # config.json, no tokenizer
    with pytest.raises(ExportError, match=r"holds no tokenizer .*pass --base"):
        cmd_export(parse([str(bare), "--format", "hf", "--out", str(tmp_path / "hf")]))
    other = tmp_path / "other"
    cfg = json.loads((base / "config.json").read_text())
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    tok.save_pretrained(other)
    with pytest.raises(ExportError, match=rf"--base {other} is not the model in {bare}: "
                                          r"their config.json differ in hidden_act;"):
        cmd_export(parse([str(bare), "--format", "hf", "--base", str(other), "--out",
                          str(tmp_path / "hf")]))
    assert not (tmp_path / "hf").exists()
    same = tmp_path / "same"  # the same model with another task head: its tokenizer fits
    same.mkdir()
    (same / "config.json").write_text(json.dumps({
        **cfg, "problem_type": "single_label_classification",
        "id2label": {str(i): f"L{i}" for i in range(3)},
        "label2id": {f"L{i}": i for i in range(3)}}))
    tok.save_pretrained(same)
    args = parse([str(bare), "--format", "hf", "--base", str(same), "--out",
                  str(tmp_path / "hf")])
    assert cmd_export(args) == 0 and args.opset is None  # the caller's namespace unchanged
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["hidden_act"] == cfg["hidden_act"]
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # --base's tokenizer


def test_cli_4bit_embeddings_of_a_tied_or_mpo_table_refused_before_export(tmp_path):
    """A tied word-embedding table (a causal LM's head reads it) or an MPO embedding
    cannot be stored in 4 bits: refused after loading, before the graph is exported."""
    pytest.importorskip("onnxruntime")
    cfg = llama().config
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = get_mpo_model(LlamaForCausalLM(cfg).eval(), MPOConfig(target_modules=["q_proj"],
                                                                  max_bond=4, n_sites=2),
                         progress=False).eval()
    assert tied.base_model.get_output_embeddings().weight is \
        tied.base_model.get_input_embeddings().weight
    save_self_contained(tied, None, tmp_path / "tied")
    with pytest.raises(ExportError, match="^--embedding-bits 4: the word-embedding table is "
                                          "tied to the language-model head"):
        cmd_export(parse([str(tmp_path / "tied"), "--format", "onnx", "--int8",
                          "--embedding-bits", "4", "--out", str(tmp_path / "t.onnx")]))
    enc = get_mpo_model(bert(), MPOConfig(target_modules=["word_embeddings"], max_bond=4,
                                          n_sites=2), progress=False).eval()
    save_self_contained(enc, make_bert_tokenizer_for(tmp_path), tmp_path / "emb")
    with pytest.raises(ExportError, match="^--embedding-bits 4: the word embeddings are a "
                                          "MPOEmbedding"):
        cmd_export(parse([str(tmp_path / "emb"), "--format", "onnx", "--int8",
                          "--embedding-bits", "4", "--out", str(tmp_path / "e.onnx")]))
    assert not list(tmp_path.glob("*.onnx"))
    # --weight-bits gives the tied head its own quantized copy: the table can be 4-bit
    import onnx

    out = tmp_path / "w.onnx"
    assert cmd_export(parse([str(tmp_path / "tied"), "--format", "onnx", "--weight-bits", "8",
                             "--embedding-bits", "4", "--out", str(out)])) == 0
    g = onnx.load(str(out)).graph
    vocab = tied.base_model.config.vocab_size
    assert any(t.name.endswith(".q4") for t in g.initializer)
    assert not [t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT
                and len(t.dims) == 2 and vocab in t.dims and not t.name.endswith("_scales")]
    # neither the float table nor a float head is left
    assert not any(n.op_type == "Transpose" and n.input[0] in {t.name for t in g.initializer}
                   for n in g.node)


def make_bert_tokenizer_for(tmp_path):
    d = tmp_path / "vocab"
    d.mkdir()
    return make_bert_tokenizer(d)



def test_a_lightweight_checkpoint_naming_no_base_is_not_given_the_working_folder(
        tmp_path, monkeypatch):
    """An in-memory model's lightweight checkpoint names no base (""); it is refused,
    never rebuilt on whatever model folder the working directory is."""
    model = get_mpo_model(bert(), MPOConfig(target_modules=["query"], n_sites=3),
                          progress=False)
    model.save_pretrained(tmp_path / "light", lightweight=True)
    bert(seed=1).save_pretrained(tmp_path / "cwd")  # a model folder as working directory
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(ValueError, match="lightweight task checkpoint: it needs its base"):
        load_compressed(tmp_path / "light", base=None)


def test_sentence_transformers_files_need_a_tokenizer_and_a_length_the_model_has(
        compressed, tok, tmp_path):
    """Without its tokenizer a sentence-transformers folder encoded every word as [UNK];
    a truncation length beyond the model's positions failed at encode time."""
    from tnlm.export import sentence_transformer

    with pytest.raises(ValueError, match="sentence_transformers=True needs the tokenizer"):
        save_self_contained(compressed, None, tmp_path / "st", sentence_transformers=True)
    bare = save_self_contained(compressed, None, tmp_path / "bare")  # the default: no ST files
    assert not (bare / "modules.json").exists()
    for bad in (0, -5, True, 65, 2.0):  # the model has 64 positions
        with pytest.raises(ValueError, match=r"max_seq_length must be an int in \[1, 64\]"):
            save_self_contained(compressed, tok, tmp_path / f"bad{bad}", max_seq_length=bad)
    d = save_self_contained(compressed, tok, tmp_path / "ok")  # default: min(128, 64)
    assert json.loads((d / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="holds no tokenizer"):
        sentence_transformer(d)


def test_table4_default_block_fits_a_narrow_table():
    """The default block is 64 columns, or the table's width (rounded up to even) where
    that is fewer; a block asked for wider than that is refused."""
    from tnlm.export.table4 import quantize_table_4bit, table_block

    assert table_block(384) == 64 and table_block(32) == 32 and table_block(7) == 8
    assert table_block(32, 16) == 16
    with pytest.raises(ValueError, match=r"block_size 64 is wider than the table \(32"):
        table_block(32, 64)
    t = quantize_table_4bit(np.ones((4, 6), np.float32))
    assert t.block_size == 6 and t.scale.shape == (4, 1)


def test_cli_opset_allows_what_the_library_allows(checkpoint, tmp_path):
    """``tnlm export --opset`` allowed 7-23 while ``export_onnx`` allows up to the
    installed onnx's newest opset (28 with onnx 1.20): the CLI refused 24-28 before any
    work. The two now share one bound: the newest passes the CLI's checks."""
    from tnlm.cli.export import _check_args
    from tnlm.export.onnx_graph import newest_opset

    ckpt, _ = checkpoint
    args = parse([str(ckpt), "--format", "onnx", "--opset", str(newest_opset()), "--out",
                  str(tmp_path / "m.onnx")])
    _check_args(args)
    assert args.opset == newest_opset()
