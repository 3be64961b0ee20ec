"""A compressed model in one folder: MPO weights, architecture, tokenizer, and the
sentence-transformers files; :func:`load_compressed` rebuilds it from that folder alone.

Layout written by :func:`save_self_contained`::

    mpo_config.json, mpo_model-<sha12>.safetensors   the MPO checkpoint (every tensor)
    config.json                                      the architecture (transformers)
    tokenizer.json, tokenizer_config.json, ...       the tokenizer, if given
    README.md                                        how to load it
    modules.json, sentence_bert_config.json,         sentence-transformers: module 0 is
    config_sentence_transformers.json,               tnlm's MPOTransformer (this folder),
    1_Pooling/config.json, 2_Normalize/              then mean pooling and normalisation

There is no ``model.safetensors``: ``AutoModel.from_pretrained(folder)`` fails instead of
silently loading random weights; :func:`tnlm.export.export_hf` writes a dense folder that
needs no tnlm. A folder that holds another model's weights (:data:`DENSE_WEIGHTS`, e.g.
a transformers model folder or an earlier :func:`~tnlm.export.export_hf`) is refused:
``AutoModel.from_pretrained`` would silently load those.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from tnlm.export.replace import DENSE_WEIGHTS, is_dense_weights, write_folder
from tnlm.integration import MPOModel
from tnlm.integration.architectures import position_limit
from tnlm.integration.io import CONFIG_NAME, read_meta
from tnlm.integration.loading import check_block_weights

__all__ = ["save_self_contained", "load_compressed", "is_checkpoint", "ST_MODULE",
           "check_checkpoint", "lightweight_base", "recorded_class_generates", "has_tokenizer",
           "DENSE_WEIGHTS", "dense_weights"]


#: the sentence-transformers module type of the compressed transformer (modules.json)
ST_MODULE = "tnlm.export.sentence.MPOTransformer"

_README = """# {name}

A model compressed with tnlm (Matrix Product Operators): the layers listed in
`mpo_config.json` hold MPO cores (`mpo_model-*.safetensors`), not dense weights.
{params}

Load it with tnlm installed:

```python
{usage}
```
"""

_USAGE_ST = """from tnlm.export import load_compressed, sentence_transformer
model = load_compressed("{folder}")    # an MPOModel (transformers API)
st = sentence_transformer("{folder}")  # a SentenceTransformer: st.encode([...])
# or: SentenceTransformer("{folder}", trust_remote_code=True)  (imports tnlm's module)"""

_USAGE_MODEL = """from tnlm.export import load_compressed
model = load_compressed("{folder}")    # an MPOModel (transformers API){generate}"""

_USAGE_GENERATE = """
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("{folder}")
inputs = tok("The capital of France is", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=32)  # generation_config.json: EOS, sampling
print(tok.decode(out[0]))"""


