"""The invariants every MPO layer kind passes, as one mixin (as PEFT's shared tests do).

A subclass (one per kind, ``tests/test_invariants.py``) says how to build a small dense
module of its kind, its site shapes, and a tiny random-init transformers model whose
target modules are of that kind; :class:`LayerInvariants` then checks, for that kind:

1. untruncated, the MPO layer computes the dense module's outputs (every forward mode);
2. ``merge()`` returns a module of the original class computing the MPO layer's outputs
   (untruncated: the original weight);
3. a model wrapped by ``get_mpo_model`` reloads to the same outputs, bit for bit, from a
   full checkpoint, a lightweight task checkpoint and a Trainer-style state dict;
4. ``merge_and_unload`` keeps the wrapped model's outputs and leaves no MPO module;
5. a truncated layer's ``truncation_error`` is its measured relative error, and cutting to
   a smaller bond never lowers the error;
6. a backward pass gives finite gradients on the trainable cores (equal, in float64, to
   those of an independent dense reconstruction) and none on the frozen central core.

Tolerances are relative to the scale of what is compared: ``TOL[dtype] * max|reference|``
for outputs and weights (float32 1e-5, float64 1e-10; the decomposition runs in float64,
the contraction in the layer's dtype), and ``ERR_TOL[dtype]`` absolute on relative errors.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tnlm.bridge import MPOModule, kind_of, weight_xw
from tnlm.core.spec import DecompositionSpec
from tnlm.integration import MPOConfig, MPOModel, get_mpo_model, io

#: output / weight agreement, relative to the scale of the reference
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
#: agreement of two relative errors (reported vs measured)
ERR_TOL = {torch.float32: 1e-6, torch.float64: 1e-10}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64],
                                 ids=["float32", "float64"])
MODES = ("contract", "dense", "auto")

IDS = torch.tensor([[5, 17, 42, 9, 63, 2], [7, 7, 90, 31, 1, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])


def assert_close(actual, expected, dtype, what=""):
    """``actual == expected`` to ``TOL[dtype]`` times the scale of ``expected``."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    assert scale > 0, f"{what}: the reference is all zeros, the check would be vacuous"
    torch.testing.assert_close(actual, expected, atol=TOL[dtype] * scale, rtol=0,
                               msg=lambda m: f"{what}: {m}")


def rel_error(W, ref):
    """||W - ref||_F / ||ref||_F in float64."""
    W, ref = W.detach().double(), ref.detach().double()
    return float(torch.linalg.norm(W - ref) / torch.linalg.norm(ref))


def contract_cores(cores):
    """W (prod i_k, prod j_k) of cores ``T_k[d, i, j, d']`` by one plain einsum per site
    (independent of the layer's planned contraction)."""
    acc = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], cores[0].shape[3])
    for c in cores[1:]:
        I, J = acc.shape[0], acc.shape[1]
        acc = torch.einsum("ijd,dkle->ikjle", acc, c).reshape(I * c.shape[1], J * c.shape[2],
                                                               c.shape[3])
    return acc[:, :, 0]


def mpo_layers(model):
    return [m for m in model.modules() if isinstance(m, MPOModule)]


