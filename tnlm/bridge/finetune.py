"""What trains, and fine-tuning helpers: count parameters, build optimizers.

What trains: one vocabulary
---------------------------

Every setting of tnlm that says which parameters train (``MPOConfig.train`` and
:meth:`~tnlm.integration.model.MPOModel.setup_training`, ``HealConfig.train``,
``CausalHealConfig.train``, the CLI's ``--heal-train``, ``EncoderRecipe.heal_train``,
block fitting) names one of the sets below, and a name means the same set wherever it is
accepted. :func:`select_parameters` is the one place that computes them (below the module
it is given: healing a causal LM gives it the blocks, so the final norm and the LM head
stay out); :data:`TRAIN_SETS` lists them.

=================  ========================================================  ==============
name               what trains                                               accepted by
=================  ========================================================  ==============
``lightweight``    the auxiliary tensors of every MPO layer, plus every      model
                   parameter of the modules to save (``modules_to_save``,
                   by default the task head) except the central tensors of
                   MPO layers inside them
``auxiliary``      every parameter except the central tensors of the MPO     model
                   layers (the paper's setting: embeddings, norms, biases
                   and heads train too)
``all``            every parameter                                           model
``cores``          every MPO core (central and auxiliary) and MPO bias,      heal, causal,
                   plus the norm layers                                      block fitting
``cores-central``  ``cores`` without the central tensors (the auxiliary      heal
                   tensors and biases of the MPO layers, plus the norms)
``cores+linears``  ``cores`` plus every dense ``nn.Linear`` / ``Conv1D``     heal, causal
                   (layers the allocation kept dense, a pooler, ...);
                   never embedding tables
=================  ========================================================  ==============

model: ``MPOConfig.train`` and ``MPOModel.setup_training`` / ``from_pretrained``
(:data:`tnlm.integration.config.TRAIN_MODES`); heal: ``HealConfig.train``,
``EncoderRecipe.heal_train`` and the CLI's ``--heal-train``
(:data:`tnlm.compress.distill.TRAIN_CHOICES`); causal: ``CausalHealConfig.train``
(:data:`tnlm.compress.decoder.heal.TRAIN`); block fitting:
:func:`tnlm.compress.layerwise.block_parameters` (``linears=True``: ``cores+linears``).

A gauge-fixed low-rank layer (:class:`~tnlm.bridge.pivoted.PivotedLinear`) has no
auxiliary tensor: its ``coef`` and ``right`` count as central tensors (they train in
``cores``, ``cores+linears`` and ``all``; ``cores-central``, ``auxiliary`` and
``lightweight`` leave them frozen), its bias as an MPO bias.

A norm layer is a leaf module that no MPO can replace and whose class name holds
``"norm"`` (:func:`is_norm`: ``LayerNorm``, ``RMSNorm``, ...). Defaults: ``MPOConfig``
``lightweight``; ``HealConfig`` ``cores``; ``CausalHealConfig``, ``EncoderRecipe`` and
``--heal-train`` ``cores+linears``.

Healing used to call ``cores+linears`` ``"all"`` and ``cores-central`` ``"auxiliary"``;
those words now name :class:`MPOConfig`'s sets, so a healing setting refuses them with a
message naming the new spelling (:data:`HEALING_RENAMED`, :func:`check_train`), never
reading them with another meaning.

Helpers
-------

* :func:`set_trainable`: set ``requires_grad`` from a set's name;
  :func:`train_lightweight` and :func:`train_auxiliary_only` are its
  ``"lightweight"`` and ``"auxiliary"``;
* :func:`parameter_report` counts as ``peft`` does (every parameter of the model once);
* :func:`parameter_groups` / :func:`make_optimizer`: AdamW with MPO cores in their own group.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tnlm.bridge.kinds import MATRIX_KINDS, kind_of
from tnlm.bridge.layer import MPOModule
from tnlm.bridge.pivoted import PivotedLinear
from tnlm.core.validation import check_number

__all__ = ["TRAIN_SETS", "HEALING_RENAMED", "select_parameters", "set_trainable", "check_train",
           "is_norm", "mpo_modules", "freeze_central", "train_auxiliary_only",
           "train_lightweight", "ParamReport", "make_optimizer", "parameter_report",
           "parameter_groups"]

#: every named set of parameters (the module docstring's table): name -> what it selects
TRAIN_SETS: dict[str, str] = {
    "lightweight": "the auxiliary tensors of every MPO layer, plus every parameter of the "
                   "modules to save except the central tensors of MPO layers inside them",
    "auxiliary": "every parameter except the central tensors of the MPO layers",
    "all": "every parameter",
    "cores": "every MPO core and MPO bias, plus the norm layers",
    "cores-central": "'cores' without the central tensors",
    "cores+linears": "'cores' plus every dense nn.Linear / Conv1D (never embeddings)",
}

#: healing's former names of sets that now have their own: refused by healing settings,
#: with a message naming the new spelling (the old words now mean MPOConfig's sets)
HEALING_RENAMED: dict[str, str] = {"all": "cores+linears", "auxiliary": "cores-central"}

_CORE_SETS = ("cores", "cores-central", "cores+linears")


def mpo_modules(model: nn.Module) -> Iterator[tuple[str, MPOModule]]:
    """``(name, module)`` for every MPO module inside ``model`` (``model`` itself included)."""
    for name, module in model.named_modules():
        if isinstance(module, MPOModule):
            yield name, module


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer: a leaf that no MPO can replace whose
    class name holds ``"norm"`` (``nn.LayerNorm``, Llama's ``RMSNorm``, ...)."""
    return (not any(True for _ in module.children()) and kind_of(module) is None
            and "norm" in type(module).__name__.lower())