def can_generate(base: nn.Module) -> bool:
    """Whether ``base`` is a transformers model that generates (a causal LM's head)."""
    can = getattr(base, "can_generate", None)
    return bool(can()) if callable(can) else False


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a tokenizer's files (``tokenizer.json``,
    ``tokenizer_config.json`` or a WordPiece ``vocab.txt``)."""
    d = Path(folder)
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                           "vocab.txt"))


def dense_weights(folder: str | os.PathLike) -> list[str]:
    """The names of the files in ``folder`` that are a transformers model's weights
    (:data:`DENSE_WEIGHTS`); none for a folder that does not exist."""
    d = Path(folder)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir()
                  if is_dense_weights(p.name))


def recorded_class_generates(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's recorded transformers class (``mpo_config.json``'s
    ``base_model_class``) generates: its ``can_generate``, asked of the class (nothing is
    loaded), else its name (``*ForCausalLM``, ``*LMHeadModel``)."""
    import transformers

    name = meta.get("base_model_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    can = getattr(cls, "can_generate", None)
    if callable(can):
        try:
            return bool(can())
        except TypeError:  # an instance method in this transformers version
            pass
    return isinstance(name, str) and name.endswith(("ForCausalLM", "LMHeadModel"))


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a tnlm MPO checkpoint (``mpo_config.json``)."""
    return (Path(folder) / CONFIG_NAME).is_file()


def check_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's parsed ``mpo_config.json``, or ``ValueError`` in one line naming
    the folder and what is missing."""
    d = Path(folder)
    if not d.is_dir():
        raise ValueError(f"{d} is not a folder")
    if not is_checkpoint(d):
        raise ValueError(f"{d} is not a tnlm checkpoint (no {CONFIG_NAME}; expected a folder "
                         "written by tnlm compress or MPOModel.save_pretrained)")
    try:
        return read_meta(d)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{d} is not a readable tnlm checkpoint: {err}") from None


def lightweight_base(meta: dict[str, Any]) -> Path | None:
    """The base model folder a lightweight task checkpoint names (its parsed
    ``mpo_config.json``: :func:`check_checkpoint`), or ``None`` when it is not
    lightweight or names none."""
    name = (meta.get("lightweight") or {}).get("base_model_name_or_path")
    return Path(str(name)) if name else None


def save_self_contained(model: MPOModel, tokenizer: Any, folder: str | os.PathLike, *,
                        sentence_transformers: bool | None = None,
                        max_seq_length: int | None = None, keep_sentence_files: bool = False,
                        shown_as: str | os.PathLike | None = None) -> Path:
    """Write ``model`` to ``folder`` so that :func:`load_compressed` rebuilds it from the
    folder alone (no base model needed).

    Args:
        model: the compressed :class:`~tnlm.integration.MPOModel`.
        tokenizer: its tokenizer (saved beside it), or ``None``.
        folder: the folder (created). An earlier save there is replaced whole: the new
            folder is written beside it and renamed into place
            (:func:`~tnlm.export.replace.replace_folder`; none of the earlier model's files
            stays, an interrupted save leaves it as it was, the user's own files are kept;
            a new or empty folder, and with ``keep_sentence_files`` any, is written in
            place: :func:`~tnlm.export.replace.write_folder`). It must not hold another
            model's weights (:data:`DENSE_WEIGHTS`).
        sentence_transformers: also write the sentence-transformers files (mean pooling
            and normalisation of the last hidden states, as
            :func:`tnlm.integration.mean_pooled`), so that
            :func:`tnlm.export.sentence_transformer` loads it. ``None`` (default): for a
            bare encoder (no head: ``AutoModel``) saved with its tokenizer, not for a
            causal LM or a model with a head (a masked LM, a classifier), whose outputs
            sentence-transformers cannot pool (refused with ``True``).
        max_seq_length: the sentence-transformers truncation length (default: 128, the
            length :func:`tnlm.integration.mean_pooled` truncates to, or the model's
            positions where they are fewer (:func:`~tnlm.integration.architectures.
            position_limit`); all-MiniLM-L6-v2's own folder says 256).
        keep_sentence_files: leave the sentence-transformers files already in ``folder``
            as they are (neither written nor removed): for sentence-transformers' own
            ``save``, which writes them itself (its prompts and similarity function
            among them). Not with ``sentence_transformers=True``.
        shown_as: the folder the README's loading lines name (default ``folder``): for a
            folder written in one place and then moved (``tnlm export`` writes beside
            ``--out`` and renames).

    A model that generates also gets its ``generation_config.json`` (end-of-sequence ids,
    sampling defaults), which :func:`load_compressed` gives back.

    Returns:
        The folder.

    Raises:
        TypeError: ``model`` is not an :class:`~tnlm.integration.MPOModel`;
            ``sentence_transformers`` not None or a bool, ``keep_sentence_files`` not a
            bool.
        ValueError: ``sentence_transformers=True`` for a causal LM, without a tokenizer
            or with ``keep_sentence_files``; ``max_seq_length`` not an int between 1 and
            the model's positions (where sentence-transformers files are written), or
            given where none are written; ``folder`` holds another model's weights
            (``model.safetensors``, ``pytorch_model.bin``, ...: :data:`DENSE_WEIGHTS`),
            which ``AutoModel.from_pretrained(folder)`` would load instead of this model:
            refused before anything is written, naming the folder and the files.
    """
    if not isinstance(model, MPOModel):
        raise TypeError(f"model must be an MPOModel (from get_mpo_model, compress_model or "
                        f"load_compressed), got {type(model).__name__}")
    # bools: "no" or 0.0 passed for False were taken by truth value
    if sentence_transformers is not None and not isinstance(sentence_transformers, bool):
        raise TypeError(f"sentence_transformers must be None or a bool, got "
                        f"{sentence_transformers!r}")
    if not isinstance(keep_sentence_files, bool):
        raise TypeError(f"keep_sentence_files must be a bool, got {keep_sentence_files!r}")
    generates = can_generate(model.base_model)
    if keep_sentence_files and sentence_transformers:
        raise ValueError("keep_sentence_files=True leaves the folder's sentence-transformers "
                         "files as they are: it cannot be given with sentence_transformers=True")
    # a bare encoder (AutoModel): sentence-transformers pools its last hidden states; a
    # model with a head (a masked LM's logits, a classifier's) has none to pool
    bare = getattr(model.base_model, "base_model", model.base_model) is model.base_model
    if sentence_transformers is None:
        sentence_transformers = (not generates and bare and not keep_sentence_files
                                 and tokenizer is not None)
    elif sentence_transformers and generates:
        raise ValueError(f"sentence_transformers=True: {type(model.base_model).__name__} is a "
                         "causal LM (it generates); sentence-transformers files are written "
                         "for encoders only")
    elif sentence_transformers and not bare:
        raise ValueError(f"sentence_transformers=True: {type(model.base_model).__name__} has "
                         "a head (its outputs are not hidden states to pool); "
                         "sentence-transformers files are written for a bare encoder "
                         "(AutoModel) only")
    elif sentence_transformers and tokenizer is None:
        raise ValueError("sentence_transformers=True needs the tokenizer (tokenizer=None): "
                         "without it every word would be encoded as an unknown token")
    if sentence_transformers:
        limit = position_limit(model.base_model)
        if max_seq_length is None:
            max_seq_length = 128 if limit is None else min(128, limit)
        if (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)
                or max_seq_length < 1 or (limit is not None and max_seq_length > limit)):
            raise ValueError(f"max_seq_length must be an int in [1, {limit or 'the positions'}]"
                             f" (the model's positions), got {max_seq_length!r}")
    elif max_seq_length is not None:  # it would be dropped without a word
        why = ("keep_sentence_files=True keeps the folder's own" if keep_sentence_files else
               f"{type(model.base_model).__name__} is a causal LM" if generates else
               "tokenizer=None" if tokenizer is None else "sentence_transformers=False")
        fix = (" (with a tokenizer)" if tokenizer is None else "") if not (
            keep_sentence_files or generates) else None
        raise ValueError(f"max_seq_length={max_seq_length!r} is the sentence-transformers "
                         f"truncation length, but no sentence-transformers files are written "
                         f"({why}): leave it out"
                         + ("" if fix is None else f", or pass sentence_transformers=True{fix}"))
    d = Path(folder)
    stale = dense_weights(d)
    if stale:
        shown = ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else "")
        raise ValueError(f"save_self_contained: {d} holds another model's weights ({shown}), "
                         "which AutoModel.from_pretrained would load instead of the "
                         "compressed model; save into a new or empty folder, or remove them")
    base = model.base_model
    shown = Path(shown_as) if shown_as is not None else d

    def write(target: Path) -> None:
        # every tensor: no base model to rebuild from
        model.save_pretrained(target, lightweight=False)
        base.config.save_pretrained(target)
        if generates and getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(target)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        if sentence_transformers:
            _write_st_files(target, base, max_seq_length)
        elif not keep_sentence_files:
            # an earlier save's sentence-transformers files would make this one look like
            # one (where the folder is written in place)
            _remove_st_files(target)
        params = sum(p.numel() for p in model.parameters())
        st_usage = sentence_transformers or (keep_sentence_files
                                             and (target / "modules.json").is_file())
        usage = (_USAGE_ST if st_usage else _USAGE_MODEL).format(
            folder=shown, generate=_USAGE_GENERATE.format(folder=shown) if generates else "")
        (target / "README.md").write_text(_README.format(
            name=shown.name, usage=usage,
            params=f"Parameters: {params:,} (MPO cores and the layers kept dense)."))

    if keep_sentence_files:  # sentence-transformers' own save, which writes its files there
        d.mkdir(parents=True, exist_ok=True)
        write(d)
    else:  # beside it, renamed into place: an earlier save's files never stay (the
        # sentence-transformers files of the user's own, not tnlm's, are kept)
        write_folder(d, write, keep=_user_st_files(d))
    return d


