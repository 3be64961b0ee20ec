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
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import (
    MPOEmbedding,
    MPOLinear,
    MPOModule,
    parameter_report,
    train_auxiliary_only,
)
from tnlm.bridge.layer import export_gauge
from tnlm.core import MPO
from tnlm.integration.config import MPOConfig

__all__ = ["MPOModel", "get_mpo_model", "CONFIG_NAME", "FORMAT_VERSION"]

CONFIG_NAME = "mpo_config.json"
FORMAT_VERSION = 1


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def _kind(module: nn.Module) -> str | None:
    conv = _conv1d_type()
    if isinstance(module, nn.Linear):
        return "linear"
    if conv is not None and isinstance(module, conv):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _weight_xw(module: nn.Module, kind: str) -> torch.Tensor:
    """W in the ``y = x @ W`` convention."""
    w = module.weight.detach()
    return w.T if kind == "linear" else w  # Conv1D stores (in, out); Embedding (vocab, dim)


def _all_paths(root: nn.Module) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        Path(tmp).chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _decompose(module: nn.Module, kind: str, opts: dict[str, Any]) -> MPOModule:
    W = _weight_xw(module, kind).to(torch.float64)
    gauge, mode = opts["gauge"], opts["mode"]
    mpo = MPO.from_matrix(W, opts["in_shape"], opts["out_shape"], opts["n_sites"],
                          max_bond=opts["max_bond"], cutoff=opts["cutoff"],
                          max_error=opts["max_error"], pad=opts["pad"])
    mpo = export_gauge(mpo, gauge)
    dtype, device = module.weight.dtype, module.weight.device
    if kind == "embedding":
        layer = MPOEmbedding.from_mpo(mpo, module.padding_idx, mode, dtype=dtype)
    else:
        layer = MPOLinear.from_mpo(mpo, module.bias, mode, dtype=dtype)
    return layer.to(device)


def _empty_module(spec: dict[str, Any], like: nn.Module) -> MPOModule:
    dtype = like.weight.dtype
    cores = [torch.zeros(s, dtype=dtype) for s in spec["core_shapes"]]
    if spec["kind"] == "embedding":
        layer = MPOEmbedding(cores, spec["in_dim"], spec["out_dim"], spec.get("padding_idx"),
                             spec.get("mode", "auto"))
    else:
        bias = torch.zeros(spec["out_dim"], dtype=dtype) if spec["bias"] else None
        layer = MPOLinear(cores, bias, spec["in_dim"], spec["out_dim"], spec.get("mode", "auto"))
    layer.truncation_error = float(spec.get("truncation_error", 0.0))
    return layer.to(like.weight.device)


