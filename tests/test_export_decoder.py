"""tnlm.export.onnx_decoder: a causal LM's ONNX graph with its key/value cache, run by
ONNX Runtime against transformers (logits, greedy generation, the cache passed back in),
on random-init decoders of width 32 (a compressed Llama with GQA, GPT-2, OPT), int8, the
CLI, and the refusals."""

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from tests.common import one_thread  # noqa: F401  (module-scoped autouse fixture)
from tnlm.integration import MPOConfig, get_mpo_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tnlm.export import OnnxCausalLM, export_onnx_decoder  # noqa: E402
from tnlm.export.onnx_decoder import cache_shape  # noqa: E402

V = 64


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    return get_mpo_model(model, MPOConfig(target_modules=["q_proj", "k_proj", "v_proj",
                                                          "up_proj", "down_proj"],
                                          max_bond=4, n_sites=3), progress=False).eval()


def gpt2():
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2)).eval()


def opt():
    torch.manual_seed(2)
    return OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32,
                                    max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2)).eval()


MODELS = {"llama-mpo": llama, "gpt2": gpt2, "opt": opt}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    model = MODELS[request.param]()
    path = tmp_path_factory.mktemp("dec") / "model.onnx"
    res = export_onnx_decoder(model, path)
    return model, res, OnnxCausalLM(path)


def batch(seed=0, seq=7):
    """Two prompts, the first left-padded by two positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(1) - 1).clamp(min=0)


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask,
                     position_ids=positions(mask)).logits.numpy()


def test_graph_names_the_cache_like_onnx_decoders(exported):
    model, res, runner = exported
    layers, kv_heads, head_dim = cache_shape(model.config)
    assert res["cache"] == (layers, kv_heads, head_dim) and layers == 2
    assert res["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert res["inputs"][3:] == [f"past_key_values.{i}.{kv}" for i in range(layers)
                                 for kv in ("key", "value")]
    assert res["outputs"] == ["logits"] + [f"present.{i}.{kv}" for i in range(layers)
                                           for kv in ("key", "value")]
    assert (runner.kv_heads, runner.head_dim) == (kv_heads, head_dim)


def test_logits_match_torch_with_left_padding(exported):
    model, _, runner = exported
    ids, mask = batch()
    got, want = runner.logits(ids, mask), torch_logits(model, ids, mask)
    assert got.shape == want.shape == (2, 7, V)
    # the padded positions of row 0 are not compared (their values are not defined)
    assert np.abs(got[1] - want[1]).max() <= 1e-4
    assert np.abs(got[0, 2:] - want[0, 2:]).max() <= 1e-4


def test_cache_passed_back_in_equals_one_pass(exported):
    """The prompt split in two passes (the second fed the first's present) gives the
    logits of one pass over the whole prompt."""
    model, _, runner = exported
    ids, mask = batch(seed=3, seq=9)
    ids_np, mask_np = ids.numpy(), mask.numpy()
    pos = positions(mask).numpy()
    first, past = runner._run(ids_np[:, :5], mask_np[:, :5], pos[:, :5], runner._empty(2))
    assert past[0].shape == (2, runner.kv_heads, 5, runner.head_dim)
    second, past = runner._run(ids_np[:, 5:], mask_np, pos[:, 5:], past)
    assert past[0].shape[2] == 9
    whole = torch_logits(model, ids, mask)
    assert np.abs(second - whole[:, 5:]).max() <= 1e-4
    assert np.abs(first[1] - whole[1, :5]).max() <= 1e-4


def test_greedy_generation_equals_transformers(exported):
    model, _, runner = exported
    ids, mask = batch(seed=5)
    got = runner.generate(ids, mask, max_new_tokens=12, eos_token_id=None)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                              do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    assert got.shape == want.shape == (2, 19)
    assert np.array_equal(got, want)


def test_generation_stops_each_row_at_eos_as_transformers(exported):
    """With the first token row 0 generates declared EOS, row 0 ends at once and is padded,
    token for token what transformers' generate returns with that EOS."""
    model, _, runner = exported
    ids, mask = batch(seed=7)
    free = runner.generate(ids, mask, max_new_tokens=6)
    eos = int(free[0, 7])
    got = runner.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert got[0, 7] == eos and (got[0, 8:] == 0).all()
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                              do_sample=False, eos_token_id=eos, pad_token_id=0).numpy()
    assert np.array_equal(got, want[:, :got.shape[1]])
    assert got.shape[1] == want.shape[1] or (want[:, got.shape[1]:] == 0).all()


def test_int8_decoder_graph_generates(exported, tmp_path):
    from tnlm.export import quantize_int8

    model, res, runner = exported
    out = tmp_path / "model.int8.onnx"
    size = quantize_int8(res["path"], out)
    assert size < res["bytes"]
    q = OnnxCausalLM(out)
    ids, mask = batch(seed=9)
    got, want = q.logits(ids, mask)[1], runner.logits(ids, mask)[1]
    # int8 weights: close to the float32 graph, not equal
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < rel < 0.2
    assert q.generate(ids, mask, max_new_tokens=4).shape == (2, 11)