#: the sentence-transformers files :func:`_write_st_files` writes (folders last)
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
             "1_Pooling/config.json", "2_Normalize", "1_Pooling")


def _st_modules_are_tnlms(d: Path) -> bool | None:
    """Whether the modules.json of ``d`` names tnlm's module first (an earlier save's);
    None when there is none that can be read."""
    try:
        modules = json.loads((d / "modules.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return (isinstance(modules, list) and bool(modules) and isinstance(modules[0], dict)
            and modules[0].get("type") == ST_MODULE)


def _user_st_files(d: Path) -> list[str]:
    """The sentence-transformers entries of ``d`` (:data:`_ST_FILES`) when its
    modules.json is the user's own (names another module than tnlm's), else none."""
    if _st_modules_are_tnlms(d) is not False:
        return []
    return [name for name in _ST_FILES if "/" not in name and (d / name).exists()]


def _remove_st_files(d: Path) -> None:
    """Remove the sentence-transformers files of an earlier save in ``d`` (only when its
    modules.json names tnlm's module: a folder of the user's own is left alone)."""
    if not _st_modules_are_tnlms(d):
        return
    for name in _ST_FILES:
        f = d / name
        if f.is_dir():
            with contextlib.suppress(OSError):
                f.rmdir()  # empty folders only
        else:
            f.unlink(missing_ok=True)


def _write_st_files(d: Path, base: nn.Module, max_seq_length: int) -> None:
    """modules.json and the configs of the sentence-transformers modules."""
    from tnlm import __version__

    hidden = int(base.config.get_text_config().hidden_size)
    modules = [dict(idx=0, name="0", path="", type=ST_MODULE),
               dict(idx=1, name="1", path="1_Pooling",
                    type="sentence_transformers.models.Pooling"),
               dict(idx=2, name="2", path="2_Normalize",
                    type="sentence_transformers.models.Normalize")]
    _write_json(d / "modules.json", modules)
    _write_json(d / "sentence_bert_config.json",
                dict(max_seq_length=int(max_seq_length), do_lower_case=False))
    _write_json(d / "config_sentence_transformers.json",
                dict(__version__=dict(tnlm=__version__), prompts={}, default_prompt_name=None,
                     similarity_fn_name="cosine"))
    (d / "1_Pooling").mkdir(exist_ok=True)
    _write_json(d / "1_Pooling" / "config.json",
                dict(word_embedding_dimension=hidden, pooling_mode_cls_token=False,
                     pooling_mode_mean_tokens=True, pooling_mode_max_tokens=False,
                     pooling_mode_mean_sqrt_len_tokens=False))
    (d / "2_Normalize").mkdir(exist_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _base_class(meta: dict[str, Any], config: Any) -> type:
    """The transformers class the checkpoint was saved from (``base_model_class``), or the
    ``AutoModel`` class of ``config``."""
    import transformers

    name = meta.get("base_model_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return transformers.AutoModel._model_mapping[type(config)]


def load_compressed(folder: str | os.PathLike, base: str | os.PathLike | None = None
                    ) -> MPOModel:
    """The compressed model saved in ``folder``, for inference (eval mode, frozen).

    A causal LM's generation settings come from ``generation_config.json`` when there is
    one. The architecture comes from ``folder/config.json`` (or, for a checkpoint written by
    ``tnlm compress``, from ``base``: a transformers model folder, default the embedded
    MiniLM), instantiated with random weights, then every tensor is loaded from the
    checkpoint by :meth:`MPOModel.from_pretrained` (hash-checked). A lightweight task
    checkpoint (which leaves tensors to its base model) loads on ``base`` or on the base
    model it names, with that model's weights.

    A folder with its own ``config.json`` (not a lightweight checkpoint) is that model:
    a ``base`` given with it must have the same configuration (:func:`~tnlm.integration.
    loading.config_differences`; where or how it was saved aside), else it is refused.

    Raises:
        ValueError: ``folder`` is not a tnlm checkpoint, no architecture is found, or a
            ``base`` whose configuration differs from the folder's own (naming the fields).
    """
    from transformers import AutoConfig

    d = Path(folder)
    meta = check_checkpoint(d)
    light = meta.get("lightweight")
    own = (d / "config.json").is_file()
    arch = d if own else None
    if arch is None or (base is not None and light):
        arch = Path(base) if base is not None else _default_base()
    if not (arch / "config.json").is_file():
        raise ValueError(f"{arch} holds no config.json: cannot tell the architecture of {d}")
    config = AutoConfig.from_pretrained(str(arch))
    if own and not light and base is not None:  # the folder's own model; base must agree
        if not (Path(base) / "config.json").is_file():
            raise ValueError(f"base {base} holds no config.json")
        from tnlm.integration.loading import config_differences

        diff = config_differences(config, AutoConfig.from_pretrained(str(base)))
        if diff:
            raise ValueError(f"base {base} is not the model saved in {d}: its config.json "
                             f"differs in {', '.join(diff[:6])}"
                             + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
                             + " (the folder's own config.json describes it: pass no base)")
    cls = _base_class(meta, config)
    if light:
        source = Path(base) if base is not None else lightweight_base(meta)
        if source is None or not (source / "config.json").is_file():
            raise ValueError(f"{d} is a lightweight task checkpoint: it needs its base model "
                             f"({light.get('base_model_name_or_path')!r}); pass base=FOLDER")
        model, info = cls.from_pretrained(str(source), output_loading_info=True)
        check_block_weights(source, info, model)  # its task head is new: allowed
    else:
        model = cls._from_config(config)
    if (d / "generation_config.json").is_file() and can_generate(model):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(d))
    return MPOModel.from_pretrained(model.eval(), d, is_trainable=False)


def _default_base() -> Path:
    from tnlm.integration import default_model_path

    return default_model_path()
