"""``get_mpo_model`` / ``MPOModel``: a transformers model with MPO layers.

A PEFT user should feel at home::

    config = MPOConfig(target_modules=["query", "key", "value", "dense"], max_bond=64)
    model = get_mpo_model(model, config)      # replaces the layers in place
    model.print_trainable_parameters()
    model(**batch)                             # the base model's forward
    model.save_pretrained("out/")              # safetensors + mpo_config.json, atomic
    model = MPOModel.from_pretrained(base_model, "out/")
    plain = model.merge_and_unload()           # back to nn.Linear / Conv1D / nn.Embedding

Model surgery is transactional: :func:`get_mpo_model` and
:meth:`MPOModel.from_pretrained` build and check every new layer before the first
one is put in place, and undo every replacement (module objects, parameter values,
``requires_grad`` flags) if anything fails after that. When they raise, the model
is exactly as it was.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import (
    MPOModule,
    kind_of,
    parameter_report,
    train_auxiliary_only,
    weight_xw,
)
from tnlm.bridge.finetune import train_lightweight
from tnlm.integration import io
from tnlm.integration.config import TRAIN_MODES, MPOConfig

__all__ = ["MPOModel", "get_mpo_model", "module_paths", "set_module"]


def module_paths(root: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every dotted path under which ``root`` holds it (shared modules
    have several)."""
    paths: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _some(names: list[str], n: int = 5) -> str:
    return f"{names[:n]}{f' and {len(names) - n} more' if len(names) > n else ''}"


class _Swap:
    """Module replacements in ``root`` that are undone together (in reverse order)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.done: list[tuple[nn.Module, str, nn.Module]] = []
        self.flags = [(p, p.requires_grad) for p in root.parameters()]

    def put(self, path: str, new: nn.Module) -> None:
        parent_name, _, child = path.rpartition(".")
        parent = self.root.get_submodule(parent_name) if parent_name else self.root
        old = getattr(parent, child)
        set_module(self.root, path, new)
        self.done.append((parent, child, old))

    def undo(self) -> None:
        """Put every replaced module back and restore the ``requires_grad`` flags."""
        for parent, child, old in reversed(self.done):
            setattr(parent, child, old)
        self.done.clear()
        for p, flag in self.flags:
            p.requires_grad_(flag)


class MPOModel(nn.Module):
    """A model whose target layers are MPO modules; forwards to the base model.

    Attribute access falls through to the base model (``config``, ``generate``, ...),
    and ``forward`` has the base model's signature, so ``transformers.Trainer``
    sees the right input columns.
    """

    def __init__(self, model: nn.Module, config: MPOConfig) -> None:
        super().__init__()
        self.base_model = model
        self.mpo_config = copy.deepcopy(config)  # setup_training records its mode in it
        self.forward = model.forward  # keeps the base signature for Trainer

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

    def modules_to_save(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every module matching a ``modules_to_save`` pattern of
        the config (names relative to the base model)."""
        patterns = self.mpo_config.modules_to_save
        return [(n, m) for n, m in self.base_model.named_modules()
                if n and any(MPOConfig.pattern_matches(p, n) for p in patterns)]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as ``peft.PeftModel`` computes them:
        every parameter of the model counted once (shared ones too), MPO cores included."""
        rep = parameter_report(self)
        return rep.trainable, rep.total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: X || all params: Y || trainable%: Z``, PEFT's line
        with PEFT's counting (:meth:`get_nb_trainable_parameters`)."""
        print(parameter_report(self))

    def setup_training(self, train: str | None = None) -> MPOModel:
        """Set ``requires_grad`` of every parameter for a training mode (default: the
        config's ``train``; a mode given here becomes the config's):

        * ``"lightweight"``: only the auxiliary tensors of the MPO layers train, plus the
          ``modules_to_save`` (all their parameters but MPO central tensors);
        * ``"auxiliary"``: the paper's setting: everything but the central tensors;
        * ``"all"``: everything.
        """
        if train is not None and train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
        mode = self.mpo_config.train if train is None else train
        if mode == "lightweight":
            train_lightweight(self.base_model, [m for _, m in self.modules_to_save()])
        elif mode == "auxiliary":
            train_auxiliary_only(self.base_model)
        else:
            for p in self.base_model.parameters():
                p.requires_grad_(True)
        self.mpo_config.train = mode
        return self

    def compression_report(self) -> list[dict[str, Any]]:
        """Per MPO module: shapes, bonds, parameters before/after, truncation error, entropies.

        Plain dicts and lists (no DataFrame), ready to tabulate or plot; see
        :func:`tnlm.integration.report.format_report`.
        """
        rows = []
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

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Replace every MPO module by a plain module of the kind it replaced
        (``nn.Linear``, ``Conv1D``, ``nn.Embedding``); return the plain base model."""
        base = self.base_model
        paths = module_paths(base)
        for _, m in list(self.mpo_modules()):
            new = m.merge()
            for path in paths[id(m)]:
                set_module(base, path, new)
        return base

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Save the whole model state (safetensors, no pickle) and ``mpo_config.json``
        atomically; see :mod:`tnlm.integration.io` for what is guaranteed."""
        meta = dict(config=self.mpo_config.to_dict(),
                    modules={n: m.structure() for n, m in self.mpo_modules()},
                    base_model_class=type(self.base_model).__name__)
        return io.write_checkpoint(directory, meta, self.base_model)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike,
                        train: str | None = None) -> MPOModel:
        """Rebuild the MPO structure on ``base_model`` (a fresh instance of the same
        architecture) and load the saved state, bit-exact. No decomposition is run.

        Everything is checked before ``base_model`` is touched: the weights' SHA-256,
        the config, that every saved module exists in ``base_model`` with the saved
        kind, dimensions and bias, that the core shapes are consistent, and that the
        tensor names and shapes in the weights file are exactly those of the model
        after the replacement. The saved tensors are then loaded into new layers, and
        only then are the layers swapped in and the other tensors copied; if anything
        fails on the way, ``base_model`` is restored (same modules, same values).

        Raises:
            FileNotFoundError: no checkpoint (config or weights) in ``directory``.
            ValueError: a corrupt or modified checkpoint, or one of another
                architecture; the message names what does not match.
        """
        if isinstance(base_model, MPOModel):
            raise ValueError("base_model is already an MPOModel; pass a plain model of the "
                             "saved architecture")
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
        if train is not None and train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES} or None, got {train!r}")
        with io.reading(directory):
            config, paths, olds, shells, targets, rest = _read_for_load(base_model,
                                                                        directory)
        # swap in and copy; on any failure, put everything back
        swap = _Swap(base_model)
        backup: dict[str, torch.Tensor] = {}
        try:
            for name, shell in shells.items():
                for path in paths[id(olds[name])]:
                    swap.put(path, shell)
            with torch.no_grad():
                for key, value in rest.items():
                    target = targets[key]
                    backup[key] = target.detach().clone()
                    target.copy_(value)
            model = cls(base_model, config)
            model.setup_training(train)
        except BaseException:
            with torch.no_grad():
                for key, value in backup.items():
                    targets[key].copy_(value)
            swap.undo()
            raise
        return model


