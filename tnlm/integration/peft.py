"""PEFT interop: task heads (``modules_to_save``), peft adapter layers, LoRA on MPO layers.

* :func:`task_heads`: the newly initialised head of a transformers task architecture,
  what PEFT's task types add to ``modules_to_save`` (and :class:`~tnlm.integration.MPOModel`
  trains by default);
* :func:`check_outside_adapters`: MPO layers are not put inside peft adapter layers (a
  merge would silently drop the adapter);
* :func:`lora_config_for_mpo` / :func:`mpo_lora_class`: LoRA on top of MPO layers, with
  an exact merge.

peft itself is imported only when a LoRA class is asked for (or is already imported).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tnlm.bridge import MPOLinear, MPOModule
from tnlm.bridge.pivoted import merged_module

__all__ = ["check_outside_adapters", "lora_config_for_mpo", "mpo_lora_class",
           "peft_tuner_layer", "task_heads"]

#: transformers' task architectures whose head a base checkpoint does not have:
#: ``*ForSequenceClassification``, ``*ForTokenClassification``, ``*ForImageClassification``,
#: ``*ForAudioClassification``, ``*ForQuestionAnswering``, ``*ForMultipleChoice``
_TASK_CLASS = re.compile(r".*For\w*(Classification|QuestionAnswering|MultipleChoice)")


def task_heads(model: nn.Module) -> list[str]:
    """Names of the task head modules of a transformers task architecture (``[]`` for
    any other model).

    The rule is by architecture: for a class named ``*For...Classification``,
    ``*ForQuestionAnswering`` or ``*ForMultipleChoice`` that holds its base model under
    ``model.base_model_prefix`` (e.g. ``bert``), the heads are the other direct
    children with parameters: ``classifier`` (BERT), ``pre_classifier`` and
    ``classifier`` (DistilBERT), ``score`` (GPT-2), ``qa_outputs`` (question answering).
    Loading such a model from a base checkpoint initialises them anew (transformers
    reports them as missing keys), whoever loaded it; they are what PEFT's task types
    add to ``modules_to_save``. An ``*ForMaskedLM`` / ``*ForCausalLM`` head is
    pre-trained and is not one.
    """
    prefix = getattr(model, "base_model_prefix", "")
    if not (isinstance(prefix, str) and prefix and _TASK_CLASS.fullmatch(type(model).__name__)):
        return []
    children = dict(model.named_children())
    if prefix not in children:
        return []
    return [n for n, m in children.items()
            if n != prefix and any(True for _ in m.parameters())]


def peft_tuner_layer() -> type | None:
    """peft's ``BaseTunerLayer`` if peft is imported (no peft layer can exist otherwise)."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - a peft without it
        return None
    return BaseTunerLayer


def check_outside_adapters(model: nn.Module, targets: Iterable[str]) -> None:
    """Refuse target modules inside a peft adapter layer (a ``BaseTunerLayer``).

    Raises:
        ValueError: a target is inside an adapter layer (the message says what to do).
    """
    tuner = peft_tuner_layer()
    if tuner is None:
        return
    adapters = [n for n, m in model.named_modules() if n and isinstance(m, tuner)]
    for name in targets:
        inside = [a for a in adapters if name.startswith(a + ".")]
        if inside:
            raise ValueError(
                f"module {name!r} is inside the peft adapter layer {inside[0]!r}: peft merges "
                "an adapter by writing its base layer's weight, which an MPO layer computes "
                "from its cores, so merging would silently drop the adapter; merge the "
                "adapters first (merge_and_unload) and decompose the merged model, or "
                "decompose first and add LoRA on top with lora_config_for_mpo(LoraConfig(...))")


_LORA_CLASS: list[type] = []