def check_train(train: str, accepted: Sequence[str],
                renamed: Mapping[str, str] | None = None) -> str:
    """``train`` if it is one of ``accepted`` (names of :data:`TRAIN_SETS`).

    Raises:
        ValueError: otherwise; for a name of ``renamed`` (e.g. :data:`HEALING_RENAMED`)
            whose new spelling is accepted, the message names that spelling.
    """
    if isinstance(train, str) and train in accepted:
        return train
    new = (renamed or {}).get(train) if isinstance(train, str) else None
    if new is not None and new in accepted:
        raise ValueError(
            f"train must be one of {tuple(accepted)}, got {train!r}: healing's former "
            f"{train!r} is now spelled {new!r} ({TRAIN_SETS[new]}); {train!r} names another "
            f"set ({TRAIN_SETS[train]}), which healing does not train")
    raise ValueError(f"train must be one of {tuple(accepted)}, got {train!r}")


def _check_extra(extra: Iterable[nn.Module]) -> list[nn.Module]:
    """``extra`` (the modules to save) as a list of modules, or ``TypeError`` naming it."""
    if isinstance(extra, (str, bytes)) or (
            isinstance(extra, nn.Module) and not isinstance(extra, (nn.ModuleList, nn.Sequential))
    ) or not isinstance(extra, Iterable):
        what = f"one {type(extra).__name__}" + (": wrap it in a list, e.g. [model.classifier]"
                                                 if isinstance(extra, nn.Module) else "")
        raise TypeError(f"extra must be an iterable of nn.Module (the modules to save), got "
                        f"{what}")
    extra = list(extra)
    for k, m in enumerate(extra):
        if not isinstance(m, nn.Module):
            raise TypeError(f"extra must be an iterable of nn.Module (the modules to save); "
                            f"extra[{k}] is a {type(m).__name__}: {m!r}")
    return extra


