"""Lightweight fine-tuning helpers: freeze central tensors, count parameters, build optimizers.

Two settings:

* :func:`train_lightweight`: only the auxiliary tensors of the MPO modules train (and
  the modules passed as ``extra``, e.g. a new task head); everything else is frozen.
  This is what a task needs to store, as a PEFT adapter.
* :func:`train_auxiliary_only`: the paper's strategy (LFA): the central tensor of every
  MPO module is frozen; its auxiliary tensors train, together with every parameter that
  was not decomposed (biases, LayerNorm, embeddings, task head, ...).

:func:`parameter_report` counts as ``peft`` does (every parameter of the model once).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tnlm.bridge.layer import MPOModule

__all__ = ["mpo_modules", "freeze_central", "train_auxiliary_only", "train_lightweight",
           "ParamReport", "make_optimizer", "parameter_report", "parameter_groups"]


def mpo_modules(model: nn.Module) -> Iterator[tuple[str, MPOModule]]:
    """``(name, module)`` for every MPO module inside ``model`` (``model`` itself included)."""
    for name, module in model.named_modules():
        if isinstance(module, MPOModule):
            yield name, module


def freeze_central(model: nn.Module) -> nn.Module:
    """Freeze the central tensor of every MPO module; nothing else changes."""
    found = False
    for _, module in mpo_modules(model):
        module.freeze_central()
        found = True
    if not found:
        raise ValueError("model contains no MPO modules (MPOLinear / MPOEmbedding)")
    return model


def train_auxiliary_only(model: nn.Module) -> nn.Module:
    """The paper's lightweight fine-tuning: every parameter trains except central tensors."""
    for p in model.parameters():
        p.requires_grad_(True)
    return freeze_central(model)


def train_lightweight(model: nn.Module, extra: Iterable[nn.Module] = ()) -> nn.Module:
    """Only the auxiliary tensors of every MPO module train, plus every parameter of the
    modules in ``extra`` except the central tensors of MPO modules inside them; every
    other parameter (central tensors, MPO biases, embeddings, LayerNorms, ...) is frozen.

    Raises:
        ValueError: if ``model`` contains no MPO modules.
    """
    found = list(mpo_modules(model))
    if not found:
        raise ValueError("model contains no MPO modules (MPOLinear / MPOEmbedding)")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in found:
        for p in m.auxiliary_parameters():
            p.requires_grad_(True)
    for module in extra:
        for p in module.parameters():
            p.requires_grad_(True)
        for _, m in mpo_modules(module):
            m.freeze_central()
    return model


@dataclass(frozen=True)
class ParamReport:
    """Parameter counts of a model (shared parameters counted once, as ``peft`` counts);
    ``str()`` is ``peft``'s ``print_trainable_parameters`` line."""

    trainable: int
    total: int
    central: int
    auxiliary: int
    other: int

    @property
    def ratio(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {100 * self.ratio:.4f}")


def parameter_report(model: nn.Module) -> ParamReport:
    """Trainable/total counts, and how many sit in central, auxiliary and other tensors."""
    central_ids, aux_ids = set(), set()
    for _, m in mpo_modules(model):
        central_ids.update(id(p) for p in m.central_parameters())
        aux_ids.update(id(p) for p in m.auxiliary_parameters())
    seen, trainable, total, central, aux = set(), 0, 0, 0, 0
    for p in model.parameters():  # nn.Module.parameters() already skips shared duplicates
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        central += n if id(p) in central_ids else 0
        aux += n if id(p) in aux_ids else 0
    return ParamReport(trainable, total, central, aux, total - central - aux)


def parameter_groups(model: nn.Module, lr: float, mpo_lr: float | None = None,
                     weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: MPO cores with their own learning rate ``mpo_lr``.

    Only trainable parameters are included; call again after any change of core
    shapes (e.g. dimension squeezing) and rebuild the optimizer.
    """
    core_ids = {id(p) for _, m in mpo_modules(model) for p in m.cores}
    cores, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (cores if id(p) in core_ids else rest).append(p)
    groups = []
    if cores:
        groups.append({"params": cores, "lr": lr if mpo_lr is None else mpo_lr,
                       "weight_decay": 0.0, "name": "mpo_cores"})
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "other"})
    return groups


def make_optimizer(model: nn.Module, lr: float, mpo_lr: float | None = None,
                   weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; MPO cores get ``mpo_lr`` (default ``lr``).

    Raises:
        ValueError: if nothing in ``model`` requires a gradient.
    """
    groups = parameter_groups(model, lr, mpo_lr, weight_decay)
    if not groups:
        raise ValueError("model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr)
