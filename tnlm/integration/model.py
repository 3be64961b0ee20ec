"""``get_mpo_model`` / ``MPOModel``: a transformers model with MPO layers.

A PEFT user should feel at home::

    config = MPOConfig(target_modules=["query", "key", "value", "dense"])
    model = get_mpo_model(model, config)      # replaces the layers in place
    model.print_trainable_parameters()        # auxiliary tensors + the task head
                                              # (classifier, see task_heads) train
    model(**batch)                             # the base model's forward
    Trainer(model=model, ...).train()          # label names found as for a PeftModel
    model.save_pretrained("out/")              # a task checkpoint: what trained, and the
                                               # SHA-256 of what the base model rebuilds
    model = MPOModel.from_pretrained(base_model, "out/")   # rebuilds, verifies, loads
    model = MPOModel.from_pretrained(base_model, "out/", is_trainable=False)  # inference
    plain = model.merge_and_unload()           # back to nn.Linear / Conv1D / nn.Embedding
                                               # (= unload(): the cores are the weights)
    model.resize_token_embeddings(n)           # with an MPO input embedding too

Model surgery is transactional: :func:`get_mpo_model` and
:meth:`MPOModel.from_pretrained` build and check every new layer before the first
one is put in place, and undo every replacement (module objects, parameter values,
``requires_grad`` flags) if anything fails after that
(:class:`tnlm.integration.surgery.Swap`). When they raise, the model is exactly as it
was. Reading a checkpoint is :mod:`tnlm.integration.checkpoint`; PEFT interop (task
heads, LoRA on MPO layers) is :mod:`tnlm.integration.peft`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import math
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import (
    MPOModule,
    describe_kinds,
    kind_of,
    parameter_report,
    set_trainable,
    weight_xw,
)
from tnlm.bridge.finetune import check_train
from tnlm.bridge.kinds import own_forward_error
from tnlm.bridge.pivoted import PivotedLinear
from tnlm.core.spectra import spectrum_entropy
from tnlm.core.validation import check_positive_int
from tnlm.integration import io
from tnlm.integration.checkpoint import (
    bits_equal,
    core_sketch,
    read_checkpoint,
    some_names,
    tensor_digests,
)
from tnlm.integration.config import TRAIN_MODES, MPOConfig
from tnlm.integration.loading import drawn_on_load
from tnlm.integration.merge import merge_factorized
from tnlm.integration.peft import check_outside_adapters, task_heads
from tnlm.integration.surgery import Swap, module_paths, weight_sharers

__all__ = ["MPOModel", "get_mpo_model"]


class MPOModel(nn.Module):
    """A model whose target layers are MPO modules; forwards to the base model.

    Attribute access falls through to the base model (``config``, ``generate``,
    ``gradient_checkpointing_enable``, ...). ``forward(*args, **kwargs)`` calls the base
    model (its hooks fire). Each instance belongs to a subclass made for its base
    model's class, ``MPO<BaseClass>`` (e.g. ``MPOBertForSequenceClassification``),
    whose ``forward`` shows the base class's signature: ``transformers.Trainer`` reads
    label names, ``return_loss`` and input columns from the class, as it does for
    ``peft.PeftModel``. The state dict carries the model's description (config and
    layer structures) as extra state (:data:`tnlm.integration.io.STATE_META_KEY`), so
    that a state dict saved by someone else (Trainer's ``model.safetensors``) is a
    checkpoint :meth:`from_pretrained` reads.
    """

    def __init__(self, model: nn.Module, config: MPOConfig) -> None:
        super().__init__()
        self.base_model = model
        self.mpo_config = copy.deepcopy(config)  # setup_training records its mode in it
        # state key -> SHA-256 of every tensor of the base model as the base model
        # rebuilds it (decomposed by get_mpo_model or a lightweight load); None when
        # unknown (lightweight saving then impossible)
        self._references: dict[str, str] | None = None
        if not any(getattr(h, "hook", None) is _refill_tied_names
                   for h in getattr(model, "_load_state_dict_pre_hooks", {}).values()):
            model.register_load_state_dict_pre_hook(_refill_tied_names)
        self.__class__ = _class_for(type(model))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward (called as ``base_model(...)``: its hooks fire)."""
        return self.base_model(*args, **kwargs)

    def __reduce__(self) -> tuple:
        # the class is made at run time: pickle a recipe for it (copy.deepcopy too)
        return _new_instance, (type(self.base_model),), self.__getstate__()

    def get_extra_state(self) -> torch.Tensor:
        """The model's description (config, layer structures) as a uint8 tensor."""
        return io.meta_to_tensor(self._meta())

    def _alias_names(self) -> dict[str, str]:
        """State key -> the first key of the same tensor, for every later name of a
        tensor the base model shares under several names (tied weights)."""
        return {f"base_model.{alias}": f"base_model.{kept}"
                for alias, kept in _tied_names(self.base_model).items()}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict``, with each tensor the base model shares under several
        names (tied weights, e.g. ``lm_head.weight`` and the word embeddings) under its
        first name only: ``transformers.Trainer.save_model`` writes this dict with
        ``safetensors``, which refuses tensors sharing memory. A ``load_state_dict``
        pre-hook of the base model fills the other names from the kept one, whatever
        the route (this model's ``load_state_dict``, a parent's or a
        ``DistributedDataParallel``'s, ``base_model.load_state_dict`` with the prefix
        stripped), as does :meth:`from_pretrained`. A call filling a given
        ``destination`` (a parent module's) keeps every name."""
        if args or "destination" in kwargs and kwargs["destination"] is not None:
            return super().state_dict(*args, **kwargs)
        out = super().state_dict(**kwargs)
        prefix = kwargs.get("prefix", "")
        for alias in self._alias_names():
            out.pop(prefix + alias, None)
        return out

    def set_extra_state(self, state: Any) -> None:
        """Loading a state dict: check the description is an MPO model's; the tensors
        carry the values (a structure that differs fails on their shapes)."""
        io.meta_from_tensor(state, "state dict")

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused: the base model's ``push_to_hub`` (which attribute lookup would reach)
        uploads its transformers files holding the MPO cores' tensors under names
        ``AutoModel`` does not know, so the upload loads with random weights. Upload a
        folder written by :meth:`save_pretrained`, or a plain transformers folder
        (:func:`tnlm.export.export_hf`, ``tnlm export --format hf``)."""
        raise NotImplementedError(
            "MPOModel.push_to_hub would upload the base model's files holding the MPO "
            "cores, which AutoModel.from_pretrained loads as random weights; upload the "
            "folder of save_pretrained, or a plain transformers folder (tnlm export "
            "--format hf)")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ structure
    def mpo_modules(self) -> Iterator[tuple[str, MPOModule]]:
        """``(name, module)`` of every MPO module, names relative to the base model."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, MPOModule):
                yield name, module

    def pivoted_modules(self) -> Iterator[tuple[str, PivotedLinear]]:
        """``(name, module)`` of every gauge-fixed low-rank layer
        (:class:`~tnlm.bridge.pivoted.PivotedLinear`), names relative to the base model:
        saved, loaded and merged with the MPO modules."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, PivotedLinear):
                yield name, module

    def modules_to_save(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every module matching a ``modules_to_save`` pattern of
        the config, or of the task heads (:func:`task_heads`) when it is ``None`` (names
        relative to the base model)."""
        patterns = self.mpo_config.modules_to_save
        if patterns is None:
            return [(n, self.base_model.get_submodule(n)) for n in task_heads(self.base_model)]
        return [(n, m) for n, m in self.base_model.named_modules()
                if n and any(MPOConfig.pattern_matches(p, n) for p in patterns)]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as ``peft.PeftModel`` computes them:
        every parameter of the model counted once (shared ones too), MPO cores included."""
        rep = parameter_report(self)
        return rep.trainable, rep.total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: X || all params: Y || trainable%: Z``, PEFT's line
        with PEFT's counting (:meth:`get_nb_trainable_parameters`), followed by
        ``(includes the newly initialised task head: classifier)`` when the config's
        ``modules_to_save`` is ``None`` and the task head trains, or by a note naming a
        task head that does not train (a ``modules_to_save`` list without it)."""
        print(f"{parameter_report(self)}{self._head_note()}")

    def _head_note(self) -> str:
        heads = task_heads(self.base_model)
        trains = [h for h in heads if any(
            p.requires_grad for p in self.base_model.get_submodule(h).parameters())]
        frozen = [h for h in heads if h not in trains]
        lightweight = self.mpo_config.train == "lightweight" and any(
            p.requires_grad for p in self.parameters())
        if frozen and lightweight:
            return (f" (the task head {', '.join(frozen)} does not train: modules_to_save="
                    f"{self.mpo_config.modules_to_save!r} leaves it out)")
        if trains and self.mpo_config.modules_to_save is None:
            return f" (includes the newly initialised task head: {', '.join(trains)})"
        return ""

    def setup_training(self, train: str | None = None) -> MPOModel:
        """Set ``requires_grad`` of every parameter for a training mode (default: the
        config's ``train``; a mode given here becomes the config's), one of
        :data:`~tnlm.integration.config.TRAIN_MODES`, the sets of the same names in
        :mod:`tnlm.bridge.finetune` (:func:`~tnlm.bridge.finetune.set_trainable`):

        * ``"lightweight"``: only the auxiliary tensors of the MPO layers train, plus the
          ``modules_to_save`` (all their parameters but MPO central tensors; by default
          the task head, see :func:`task_heads`);
        * ``"auxiliary"``: the paper's setting: everything but the central tensors;
        * ``"all"``: everything.
        """
        if train is not None:
            check_train(train, TRAIN_MODES)
        mode = self.mpo_config.train if train is None else train
        extra = [m for _, m in self.modules_to_save()] if mode == "lightweight" else []
        set_trainable(self.base_model, mode, extra=extra)
        self.mpo_config.train = mode
        return self

    def disable_adapter(self) -> Any:
        """Not available: an MPO model has no separate delta to switch off (PEFT's
        ``disable_adapter`` runs the base model by skipping the adapter's additive
        branch). The task lives in the auxiliary tensors, which replaced the layers'
        weights; the base model's outputs need the base model (a lightweight task
        checkpoint is applied on top of a fresh copy of it)."""
        raise NotImplementedError(
            "MPOModel.disable_adapter: MPO layers have no separate adapter delta to switch off "
            "(the trained auxiliary tensors are the layers' weights); run the base model itself, "
            "or load the task checkpoint onto a copy of it with MPOModel.from_pretrained")

    def compression_report(self) -> list[dict[str, Any]]:
        """Per MPO module: shapes, bonds, parameters before/after, truncation error, entropies.

        Plain dicts and lists (no DataFrame), ready to tabulate or plot; see
        :func:`tnlm.integration.report.format_report`.
        """
        rows = []
        for name, m in self.pivoted_modules():  # a gauge-fixed bond: one cut, rank r
            rows.append(dict(
                name=name, kind=m.kind, shape=[m.in_dim, m.out_dim], in_shape=[m.in_dim],
                out_shape=[m.out_dim], bond_dims=[m.rank], params_before=m.in_dim * m.out_dim,
                params_after=m.n_params, central_params=m.n_params,
                truncation_error=float(m.truncation_error), layout="pivoted",
                entropy=[spectrum_entropy(m.singular_values().cpu().numpy())]))
        for name, m in self.mpo_modules():
            mpo = m.to_mpo()
            rows.append(dict(
                name=name, kind=m.kind, shape=[m.in_dim, m.out_dim],
                in_shape=list(m.in_shape), out_shape=list(m.out_shape),
                bond_dims=list(m.bond_dims), params_before=m.in_dim * m.out_dim,
                params_after=sum(c.numel() for c in m.cores),
                central_params=m.num_central_params,
                truncation_error=float(m.truncation_error),
                entropy=[float(e) for e in mpo.entanglement_entropy()],
            ))
        return rows

    # ------------------------------------------------------------------ vocabulary
    def resize_token_embeddings(self, new_num_tokens: int | None = None,
                                pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Module:
        """transformers' ``resize_token_embeddings`` for a model whose input embedding is
        an :class:`~tnlm.bridge.MPOEmbedding`; returns the new input embedding.

        The MPO embedding is merged to a dense ``nn.Embedding``, the base model resizes
        that (new rows, ``config.vocab_size``, the output embedding if any, as
        transformers does), and the resized table is decomposed again with the same
        config (:meth:`MPOConfig.spec_for` for the new size; the layer keeps its forward
        mode, dense cache setting and the ``requires_grad`` flags of its central and
        auxiliary tensors). ``truncation_error`` of the new layer is relative to the
        resized dense table. A truncating config truncates the new table afresh (its site
        shapes differ), so the existing tokens' rows move too: by how much is measured
        (the relative Frobenius change of the old rows) and a ``UserWarning`` says it when
        it is above 1e-5; resize before compressing to keep them as they were. Optimizers
        holding the old parameters must be rebuilt.
        A lightweight checkpoint is no longer possible afterwards (the base model does
        not rebuild the resized embedding); save with ``lightweight=False``, and load
        that onto a base model of the new vocabulary size.

        When the input embedding is not an MPO layer, this is the base model's method.
        With an MPO output embedding (``lm_head``), an unchanged size (``None``, or
        ``len(tokenizer)`` equal to the vocabulary) returns the input embedding and
        changes nothing; another size is refused. The new size is checked against the
        config before anything changes; if a later step fails, the old embedding, output
        embedding and vocabulary size are put back.

        Raises:
            TypeError: ``new_num_tokens`` is not None or an int (a bool, a float).
            ValueError: ``new_num_tokens`` below 1, the config's site shapes do not fit
                the new size, the output embedding (``lm_head``) is an MPO layer and
                the size changes (refused before anything changes), or the resized
                output embedding would be tied to the (temporary dense) input embedding
                (``tie_word_embeddings``: an MPO embedding cannot be tied).
        """
        if new_num_tokens is not None:  # True or 70.9 must not become 1 or 70 rows
            new_num_tokens = check_positive_int(new_num_tokens, "new_num_tokens")
        base = self.base_model
        emb = base.get_input_embeddings()
        head = base.get_output_embeddings()
        # transformers resizes only an nn.Linear head: refused before anything changes
        wanted = getattr(head, "out_dim", None) if new_num_tokens is None else new_num_tokens
        if isinstance(pad_to_multiple_of, int) and pad_to_multiple_of > 0 and isinstance(
                wanted, int):
            wanted = math.ceil(wanted / pad_to_multiple_of) * pad_to_multiple_of
        if isinstance(head, (MPOModule, PivotedLinear)) and wanted == head.out_dim:
            rows = getattr(emb, "num_embeddings", None)
            if rows == wanted:  # nothing to resize (``len(tokenizer)``): transformers would
                return emb      # try to set the MPO head's out_features and fail
            where = module_paths(base)[id(head)][0]
            raise ValueError(
                f"resize_token_embeddings(new_num_tokens={new_num_tokens!r}): the input "
                f"embedding has {rows} rows, and resizing it would resize the output "
                f"embedding {where!r} too, an MPO layer ({type(head).__name__}) that cannot "
                "be resized; nothing was changed. Merge it first (merge_and_unload), resize, "
                f"then decompose again, or leave {where!r} out of target_modules")
        if isinstance(head, (MPOModule, PivotedLinear)) and wanted != head.out_dim:
            where = module_paths(base)[id(head)][0]
            raise ValueError(
                f"resize_token_embeddings(new_num_tokens={new_num_tokens!r}): the output "
                f"embedding {where!r} is an MPO layer ({type(head).__name__}), which cannot be "
                "resized (transformers resizes only an nn.Linear head); nothing was changed. "
                f"Merge it first (merge_and_unload), resize, then decompose again, or leave "
                f"{where!r} out of target_modules")
        if not isinstance(emb, MPOModule):
            return base.resize_token_embeddings(new_num_tokens, pad_to_multiple_of,
                                                mean_resizing)
        if new_num_tokens is None and pad_to_multiple_of is None:
            return emb
        size = emb.num_embeddings if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError("pad_to_multiple_of must be a positive int, got "
                                 f"{pad_to_multiple_of!r}")
            size = math.ceil(size / pad_to_multiple_of) * pad_to_multiple_of
        if size < 1:
            raise ValueError(f"new_num_tokens must be >= 1, got {new_num_tokens}")
        if size == emb.num_embeddings:
            return emb
        name, dim = module_paths(base)[id(emb)][0], emb.embedding_dim
        try:
            spec, _ = self.mpo_config.spec_for(name, size, dim)
            _check_site_shapes(spec, size, dim)
        except (TypeError, ValueError) as err:
            raise type(err)(f"cannot resize {name!r} to {size} tokens: {err}") from err
        central = emb.cores[emb.central_index].requires_grad
        auxiliary = [emb.cores[k].requires_grad for k in emb.auxiliary_indices]
        old_out = base.get_output_embeddings()
        text_config = base.config.get_text_config()
        old_vocab = text_config.vocab_size
        had_vocab_attr = "vocab_size" in base.__dict__
        old_vocab_attr = base.__dict__.get("vocab_size")
        dense = emb.merge()
        dense.weight.requires_grad_(central or any(auxiliary))

        def restore_vocabulary() -> None:
            if old_out is not None:
                base.set_output_embeddings(old_out)
            text_config.vocab_size = old_vocab
            if had_vocab_attr:
                base.__dict__["vocab_size"] = old_vocab_attr
            else:
                base.__dict__.pop("vocab_size", None)

        with Swap(base) as swap:  # on failure: the old embeddings and vocabulary size
            swap.on_undo(restore_vocabulary)
            swap.replace({name: dense})
            resized = base.resize_token_embeddings(size, None, mean_resizing)
            out = base.get_output_embeddings()
            if out is not None and getattr(out, "weight", None) is resized.weight:
                raise ValueError(
                    f"resizing tied the output embedding to {name!r} (tie_word_embeddings); an "
                    "MPO embedding cannot share its weight: set config.tie_word_embeddings = "
                    "False, or merge the model (merge_and_unload) before resizing")
            layer = MPOModule.from_module(resized, spec, emb.mode)
            n_old = min(emb.num_embeddings, size)
            old_rows = dense.weight[:n_old].double()
            moved = float((layer.merge().weight[:n_old].double() - old_rows).norm()
                          / old_rows.norm().clamp_min(1e-300))
            if moved > 1e-5:
                warnings.warn(
                    f"resizing {name!r} to {size} tokens decomposed the table again with the "
                    f"config's truncation: the {n_old} existing tokens' rows moved by "
                    f"{moved:.3g} (relative Frobenius change); resize before compressing to "
                    "keep them", stacklevel=2)
            layer.cache_dense = emb.cache_dense
            layer.cores[layer.central_index].requires_grad_(central)
            for k, flag in zip(layer.auxiliary_indices, auxiliary):
                layer.cores[k].requires_grad_(flag)
            for path in module_paths(base)[id(resized)]:
                swap.put(path, layer)
        return layer

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Replace every MPO module (and gauge-fixed PivotedLinear) by a plain module of the
        kind it replaced
        (``nn.Linear``, ``Conv1D``, ``nn.Embedding``) whose weight is contracted from the
        cores; return the plain base model (outputs unchanged up to rounding;
        :func:`~tnlm.integration.merge.merge_factorized`).

        Each dense module keeps its MPO module's train/eval mode; its weight trains if
        any core of the MPO module did, its bias as before (as PEFT's merge keeps the
        base layers' flags).

        Args:
            progressbar: show a progress bar (PEFT's argument).
            safe_merge: check every merged weight for NaN / inf before the first
                replacement; raise ``ValueError`` naming the modules (the model is then
                unchanged) instead of merging them.
            adapter_names: PEFT's argument; an MPO model has no named adapters, so only
                ``None`` is accepted.
        """
        if adapter_names is not None:
            raise ValueError("adapter_names: an MPO model has no named adapters (the MPO cores "
                             "are the layers' weights); pass None")
        merge_factorized(self.base_model, safe_merge=safe_merge, progressbar=progressbar)
        return self.base_model

    def unload(self) -> nn.Module:
        """The base model with every MPO module (and gauge-fixed PivotedLinear) replaced by
        a plain module rebuilt from its cores: the same as :meth:`merge_and_unload`
        (without its options).

        What ``unload`` means here: PEFT's ``unload`` returns the base model *without*
        merging the adapters, i.e. the original weights, which a LoRA layer keeps beside
        its adapter. An MPO layer keeps no original weight: its cores *are* the weight
        (decomposed, possibly truncated, then trained), so there is nothing else to
        return. The dense layers compute what the MPO layers computed, not what the
        model computed before :func:`get_mpo_model`; to get the original model, load it
        again (a lightweight task checkpoint never altered it on disk).
        """
        return self.merge_and_unload()

    # ------------------------------------------------------------------ persistence
    def _meta(self) -> dict[str, Any]:
        return dict(config=self.mpo_config.to_dict(),
                    modules={n: m.structure() for n, m in (*self.mpo_modules(),
                                                             *self.pivoted_modules())},
                    base_model_class=type(self.base_model).__name__)

    def _lightweight_plan(self, name_or_path: str) -> tuple[dict[str, str] | None, str]:
        """``(omitted, "")``: the SHA-256 of every tensor a lightweight checkpoint would
        leave to the base model (frozen and equal to what the base model rebuilds), or
        ``(None, reason)`` when a lightweight checkpoint is impossible: a central tensor
        trains or differs from the decomposition of the base model. Tensors transformers
        draws at random when it loads the base model from ``name_or_path`` (a pooler its
        files lack, :func:`~tnlm.integration.loading.drawn_on_load`) are never left to
        it: they are saved."""
        refs = self._references
        if any(True for _ in self.pivoted_modules()):
            return None, ("gauge-fixed layers (PivotedLinear) are not decompositions of the "
                          "base model")
        if refs is None:
            return None, ("the model was not wrapped here by get_mpo_model (nor loaded from a "
                          "lightweight checkpoint): nothing records what the base model rebuilds")
        state = self.base_model.state_dict(keep_vars=True)
        if state.keys() != refs.keys():
            return None, "the model's tensors changed names since it was wrapped"
        drawn = drawn_on_load(self.base_model, state, name_or_path)
        digests: dict[int, str] = {}
        omitted = {}
        for key, t in state.items():
            if t.requires_grad or key in drawn:
                continue
            if id(t) not in digests:
                digests[id(t)] = io.tensor_sha256(t)
            if digests[id(t)] == refs[key]:
                omitted[key] = refs[key]
        for name, m in self.mpo_modules():
            k = m.central_index
            if m.cores[k].requires_grad:
                return None, (f"the central tensor of {name!r} trains (train="
                              f"{self.mpo_config.train!r})")
            if f"{name}.cores.{k}" in drawn:
                return None, (f"{name!r} lies in a module transformers draws at random when it "
                              "loads the base model (its files lack it): decomposing it anew "
                              "cannot give the central tensor")
            if f"{name}.cores.{k}" not in omitted:
                return None, (f"the central tensor of {name!r} is not the decomposition of the "
                              "base model any more (trained, truncated, squeezed, compressed or "
                              "resized)")
        return omitted, ""

    def save_pretrained(self, directory: str | os.PathLike, lightweight: bool | None = None,
                        *, state_dict: dict[str, torch.Tensor] | None = None,
                        safe_serialization: bool = True, is_main_process: bool = True,
                        **kwargs: Any) -> Path:
        """Save a checkpoint (safetensors, no pickle, and ``mpo_config.json``), atomically;
        see :mod:`tnlm.integration.io` for what is guaranteed.

        Args:
            lightweight: ``True``: a task checkpoint, as a PEFT adapter: only what the task
                changed (the trainable tensors: auxiliary cores, ``modules_to_save``,
                anything else that trains, and any frozen tensor changed since wrapping)
                plus, in the config, the recipe for the rest (the MPO config, the structure
                of every layer, the SHA-256 of every tensor left to the base model: central
                cores, frozen biases, embeddings, ...; not the frozen tensors
                transformers draws at random when it loads the base model, e.g. a pooler
                its files lack: those are saved). :meth:`from_pretrained` rebuilds
                those by decomposing the base model again and refuses a base model that
                does not give them bit for bit. Possible when every central tensor is
                frozen and still the decomposition of the base model (raises
                ``ValueError`` saying why not otherwise). ``False``: every tensor of the
                model (MPO cores, never the dense weights they replaced): needs only the
                architecture to load. ``None`` (default): lightweight when possible and
                the base model has a ``name_or_path`` (it was loaded from a checkpoint
                one can load again; a randomly initialised base cannot be rebuilt
                elsewhere), else everything.
            state_dict: save these tensors (the model's state dict, keys with or without
                the ``base_model.`` prefix) instead of the model's, as a full checkpoint:
                every tensor of the model (one key of tensors shared by several), each of
                the model's shape, checked before anything is written.
            safe_serialization: must be ``True`` (checkpoints are safetensors only).
            is_main_process: ``False`` writes nothing (other ranks of a distributed job).

        Raises:
            TypeError: unexpected arguments, ``lightweight`` not a bool or None, a
                ``state_dict`` that is not a dict of tensors.
            ValueError: ``safe_serialization`` not True; ``lightweight=True`` where no
                lightweight checkpoint is possible or with a ``state_dict``; a
                ``state_dict`` lacking tensors of the model, holding others, one of
                another shape, or different values under names the model ties (one
                shared tensor) (naming them).
        """
        if kwargs:
            raise TypeError(f"save_pretrained got unexpected arguments {sorted(kwargs)}")
        if lightweight is not None and not isinstance(lightweight, bool):
            raise TypeError(f"lightweight must be True, False or None, got {lightweight!r}")
        if safe_serialization is not True:
            raise ValueError("safe_serialization must be True: tnlm checkpoints are safetensors "
                             "only (loading never unpickles)")
        if not is_main_process:
            return Path(directory)
        meta = self._meta()
        if state_dict is not None:
            if lightweight:
                raise ValueError("a given state_dict is saved as a full checkpoint; "
                                 "lightweight=True cannot be used with it")
            return io.write_tensors(directory, meta, self._own_keys(state_dict))
        name = _name_or_path(self.base_model)
        omitted, reason = (None, "") if lightweight is False or (
            lightweight is None and not name) else self._lightweight_plan(name)
        if lightweight and omitted is None:
            raise ValueError(f"cannot save a lightweight checkpoint: {reason}; save with "
                             "lightweight=False (every tensor)")
        if omitted is None:
            return io.write_checkpoint(directory, meta, self.base_model)
        kept: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, t in self.base_model.state_dict(keep_vars=True).items():
            if key not in omitted and id(t) not in seen:
                seen.add(id(t))
                kept[key] = t
        state = self.base_model.state_dict()
        sketches = {k: core_sketch(state[k]) for k in omitted
                    if re.search(r"\.cores\.\d+$", k)}  # rounding told from another base
        meta["lightweight"] = dict(rebuilt=omitted, base_model_name_or_path=name,
                                   sketches=sketches)
        return io.write_tensors(directory, meta, kept)

    def _own_keys(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A given state dict as the base model's tensors (one key per shared tensor),
        checked against what a full checkpoint needs: every tensor of the model (one key
        of a shared one) in the model's shape (:meth:`save_pretrained` raises)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        own = self.base_model.state_dict(keep_vars=True)
        prefix = "base_model."
        out: dict[str, torch.Tensor] = {}
        seen: set[tuple] = set()
        given: set[str] = set()
        values: dict[str, torch.Tensor] = {}
        wrong: list[str] = []
        for key, t in state_dict.items():
            if key == io.STATE_META_KEY:
                continue
            key = key[len(prefix):] if key.startswith(prefix) and key not in own else key
            if key not in own:
                raise ValueError(f"state_dict key {key!r} is not a tensor of the model")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state_dict[{key!r}] must be a tensor, got "
                                f"{type(t).__name__}")
            given.add(key)
            values[key] = t
            if t.shape != own[key].shape:
                wrong.append(f"{key} {list(t.shape)} (the model's: {list(own[key].shape)})")
            # every empty tensor has data_ptr 0: never one of a shared group
            tag = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else ("empty", key)
            if tag not in seen:
                seen.add(tag)
                out[key] = t
        if wrong:
            raise ValueError(f"state_dict holds tensors of another shape than the model's: "
                             f"{some_names(wrong, 3)}")
        groups: dict[int, list[str]] = {}  # a tensor shared by several keys: one of them
        for key, t in own.items():
            groups.setdefault(id(t), []).append(key)
        for keys in groups.values():  # the model holds one tensor: one value for all names
            named = [k for k in keys if k in given]
            for other in named[1:]:
                if not bits_equal(values[named[0]].detach().cpu(), values[other].detach().cpu()):
                    raise ValueError(
                        f"state_dict holds {named[0]!r} and {other!r} with different values, "
                        f"but the model ties them (one shared tensor): a checkpoint of both "
                        "could not be loaded. Give them equal values (or only one of the "
                        "names); nothing was written")
            for other in [k for k in named if k in out][1:]:
                out.pop(other)
        missing = sorted(keys[0] for keys in groups.values() if given.isdisjoint(keys))
        if missing:
            raise ValueError(f"state_dict lacks tensors of the model: {some_names(missing)}; "
                             "a full checkpoint needs every tensor (pass model.state_dict(), "
                             "or save without state_dict)")
        return out

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike,
                        train: str | None = None, *, is_trainable: bool = True) -> MPOModel:
        """Rebuild the MPO model on ``base_model`` and load a checkpoint, bit-exact.

        ``is_trainable=False`` loads for inference, as PEFT's ``is_trainable=False``:
        every parameter of the model has ``requires_grad=False`` and the model is in
        eval mode (MPO layers then reuse their dense weight, see
        :mod:`tnlm.bridge.layer`); ``train`` must then be ``None``. The default,
        ``True``, differs from PEFT's (``False``): the parameters are set up for
        training by ``train`` (default: the saved config's mode, see
        :meth:`setup_training`) and the train/eval mode of ``base_model`` is left as
        it was.

        Three kinds of folder are read:

        * a full checkpoint (``save_pretrained(lightweight=False)``): ``base_model`` is a
          fresh instance of the architecture; no decomposition is run;
        * a lightweight task checkpoint: ``base_model`` must be the base model the task
          was trained on. Its target layers are decomposed again with the saved config
          (the code of :func:`get_mpo_model`, float64), every tensor the checkpoint leaves
          to the base (central cores, frozen biases, embeddings, ...) is checked against
          its recorded SHA-256, then the saved tensors are loaded. Several task
          checkpoints share one base model;
        * a folder where ``transformers.Trainer`` saved the model (``model.safetensors``,
          a state dict carrying the model's description): as a full checkpoint, without
          a hash to verify (Trainer records none).

        Everything is checked before ``base_model`` is touched: the weights' SHA-256,
        the config, that every saved module exists in ``base_model`` with the saved
        kind, dimensions and bias, that the core shapes are consistent, and that the
        tensor names and shapes in the weights file are exactly those of the model
        after the replacement (less, for a task checkpoint, the rebuilt ones). The
        saved tensors are then loaded into new layers, and only then are the layers
        swapped in and the other tensors copied; if anything fails on the way,
        ``base_model`` is restored (same modules, same values).

        Raises:
            FileNotFoundError: no checkpoint (config or weights) in ``directory``.
            ValueError: a corrupt or modified checkpoint, one of another architecture,
                a task checkpoint on another base model, one of another dtype than
                ``base_model`` (load the base in the checkpoint's dtype), or a folder
                holding both a ``save_pretrained`` checkpoint and a Trainer's
                ``model.safetensors``; the message names what does not match.
        """
        if isinstance(base_model, MPOModel):
            raise ValueError("base_model is already an MPOModel; pass a plain model of the "
                             "saved architecture")
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
        if train is not None and train not in TRAIN_MODES:
            check_train(train, TRAIN_MODES)
        if not isinstance(is_trainable, bool):
            raise TypeError(f"is_trainable must be True or False, got {is_trainable!r}")
        if not is_trainable and train is not None:
            raise ValueError(f"train={train!r} asks for training but is_trainable=False loads "
                             "for inference; pass one of them")
        plan = read_checkpoint(base_model, directory)
        # swap in and copy; on any failure, put everything back
        with Swap(base_model) as swap:
            swap.replace(plan.shells)
            with torch.no_grad():
                for key, value in plan.rest.items():
                    swap.save_value(plan.targets[key])
                    plan.targets[key].copy_(value)
            model = cls(base_model, plan.config)
            if is_trainable:  # for inference everything is frozen below
                model.setup_training(train)
            model._references = plan.references
            if not is_trainable:
                for p in model.parameters():
                    p.requires_grad_(False)
                model.eval()
        return model


def _name_or_path(model: nn.Module) -> str:
    """Where a transformers model was loaded from ("" for a randomly initialised one)."""
    name = getattr(getattr(model, "config", None), "name_or_path", "")
    return name if isinstance(name, str) else ""


#: the MPOModel subclass of each base model class (see MPOModel)
_CLASSES: dict[type, type] = {}


def _class_for(base_cls: type) -> type:
    """``MPO<BaseClass>``: an :class:`MPOModel` whose ``forward`` shows the signature of
    ``base_cls.forward`` (made once per base class)."""
    cls = _CLASSES.get(base_cls)
    if cls is None:
        def forward(self: MPOModel, *args: Any, **kwargs: Any) -> Any:
            return self.base_model(*args, **kwargs)

        forward.__doc__ = MPOModel.forward.__doc__
        # no introspectable signature: keep *args, **kwargs
        with contextlib.suppress(TypeError, ValueError):
            forward.__signature__ = inspect.signature(base_cls.forward)
        name = f"MPO{base_cls.__name__}"
        cls = type(name, (MPOModel,), {"forward": forward, "__module__": __name__,
                                       "__qualname__": name, "__doc__": MPOModel.__doc__})
        _CLASSES[base_cls] = cls
    return cls


def _tied_names(model: nn.Module) -> dict[str, str]:
    """State key -> the first key of the same tensor, for every later name of a tensor
    ``model`` shares under several names (tied weights); keys relative to ``model``."""
    first: dict[int, str] = {}
    aliases = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[key] = first[id(t)]
        else:
            first[id(t)] = key
    return aliases


def _refill_tied_names(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                       *_: Any) -> None:
    """``load_state_dict`` pre-hook of an MPO model's base model (module level: a model
    holding it still pickles): each later name of a tied tensor that ``state_dict``
    lacks (:meth:`MPOModel.state_dict` leaves them out) takes the value under the
    first name, under the ``prefix`` this load gives the base model (``base_model.``,
    ``module.base_model.`` through a parent, ``""`` when loaded directly). Names
    present are left alone (a dict with every name loads as before). Once the model
    holds no MPO or gauge-fixed layer (merged), it does nothing: a plain model loads as
    transformers made it."""
    if not any(isinstance(m, (MPOModule, PivotedLinear)) for m in module.modules()):
        return
    for alias, kept in _tied_names(module).items():
        if prefix + alias not in state_dict and prefix + kept in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + kept]


def _new_instance(base_cls: type) -> MPOModel:
    """An empty instance of the MPOModel class for ``base_cls`` (unpickling)."""
    return nn.Module.__new__(_class_for(base_cls))


def _check_site_shapes(spec: Any, I: int, J: int) -> None:
    """The site shapes ``spec`` gives a matrix (I, J) fit it (as decomposing will require)."""
    ins, outs = spec.site_shapes(I, J)
    if len(ins) != len(outs):
        raise ValueError(f"in_shape {ins} and out_shape {outs} must have the same number of "
                         "sites")
    for label, shape, dim in (("in_shape", ins, I), ("out_shape", outs, J)):
        p = math.prod(shape)
        if p < dim or (p > dim and not spec.pad):
            hint = "; pass pad=True to zero-pad" if p > dim else ""
            raise ValueError(f"{label}={shape} has product {p}, but the dimension is {dim}{hint}")


def get_mpo_model(model: nn.Module, config: MPOConfig, progress: bool = True) -> MPOModel:
    """Replace the target layers of ``model`` (in place) by MPO modules; wrap it.

    Every check (patterns, tied weights, site shapes and options of every target)
    runs before the first decomposition, and every layer is built before the first
    one is put in place; if anything fails, ``model`` is left exactly as it was.

    Raises:
        ValueError: if a target pattern matches no ``nn.Linear`` / ``Conv1D`` /
            ``nn.Embedding`` or an override pattern matches no target (the messages
            list close names), a ``modules_to_save`` pattern matches nothing, the
            options of a target do not fit it (the message names the module), or an
            ``in_shapes`` / ``out_shapes`` key is no target's input / output dimension,
            or a target is a subclass of one of those types with a ``forward`` of its
            own (Gemma's scaled word embedding, OPT's learned positions): an MPO layer
            would compute only the plain lookup / product.
    """
    if not isinstance(config, MPOConfig):
        raise TypeError(f"config must be an MPOConfig, got {type(config).__name__}")
    if isinstance(model, MPOModel):
        raise ValueError("model is already an MPOModel")
    supported: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and kind_of(module) is not None:
            supported[name] = module
    targets = [n for n in supported if config.is_target(n)]
    patterns = config.target_modules if isinstance(config.target_modules, list) else [
        config.target_modules]
    for p in patterns:
        hit = any(config.pattern_matches(p, n) for n in supported) if isinstance(
            config.target_modules, list) else bool(targets)
        if not hit:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in supported})
            close = difflib.get_close_matches(p.rsplit(".", 1)[-1], leaves, n=3)
            hint = f"; did you mean {close}?" if close else f"; supported leaf names: {leaves[:12]}"
            raise ValueError(f"target_modules pattern {p!r} matches no {describe_kinds()} "
                             f"module of {type(model).__name__}{hint}")
    for p in config.overrides:
        if not any(config.override_matches(p, n) for n in targets):
            suffixes = sorted({".".join(n.split(".")[k:]) for n in targets
                               for k in range(len(n.split(".")))})
            close = difflib.get_close_matches(p, suffixes, n=3)
            leaves = sorted({n.rsplit(".", 1)[-1] for n in targets})
            hint = f"; did you mean {close}?" if close else f"; target leaf names: {leaves[:12]}"
            raise ValueError(f"overrides pattern {p!r} matches none of the {len(targets)} "
                             f"target modules of {type(model).__name__}{hint}")
    all_names = [n for n, _ in model.named_modules() if n]
    for p in config.modules_to_save or ():
        if not any(config.pattern_matches(p, n) for n in all_names):
            raise ValueError(f"modules_to_save pattern {p!r} matches no module of "
                             f"{type(model).__name__}")
    for name in targets:
        problem = own_forward_error(supported[name], name)
        if problem:
            raise ValueError(f"target_modules: {problem}; leave it out of target_modules")
    check_outside_adapters(model, targets)
    for name, others in weight_sharers(model, targets).items():
        raise ValueError(f"module {name!r} shares its weight with {others} (tied "
                         "weights); an MPO would silently untie them: untie them first or "
                         "leave the module out of target_modules")
    # every spec and site shape first (cheap), then every decomposition (costly);
    # the model is not touched until all layers are built
    specs = {}
    for name in targets:
        I, J = weight_xw(supported[name]).shape
        try:
            spec, mode = config.spec_for(name, I, J)
            _check_site_shapes(spec, I, J)
        except (TypeError, ValueError) as err:
            raise type(err)(f"module {name!r} ({I}x{J}): {err}") from err
        specs[name] = (spec, mode, I, J)
    for label, shapes, axis, side in (("in_shapes", config.in_shapes, 2, "input"),
                                      ("out_shapes", config.out_shapes, 3, "output")):
        dims = sorted({specs[name][axis] for name in targets})
        unused = sorted(set(shapes) - set(dims))
        if unused:  # a typo (23 for 32) would silently leave the default shapes
            raise ValueError(f"{label} keys {unused} are no target's {side} dimension; the "
                             f"targets' {side} dimensions are {dims}")
    built: dict[str, MPOModule] = {}
    for name in tqdm(targets, desc="MPO decomposition", disable=not progress, leave=False):
        spec, mode, I, J = specs[name]
        try:
            built[name] = MPOModule.from_module(supported[name], spec, mode)
        except ValueError as err:
            raise ValueError(f"module {name!r} ({I}x{J}): {err}") from err
    with Swap(model) as swap:  # on any failure the model is left as it was
        swap.replace(built)
        wrapped = MPOModel(model, config)
        wrapped.setup_training()
        wrapped._references = tensor_digests(model)
    return wrapped