def select_parameters(root: nn.Module, train: str, *,
                      extra: Iterable[nn.Module] = ()) -> list[tuple[str, nn.Parameter]]:
    """The parameters of set ``train`` below ``root`` (module docstring, :data:`TRAIN_SETS`),
    as ``(name in root, parameter)``, each once.

    Order: for the ``cores`` sets, the MPO layers' tensors (layer by layer, cores in site
    order, then the bias) followed by the norms (and dense linears) in module order; for
    the others, the order of ``root.parameters()`` (``lightweight``: the auxiliary tensors
    first, then the modules to save). ``extra``: the modules to save of ``lightweight``
    (ignored by the other sets); parameters outside ``root`` are not selected.
    ``cores+linears`` leaves out a linear's parameter that an ``nn.Embedding`` also holds
    (a tied LM head): embedding tables never train in it.

    Raises:
        TypeError: ``extra`` is not an iterable of ``nn.Module`` (one module, e.g. a head,
            must be wrapped in a list; an ``nn.ModuleList`` / ``nn.Sequential`` is read as
            its children).
        ValueError: ``train`` is not a name of :data:`TRAIN_SETS`.
    """
    check_train(train, tuple(TRAIN_SETS))
    extra = _check_extra(extra)
    chosen: dict[int, nn.Parameter] = {}

    def take(params: Iterable[nn.Parameter]) -> None:
        for p in params:
            chosen.setdefault(id(p), p)

    mpos = [m for _, m in mpo_modules(root)]
    pivoted = [m for m in root.modules() if isinstance(m, PivotedLinear)]
    if train in _CORE_SETS:
        for m in mpos:
            take(m.auxiliary_parameters() if train == "cores-central" else m.cores)
            if getattr(m, "bias", None) is not None:
                take([m.bias])
        for m in pivoted:  # central tensors only (module docstring)
            take(([] if train == "cores-central" else [m.coef, m.right])
                 + ([] if m.bias is None else [m.bias]))
        tables = {id(p) for mod in root.modules() if isinstance(mod, nn.Embedding)
                  for p in mod.parameters(recurse=False)}  # a tied LM head holds one
        for mod in root.modules():
            if is_norm(mod) or (train == "cores+linears" and kind_of(mod) in MATRIX_KINDS
                                and not any(True for _ in mod.children())):
                take(p for p in mod.parameters(recurse=False) if id(p) not in tables)
    elif train == "lightweight":
        for m in mpos:
            take(m.auxiliary_parameters())
        for module in extra:
            central = {id(p) for _, m in mpo_modules(module) for p in m.central_parameters()}
            central |= {id(p) for m in module.modules() if isinstance(m, PivotedLinear)
                        for p in (m.coef, m.right)}
            take(p for p in module.parameters() if id(p) not in central)
    elif train == "auxiliary":
        central = {id(p) for m in mpos for p in m.central_parameters()}
        central |= {id(p) for m in pivoted for p in (m.coef, m.right)}
        take(p for p in root.parameters() if id(p) not in central)
    else:  # "all"
        take(root.parameters())
    names = {id(p): n for n, p in root.named_parameters()}
    return [(names[i], p) for i, p in chosen.items() if i in names]


def set_trainable(model: nn.Module, train: str, *,
                  extra: Iterable[nn.Module] = ()) -> nn.Module:
    """Set ``requires_grad``: the parameters of set ``train`` (:func:`select_parameters`)
    train, every other parameter of ``model`` is frozen. Returns ``model``.

    Raises:
        TypeError: ``extra`` is not an iterable of ``nn.Module`` (:func:`select_parameters`).
        ValueError: an unknown name, or ``"lightweight"`` / ``"auxiliary"`` (defined by
            the MPO layers' tensors) on a model without MPO modules; ``extra`` given for
            another set than ``"lightweight"`` (which would ignore it), or holding a
            module that is not one of ``model``'s (e.g. a copy of the head, which would
            leave the model's own head frozen).
    """
    extra = _check_extra(extra)
    if extra and train != "lightweight":
        raise ValueError(f"extra (the modules to save) is read by 'lightweight' only; "
                         f"{train!r} would ignore it: pass extra=() or train='lightweight'")
    inside = {id(m) for m in model.modules()}
    for k, module in enumerate(extra):
        if id(module) not in inside:
            raise ValueError(f"extra[{k}] (a {type(module).__name__}) is not a module of the "
                             "model: pass the model's own module (e.g. model.classifier), "
                             "not a copy")
    if train == "lightweight" and not any(isinstance(m, MPOModule) for m in model.modules()):
        raise ValueError("model contains no MPO modules (MPOLinear / MPOEmbedding) whose "
                         "auxiliary tensors train 'lightweight' trains (gauge-fixed "
                         "PivotedLinear layers have none): pass 'cores', 'cores+linears' or "
                         "'all'")
    if train == "auxiliary" and not any(isinstance(m, (MPOModule, PivotedLinear))
                                        for m in model.modules()):
        raise ValueError("model contains no MPO modules (MPOLinear / MPOEmbedding / "
                         "PivotedLinear)")
    chosen = {id(p) for _, p in select_parameters(model, train, extra=extra)}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return model


