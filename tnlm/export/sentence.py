"""sentence-transformers for a compressed model folder (:func:`save_self_contained`).

:class:`MPOTransformer` is sentence-transformers' ``Transformer`` module whose model is
loaded by :func:`~tnlm.export.load_compressed` (the MPO layers, not a dense
``model.safetensors``). sentence-transformers 6 imports a module class from outside its
own package only with ``trust_remote_code=True``; :func:`sentence_transformer` builds the
same model without that flag, from the classes imported here:

    sentence_transformer(folder).encode(sentences)
    SentenceTransformer(folder, trust_remote_code=True).encode(sentences)  # the same

Importing this module needs ``sentence-transformers`` (``pip install 'tnlm[export]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling

from tnlm.export.folder import (
    ST_MODULE,
    check_checkpoint,
    has_tokenizer,
    load_compressed,
    save_self_contained,
)

__all__ = ["MPOTransformer", "sentence_transformer"]


class MPOTransformer(Transformer):
    """sentence-transformers' ``Transformer`` on a tnlm compressed folder: the model is
    :func:`~tnlm.export.load_compressed`'s (its transformers model, MPO layers inside);
    tokenizer, truncation and features are the ``Transformer``'s. Saving writes the
    compressed folder again (:func:`~tnlm.export.save_self_contained`)."""

    def _load_model(self, model_name_or_path: str, transformer_task: str, config: Any,
                    backend: str, is_peft_model: bool, **model_kwargs: Any) -> Any:
        if backend != "torch" or transformer_task != "feature-extraction":
            raise ValueError(f"{type(self).__name__} runs the torch backend for "
                             f"feature-extraction only, got backend={backend!r}, "
                             f"transformer_task={transformer_task!r}")
        mpo = load_compressed(model_name_or_path)
        object.__setattr__(self, "mpo_model", mpo)  # not a submodule: no duplicate tensors
        return mpo.base_model

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True,
             **kwargs: Any) -> None:
        """The compressed folder (MPO weights, config, tokenizer) and this module's config."""
        save_self_contained(self.mpo_model, self.tokenizer, output_path,
                            keep_sentence_files=True)  # sentence-transformers writes its own
        self.save_config(output_path)


def sentence_transformer(folder: str | os.PathLike, device: str = "cpu") -> SentenceTransformer:
    """The ``SentenceTransformer`` of a folder written by
    :func:`~tnlm.export.save_self_contained`: :class:`MPOTransformer`, then the pooling
    and normalisation its ``modules.json`` lists; ``.encode()`` gives the model's
    mean-pooled, normalised embeddings (:func:`tnlm.integration.mean_pooled`). The
    prompts, default prompt and similarity function of its
    ``config_sentence_transformers.json`` are the model's, as
    ``SentenceTransformer(folder, trust_remote_code=True)`` reads them.

    Raises:
        ValueError: ``folder`` is not a tnlm checkpoint with sentence-transformers files
            and a tokenizer.
    """
    d = Path(folder)
    check_checkpoint(d)
    if not (d / "modules.json").is_file():
        raise ValueError(f"{d} has no modules.json: save it with save_self_contained(..., "
                         "sentence_transformers=True)")
    if not has_tokenizer(d):
        raise ValueError(f"{d} holds no tokenizer (tokenizer.json, tokenizer_config.json or "
                         "vocab.txt): every word would be encoded as an unknown token")
    entries = json.loads((d / "modules.json").read_text())
    modules: list[Any] = []
    for e in sorted(entries, key=lambda e: e["idx"]):
        kind = e["type"].rsplit(".", 1)[-1]
        if e["type"] == ST_MODULE:
            modules.append(MPOTransformer.load(str(d), subfolder=e["path"]))
        elif kind == "Pooling":
            modules.append(Pooling.load(str(d), subfolder=e["path"]))
        elif kind == "Normalize":
            modules.append(Normalize())
        else:
            raise ValueError(f"{d / 'modules.json'}: module type {e['type']!r} is not one "
                             f"sentence_transformer() builds ({ST_MODULE}, Pooling, Normalize)")
    settings: dict[str, Any] = {}
    config = d / "config_sentence_transformers.json"
    if config.is_file():
        saved = json.loads(config.read_text(encoding="utf-8"))
        settings = {k: saved[k] for k in ("prompts", "default_prompt_name",
                                          "similarity_fn_name") if saved.get(k) is not None}
    return SentenceTransformer(modules=modules, device=device, **settings)