class LayerInvariants:
    """Shared invariants of an MPO layer kind.

    A subclass sets:

    * ``kind`` (``"linear"``, ``"conv1d"``, ``"embedding"``) and ``in_shape`` /
      ``out_shape`` (site shapes; ``pad`` when their products exceed the dimensions);
    * ``make_dense(dtype)`` -> ``(dense_module, example_input)``;
    * ``make_base(seed)`` -> a tiny random-init transformers model (eval mode) and
      ``targets``: the names of its modules of this kind to decompose.

    The factory :meth:`make` builds ``(dense_module, mpo_module, example_input)``.
    """

    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    pad = False
    targets: list[str]
    #: the bond caps of the truncation checks, largest first (all below the full bonds)
    bonds = (6, 4, 3, 2, 1)

    def make_dense(self, dtype):
        raise NotImplementedError

    def make_base(self, seed):
        raise NotImplementedError

    # ------------------------------------------------------------------ factories
    def make(self, dtype=torch.float32, max_bond=None):
        """``(dense, mpo_layer, x)``: the MPO layer decomposed from ``dense``."""
        dense, x = self.make_dense(dtype)
        spec = DecompositionSpec(self.in_shape, self.out_shape, max_bond=max_bond, pad=self.pad)
        return dense, MPOModule.from_module(dense, spec), x

    def reference_forward(self, W, layer, x):
        """The layer's output from its dense W (in, out), by plain torch ops."""
        if self.kind == "embedding":
            return F.embedding(x, W, layer.padding_idx)
        y = x.to(W.dtype) @ W
        return y if layer.bias is None else y + layer.bias

    def run(self, model):
        with torch.no_grad():
            return self.forward(model)

    def forward(self, model):
        out = model(input_ids=IDS, attention_mask=MASK)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    def wrap(self, seed=0, **cfg):
        base = self.make_base(seed)
        config = MPOConfig(target_modules=self.targets, n_sites=3, **cfg)
        return get_mpo_model(base, config, progress=False).eval()

    def perturb_auxiliaries(self, model, seed=1):
        """Change every auxiliary core (as a training step would), so that a checkpoint
        must carry them: a reload that rebuilt them from the base would differ."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, m in model.mpo_modules():
                for p in m.auxiliary_parameters():
                    p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g).to(p.dtype))

    # ------------------------------------------------------------------ the factory itself
    def test_factory_builds_this_kind(self):
        dense, layer, x = self.make()
        assert kind_of(dense) == self.kind and layer.kind == self.kind
        assert (layer.in_dim, layer.out_dim) == tuple(weight_xw(dense).shape)
        assert (layer.in_shape, layer.out_shape) == (self.in_shape, self.out_shape)
        base = self.make_base(0)
        found = [n for n, m in base.named_modules() if kind_of(m) == self.kind
                 and any(MPOConfig.pattern_matches(p, n) for p in self.targets)]
        assert found, f"the base model has no {self.kind} module matching {self.targets}"

    # ------------------------------------------------------------------ 1. exactness
    @DTYPES
    @pytest.mark.parametrize("mode", MODES)
    def test_untruncated_forward_equals_dense(self, dtype, mode):
        dense, layer, x = self.make(dtype)
        assert layer.truncation_error <= ERR_TOL[dtype]
        layer.mode = mode
        with torch.no_grad():
            ref = dense(x)
            y = layer(x)
        assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
        assert_close(y, ref, dtype, f"{mode} forward")
        y = layer(x)  # with autograd (no cached W)
        assert_close(y.detach(), ref, dtype, f"{mode} forward with grad")

    # ------------------------------------------------------------------ 2. merge
    @DTYPES
    def test_merge_returns_the_original_kind_and_outputs(self, dtype):
        dense, layer, x = self.make(dtype)
        merged = layer.merge()
        assert type(merged) is type(dense)
        assert merged.weight.shape == dense.weight.shape and merged.weight.dtype == dtype
        assert_close(merged.weight, dense.weight.detach(), dtype, "untruncated merged weight")
        assert (getattr(merged, "bias", None) is None) == (getattr(dense, "bias", None) is None)
        if getattr(dense, "bias", None) is not None:
            assert torch.equal(merged.bias, dense.bias)
        if self.kind == "embedding":
            assert merged.padding_idx == dense.padding_idx
        # truncated: the merged module computes the MPO layer, not the original
        _, small, _ = self.make(dtype, max_bond=2)
        merged = small.merge()
        assert type(merged) is type(dense)
        with torch.no_grad():
            y = small(x)
            assert_close(merged(x), y, dtype, "merged truncated layer")
            assert rel_error(y, dense(x)) > 10 * ERR_TOL[dtype]  # truncation did change it

    # ------------------------------------------------------------------ 3. save / reload
    def test_full_checkpoint_reloads_on_a_fresh_base(self, tmp_path):
        model = self.wrap(seed=0, max_bond=2)
        self.perturb_auxiliaries(model)
        ref = self.run(model)
        model.save_pretrained(tmp_path, lightweight=False)
        meta = json.loads((tmp_path / io.CONFIG_NAME).read_text())
        assert "lightweight" not in meta
        assert {s["kind"] for s in meta["modules"].values()} == {self.kind}
        fresh = self.make_base(seed=5)  # other weights: everything must come from the files
        assert not torch.equal(self.run(fresh), self.run(self.make_base(seed=0)))
        loaded = MPOModel.from_pretrained(fresh, tmp_path).eval()
        assert torch.equal(self.run(loaded), ref)
        self.assert_same_layers(model, loaded)

    def test_lightweight_checkpoint_reloads_on_the_same_base(self, tmp_path):
        model = self.wrap(seed=0, max_bond=2)
        self.perturb_auxiliaries(model)
        ref = self.run(model)
        model.save_pretrained(tmp_path, lightweight=True)
        meta = json.loads((tmp_path / io.CONFIG_NAME).read_text())
        header = io.read_header(tmp_path / meta["weights"])
        centrals = {f"{n}.cores.{m.central_index}" for n, m in model.mpo_modules()}
        assert centrals <= set(meta["lightweight"]["rebuilt"])
        assert not centrals & set(header)
        auxiliaries = {f"{n}.cores.{k}" for n, m in model.mpo_modules()
                       for k in m.auxiliary_indices}
        assert auxiliaries <= set(header)
        loaded = MPOModel.from_pretrained(self.make_base(seed=0), tmp_path).eval()
        assert torch.equal(self.run(loaded), ref)
        self.assert_same_layers(model, loaded)

    def test_trainer_state_dict_reloads(self, tmp_path):
        """A folder holding only ``model.safetensors`` = the wrapped model's state dict (what
        ``transformers.Trainer`` writes for a non-PreTrainedModel)."""
        model = self.wrap(seed=0, max_bond=2)
        self.perturb_auxiliaries(model)
        ref = self.run(model)
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(tmp_path / io.STATE_DICT_NAME))
        loaded = MPOModel.from_pretrained(self.make_base(seed=5), tmp_path).eval()
        assert torch.equal(self.run(loaded), ref)
        self.assert_same_layers(model, loaded)

    @staticmethod
    def assert_same_layers(model, loaded):
        a, b = dict(model.mpo_modules()), dict(loaded.mpo_modules())
        assert a.keys() == b.keys() and a
        for name in a:
            assert type(a[name]) is type(b[name]) and a[name].kind == b[name].kind
            assert all(torch.equal(p, q) for p, q in zip(a[name].cores, b[name].cores))
            assert [p.requires_grad for p in a[name].cores] == \
                [p.requires_grad for p in b[name].cores]

    # ------------------------------------------------------------------ 4. merge_and_unload
    def test_wrapped_untruncated_model_equals_base(self):
        ref = self.run(self.make_base(seed=0))
        model = self.wrap(seed=0)
        layers = [m for _, m in model.mpo_modules()]
        assert layers and {m.kind for m in layers} == {self.kind}
        assert_close(self.run(model), ref, torch.float32, "wrapped untruncated model")

    def test_merge_and_unload_keeps_outputs_and_leaves_no_mpo(self):
        originals = {n: type(m) for n, m in self.make_base(seed=0).named_modules()}
        model = self.wrap(seed=0, max_bond=2)
        self.perturb_auxiliaries(model)
        names = [n for n, _ in model.mpo_modules()]
        ref = self.run(model)
        assert rel_error(ref, self.run(self.make_base(seed=0))) > 1e-4  # truncated: not the base
        plain = model.merge_and_unload()
        assert not isinstance(plain, MPOModel) and not mpo_layers(plain)
        modules = dict(plain.named_modules())
        for n in names:
            assert type(modules[n]) is originals[n]
        assert_close(self.run(plain), ref, torch.float32, "merge_and_unload")

    # ------------------------------------------------------------------ 5. truncation
    @DTYPES
    def test_truncation_error_is_measured_and_monotone(self, dtype):
        dense, full, _ = self.make(dtype)
        W = weight_xw(dense)
        full_bonds = full.bond_dims
        errors = []
        for b in self.bonds:
            assert b < max(full_bonds), "a bond cap that truncates nothing checks nothing"
            _, layer, _ = self.make(dtype, max_bond=b)
            assert layer.bond_dims == tuple(min(b, f) for f in full_bonds)
            measured = rel_error(weight_xw(layer.merge()), W)
            assert layer.truncation_error == pytest.approx(measured, abs=ERR_TOL[dtype])
            errors.append(measured)
        assert errors[0] > 10 * ERR_TOL[dtype]
        assert all(e2 >= e1 for e1, e2 in zip(errors, errors[1:])), errors
        # retruncating one layer to ever smaller bonds: the error against the original W
        # never decreases
        layer = full
        previous = 0.0
        for b in self.bonds:
            layer.retruncate(max_bond=b)
            assert max(layer.bond_dims) <= b
            now = rel_error(weight_xw(layer.merge()), W)
            assert now >= previous - ERR_TOL[dtype], (b, now, previous)
            previous = now
        assert previous > 10 * ERR_TOL[dtype]

    @DTYPES
    def test_retruncate_reports_the_error_of_its_cut(self, dtype):
        """``retruncate`` returns ||W - W'||_F / ||W||_F of the layer's W (in_dim, out_dim)
        before and after the cut."""
        _, layer, _ = self.make(dtype)
        for b in self.bonds:
            before = weight_xw(layer.merge())
            cut = layer.retruncate(max_bond=b)
            measured = rel_error(weight_xw(layer.merge()), before)
            assert cut == pytest.approx(measured, abs=ERR_TOL[dtype]), (b, cut, measured)
            assert measured > 10 * ERR_TOL[dtype]

    # ------------------------------------------------------------------ 6. gradients
    @DTYPES
    @pytest.mark.parametrize("mode", ("contract", "dense"))
    def test_gradients_on_trainable_cores_only(self, dtype, mode):
        _, layer, x = self.make(dtype)
        layer.train_auxiliary_only()
        layer.mode = mode
        c = layer.central_index
        assert [p is layer.cores[c] for p in layer.central_parameters()] == [True]
        assert not layer.cores[c].requires_grad
        target = torch.randn(self.reference_forward(layer.dense_matrix(), layer, x).shape,
                             generator=torch.Generator().manual_seed(0), dtype=dtype)
        ((layer(x) - target) ** 2).mean().backward()
        assert layer.cores[c].grad is None
        trainable = layer.auxiliary_parameters()
        assert len(trainable) == layer.n_sites - 1
        for p in trainable:
            assert p.grad is not None and p.grad.dtype == dtype
            assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
        # the same gradients through an independent dense reconstruction of the cores
        cores = [p.detach().clone().requires_grad_(True) for p in layer.cores]
        W = contract_cores(cores)[: layer.in_dim, : layer.out_dim]
        ((self.reference_forward(W, layer, x) - target) ** 2).mean().backward()
        for k in layer.auxiliary_indices:
            assert_close(layer.cores[k].grad, cores[k].grad, dtype, f"grad of core {k}")

    def test_model_gradients_in_lightweight_mode(self):
        model = self.wrap(seed=0, max_bond=2)
        assert model.mpo_config.train == "lightweight"
        model.zero_grad()
        self.forward(model).pow(2).mean().backward()
        layers = dict(model.mpo_modules())
        trainable = set()
        for m in layers.values():
            assert m.cores[m.central_index].grad is None
            for p in m.auxiliary_parameters():
                assert p.requires_grad and p.grad is not None
                assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
                trainable.add(id(p))
        # the task head a task model initialised anew trains too (modules_to_save=None)
        for _, head in model.modules_to_save():
            for p in head.parameters():
                assert p.requires_grad and p.grad is not None
                trainable.add(id(p))
        others = [p for p in model.parameters() if id(p) not in trainable]
        assert others and all(p.grad is None for p in others)


# ---------------------------------------------------------------- tiny causal LMs

VOCAB = 128
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
WORDS = ["the", "a", "is", "of", "what", "how", "many", "capital", "france", "paris", "day",
         "days", "week", "sky", "blue", "color", "on", "clear", "in", "?", ".", ",", "and",
         "to", "it", "was", "cat", "dog", "sat", "mat"]
TEXT = ("the cat sat on the mat . the dog sat on the cat . what is the capital of france ? "
        "paris is the capital . how many days in a week ? the sky is blue on a clear day .")
CHAT = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
QUESTIONS = ["what is the capital of france ?", "how many days ?",
             "what color is the sky on a clear day ?", "the cat ?",
             "how many days in a week and what is the capital of france ?"]


def decaying_pivoted_layer(n_in: int, n_out: int, rank: int):
    """``(plain, pivoted)``: a rank-``rank`` 2-site MPOLinear (float32) of an ``n_in x
    n_out`` matrix whose singular values fall over two decades, and its gauge-fixed
    PivotedLinear (the case int8 tells the gauges apart on). Draws from torch's global
    generator (seed it first)."""
    from tnlm.bridge import MPOLinear
    from tnlm.bridge.pivoted import PivotedLinear
    from tnlm.core import MPO

    k = min(n_in, n_out)
    U, _ = torch.linalg.qr(torch.randn(n_in, k, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n_out, k, dtype=torch.float64))
    W = (U * torch.logspace(0, -2, k, dtype=torch.float64)) @ V.T
    mpo = MPO.from_matrix(W, (n_in, 1), (1, n_out), max_bond=[rank])
    plain = MPOLinear.from_mpo(mpo, None, "auto", dtype=torch.float32, kind="linear")
    return plain, PivotedLinear.from_mpo(plain)


def make_word_tokenizer(chat_template: bool = True):
    """A 128-token word-level tokenizer built offline (ids beyond the words are fillers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = SPECIALS + WORDS
    names += [f"w{i}" for i in range(VOCAB - len(names))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    if chat_template:
        tok.chat_template = CHAT
    return tok


def make_causal_lm(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, bos_token_id=2, eos_token_id=3,
                          pad_token_id=1)
    else:
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=256,
                         tie_word_embeddings=False,  # tied, it repeats its last token
                         bos_token_id=2, eos_token_id=3, pad_token_id=1)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_llm_folder(d):
    """A tiny Llama (:func:`make_causal_lm`) and its word tokenizer saved in ``d / "llm"``,
    and ``d / "text.txt"``: 40 lines of 30 random words it knows. Returns both paths."""
    words = ["the", "cat", "sat", "on", "mat", ".", "dog", "is", "blue", "and", "sky", "a",
             "day"]
    folder = d / "llm"
    make_causal_lm("llama").save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (30,), generator=g))
             for _ in range(40)]
    text = d / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    return folder, text


