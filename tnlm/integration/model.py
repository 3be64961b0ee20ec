"""``get_mpo_model`` / ``MPOModel``: a transformers model with MPO layers.

A PEFT user should feel at home::

    config = MPOConfig(target_modules=["query", "key", "value", "dense"], max_bond=64)
    model = get_mpo_model(model, config)      # replaces the layers in place
    model.print_trainable_parameters()
    model(**batch)                             # the base model's forward
    model.save_pretrained("out/")              # safetensors + mpo_config.json, atomic
    model = MPOModel.from_pretrained(base_model, "out/")
    plain = model.merge_and_unload()           # back to nn.Linear / Conv1D / nn.Embedding
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import (
    MPOModule,
    kind_of,
    parameter_report,
    train_auxiliary_only,
    weight_xw,
)
from tnlm.integration import io
from tnlm.integration.config import MPOConfig

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


class MPOModel(nn.Module):
    """A model whose target layers are MPO modules; forwards to the base model.

    Attribute access falls through to the base model (``config``, ``generate``, ...),
    and ``forward`` has the base model's signature, so ``transformers.Trainer``
    sees the right input columns.
    """

    def __init__(self, model: nn.Module, config: MPOConfig) -> None:
        super().__init__()
        self.base_model = model
        self.mpo_config = config
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

    def print_trainable_parameters(self) -> None:
        print(parameter_report(self))

    def setup_training(self, train: str | None = None) -> MPOModel:
        """Apply the training mode: ``"auxiliary"`` freezes the central tensors only."""
        train = train or self.mpo_config.train
        if train == "auxiliary":
            train_auxiliary_only(self.base_model)
        elif train == "all":
            for p in self.base_model.parameters():
                p.requires_grad_(True)
        else:
            raise ValueError(f"train must be 'auxiliary' or 'all', got {train!r}")
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
        architecture) and load the saved state, bit-exact. No decomposition is run."""
        meta = io.read_meta(directory)
        weights = io.verified_weights(directory, meta)
        config = MPOConfig.from_dict(meta["config"])
        paths = module_paths(base_model)
        for name, spec in meta["modules"].items():
            try:
                old = base_model.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"saved module {name!r} does not exist in the base model "
                                 f"{type(base_model).__name__}") from err
            if kind_of(old) != spec["kind"]:
                raise ValueError(f"saved module {name!r} is a {spec['kind']} but the base model "
                                 f"has {type(old).__name__}")
            new = MPOModule.from_structure(spec, old.weight.dtype, old.weight.device)
            for path in paths[id(old)]:
                set_module(base_model, path, new)
        try:
            load_model(base_model, str(weights), strict=True)
        except (SafetensorError, RuntimeError) as err:
            raise ValueError(f"cannot load {weights} into {type(base_model).__name__}: "
                             f"{str(err).splitlines()[0]}") from err
        model = cls(base_model, config)
        return model.setup_training(train)


def get_mpo_model(model: nn.Module, config: MPOConfig, progress: bool = True) -> MPOModel:
    """Replace the target layers of ``model`` (in place) by MPO modules; wrap it.

    Raises:
        ValueError: if a target pattern matches no ``nn.Linear`` / ``Conv1D`` /
            ``nn.Embedding`` (the message lists close names), or a ``modules_to_save``
            pattern matches nothing.
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
    for name in tqdm(targets, desc="MPO decomposition", disable=not progress, leave=False):
        old = supported[name]
        I, J = weight_xw(old).shape
        spec, mode = config.spec_for(name, I, J)
        try:
            new = MPOModule.from_module(old, spec, mode)
        except ValueError as err:
            raise ValueError(f"module {name!r} ({I}x{J}): {err}") from err
        for path in paths[id(old)]:
            set_module(model, path, new)
    wrapped = MPOModel(model, config)
    wrapped.setup_training()
    for name, module in model.named_modules():
        if any(config.pattern_matches(p, name) for p in config.modules_to_save):
            for p in module.parameters():
                p.requires_grad_(True)
    return wrapped