def test_weight_only_decoder_graph_is_closer_than_int8(exported, tmp_path):
    """quantize_weights: MatMulNBits with float activations; 8 bits stays far closer to
    the float32 graph than dynamic int8, 4 bits is smaller than 8; both generate."""
    import onnx

    from tnlm.export import quantize_int8, quantize_weights

    model, res, runner = exported
    ids, mask = batch(seed=9)
    want = runner.logits(ids, mask)[1]

    def rel(path):
        got = OnnxCausalLM(path).logits(ids, mask)[1]
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    quantize_int8(res["path"], tmp_path / "int8.onnx")
    sizes = {b: quantize_weights(res["path"], tmp_path / f"w{b}.onnx", bits=b) for b in (8, 4)}
    assert sizes[4] < sizes[8] < res["bytes"]
    graph = onnx.load(str(tmp_path / "w8.onnx"))
    assert any(n.op_type == "MatMulNBits" for n in graph.graph.node)
    assert not any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
                   for n in graph.graph.node)
    assert {p.key: p.value for p in graph.metadata_props}["tnlm.weight_bits"] == "8"
    r8, r4, r_int8 = rel(tmp_path / "w8.onnx"), rel(tmp_path / "w4.onnx"), rel(
        tmp_path / "int8.onnx")
    # 8 bits with int8 compute (the default): activations per block of 32, closer than
    # dynamic int8's one scale a tensor; with float compute closer still
    assert 0 < r8 < 0.02 and r8 < 0.75 * r_int8
    quantize_weights(res["path"], tmp_path / "w8f.onnx", bits=8, compute=1)
    r8f = rel(tmp_path / "w8f.onnx")
    assert r8f <= r8 and r8f < r_int8 / 2
    assert r8 < r4 < 0.3
    q = OnnxCausalLM(tmp_path / "w8.onnx")
    assert q.generate(ids, mask, max_new_tokens=4).shape == (2, 11)


def test_refusals(tmp_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=4, intermediate_size=64)).eval()
    with pytest.raises(ValueError, match=r"^model: expected a causal LM .* BertModel"):
        export_onnx_decoder(bert, tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()
    with pytest.raises(ValueError, match="num_hidden_layers"):
        cache_shape(object())


def test_an_opset_the_exporter_cannot_write_is_said(tmp_path):
    """The exporter writes 18 and converts; where it cannot (opset 12 here), the file says
    18 and a warning says so: no silently other opset."""
    with pytest.warns(UserWarning, match=r"opset 12 was asked for.* is opset 18"):
        res = export_onnx_decoder(gpt2(), tmp_path / "o.onnx", opset=12)
    assert res.opset == 18


def test_runner_refusals(exported, tmp_path):
    from onnx import TensorProto, helper, save

    _, _, runner = exported
    g = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, None)],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]),
         str(tmp_path / "enc.onnx"))
    with pytest.raises(ValueError, match=r"^path: .* is not a cached decoder graph"):
        OnnxCausalLM(tmp_path / "enc.onnx")
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"^max_new_tokens must be an int >= 1"):
        runner.generate(ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"^attention_mask: expected the shape"):
        runner.generate(ids, mask[:, 1:])
    with pytest.raises(ValueError, match=r"^input_ids: expected shape \(batch, seq\)"):
        runner.logits(ids[0])
    right = torch.ones_like(mask)
    right[0, -2:] = 0  # right padding: the next token would be read at a pad
    with pytest.raises(ValueError, match=r"^attention_mask: expected left padding"):
        runner.generate(ids, right)
    with pytest.raises(ValueError, match=r"^attention_mask: expected values 0 and 1"):
        runner.logits(ids, mask * 2)
    with pytest.raises(ValueError, match=r"^input_ids: expected token ids >= 0"):
        runner.logits(ids - 100)
    with pytest.raises(ValueError, match=rf"^input_ids: expected token ids < the vocabulary "
                                         rf"size {V}"):
        runner.logits(ids + V)


def test_sliding_window_cache_is_refused(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, sliding_window=4)).eval()
    with pytest.raises(ValueError, match=r"^model: MistralForCausalLM's cache has "
                                         r"DynamicSlidingWindowLayer layers"):
        export_onnx_decoder(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_factors_are_exported_not_w(exported):
    model, res, _ = exported
    if not isinstance(model.base_model, LlamaForCausalLM):
        assert res["mpo_layers"] == 0
        return
    assert res["mpo_layers"] == 10  # q, k, v, up, down of 2 layers
    dense = sum(p.numel() for p in LlamaForCausalLM(model.config).parameters())
    assert res["weights"] < dense


def test_cli_exports_a_causal_lm_with_its_cache(tmp_path, capsys):
    from tests.test_export import parse
    from tnlm.cli.export import cmd_export
    from tnlm.export import save_self_contained

    model = llama()
    save_self_contained(model, None, tmp_path / "lm", sentence_transformers=False)
    out = tmp_path / "lm.onnx"
    assert cmd_export(parse([str(tmp_path / "lm"), "--format", "onnx", "--out", str(out)])) == 0
    line = capsys.readouterr().out
    assert "present.{0..1}.key/value" in line and "OnnxCausalLM" in line
    runner = OnnxCausalLM(out)
    ids, mask = batch(seed=11)
    assert np.abs(runner.logits(ids, mask)[1] - torch_logits(model, ids, mask)[1]).max() <= 1e-4


def test_a_model_marked_quantized_exports_in_float32(tmp_path):
    """A GGUF-loaded model is marked quantized by transformers, which then refuses
    ``.float()``; the export casts tensor by tensor and leaves the model as it was."""
    import copy

    from tnlm.export.onnx_graph import as_float32

    torch.manual_seed(4)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2)).eval().to(torch.bfloat16)
    model.is_quantized = True
    with pytest.raises(ValueError, match="quantized"):
        model.float()
    res = export_onnx_decoder(model, tmp_path / "q.onnx")
    assert next(model.parameters()).dtype == torch.bfloat16  # a copy was exported
    ref = as_float32(copy.deepcopy(model))
    assert next(ref.parameters()).dtype == torch.float32
    ids, mask = batch(seed=13)
    got = OnnxCausalLM(res["path"]).logits(ids, mask)[1]
    assert np.abs(got - torch_logits(ref, ids, mask)[1]).max() <= 1e-4