def mpo_lora_class() -> type:
    """``MPOLoraLinear``: peft's LoRA ``Linear`` over an :class:`~tnlm.bridge.MPOLinear`,
    with an exact merge (needs peft).

    peft merges LoRA by adding ``B @ A`` to ``base_layer.weight``; an MPO layer's weight
    is computed from its cores, so that write is lost (peft's own ``Linear`` registered
    for ``MPOLinear`` merges to the model *without* LoRA). This class merges into a
    dense layer of the kind the MPO layer replaced (``W(cores) + scaling * B @ A``:
    ``merge_and_unload`` then puts that dense layer in place) and ``unmerge`` puts the
    untouched MPO layer back. LoRA variants (DoRA, ...) are refused when merging (and by
    :func:`lora_config_for_mpo`, before any training). The merge runs in the base weight's
    dtype promoted to at least float32 (a float64 layer merges in float64).
    Register it with :func:`lora_config_for_mpo`.
    """
    if _LORA_CLASS:
        return _LORA_CLASS[0]
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class MPOLoraLinear(LoraLinear):
        __doc__ = mpo_lora_class.__doc__

        def _delta(self, adapter: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            """``scaling * B @ A`` in nn.Linear layout (out, in), computed in ``dtype``."""
            A = self.lora_A[adapter].weight.to(dtype)
            B = self.lora_B[adapter].weight.to(dtype)
            return (B @ A) * self.scaling[adapter]

        @torch.no_grad()
        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
            if not names:
                return
            variants = [n for n in names if n in self.lora_variant]
            if variants:
                raise NotImplementedError(f"adapters {variants} use a LoRA variant (DoRA, ...), "
                                          "which tnlm does not merge into MPO layers")
            base = self.base_layer
            if isinstance(base, MPOModule):
                self.__dict__["_mpo_layer"] = base  # kept out of the module tree
                base = merged_module(base)  # the MPO layer's flags, not a new module's
            dtype = torch.promote_types(base.weight.dtype, torch.float32)  # float64 stays
            weight = base.weight.detach().to(dtype).clone()
            bias = None if base.bias is None else base.bias.detach().to(dtype).clone()
            for name in names:
                delta = self._delta(name, dtype)
                weight += delta if isinstance(base, nn.Linear) else delta.T  # Conv1D: (in, out)
                if self.lora_bias[name]:
                    if bias is None:
                        raise RuntimeError("cannot merge LoRA with lora_bias=True: the base layer "
                                           "has no bias")
                    bias += self.lora_B[name].bias.to(dtype) * self.scaling[name]
            if safe_merge and not (torch.isfinite(weight).all() and (
                    bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"NaNs detected in the merged weights of adapters {names}")
            base.weight.data = weight.to(base.weight.dtype)
            if bias is not None:
                base.bias.data = bias.to(base.bias.dtype)
            self.base_layer = base
            self.merged_adapters.extend(names)

        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
                return
            mpo = self.__dict__.pop("_mpo_layer", None)
            if mpo is not None:
                self.merged_adapters.clear()
                self.base_layer = mpo  # the MPO layer as it was: unmerging is exact
                return
            # a dense base (an MPO layer merged before, merge_factorized): the deltas come
            # out again, as PEFT unmerges (to float rounding)
            base = self.base_layer
            with torch.no_grad():
                while self.merged_adapters:
                    name = self.merged_adapters.pop()
                    dtype = torch.promote_types(base.weight.dtype, torch.float32)
                    delta = self._delta(name, dtype)
                    delta = delta if isinstance(base, nn.Linear) else delta.T
                    base.weight.data = (base.weight.to(dtype) - delta).to(base.weight.dtype)
                    if self.lora_bias[name]:
                        base.bias.data = (base.bias.to(dtype) - self.lora_B[name].bias.to(
                            dtype) * self.scaling[name]).to(base.bias.dtype)

    MPOLoraLinear.__module__ = __name__
    _LORA_CLASS.append(MPOLoraLinear)
    return MPOLoraLinear


def _lora_variants(config: Any) -> list[str]:
    """The LoRA variants ``config`` asks for, as peft resolves them (a field marked
    ``is_lora_variant`` that is set, e.g. ``use_dora``, or an ``init_lora_weights`` that
    names a variant), plus ``use_dora`` for a peft without those marks."""
    asked = []
    for f in dataclasses.fields(config) if dataclasses.is_dataclass(config) else ():
        value = getattr(config, f.name, None)
        if f.name == "init_lora_weights":
            if isinstance(value, str) and value in f.metadata.get("lora_variants", ()):
                asked.append(f"init_lora_weights={value!r}")
        elif f.metadata.get("is_lora_variant") and value:
            asked.append(f.name)
    if getattr(config, "use_dora", False) and "use_dora" not in asked:
        asked.append("use_dora")
    return asked


def lora_config_for_mpo(config: Any) -> Any:
    """Let a ``peft.LoraConfig`` target :class:`~tnlm.bridge.MPOLinear` layers, through
    peft's documented custom-module route (``LoraConfig._register_custom_module``), with
    the exact merge of :func:`mpo_lora_class`; returns ``config``::

        peft_model = get_peft_model(mpo_model, lora_config_for_mpo(LoraConfig(...)))

    Raises:
        TypeError: ``config`` is not a peft ``LoraConfig``.
        ValueError: ``config`` asks for a LoRA variant (``use_dora=True``, ...), which the
            merge into MPO layers refuses: refused here, before any training.
    """
    if not hasattr(config, "_register_custom_module"):
        raise TypeError(f"config must be a peft LoraConfig, got {type(config).__name__}")
    variants = _lora_variants(config)
    if variants:
        raise ValueError(f"config asks for the LoRA variant {', '.join(variants)}, which tnlm "
                         "cannot merge into MPO layers: use plain LoRA (e.g. use_dora=False)")
    config._register_custom_module({MPOLinear: mpo_lora_class()})
    return config