def _read_for_load(base_model: nn.Module, directory: str | os.PathLike) -> tuple:
    """Everything ``from_pretrained`` needs, read and checked without touching
    ``base_model``: ``(config, paths, olds, shells, targets, rest)``."""
    meta = io.read_meta(directory)
    weights = io.verified_weights(directory, meta)
    where = Path(directory) / io.CONFIG_NAME
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{where}: 'config' must be an object")
    try:
        config = MPOConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid config: {err}") from err
    if not isinstance(meta["modules"], dict):
        raise ValueError(f"{where}: 'modules' must be an object")
    base_name = type(base_model).__name__
    paths = module_paths(base_model)
    entries: dict[str, dict[str, Any]] = {}
    olds: dict[str, nn.Module] = {}
    owner: dict[int, str] = {}
    for name, raw in meta["modules"].items():
        entry = io.check_module_entry(name, raw)
        try:
            old = base_model.get_submodule(name) if name else None
        except AttributeError:
            old = None
        if old is None:
            raise ValueError(f"saved module {name!r} does not exist in the base model "
                             f"{base_name}")
        kind = kind_of(old)
        if kind != entry["kind"]:
            raise ValueError(f"saved module {name!r} is a {entry['kind']} but the base model "
                             f"has {type(old).__name__}")
        I, J = weight_xw(old).shape
        if (entry["in_dim"], entry["out_dim"]) != (I, J):
            raise ValueError(f"saved module {name!r} is {entry['in_dim']}x{entry['out_dim']} "
                             f"(in x out) but the base model's is {I}x{J}")
        has_bias = getattr(old, "bias", None) is not None
        if kind != "embedding" and entry["bias"] != has_bias:
            raise ValueError(f"saved module {name!r} has bias={entry['bias']} but the base "
                             f"model's has bias={has_bias}")
        if id(old) in owner:
            raise ValueError(f"saved modules {owner[id(old)]!r} and {name!r} are the same "
                             f"module of {base_name}")
        owner[id(old)] = name
        entries[name], olds[name] = entry, old
    # the state dict the model will have after the replacement: name -> (shape, group);
    # names in one group are one tensor (tied or shared), saved under one of them
    replaced = [path for name in olds for path in paths[id(olds[name])]]
    expected: dict[str, tuple[tuple[int, ...], Any]] = {}
    targets: dict[str, torch.Tensor] = {}
    for key, t in base_model.state_dict(keep_vars=True).items():
        if not any(key.startswith(path + ".") for path in replaced):
            expected[key] = (tuple(t.shape), id(t))
            targets[key] = t
    for name, entry in entries.items():
        for local, shape in io.module_tensor_shapes(entry).items():
            for path in paths[id(olds[name])]:
                expected[f"{path}.{local}"] = (shape, (name, local))
    header = io.read_header(weights)
    for key, shape in header.items():
        if key in expected and shape != expected[key][0]:
            raise ValueError(f"tensor {key!r} of {weights} has shape {list(shape)}, but "
                             f"{base_name} with the saved MPO modules needs "
                             f"{list(expected[key][0])}")
    saved_as: dict[Any, str] = {}
    for key in header:
        if key in expected:
            saved_as.setdefault(expected[key][1], key)
    unexpected = sorted(set(header) - set(expected))
    missing = sorted(k for k, (_, group) in expected.items() if group not in saved_as)
    if unexpected or missing:
        raise ValueError(f"{weights} does not fit {base_name} with the saved MPO modules: "
                         f"missing {_some(missing)}, unexpected {_some(unexpected)}")
    # load into new layers and read the other tensors; base_model is still untouched
    shells: dict[str, MPOModule] = {}
    rest: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name, entry in entries.items():
                old = olds[name]
                shell = MPOModule.from_structure(entry, old.weight.dtype, old.weight.device)
                state = {local: f.get_tensor(saved_as[(name, local)])
                         for local in io.module_tensor_shapes(entry)}
                shell.load_state_dict(state, strict=True)
                shells[name] = shell
            for key in targets:
                if expected[key][1] in saved_as and saved_as[expected[key][1]] == key:
                    rest[key] = f.get_tensor(key)
    except (SafetensorError, RuntimeError) as err:
        raise ValueError(f"cannot load {weights} into {base_name}: "
                         f"{' '.join(str(err).split())[:400]}") from err
    return config, paths, olds, shells, targets, rest


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
            list close names), a ``modules_to_save`` pattern matches nothing, or the
            options of a target do not fit it (the message names the module).
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
            raise ValueError(f"target_modules pattern {p!r} matches no nn.Linear, Conv1D or "
                             f"nn.Embedding module of {type(model).__name__}{hint}")
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
    for p in config.modules_to_save:
        if not any(config.pattern_matches(p, n) for n in all_names):
            raise ValueError(f"modules_to_save pattern {p!r} matches no module of "
                             f"{type(model).__name__}")
    owners: dict[int, set[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(prefix=mname, recurse=False,
                                                    remove_duplicate=False):
            owners.setdefault(id(param), set()).add(pname.rpartition(".")[0])
    paths = module_paths(model)
    for name in targets:
        weight = supported[name].weight
        others = owners.get(id(weight), set()) - set(paths[id(supported[name])])
        if others:
            raise ValueError(f"module {name!r} shares its weight with {sorted(others)} (tied "
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
    built: dict[str, MPOModule] = {}
    for name in tqdm(targets, desc="MPO decomposition", disable=not progress, leave=False):
        spec, mode, I, J = specs[name]
        try:
            built[name] = MPOModule.from_module(supported[name], spec, mode)
        except ValueError as err:
            raise ValueError(f"module {name!r} ({I}x{J}): {err}") from err
    swap = _Swap(model)
    try:
        for name, new in built.items():
            for path in paths[id(supported[name])]:
                swap.put(path, new)
        wrapped = MPOModel(model, config)
        wrapped.setup_training()
    except BaseException:
        swap.undo()
        raise
    return wrapped
