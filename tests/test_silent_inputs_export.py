"""Inputs of the export layer that were once accepted silently (a wrong or unloadable
file, a setting ignored) or failed late, after the export: each is now refused before
any work, naming the argument. Small hand-built ONNX graphs and a random-init BERT of
width 32; the exporter itself is stubbed where only the checks before it matter."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from tests.common import (
    dead_pid,
    make_bert_tokenizer,
    one_thread,  # noqa: F401  (module-scoped autouse fixture)
)
from tests.test_export import _low_rank_chain
from tnlm.export import save_self_contained
from tnlm.integration import MPOConfig, get_mpo_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64)).eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_bert_tokenizer(tmp_path_factory.mktemp("vocab"))


# ------------------------------------------------------------------ weight-only, int8
def test_quantize_weights_refuses_a_float_compute_and_a_folder_dst(tmp_path):
    """``compute=4.0`` compared equal to 4 and was written as a float ``accuracy_level``
    attribute: a file ONNX Runtime refuses to load (metadata saying int8). A folder as
    ``dst`` failed after the whole quantization with ``IsADirectoryError``."""
    import onnxruntime as ort

    from tnlm.export import quantize_weights

    src = tmp_path / "chain.onnx"
    _low_rank_chain(src)
    with pytest.raises(ValueError, match=r"compute must be None, 1 \(float32\) or 4 \(int8\), "
                                         r"got 4\.0"):
        quantize_weights(src, tmp_path / "bad.onnx", compute=4.0)
    assert not (tmp_path / "bad.onnx").exists()
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(ValueError, match="dst .* is a folder; expected the file to write"):
        quantize_weights(src, folder)
    assert list(folder.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # the int loads and runs, as before
    quantize_weights(src, tmp_path / "ok.onnx", compute=4)
    ort.InferenceSession(str(tmp_path / "ok.onnx"), providers=["CPUExecutionProvider"])


def test_a_4bit_block_size_without_4bit_embeddings_is_refused(tmp_path):
    """``quantize_weights(embedding_block=...)`` without ``embedding_bits=4`` and
    ``quantize_int8(block_size=...)`` with the int8 table were ignored (not even
    checked: ``embedding_block=7`` passed)."""
    from tnlm.export import quantize_int8, quantize_weights

    src = tmp_path / "chain.onnx"
    _low_rank_chain(src)
    for block in (16, 7):
        with pytest.raises(ValueError, match=rf"embedding_block={block} applies with "
                                             r"embedding_bits=4 only"):
            quantize_weights(src, tmp_path / "bad.onnx", embedding_block=block)
    with pytest.raises(ValueError, match=r"block_size=16 applies with embedding_bits=4 only"):
        quantize_int8(src, tmp_path / "bad.onnx", block_size=16)
    with pytest.raises(ValueError, match=r"block_size=16 applies with embedding_bits=4 only"):
        quantize_int8(src, tmp_path / "bad.onnx", embedding_bits=8, block_size=16)
    assert not (tmp_path / "bad.onnx").exists()
    # without the block, as before
    assert quantize_weights(src, tmp_path / "w.onnx") > 0
    assert quantize_int8(src, tmp_path / "i.onnx") > 0


# ------------------------------------------------------------------ the exporters
def _no_export(*args, **kwargs):
    raise AssertionError("the export started")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(opset=True), TypeError, r"opset must be an int \(an ONNX opset version\), got True"),
    (dict(opset=20.0), TypeError, r"opset must be an int .*got 20\.0"),
    (dict(opset="20"), TypeError, r"opset must be an int .*got '20'"),
    (dict(opset=99), ValueError, r"opset must be an ONNX opset between 7 and \d+, got 99"),
    (dict(opset=5), ValueError, r"opset must be an ONNX opset between 7 and \d+, got 5"),
    (dict(fuse="no"), TypeError, r"fuse must be a bool, got 'no'"),
    (dict(trace_metadata="no"), TypeError, r"trace_metadata must be a bool, got 'no'"),
    (dict(verbose=1), TypeError, r"verbose must be a bool, got 1"),
    (dict(path="."), ValueError, r"path .* is a folder; expected the \.onnx file to write"),
])
@pytest.mark.parametrize("which", ["export_onnx", "export_onnx_decoder"])
def test_exporters_check_opset_flags_and_path_before_exporting(which, kwargs, error, match,
                                                               tok, tmp_path, monkeypatch):
    """``opset=True`` (or 99, or 5) exported the whole model and wrote opset 18 with a
    warning, ``20.0`` failed inside the exporter; ``fuse="no"`` fused; a folder as
    ``path`` failed after the export with ``IsADirectoryError``."""
    from tnlm.export import onnx_decoder, onnx_graph

    monkeypatch.setattr(onnx_graph, "export_copy", _no_export)
    monkeypatch.setattr(onnx_decoder, "export_copy", _no_export)
    kwargs = dict(kwargs)
    path = kwargs.pop("path", tmp_path / "m.onnx")
    if path == ".":
        path = tmp_path
    with pytest.raises(error, match=f"^{which}: {match}"):
        if which == "export_onnx":
            onnx_graph.export_onnx(tiny_bert(), tok, path, **kwargs)
        else:
            onnx_decoder.export_onnx_decoder(tiny_bert(), path, **kwargs)
    assert not (tmp_path / "m.onnx").exists()


def test_exporters_keep_their_valid_arguments(tok, tmp_path):
    """An int opset in range, bool flags and a file path export as before."""
    from tnlm.export import export_onnx

    res = export_onnx(tiny_bert(), tok, tmp_path / "m.onnx", opset=20,
                      fuse=False, trace_metadata=False, verbose=False)
    assert res.opset == 20 and res.path.is_file()


# ------------------------------------------------------------------ the runners
def _pooled_graph(path):
    """A graph with the inputs of an exported encoder and ``sentence_embedding`` = the
    sum of each row's token ids (float, shape (batch, 1))."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["b", 1])
    nodes = [helper.make_node("Mul", ["input_ids", "attention_mask"], ["kept"]),
             helper.make_node("ReduceSum", ["kept", "axes"], ["total"], keepdims=1),
             helper.make_node("Cast", ["total"], ["sentence_embedding"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [ids, mask], [out],
                              [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_onnx_encoder_refuses_one_string_and_lengths_that_are_not_ints(tok, tmp_path):
    """``encode("the cat")`` encoded each of its 7 characters as a sentence;
    ``max_length=True`` truncated every sentence to its first token ([CLS]); 12.7 was
    12; ``threads=True`` was one thread; ``batch_size=0`` failed in ``range``."""
    from tnlm.export import OnnxEncoder

    path = _pooled_graph(tmp_path / "pooled.onnx")
    enc = OnnxEncoder(path, tok)
    with pytest.raises(TypeError, match=r"sentences must be a list of strings, got one string "
                                        r"\('the cat'\).*pass \[text\]"):
        enc.encode("the cat")
    for bad, error in ((0, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match="batch_size must be"):
            enc.encode(["the cat"], batch_size=bad)
    for bad, error in ((True, TypeError), (12.7, TypeError), (0, ValueError)):
        with pytest.raises(error, match="max_length must be"):
            OnnxEncoder(path, tok, max_length=bad)
    for bad, error in ((True, TypeError), (2.5, TypeError), (-1, ValueError)):
        with pytest.raises(error, match="threads must be"):
            OnnxEncoder(path, tok, threads=bad)
    # valid input as before: one row per sentence, the ids of the whole sentence
    got = OnnxEncoder(path, tok, threads=1, max_length=64).encode(["the cat", "a"],
                                                                  batch_size=1)
    want = [sum(tok(s)["input_ids"]) for s in ("the cat", "a")]
    assert got.shape == (2, 1) and got[:, 0].tolist() == want


V = 16


def _decoder_graph(path):
    """A graph with the inputs and outputs of :func:`export_onnx_decoder` (one layer, 2
    heads of 4): ``logits[..., v] = v * id`` (the next token is 15 after any id > 0),
    ``present`` = ``past``."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info(n, i64, ["b", s]) for n, s in
              (("input_ids", "s"), ("attention_mask", "t"), ("position_ids", "s"))]
    inputs += [helper.make_tensor_value_info(f"past_key_values.0.{kv}", f, ["b", 2, "p", 4])
               for kv in ("key", "value")]
    outputs = [helper.make_tensor_value_info("logits", f, ["b", "s", V])]
    outputs += [helper.make_tensor_value_info(f"present.0.{kv}", f, ["b", 2, "p", 4])
                for kv in ("key", "value")]
    nodes = [helper.make_node("Cast", ["input_ids"], ["x"], to=f),
             helper.make_node("Unsqueeze", ["x", "last"], ["x1"]),
             helper.make_node("Mul", ["x1", "levels"], ["logits"]),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.arange(V, dtype=np.float32), "levels")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_generate_refuses_eos_and_pad_ids_that_are_not_token_ids(tmp_path):
    """``pad_token_id=True`` padded with token 1, ``eos_token_id=15.5`` was token 15, a pad
    id beyond the vocabulary failed inside ONNX Runtime once a row had ended (1.5: a
    dtype error there), an EOS of -1 or 99 could never be generated."""
    from tnlm.export import OnnxCausalLM

    lm = OnnxCausalLM(_decoder_graph(tmp_path / "dec.onnx"))
    ids = np.array([[3, 4], [0, 0]])  # row 0 ends at once with EOS 15, row 1 runs
    for kw, match in ((dict(pad_token_id=True), r"pad_token_id must be an int token id.*True"),
                      (dict(pad_token_id=1.5), r"pad_token_id must be an int token id.*1\.5"),
                      (dict(pad_token_id=V), rf"pad_token_id must be a token id in \[0, {V}\), "
                                             rf"got {V}"),
                      (dict(pad_token_id=-1), r"pad_token_id must be a token id in"),
                      (dict(eos_token_id=15.5), r"eos_token_id must be an int token id"),
                      (dict(eos_token_id=[15, True]), r"eos_token_id must be an int.*True"),
                      (dict(eos_token_id=np.array([15.0])), r"eos_token_id must be an int"),
                      (dict(eos_token_id=99), r"eos_token_id must be a token id in \[0, 16\)"),
                      (dict(eos_token_id=-1), r"eos_token_id must be a token id in")):
        with pytest.raises(ValueError, match=match):
            lm.generate(ids, max_new_tokens=3, eos_token_id=kw.get("eos_token_id", 15),
                        pad_token_id=kw.get("pad_token_id"))
    # valid ids as before: ints, numpy ints, lists and arrays of them
    want = [[3, 4, 15, 7, 7], [0, 0, 0, 0, 0]]
    assert lm.generate(ids, max_new_tokens=3, eos_token_id=15, pad_token_id=7).tolist() == want
    assert lm.generate(ids, max_new_tokens=3, eos_token_id=np.array([2, 15]),
                       pad_token_id=np.int64(7)).tolist() == want
    assert lm.generate(ids, max_new_tokens=3, eos_token_id=[15],
                       pad_token_id=torch.tensor(7)).tolist() == want
    assert lm.generate(ids, max_new_tokens=2).tolist() == [[3, 4, 15, 15], [0, 0, 0, 0]]


# ------------------------------------------------------------------ the folder
def test_save_self_contained_refuses_non_bool_flags_and_an_unused_max_seq_length(tok,
                                                                                 tmp_path):
    """``sentence_transformers="no"`` wrote the sentence-transformers files (a truthy
    string), ``keep_sentence_files="no"`` kept an earlier save's; ``max_seq_length`` was
    dropped without a word where no sentence-transformers files are written."""
    model = get_mpo_model(tiny_bert(), MPOConfig(target_modules=["query"], n_sites=2,
                                                 max_bond=4), progress=False)
    for kw, error, match in (
            (dict(sentence_transformers="no"), TypeError,
             r"sentence_transformers must be None or a bool, got 'no'"),
            (dict(sentence_transformers=0), TypeError, "sentence_transformers must be"),
            (dict(keep_sentence_files="no"), TypeError,
             r"keep_sentence_files must be a bool, got 'no'"),
            (dict(sentence_transformers=False, max_seq_length=32), ValueError,
             r"max_seq_length=32 is the sentence-transformers truncation length, but no "
             r"sentence-transformers files are written \(sentence_transformers=False\)"),
            (dict(keep_sentence_files=True, max_seq_length=32), ValueError,
             r"no sentence-transformers files are written \(keep_sentence_files=True"),
            (dict(tokenizer=None, max_seq_length=32), ValueError,
             r"no sentence-transformers files are written \(tokenizer=None\)")):
        kw = dict(kw)
        t = kw.pop("tokenizer", tok)
        with pytest.raises(error, match=match):
            save_self_contained(model, t, tmp_path / "bad", **kw)
        assert not (tmp_path / "bad").exists()
    # valid flags as before
    d = save_self_contained(model, tok, tmp_path / "st", max_seq_length=32)
    assert json.loads((d / "sentence_bert_config.json").read_text())["max_seq_length"] == 32
    plain = save_self_contained(model, tok, tmp_path / "plain", sentence_transformers=False)
    assert not (plain / "modules.json").exists()


def test_an_export_that_fails_leaves_an_existing_graph_as_it_was(tok, tmp_path, monkeypatch):
    """The exporter wrote straight into ``path``: an export that failed while writing left
    half a file where the previous graph was. It now writes beside it and renames."""
    from tnlm.export import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(tiny_bert(), tok, path)
    before = path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]

    def broken(graph, args, f, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a graph")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="killed while writing"):
        export_onnx(tiny_bert(), tok, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ------------------------------------------------------------------ folders of other models
def _mpo_bert():
    return get_mpo_model(tiny_bert(), MPOConfig(target_modules=["query"], n_sites=2,
                                                max_bond=4), progress=False)


def _listing(folder):
    return {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _dense_folder(folder, tok):
    """A transformers model's folder (a tiny BERT and ``tok``); returns its listing."""
    tiny_bert().save_pretrained(folder)
    tok.save_pretrained(folder)
    return _listing(folder)


def test_save_self_contained_refuses_a_folder_holding_another_model_s_weights(tok, tmp_path):
    """Saved into a transformers model's folder (or an earlier ``export_hf``), the old
    ``model.safetensors`` stayed: ``AutoModel.from_pretrained(folder)`` silently loaded
    the old dense weights. Now refused before anything is written, naming both."""
    folder = tmp_path / "dense"
    before = _dense_folder(folder, tok)
    with pytest.raises(ValueError, match=rf"save_self_contained: {folder} holds another "
                                         r"model's weights \(model\.safetensors\), which "
                                         r"AutoModel\.from_pretrained would load"):
        save_self_contained(_mpo_bert(), tok, folder)
    assert _listing(folder) == before
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "pytorch_model-00001-of-00002.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"pytorch_model-00001-of-00002\.bin"):
        save_self_contained(_mpo_bert(), tok, sharded)
    assert sorted(p.name for p in sharded.iterdir()) == ["pytorch_model-00001-of-00002.bin"]
    # a folder of an earlier save is replaced as before
    d = save_self_contained(_mpo_bert(), tok, tmp_path / "st")
    assert save_self_contained(_mpo_bert(), tok, d) == d and not (d / "model.safetensors").exists()


def test_export_hf_refuses_a_tnlm_checkpoint_folder_and_counts_its_own_weights(tok, tmp_path):
    """``export_hf`` into a ``save_self_contained`` folder left two models in one folder
    and reported the MPO weights' file in its size; a user's ``*.safetensors`` beside it
    was counted too."""
    from tnlm.export import export_hf

    folder = save_self_contained(_mpo_bert(), tok, tmp_path / "mpo")
    before = _listing(folder)
    with pytest.raises(ValueError, match=rf"export_hf: {folder} holds a tnlm checkpoint "
                                         r"\(mpo_config\.json, mpo_model-[0-9a-f]{12}"
                                         r"\.safetensors\).*two models in one folder"):
        export_hf(tiny_bert(), folder, tok, quiet=True)
    assert _listing(folder) == before
    killed = tmp_path / "killed"  # a save killed before its config: its weights alone
    killed.mkdir()
    (killed / "mpo_model-0123456789ab.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds a tnlm checkpoint \(mpo_model-0123456789ab"):
        export_hf(tiny_bert(), killed, tok, quiet=True)
    assert [p.name for p in killed.iterdir()] == ["mpo_model-0123456789ab.safetensors"]
    # its own weights only, not a user's file beside them
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.safetensors").write_bytes(b"x" * 1000)
    res = export_hf(_mpo_bert(), out, tok, quiet=True)
    assert res["bytes"] == (out / "model.safetensors").stat().st_size


def test_export_hf_merges_a_plain_model_holding_mpo_layers(tok, tmp_path):
    """A model compressed in place (not an MPOModel: compress_causal_lm's, or
    MPOModel.base_model) was saved unmerged: its folder held ``*.cores.N`` tensors, which
    AutoModel.from_pretrained replaced by random weights with a warning only."""
    from transformers import AutoModel

    from tnlm.export import export_hf

    mpo = _mpo_bert()
    plain = mpo.base_model  # holds the MPO layers, not wrapped
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = plain(input_ids=ids).last_hidden_state
    res = export_hf(plain, tmp_path / "hf", tok, quiet=True)
    loaded = AutoModel.from_pretrained(res["folder"]).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).last_hidden_state
    assert (got - want).abs().max() < 1e-5
    assert res["params"] == sum(p.numel() for p in loaded.parameters())
    assert any(type(m).__name__ == "MPOLinear" for m in plain.modules())  # unchanged


def test_export_hf_replaces_an_earlier_export_whole_and_refuses_another_models_folder(
        tok, tmp_path):
    """export_hf wrote in place: into a base model's own folder its weights were
    overwritten, and over an earlier export that folder's other files stayed (a
    chat_template.jinja the new tokenizer does not have is loaded with it). Now another
    dense model's folder is refused, unchanged; an earlier export is replaced whole, the
    user's own files kept."""
    from tnlm.export import export_hf

    base = tmp_path / "base"
    before = _dense_folder(base, tok)
    with pytest.raises(ValueError, match=rf"export_hf: {base} holds another model's "
                                         r"weights \(model\.safetensors\), not an earlier "
                                         r"export's"):
        export_hf(_mpo_bert(), base, tok, quiet=True)
    assert _listing(base) == before
    out = tmp_path / "hf"
    export_hf(_mpo_bert(), out, tok, quiet=True)
    (out / "chat_template.jinja").write_text("{{ stale }}")
    (out / "notes.txt").write_text("mine")
    export_hf(_mpo_bert(), out, tok, quiet=True)
    assert not (out / "chat_template.jinja").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing staged
    # save_self_contained: the same, over an earlier save
    st = save_self_contained(_mpo_bert(), tok, tmp_path / "st")
    (st / "chat_template.jinja").write_text("{{ stale }}")
    (st / "notes.txt").write_text("mine")
    save_self_contained(_mpo_bert(), tok, st)
    assert not (st / "chat_template.jinja").exists() and (st / "notes.txt").is_file()


def test_a_library_save_that_fails_leaves_nothing_and_one_in_place_no_earlier_files(
        tok, tmp_path, monkeypatch):
    """A new folder written in place (write_folder) and a failed write: its partial files
    stayed, and export_hf's retry was refused as "another model's weights". Now it is
    emptied again. A folder written in place (the working folder: cannot be renamed) got
    the new model beside the earlier one's files; they are removed first, the user's
    kept."""
    from tnlm.export import export_hf

    out = tmp_path / "hf"
    real = type(tok).save_pretrained

    def broken(self, *a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf(_mpo_bert(), out, tok, quiet=True)  # the weights written, then this
    assert not out.exists()
    monkeypatch.setattr(type(tok), "save_pretrained", real)
    assert export_hf(_mpo_bert(), out, tok, quiet=True)["bytes"] > 0
    # the working folder: written in place, the earlier model's files removed first
    st = save_self_contained(_mpo_bert(), tok, tmp_path / "st")
    (st / "chat_template.jinja").write_text("{{ stale }}")
    (st / "notes.txt").write_text("mine")
    monkeypatch.chdir(st)
    save_self_contained(_mpo_bert(), tok, st)
    assert not (st / "chat_template.jinja").exists() and (st / "notes.txt").is_file()
    assert (st / "mpo_config.json").is_file()


# ------------------------------------------------------------------ the factorized embedding
def test_factorized_embedding_refuses_ids_outside_the_vocabulary(tok, tmp_path):
    """Ids 100, 64 and -1 (vocabulary 64) gave rows 36, 0 and 63, in torch and in the
    exported graph, where ``MPOEmbedding`` raises ``IndexError`` and the dense graph's
    ``Gather`` fails. Now ``IndexError`` in torch; the graph's ``Gather`` fails."""
    import onnxruntime as ort

    from tnlm.bridge import MPOEmbedding
    from tnlm.export import FactorizedEmbedding, export_onnx

    torch.manual_seed(0)
    for vocab in (64, 31):  # exact (8 x 8), and padded to 32
        emb = torch.nn.Embedding(vocab, 8)
        f = FactorizedEmbedding(MPOEmbedding.from_embedding(emb, n_sites=2))
        for bad in (100, vocab, -1):
            with pytest.raises(IndexError, match=rf"token ids must be in \[0, {vocab}\), got "
                                                 rf"range \[{min(bad, 0)}, {max(bad, 2)}\]"):
                f(torch.tensor([[0, bad], [2, 1]]))
        ids = torch.arange(vocab)
        torch.testing.assert_close(f(ids), emb.weight.detach(), atol=1e-5, rtol=1e-5)
        assert f(torch.zeros(0, dtype=torch.long)).shape == (0, 8)
    model = get_mpo_model(tiny_bert(), MPOConfig(target_modules=["word_embeddings"],
                                                 n_sites=2), progress=False)
    path = export_onnx(model, tok, tmp_path / "m.onnx").path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def run(ids):
        feed = dict(input_ids=np.array([ids]), attention_mask=np.ones((1, 3), np.int64),
                    token_type_ids=np.zeros((1, 3), np.int64))
        return session.run(None, {k: v for k, v in feed.items() if k in names})[0]

    with torch.no_grad():
        want = model(input_ids=torch.tensor([[2, 5, 3]])).last_hidden_state.numpy()
    np.testing.assert_allclose(run([2, 5, 3]), want, atol=1e-4)
    for bad in (100, 64, -1):
        with pytest.raises(Exception, match="invalid index found"):  # ORT's GatherND
            run([2, bad, 3])


# ------------------------------------------------------------------ external data files
def _shared_data_pair(folder):
    """``a.onnx`` and ``b.onnx``: one MatMul each, both naming ``weights.data``."""
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])],
                                                "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(folder / "a.onnx"), save_as_external_data=True,
              location="weights.data", size_threshold=0)
    onnx.save(onnx.load(str(folder / "a.onnx"), load_external_data=False),
              str(folder / "b.onnx"))


def test_rewriting_a_graph_keeps_a_data_file_another_graph_names(tmp_path):
    """Two graphs sharing one data file: writing over ``a.onnx`` removed ``weights.data``,
    which ``a.onnx`` had named, although ``b.onnx`` still needed it."""
    import onnxruntime as ort

    from tnlm.export import quantize_weights

    _shared_data_pair(tmp_path)
    x = np.ones((1, 64), np.float32)
    src = tmp_path / "src" / "chain.onnx"
    src.parent.mkdir()
    _low_rank_chain(src)
    quantize_weights(src, tmp_path / "a.onnx")
    assert (tmp_path / "weights.data").is_file()
    b = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(b.run(None, {"x": x})[0], np.full((1, 64), 64, np.float32))
    # a data file that only the former file named still goes
    (tmp_path / "b.onnx").unlink()
    quantize_weights(src, tmp_path / "a.onnx")  # a.onnx names none now
    _shared_data_pair(tmp_path)
    (tmp_path / "b.onnx").unlink()
    quantize_weights(src, tmp_path / "a.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "src"]


def test_an_external_data_export_that_fails_leaves_the_earlier_export(tok, tmp_path,
                                                                       monkeypatch):
    """A graph with external data was written in place: a re-export that failed while
    writing (a full disk) destroyed the earlier good export. It is now staged beside it
    and moved with ``replace_onnx``, as the command line does."""
    from tnlm.export import OnnxEncoder, export_onnx

    monkeypatch.setattr("tnlm.export.onnx_graph._EXTERNAL_BYTES", 0)
    path = tmp_path / "m.onnx"
    export_onnx(_mpo_bert(), tok, path, pooling="mean")
    before = _listing(tmp_path)
    assert len(before) == 2  # the graph and its data
    sentences = ["the cat is here.", "of and the"]
    want = OnnxEncoder(path, tok).encode(sentences)
    real = torch.onnx.export

    def broken(graph, args, f, **kwargs):
        for name in (f, f"{f}.data"):
            with open(name, "wb") as fh:
                fh.write(b"half a graph")
        raise OSError(27, "File too large")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(OSError, match="File too large"):
        export_onnx(tiny_bert(), tok, path, pooling="mean")
    assert _listing(tmp_path) == before
    np.testing.assert_array_equal(OnnxEncoder(path, tok).encode(sentences), want)
    # a re-export that works replaces it: one graph, one data file it names
    monkeypatch.setattr(torch.onnx, "export", real)
    res = export_onnx(tiny_bert(), tok, path, pooling="mean")
    from tnlm.export.onnx_graph import external_files

    data = external_files(path)
    assert len(data) == 1 and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.onnx", data[0].name])
    assert res.bytes == path.stat().st_size + data[0].stat().st_size


def test_quantize_weights_reports_the_size_of_the_data_file_it_names(tmp_path, monkeypatch):
    """Past the protobuf limit the size was read from ``<dst>.data``; a second run to the
    same name (whose data ``replace_onnx`` wrote under a fresh name) raised
    ``FileNotFoundError`` after its work, and a user's ``<dst>.data`` was counted."""
    from tnlm.export import quantize_weights
    from tnlm.export.onnx_graph import external_files

    rng = np.random.default_rng(0)
    src = tmp_path / "chain.onnx"
    _low_rank_chain(src, factors=(rng.standard_normal((64, 64)),
                                  rng.standard_normal((64, 64))))
    monkeypatch.setattr("tnlm.export.weight_only._PROTOBUF_LIMIT", 0)
    out = tmp_path / "out" / "w8.onnx"

    def stored(path):
        return path.stat().st_size + sum(f.stat().st_size for f in external_files(path))

    for _ in range(2):
        size = quantize_weights(src, out, block_size=16)
        assert len(external_files(out)) == 1 and size == stored(out)
        assert len(list(out.parent.iterdir())) == 2  # the earlier data file removed
    mine = tmp_path / "mine" / "w8.onnx.data"
    mine.parent.mkdir()
    mine.write_bytes(b"x" * 10_000)
    size = quantize_weights(src, mine.parent / "w8.onnx", block_size=16)
    assert size == stored(mine.parent / "w8.onnx") and mine.read_bytes() == b"x" * 10_000
    assert mine not in external_files(mine.parent / "w8.onnx")


def _embedding_graph(path):
    """``input_ids`` -> Gather of a (16, 8) table -> MatMul by an (8, 8) weight."""
    rng = np.random.default_rng(0)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="proj")]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")]
    graph = helper.make_graph(nodes, "g", [ids], [out], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


def test_quantize_weights_checks_the_embedding_block_before_quantizing(tmp_path,
                                                                        monkeypatch):
    """``embedding_block`` wider than the table was refused only after ONNX Runtime's
    quantizer had processed every MatMul (the long step)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    from tnlm.export import quantize_weights

    src = _embedding_graph(tmp_path / "emb.onnx")
    calls = []
    real = mq.MatMulNBitsQuantizer.process

    def spy(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(mq.MatMulNBitsQuantizer, "process", spy)
    with pytest.raises(ValueError, match=r"embedding_bits=4: block_size 1024 is wider than "
                                         r"the table \(8 columns\); give at most 8"):
        quantize_weights(src, tmp_path / "w4.onnx", bits=4, embedding_bits=4,
                         embedding_block=1024)
    assert calls == [] and not (tmp_path / "w4.onnx").exists()
    # a block that fits, as before
    assert quantize_weights(src, tmp_path / "w4.onnx", bits=4, block_size=16,
                            embedding_bits=4, embedding_block=8) > 0
    assert calls == [1]


def test_quantize_int8_checks_the_4_bit_table_before_quantizing(tmp_path, monkeypatch):
    """quantize_int8(embedding_bits=4): a table also read by another node (a tied head)
    or a block wider than the table was refused only after ONNX Runtime's quantization of
    every MatMul, the tied one as "nodes: ..." (an argument the caller never passed)."""
    import onnxruntime.quantization as oq

    from tnlm.export import quantize as q
    from tnlm.export import quantize_int8

    calls = []
    real = oq.quantize_dynamic

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(oq, "quantize_dynamic", spy)
    src = _embedding_graph(tmp_path / "emb.onnx")
    with pytest.raises(ValueError, match=r"^embedding_bits=4: block_size 1024 is wider than "
                                         r"the table \(8 columns\)"):
        quantize_int8(src, tmp_path / "q.onnx", embedding_bits=4, block_size=1024)
    tied = onnx.load(str(src))  # the table read by a second node too
    tied.graph.node.append(helper.make_node("Identity", ["E"], ["E2"], name="head"))
    tied.graph.output.append(helper.make_tensor_value_info("E2", TensorProto.FLOAT, [16, 8]))
    onnx.save(tied, str(tmp_path / "tied.onnx"))
    with pytest.raises(ValueError, match=r"^embedding_bits=4: the table 'E' of Gather "
                                         r"'embed' is also read by \['head'\]"):
        quantize_int8(tmp_path / "tied.onnx", tmp_path / "q.onnx", embedding_bits=4)
    assert calls == [] and not (tmp_path / "q.onnx").exists()
    assert q.quantize_int8(src, tmp_path / "q.onnx", embedding_bits=4, block_size=8) > 0
    assert calls == [1]
    # quantize_weights the same (its long step is ONNX Runtime's MatMulNBits quantizer)
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    from tnlm.export import quantize_weights

    monkeypatch.setattr(mq.MatMulNBitsQuantizer, "process", lambda self: calls.append(2))
    with pytest.raises(ValueError, match=r"^embedding_bits=4: the table 'E' of Gather "
                                         r"'embed' is also read by \['head'\]"):
        quantize_weights(tmp_path / "tied.onnx", tmp_path / "w.onnx", bits=4,
                         embedding_bits=4)
    assert calls == [1] and not (tmp_path / "w.onnx").exists()


def test_fuse_shared_matmuls_refuses_a_graph_with_external_data_and_leaves_it(tmp_path):
    """The documented refusal of external data could never fire: onnx.load had read the
    data and cleared each tensor's external_data entries first; the file was rewritten
    self-contained and its .data file left behind."""
    from tnlm.export import fuse_shared_matmuls

    model = onnx.load(str(_embedding_graph(tmp_path / "g.onnx")))
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    before = _listing(tmp_path)
    with pytest.raises(ValueError, match=r"keeps its weights in external data"):
        fuse_shared_matmuls(path)
    assert _listing(tmp_path) == before


# ------------------------------------------------------------------ empty inputs
def test_empty_sample_is_refused_and_encoding_no_sentences_gives_no_rows(tok, tmp_path,
                                                                         monkeypatch):
    """``export_onnx(sample=[])`` failed with a bare ``IndexError``; ``encode([])`` with
    "need at least one array to concatenate"."""
    from tnlm.export import OnnxEncoder, onnx_graph

    monkeypatch.setattr(onnx_graph, "export_copy", _no_export)
    with pytest.raises(ValueError, match=r"^export_onnx: sample must hold at least one "
                                         r"sentence"):
        onnx_graph.export_onnx(tiny_bert(), tok, tmp_path / "m.onnx", sample=[])
    assert not (tmp_path / "m.onnx").exists()
    enc = OnnxEncoder(_pooled_graph(tmp_path / "pooled.onnx"), tok)
    got = enc.encode([])
    assert got.shape == (0, 1) and got.dtype == np.float32
    assert enc.encode(()).shape == (0, 1)


# ------------------------------------------------------------------ staging folders
def _staging(folder, name, pid, suffix="0123abcd", size=0):
    """A staging folder of ``name`` as the writer ``pid`` would leave it, with a
    ``size``-byte data file in it."""
    d = folder / f".{name}.tnlm-staging.{pid}.{suffix}"
    d.mkdir()
    with open(d / f"{name}.data", "wb") as fh:
        fh.truncate(size)
    (d / name).write_bytes(b"half a graph")
    return d


def test_stale_staging_removed(tok, tmp_path):
    """The exporters stage their output in a hidden folder beside the destination: an
    export killed (``SIGKILL``, the OOM killer) left that folder, with gigabytes of
    external data, in the output folder for good. The next export to that name now
    removes the staging folders whose writer no longer runs, and writes a correct file."""
    from tnlm.export import OnnxEncoder, export_onnx, quantize_int8, quantize_weights

    want = OnnxEncoder(export_onnx(tiny_bert(), tok, tmp_path / "ref" / "m.onnx",
                                   pooling="mean").path, tok).encode(["the cat is here."])
    out = tmp_path / "out"
    out.mkdir()
    dead = dead_pid()
    _staging(out, "m.onnx", dead, size=20_000_000)
    _staging(out, "m.onnx", dead, suffix="ffff0000")
    res = export_onnx(tiny_bert(), tok, out / "m.onnx", pooling="mean")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]
    np.testing.assert_allclose(OnnxEncoder(res.path, tok).encode(["the cat is here."]), want,
                               atol=1e-5)
    # the quantizers alike
    src = tmp_path / "chain.onnx"
    _low_rank_chain(src)
    for quantize, name in ((quantize_int8, "i8.onnx"), (quantize_weights, "w8.onnx")):
        _staging(out, name, dead, size=1_000_000)
        assert quantize(src, out / name) > 0
        onnx.checker.check_model(str(out / name))
    assert sorted(p.name for p in out.iterdir()) == ["i8.onnx", "m.onnx", "w8.onnx"]


def test_staging_of_a_running_export_is_kept(tmp_path):
    """A staging folder whose writer runs (a concurrent export to the same name: this
    process, or one of another user) is not touched; an export's own staging folder is
    gone when it returns."""
    from tnlm.export import quantize_weights

    src = tmp_path / "chain.onnx"
    _low_rank_chain(src)
    out = tmp_path / "out"
    out.mkdir()
    live = [_staging(out, "w8.onnx", pid, size=1000) for pid in (os.getpid(), 1)]
    quantize_weights(src, out / "w8.onnx")
    for d in live:
        assert sorted(p.name for p in d.iterdir()) == ["w8.onnx", "w8.onnx.data"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["w8.onnx", *(d.name for d in live)])


def test_only_stale_staging_folders_of_the_destination_are_removed(tmp_path):
    """What is not exactly a staging folder of the destination name is kept, even with
    a process id that no longer runs: a user's hidden folder, another name's staging
    folder, near misses of the form, a file of the form, and a symbolic link of the form
    (neither it nor what it points to is touched)."""
    from tnlm.export import quantize_weights
    from tnlm.export.staging import remove_stale_staging

    src = tmp_path / "chain.onnx"
    _low_rank_chain(src)
    out = tmp_path / "out"
    out.mkdir()
    dead = dead_pid()
    kept = [out / ".w8.onnx.backup", out / f".w8.onnx.tnlm-staging.{dead}.backup",
            out / f".w8.onnx.tnlm-staging.{dead}.0123abcd.old",
            out / f".w8.onnx.tnlm-staging.{dead}", out / f"w8.onnx.tnlm-staging.{dead}.0123abcd",
            out / ".w8.onnx.tnlm-staging.0.0123abcd"]
    for d in kept:
        d.mkdir()
        (d / "w8.onnx.data").write_bytes(b"mine")
    other = _staging(out, "other.onnx", dead, size=1000)
    plain = out / f".w8.onnx.tnlm-staging.{dead}.00000000"
    plain.write_bytes(b"a file")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "w8.onnx.data").write_bytes(b"mine")
    link = out / f".w8.onnx.tnlm-staging.{dead}.11111111"
    link.symlink_to(target, target_is_directory=True)
    def files():
        return {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*")
                if p.is_file() and not p.is_symlink()}

    before = files()
    quantize_weights(src, out / "w8.onnx")
    assert remove_stale_staging(out / "w8.onnx") == []
    after = files()
    assert after.pop("out/w8.onnx") and after == before
    assert link.is_symlink() and other.is_dir() and all(d.is_dir() for d in kept)


def test_a_graph_written_over_its_file_uses_a_temporary_name_of_its_own(tmp_path,
                                                                      monkeypatch):
    """Graphs rewritten over their file went through a fixed ``.NAME.tmp``: two writers of
    one file shared it and a failed write left it behind. Each call now has its own
    temporary name, removed when the write fails; the file is unchanged then."""
    from pathlib import Path

    from tnlm.export.staging import save_graph_replacing

    path = _embedding_graph(tmp_path / "g.onnx")
    before = path.read_bytes()
    model = onnx.load(str(path))
    names = []
    real = onnx.save

    def failing(m, f, *a, **kw):
        names.append(Path(f).name)
        real(m, f, *a, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", failing)
    for _ in range(2):
        with pytest.raises(OSError, match="disk full"):
            save_graph_replacing(model, path)
    assert names[0] != names[1] and all(n.startswith(".g.onnx.") for n in names)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "g.onnx"]
    monkeypatch.setattr(onnx, "save", real)
    model.producer_name = "rewritten"
    dead = dead_pid()
    (tmp_path / f".g.onnx.{dead}.0123abcd.tmp").write_bytes(b"a killed write's")
    save_graph_replacing(model, path)  # and removes that
    assert onnx.load(str(path)).producer_name == "rewritten"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]