class MPOModel(nn.Module):
    """A model whose target layers are MPO modules; forwards to the base model.

    Attribute access falls through to the base model (``config``, ``generate``, ...),
    and ``forward`` has the base model's signature, so ``transformers.Trainer``
    sees the right input columns.
    """

    def __init__(self, model: nn.Module, config: MPOConfig,
                 kinds: dict[str, str] | None = None) -> None:
        super().__init__()
        self.base_model = model
        self.mpo_config = config
        self.mpo_kinds: dict[str, str] = dict(kinds or {})
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
                name=name, kind=self.mpo_kinds.get(name, "linear"), shape=[m.in_dim, m.out_dim],
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
        """Replace every MPO module by its dense equivalent; return the plain base model."""
        base = self.base_model
        paths = _all_paths(base)
        conv = _conv1d_type()
        for name, m in list(self.mpo_modules()):
            kind = self.mpo_kinds.get(name, "linear")
            if isinstance(m, MPOEmbedding):
                new = m.to_embedding()
            elif kind == "conv1d":
                new = conv(m.out_dim, m.in_dim).to(device=m.cores[0].device, dtype=m.cores[0].dtype)
                new.weight.copy_(m.dense_matrix())
                if m.bias is not None:
                    new.bias.copy_(m.bias)
                else:
                    new.bias = None
            else:
                new = m.to_linear()
            for path in paths[id(m)]:
                _set_module(base, path, new)
        return base

    # ------------------------------------------------------------------ persistence
    def _structure(self) -> dict[str, Any]:
        out = {}
        for name, m in self.mpo_modules():
            out[name] = dict(
                kind=self.mpo_kinds.get(name, "linear"), in_dim=m.in_dim, out_dim=m.out_dim,
                core_shapes=[list(s) for s in m.core_shapes],
                bias=getattr(m, "bias", None) is not None,
                padding_idx=getattr(m, "padding_idx", None), mode=m.mode,
                truncation_error=float(m.truncation_error),
            )
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Save the whole model state (safetensors, no pickle) and ``mpo_config.json``.

        Nothing already in ``directory`` is lost if saving fails: the weights go to a
        new file named after their SHA-256 (``mpo_model-<sha12>.safetensors``), written
        to a temporary file and renamed; then ``mpo_config.json``, which names that
        file and records its full SHA-256, replaces the old config in one rename;
        only then are weight files the config no longer names removed. A tampered or
        truncated weights file is refused on loading.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = dict(format_version=FORMAT_VERSION, config=self.mpo_config.to_dict(),
                    modules=self._structure(),
                    base_model_class=type(self.base_model).__name__)
        json.dumps(meta)  # fail before touching the folder if anything is not serializable
        fd, tmp_name = tempfile.mkstemp(dir=d, prefix=".weights.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            save_model(self.base_model, str(tmp))
            digest = _sha256(tmp)
            weights = d / f"mpo_model-{digest[:12]}.safetensors"
            tmp.chmod(0o644)
            os.replace(tmp, weights)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        meta.update(weights=weights.name, sha256=digest)
        _atomic_write(d / CONFIG_NAME,
                      lambda t: t.write_text(json.dumps(meta, indent=1, sort_keys=True)))
        for old in d.glob("mpo_model*.safetensors"):
            if old.name != weights.name:
                old.unlink()
        return d

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike,
                        train: str | None = None) -> MPOModel:
        """Rebuild the MPO structure on ``base_model`` (a fresh instance of the same
        architecture) and load the saved state, bit-exact. No decomposition is run."""
        d = Path(directory)
        cfg_path = d / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {d}")
        try:
            meta = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{cfg_path}: unsupported format_version "
                             f"{meta.get('format_version')!r} (expected {FORMAT_VERSION})")
        weights = d / meta["weights"]
        if not weights.is_file():
            raise FileNotFoundError(f"weights file {weights} is missing")
        digest = _sha256(weights)
        if digest != meta["sha256"]:
            raise ValueError(f"{weights} does not match the SHA-256 recorded in {CONFIG_NAME} "
                             "(the file is truncated, corrupted or was modified); refusing to load")
        config = MPOConfig.from_dict(meta["config"])
        paths = _all_paths(base_model)
        kinds = {}
        for name, spec in meta["modules"].items():
            try:
                old = base_model.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"saved module {name!r} does not exist in the base model "
                                 f"{type(base_model).__name__}") from err
            if _kind(old) != spec["kind"]:
                raise ValueError(f"saved module {name!r} is a {spec['kind']} but the base model "
                                 f"has {type(old).__name__}")
            new = _empty_module(spec, old)
            for path in paths[id(old)]:
                _set_module(base_model, path, new)
            kinds[name] = spec["kind"]
        try:
            load_model(base_model, str(weights), strict=True)
        except (SafetensorError, RuntimeError) as err:
            raise ValueError(f"cannot load {weights} into {type(base_model).__name__}: "
                             f"{str(err).splitlines()[0]}") from err
        model = cls(base_model, config, kinds)
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
        if name and _kind(module) is not None:
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
    paths = _all_paths(model)
    for name in targets:
        weight = supported[name].weight
        others = owners.get(id(weight), set()) - set(paths[id(supported[name])])
        if others:
            raise ValueError(f"module {name!r} shares its weight with {sorted(others)} (tied "
                             "weights); an MPO would silently untie them: untie them first or "
                             "leave the module out of target_modules")
    kinds = {}
    for name in tqdm(targets, desc="MPO decomposition", disable=not progress, leave=False):
        old = supported[name]
        kind = _kind(old)
        W = _weight_xw(old, kind)
        opts = config.options_for(name, W.shape[0], W.shape[1])
        try:
            new = _decompose(old, kind, opts)
        except ValueError as err:
            raise ValueError(f"module {name!r} ({W.shape[0]}x{W.shape[1]}): {err}") from err
        for path in paths[id(old)]:
            _set_module(model, path, new)
            kinds[path] = kind
    wrapped = MPOModel(model, config, kinds)
    wrapped.setup_training()
    for name, module in model.named_modules():
        if any(config.pattern_matches(p, name) for p in config.modules_to_save):
            for p in module.parameters():
                p.requires_grad_(True)
    return wrapped
