"""Every causal architecture tnlm has an entry for (:mod:`tnlm.integration.architectures`),
built from a tiny random-init config, passes one set of invariants:

- every default target exists in every block of the stack the entry names;
- the layer-by-layer job (:func:`tnlm.compress.layerwise.compress_layerwise`, block
  reconstruction under the architecture's own masks, positions, attention and residual
  layout) compresses it to the budget with finite outputs;
- the compressed model generates with its key/value cache exactly as without it;
- saved as ``tnlm compress --out`` saves it and loaded back
  (:func:`tnlm.export.load_compressed`), it gives the same logits and the same greedy
  tokens.

A new entry gets these checks by adding its tiny config to :data:`CONFIGS` (a test fails
when an entry has none).
"""

import copy
import warnings

import pytest
import torch

from tests.common import (  # noqa: F401 - one_thread: autouse, one intra-op thread
    VOCAB,
    make_word_tokenizer,
    one_thread,
)
from tnlm.compress.layerwise import LayerwiseConfig, compress_layerwise
from tnlm.integration.architectures import (
    ARCHITECTURES,
    architecture_of,
    blocks_of,
    default_targets,
    is_causal_type,
)

_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             bos_token_id=2, eos_token_id=3, pad_token_id=1)

#: per causal model type, what its tiny config needs beyond :data:`_BASE` (None: leave the
#: key out; Falcon's multi-query attention keeps one key/value head whatever it says)
CONFIGS: dict[str, dict] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 8}, "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8}, "gemma3_text": {"head_dim": 8}, "olmo": {}, "olmo2": {},
    "granite": {}, "smollm3": {}, "stablelm": {}, "cohere": {}, "helium": {"head_dim": 8},
    "phi3": {}, "glm": {"head_dim": 8}, "phi": {}, "starcoder2": {}, "gpt_neox": {},
    "falcon": {"ffn_hidden_size": 64, "num_key_value_heads": None}, "gpt2": {"n_inner": 64}, "gptj": {"rotary_dim": 4},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},
}
CAUSAL = sorted(t for a in ARCHITECTURES.values() if a.causal for t in a.model_types)


def tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in dict(_BASE, **CONFIGS[model_type]).items() if v is not None}
    if not hasattr(AutoConfig.for_model(model_type), "num_key_value_heads"):
        del kw["num_key_value_heads"]  # no grouped-query attention: no stray attribute
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(cfg).eval()


def test_every_causal_entry_has_a_tiny_config_here():
    assert sorted(CONFIGS) == CAUSAL
    assert all(is_causal_type(t) for t in CAUSAL)


@pytest.mark.parametrize("model_type", CAUSAL)
def test_causal_architecture_compresses_generates_and_reloads(model_type, tmp_path):
    from tnlm.bridge import MPOLinear
    from tnlm.export import load_compressed, save_self_contained
    from tnlm.integration import MPOConfig, MPOModel

    model = tiny(model_type)
    arch = architecture_of(model)
    blocks = blocks_of(model)
    assert len(blocks) == 2
    targets = default_targets(model)
    for block in blocks:  # every default target in every block, once
        names = [n for n, _ in block.named_modules()]
        for t in targets:
            assert sum(n == t or n.endswith("." + t) for n in names) == 1, (arch.name, t)

    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(4, VOCAB, (8, 12), generator=g)
    test = torch.randint(4, VOCAB, (4, 12), generator=g)
    student = copy.deepcopy(model)
    res = compress_layerwise(student, seqs, LayerwiseConfig(targets, budget=0.5, fit_steps=4),
                             progress=False)
    assert res.ratio <= 0.5
    replaced = [n for n, m in student.named_modules() if isinstance(m, MPOLinear)]
    assert len(replaced) == 2 * len(targets)
    with torch.no_grad():
        logits = student(test).logits
        dense = model(test).logits
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, dense)  # something was truncated

    prompt = torch.tensor([[2, 5, 7, 9]])
    with torch.no_grad():
        cached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = student.generate(prompt, max_new_tokens=6, do_sample=False,
                                    use_cache=False)
    assert cached.shape == (1, 10) and torch.equal(cached, uncached)

    out = tmp_path / "out"
    save_self_contained(MPOModel(student, MPOConfig(target_modules=targets)),
                        make_word_tokenizer(), out)
    back = load_compressed(out)
    base = getattr(back, "base_model", back)
    with torch.no_grad():
        again = back(test).logits
        regenerated = back.generate(prompt, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(regenerated, cached)
    assert sum(isinstance(m, MPOLinear) for m in base.modules()) == len(replaced)


def test_cli_compresses_a_gpt_neox_folder_end_to_end(tmp_path, capsys):
    """One family beyond Llama's layout through ``tnlm compress FOLDER``: GPT-NeoX (Pythia)
    fuses q, k and v in one projection and adds attention and MLP in parallel."""
    import json
    import random

    from tests.common import WORDS
    from tnlm.cli import main
    from tnlm.export import load_compressed

    folder = tmp_path / "pythia"
    tiny("gpt_neox").save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    r = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(r.choice(WORDS) for _ in range(30)) for _ in range(40)))
    out = tmp_path / "out"
    assert main(["compress", str(folder), "--budget", "0.5", "--heal-steps", "2", "--text",
                 str(text), "--out", str(out), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "gpt_neox" and summary["ratio"] <= 0.5
    saved = json.loads((out / "mpo_config.json").read_text())["config"]["target_modules"]
    assert saved == list(ARCHITECTURES["gpt_neox"].targets)
    back = load_compressed(out)
    with torch.no_grad():
        tokens = back.generate(torch.tensor([[2, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)