def freeze_central(model: nn.Module) -> nn.Module:
    """Freeze the central tensor of every MPO module (and ``coef`` / ``right`` of every
    gauge-fixed PivotedLinear); nothing else changes."""
    found = False
    for _, module in mpo_modules(model):
        module.freeze_central()
        found = True
    for module in model.modules():
        if isinstance(module, PivotedLinear):
            module.coef.requires_grad_(False)
            module.right.requires_grad_(False)
            found = True
    if not found:
        raise ValueError("model contains no MPO modules (MPOLinear / MPOEmbedding)")
    return model


def train_auxiliary_only(model: nn.Module) -> nn.Module:
    """The paper's lightweight fine-tuning: every parameter trains except central tensors
    (the set ``"auxiliary"``, :func:`set_trainable`).

    Raises:
        ValueError: if ``model`` contains no MPO modules.
    """
    return set_trainable(model, "auxiliary")


def train_lightweight(model: nn.Module, extra: Iterable[nn.Module] = ()) -> nn.Module:
    """Only the auxiliary tensors of every MPO module train, plus every parameter of the
    modules in ``extra`` except the central tensors of MPO modules inside them; every
    other parameter (central tensors, MPO biases, embeddings, LayerNorms, ...) is frozen
    (the set ``"lightweight"``, :func:`set_trainable`).

    Raises:
        TypeError: ``extra`` is not an iterable of ``nn.Module`` (wrap one module in a list).
        ValueError: if ``model`` contains no MPO modules, or a module of ``extra`` is not
            one of ``model``'s.
    """
    return set_trainable(model, "lightweight", extra=extra)


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
    for m in model.modules():
        if isinstance(m, PivotedLinear):  # central tensors only (module docstring)
            central_ids.update((id(m.coef), id(m.right)))
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

    The group ``"mpo_cores"`` (learning rate ``mpo_lr``, default ``lr``; no weight decay)
    holds the cores of every MPO layer and the ``coef`` and ``right`` of every
    gauge-fixed :class:`~tnlm.bridge.pivoted.PivotedLinear` (its central tensors, module
    docstring); the group ``"other"`` (``lr``, ``weight_decay``) everything else, MPO
    biases included. Only trainable parameters are included; call again after any change
    of core shapes (e.g. dimension squeezing) and rebuild the optimizer. An ``mpo_lr``
    given when no trainable MPO core exists (a model without MPO layers, or with their
    cores frozen) is unused: a ``UserWarning`` says so (not an error: one training script
    may serve models the allocation left dense).

    Warns:
        UserWarning: ``mpo_lr`` is given but no parameter takes it.

    Raises:
        TypeError: ``lr``, ``mpo_lr`` or ``weight_decay`` is not a number (``bool`` and
            strings included).
        ValueError: ``lr`` or ``mpo_lr`` is not a finite number > 0, or ``weight_decay``
            not a finite number >= 0.
    """
    lr = check_number(lr, "lr", positive=True)
    mpo_lr = None if mpo_lr is None else check_number(mpo_lr, "mpo_lr", positive=True)
    weight_decay = check_number(weight_decay, "weight_decay")
    core_ids = {id(p) for _, m in mpo_modules(model) for p in m.cores}
    core_ids |= {id(p) for m in model.modules() if isinstance(m, PivotedLinear)
                 for p in (m.coef, m.right)}
    cores, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (cores if id(p) in core_ids else rest).append(p)
    groups = []
    if mpo_lr is not None and not cores:
        warnings.warn(f"mpo_lr={mpo_lr:g} is unused: the model has no trainable MPO core "
                      f"(every parameter takes lr={lr:g})", UserWarning, stacklevel=2)
    if cores:
        groups.append({"params": cores, "lr": lr if mpo_lr is None else mpo_lr,
                       "weight_decay": 0.0, "name": "mpo_cores"})
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "other"})
    return groups


def make_optimizer(model: nn.Module, lr: float, mpo_lr: float | None = None,
                   weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; MPO cores get ``mpo_lr`` (default ``lr``)
    (groups of :func:`parameter_groups`).

    Warns:
        UserWarning: ``mpo_lr`` is given but the model has no trainable MPO core (it would
            be unused).

    Raises:
        TypeError: ``lr``, ``mpo_lr`` or ``weight_decay`` is not a number.
        ValueError: ``lr`` or ``mpo_lr`` not finite and > 0, ``weight_decay`` not finite
            and >= 0, or nothing in ``model`` requires a gradient.
    """
    groups = parameter_groups(model, lr, mpo_lr, weight_decay)
    if not groups:
        raise ValueError("model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr)