# ---------------------------------------------------------------- small shared pieces

#: words of the tiny random sentences of the compression and export tests
SHORT_WORDS = ["the", "a", "is", "of", "and", "cat", "dog", "sat", "ran", "big", "red", "on", "mat"]


def make_bert_tokenizer(directory):
    """A character-level BERT tokenizer (WordPiece over a-z, a few words) in ``directory``."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)]
    vocab += [f"##{chr(c)}" for c in range(97, 123)] + [".", ",", "the", "is", "of", "and"]
    path = directory / "vocab.txt"
    path.write_text("\n".join(vocab))
    return BertTokenizerFast(vocab=str(path))


def short_sentences(n=40, seed=0):
    """``n`` random sentences of 2 to 12 :data:`SHORT_WORDS` each, ending with a period."""
    import random

    r = random.Random(seed)
    return [" ".join(r.choice(SHORT_WORDS) for _ in range(r.randint(2, 12))) + "."
            for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # two shared cores: intra-op threads only contend on these tiny matrices
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(worker, args: tuple, *, nprocs: int = 2, timeout: float = 240
                 ) -> list[int | None]:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes; their exit codes (a
    process still running after ``timeout`` seconds is killed: ``None``)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False,
                             start_method="spawn")
    codes = []
    for p in ctx.processes:
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
        codes.append(p.exitcode)
    return codes


def join_gloo_group(rank: int, world: int, port: int, timeout_s: float) -> None:
    """In a spawned rank: one thread, and the gloo process group of ``world`` ranks on
    127.0.0.1:``port`` whose collectives wait at most ``timeout_s`` seconds."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def dead_pid() -> int:
    """The process id of a process that has exited (what a killed writer leaves)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def killed_save(parent, old_config: str = "{}"):
    """What a folder replacement killed between its renames leaves beside ``parent/out``:
    ``(out, old, partial)``, the earlier folder set aside (holding an ``mpo_config.json``
    of ``old_config``) and the new one being written (empty), both named after a process
    that no longer runs."""
    pid = dead_pid()
    out = parent / "out"
    old = parent / f".out.old-{pid}-abcd1234"
    partial = parent / f".out.partial-{pid}-abcd1234"
    old.mkdir()
    (old / "mpo_config.json").write_text(old_config)
    partial.mkdir()
    return out, old, partial
