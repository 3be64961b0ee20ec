"""Reading a checkpoint onto a base model, for :meth:`MPOModel.from_pretrained
<tnlm.integration.MPOModel.from_pretrained>`: everything read and checked before the
base model is touched.

:func:`read_checkpoint` takes a folder written by :mod:`tnlm.integration.io` (a full or a
lightweight task checkpoint) or a state dict saved by ``transformers.Trainer``, checks
it against ``base_model`` (every saved module exists with the saved kind, dimensions
and bias; tensor names and shapes are exactly those of the model after the
replacement) and returns a :class:`LoadPlan`: the new layers with their saved tensors
loaded, and the other tensors to copy. For a lightweight checkpoint the layers are
first rebuilt by decomposing ``base_model`` with the saved config, and every tensor the
checkpoint leaves to the base model is checked against its recorded SHA-256.
Names ``base_model`` ties together (one tensor, e.g. ``lm_head.weight`` and the
embedding with ``tie_word_embeddings=True``) must hold one value in the checkpoint (a
checkpoint of an untied model is refused); a name the file records as saved under
another (``safetensors`` ``save_model`` metadata, a tied model) takes that tensor's
values, also where ``base_model`` holds the two separately.
Putting the plan in place (and undoing that on failure) is the caller's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tnlm.bridge import MPOModule, kind_of, weight_xw
from tnlm.bridge.kinds import own_forward_error
from tnlm.bridge.pivoted import PIVOTED_LAYOUT, PivotedLinear
from tnlm.integration import io
from tnlm.integration.config import MPOConfig
from tnlm.integration.loading import NEW_HEADS
from tnlm.integration.peft import task_heads
from tnlm.integration.surgery import module_paths

__all__ = ["LoadPlan", "bits_equal", "read_checkpoint", "some_names", "tensor_digests",
           "core_sketch", "SKETCH_RTOL"]

#: how far a rebuilt core's sketch may be from the recorded one, in units of
#: ``||core|| / sqrt(numel)`` (what a projection of a change of relative size 1 onto a
#: random unit vector is, about): decomposing the same base on another thread count or
#: BLAS changes a core by about 1e-8 of its norm, so its sketch moves by about 1e-8 of
#: that unit; a change of relative size 1e-4 (another base, a merged adapter) by about
#: 1e-4 of it in each of the four projections
SKETCH_RTOL = 1e-5


def some_names(names: list[str], n: int = 5) -> str:
    """The first ``n`` of ``names`` and how many more, for messages."""
    return f"{names[:n]}{f' and {len(names) - n} more' if len(names) > n else ''}"


def tensor_digests(model: nn.Module) -> dict[str, str]:
    """State key -> SHA-256 of every tensor of ``model`` (shared tensors hashed once):
    what a lightweight checkpoint records of the tensors it leaves to the base model."""
    digests: dict[int, str] = {}
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in digests:
            digests[id(t)] = io.tensor_sha256(t)
        out[key] = digests[id(t)]
    return out


def core_sketch(t: torch.Tensor) -> list[float]:
    """``[||t||_F, <t, g_1>, ..., <t, g_4>]`` in float64, the ``g_k`` fixed unit vectors
    (seeded Gaussians): what a lightweight checkpoint records of a core it leaves to the
    base model, besides its SHA-256, so a rebuild that differs by float rounding only
    (another thread count) is told from one of another base (:data:`SKETCH_RTOL`:
    the tolerance is relative to ``||t|| / sqrt(numel)``)."""
    x = t.detach().reshape(-1).to(torch.float64).cpu()
    g = torch.randn(4, x.numel(), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return [float(x.norm())] + [float(v) for v in g @ x]


def _sketches_agree(a: list[float], b: list[float], numel: int) -> bool:
    tol = SKETCH_RTOL * max(abs(a[0]), abs(b[0]), 1e-300) / max(numel, 1) ** 0.5
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


class LoadPlan:
    """What :func:`read_checkpoint` read and checked, before ``base_model`` is touched.

    Attributes:
        config: the saved :class:`~tnlm.integration.MPOConfig`.
        paths: :func:`~tnlm.integration.surgery.module_paths` of ``base_model``.
        olds: saved module name -> the module of ``base_model`` it replaces.
        shells: saved module name -> the new MPO layer, its saved tensors loaded.
        targets: state key -> tensor of ``base_model`` kept by the replacement.
        rest: state key -> saved value to copy into ``targets[key]``.
        references: state key -> SHA-256 of every tensor as the base model rebuilds it
            (a lightweight checkpoint), else ``None``.
    """

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def read_checkpoint(base_model: nn.Module, directory: str | os.PathLike) -> LoadPlan:
    """Read and check the checkpoint in ``directory`` against ``base_model`` (module
    docstring), under the folder's reader lock; a lightweight checkpoint's layers are
    then rebuilt outside it (decomposing takes a while). ``base_model`` is not changed.

    Raises:
        FileNotFoundError: no checkpoint (config or weights) in ``directory``.
        ValueError: a corrupt or modified checkpoint, one of another architecture, or a
            task checkpoint on another base model, or different values for names
            ``base_model`` ties together, a saved tensor of another dtype than
            ``base_model``'s (loading would cast it), a saved module that is a subclass
            with a ``forward`` of its own in ``base_model``, or a folder holding both a
            ``save_pretrained`` checkpoint and a Trainer's ``model.safetensors`` of an MPO
            model; the message names what does not match.
    """
    with io.reading(directory):
        plan = _read(base_model, directory)
    if plan.rebuilt is not None:
        _rebuild(plan)
    return plan


def _read(base_model: nn.Module, directory: str | os.PathLike) -> LoadPlan:
    """Everything :func:`read_checkpoint` returns, read and checked without touching
    ``base_model``. For a full checkpoint the new layers (``shells``) are loaded;
    for a lightweight one the saved tensors are read (``saved``) and :func:`_rebuild`
    does the rest."""
    d = Path(directory)
    prefix = ""
    if (d / io.CONFIG_NAME).is_file() and (d / io.STATE_DICT_NAME).is_file():
        _refuse_two_checkpoints(d)
    if (d / io.CONFIG_NAME).is_file() or not (d / io.STATE_DICT_NAME).is_file():
        meta = io.read_meta(directory)
        weights = io.verified_weights(directory, meta)
        where = d / io.CONFIG_NAME
    else:  # a state dict saved by someone else (transformers.Trainer)
        meta, weights = io.read_state_dict_checkpoint(directory)
        prefix, where = meta["prefix"], weights
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{where}: 'config' must be an object")
    try:
        config = MPOConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid config: {err}") from err
    if not isinstance(meta["modules"], dict):
        raise ValueError(f"{where}: 'modules' must be an object")
    light = meta.get("lightweight") if not prefix else None
    rebuilt = None
    if light is not None:
        rebuilt = light.get("rebuilt") if isinstance(light, dict) else None
        if not isinstance(rebuilt, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in rebuilt.items()):
            raise ValueError(f"{where}: 'lightweight' must be an object with 'rebuilt': "
                             "{tensor name: SHA-256}")
        sketches = light.get("sketches", {})
        if not isinstance(sketches, dict) or not all(
                k in rebuilt and isinstance(v, list) and len(v) == 5 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                for k, v in sketches.items()):
            raise ValueError(f"{where}: 'lightweight.sketches' must be an object "
                             "{rebuilt tensor name: [5 numbers]}")
    if rebuilt is not None and any(isinstance(e, dict) and e.get("layout") == PIVOTED_LAYOUT
                                   for e in meta["modules"].values()):
        raise ValueError(f"{where}: a lightweight checkpoint cannot hold gauge-fixed "
                         f"({PIVOTED_LAYOUT!r}) layers: they are not decompositions of the "
                         "base model")
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
        problem = own_forward_error(old, name)
        if problem:
            raise ValueError(f"saved module {name!r} cannot be loaded onto {base_name}: "
                             f"{problem}")
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
    header: dict[str, tuple[int, ...]] = {}
    stored: dict[str, str] = {}  # name in the model -> name in the file
    for key, shape in io.read_header(weights).items():
        if prefix and key == io.STATE_META_KEY:
            continue
        own = key[len(prefix):] if key.startswith(prefix) else key
        header[own], stored[own] = shape, key
    # names safetensors' save_model dropped as one tensor with a kept name (tied in the
    # saved model): the kept tensor's values are theirs too, wherever the base model
    # holds them separately
    for own, kept in _aliases(weights, prefix).items():
        if own in expected and own not in header and kept in header:
            header[own], stored[own] = header[kept], stored[kept]
    for key, shape in header.items():
        if key in expected and shape != expected[key][0]:
            raise ValueError(f"tensor {key!r} of {weights} has shape {list(shape)}, but "
                             f"{base_name} with the saved MPO modules needs "
                             f"{list(expected[key][0])}")
    # names of each group in the file; a group is one tensor of the base model, so names
    # the saved model held separately must have the same values (checked below)
    in_file: dict[Any, list[str]] = {}
    for key in header:
        if key in expected:
            in_file.setdefault(expected[key][1], []).append(key)
    saved_as = {group: names[0] for group, names in in_file.items()}
    unknown = sorted(set(rebuilt or ()) - set(expected))
    if unknown:
        raise ValueError(f"{where}: the tensors to rebuild {some_names(unknown)} are not "
                         f"tensors of {base_name} with the saved MPO modules")
    left: dict[Any, list[str]] = {}
    for key in rebuilt or ():
        left.setdefault(expected[key][1], []).append(key)
    for names in left.values():
        if len({rebuilt[k] for k in names}) > 1:
            raise _tied_error(base_name, f"{where} leaves {some_names(sorted(names), 3)} to "
                              "the base model with different SHA-256")
    unexpected = sorted(set(header) - set(expected))
    missing = sorted(k for k, (_, group) in expected.items()
                     if group not in saved_as and group not in left)
    if unexpected or missing:
        raise ValueError(f"{weights} does not fit {base_name} with the saved MPO modules: "
                         f"missing {some_names(missing)}, unexpected {some_names(unexpected)}")
    # load into new layers and read the other tensors; base_model is still untouched
    shells: dict[str, MPOModule] = {}
    saved: dict[Any, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for group, names in in_file.items():
                _check_one_value(f, names, [stored[k] for k in names],
                                 {k: rebuilt[k] for k in left.get(group, ())},
                                 weights, base_name)
            for name, entry in entries.items():
                if rebuilt is not None:
                    for local in io.module_tensor_shapes(entry):
                        if (name, local) in saved_as:
                            saved[(name, local)] = f.get_tensor(stored[saved_as[(name, local)]])
                    continue
                old = olds[name]
                build = (PivotedLinear.from_structure if entry.get("layout") == PIVOTED_LAYOUT
                         else MPOModule.from_structure)
                shell = build(entry, old.weight.dtype, old.weight.device)
                state = {local: f.get_tensor(stored[saved_as[(name, local)]])
                         for local in io.module_tensor_shapes(entry)}
                for local in ("pivots", "rest") if isinstance(shell, PivotedLinear) else ():
                    if state[local].dtype != torch.int64:  # load_state_dict would cast
                        raise ValueError(f"{where}: module {name!r}: {local} must be int64, "
                                         f"got {state[local].dtype}")
                own = shell.state_dict()
                for local, t in state.items():
                    _check_dtype(weights, f"{name}.{local}", t, own[local].dtype, base_name)
                shell.load_state_dict(state, strict=True)
                if isinstance(shell, PivotedLinear):
                    try:
                        shell.check_indices()
                    except ValueError as err:
                        raise ValueError(f"{where}: module {name!r}: {err}") from None
                shells[name] = shell
            for key in targets:
                if expected[key][1] in saved_as and saved_as[expected[key][1]] == key:
                    rest[key] = f.get_tensor(stored[key])
                    if rebuilt is None:  # a task checkpoint: the SHA-256 check says more
                        _check_dtype(weights, key, rest[key], targets[key].dtype, base_name)
    except (SafetensorError, RuntimeError) as err:
        raise ValueError(f"cannot load {weights} into {base_name}: "
                         f"{' '.join(str(err).split())[:400]}") from err
    return LoadPlan(config=config, paths=paths, olds=olds, entries=entries, shells=shells,
                     targets=targets, rest=rest, saved=saved, rebuilt=rebuilt,
                     base_name=base_name, where=where, references=None,
                     heads=task_heads(base_model),
                     name_or_path=light.get("base_model_name_or_path") if light else None,
                     sketches=light.get("sketches", {}) if light else {})


def _refuse_two_checkpoints(d: Path) -> None:
    """``ValueError`` when ``d`` holds both a ``save_pretrained`` checkpoint
    (``mpo_config.json``) and the state dict of an MPO model ``transformers.Trainer``
    saved (``model.safetensors`` with the model's description): which one is meant
    cannot be told, and each gives another model. A ``model.safetensors`` that is not an
    MPO model's state dict (e.g. the base model's) is left alone."""
    state = d / io.STATE_DICT_NAME
    try:
        with safe_open(str(state), framework="pt") as f:
            if io.STATE_META_KEY not in set(f.keys()):
                return
    except (SafetensorError, OSError, RuntimeError):
        return  # not a state dict of an MPO model: the save_pretrained checkpoint is read
    config = d / io.CONFIG_NAME
    newer = (io.STATE_DICT_NAME if state.stat().st_mtime > config.stat().st_mtime
             else io.CONFIG_NAME)
    raise ValueError(
        f"{d} holds two checkpoints of an MPO model: {io.CONFIG_NAME} (with its weights, "
        f"written by save_pretrained) and {io.STATE_DICT_NAME} (a state dict, written by "
        f"transformers.Trainer.save_model); {newer} is the newer. Loading cannot tell which "
        f"one is meant: move {io.STATE_DICT_NAME} away to load the save_pretrained "
        f"checkpoint, or move {io.CONFIG_NAME} away to load the Trainer's state dict (or "
        "save them to different folders)")


def _aliases(weights: Path, prefix: str) -> dict[str, str]:
    """Name -> kept name of the tensors ``safetensors.torch.save_model`` dropped because
    they shared memory with a kept one (it records them in the file's metadata); names
    without ``prefix``."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError):
        return {}  # read_header has read the file: nothing to say here

    def own(key: str) -> str:
        return key[len(prefix):] if prefix and key.startswith(prefix) else key

    return {own(k): own(v) for k, v in metadata.items()
            if isinstance(k, str) and isinstance(v, str)}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


def _check_one_value(f: Any, names: list[str], keys: list[str], left: dict[str, str],
                     weights: Path, base_name: str) -> None:
    """``names`` (in the file under ``keys``) and ``left`` (name -> SHA-256 the checkpoint
    leaves to the base model) are one tensor of the base model: refuse different values,
    which loading would silently reduce to the first."""
    if len(set(keys)) < 2 and not left:
        return
    first = f.get_tensor(keys[0])
    for name, key in zip(names[1:], keys[1:]):
        if key != keys[0] and not bits_equal(first, f.get_tensor(key)):
            raise _tied_error(base_name, f"{weights} holds {names[0]!r} and {name!r} with "
                              "different values")
    if left:
        digest = io.tensor_sha256(first)
        other = sorted(k for k, want in left.items() if want != digest)
        if other:
            raise _tied_error(base_name, f"{weights} holds {names[0]!r} with other values "
                              f"than the SHA-256 it records for {some_names(other, 3)}, which "
                              "it leaves to the base model")


def _check_dtype(weights: Path, key: str, saved: torch.Tensor, dtype: torch.dtype,
                 base_name: str) -> None:
    """Refuse a saved tensor of another dtype than the model's: loading would cast it
    (``load_state_dict``, ``copy_``), and the loaded model would not be the saved one."""
    if saved.dtype != dtype:
        raise ValueError(
            f"tensor {key!r} of {weights} is {saved.dtype}, but {base_name} holds it as "
            f"{dtype}: loading would cast it, and the loaded model would not be the saved "
            f"one. Load the base model in the checkpoint's dtype (e.g. from_pretrained(..., "
            f"dtype={saved.dtype}) or base_model.to({saved.dtype})), then cast the loaded "
            "MPO model if you need another dtype")


def _tied_error(base_name: str, what: str) -> ValueError:
    """``what`` (names the checkpoint holds with different values) is refused because
    ``base_model`` ties those names together."""
    return ValueError(
        f"{what}, but {base_name} ties them together (one shared tensor, e.g. "
        "tie_word_embeddings=True): loading would keep one value and silently drop the "
        "others. The checkpoint was saved from a model that "
        "holds them separately (e.g. tie_word_embeddings=False, or untied while training); "
        "load it onto a base model that does not tie them (e.g. built with "
        "tie_word_embeddings=False)")


def _rebuild(plan: LoadPlan) -> None:
    """A lightweight checkpoint: decompose the base model's layers with the saved config
    (as :func:`~tnlm.integration.get_mpo_model` does), check every tensor the checkpoint
    leaves to the base model against its recorded SHA-256, then load the saved tensors
    into the new layers. Fills ``plan.shells`` and ``plan.references``; ``base_model``
    is not touched."""
    references: dict[str, str] = {}
    centrals: set[str] = set()
    rebuilt_cores: dict[str, torch.Tensor] = {}
    for name, entry in plan.entries.items():
        old = plan.olds[name]
        I, J = weight_xw(old).shape
        try:
            spec, mode = plan.config.spec_for(name, I, J)
            layer = MPOModule.from_module(old, spec, mode)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{plan.where}: cannot decompose module {name!r} of the base model "
                             f"with the saved config: {err}") from err
        shapes = [list(s) for s in layer.core_shapes]
        if shapes != entry["core_shapes"]:
            raise ValueError(
                f"module {name!r} of the base model decomposes to cores {shapes}, but the task "
                f"checkpoint {plan.where.parent} was saved with {entry['core_shapes']}: "
                f"{_other_base(plan)}")
        layer.mode = entry["mode"]
        local_state = layer.state_dict()
        local_digests = {k: io.tensor_sha256(t) for k, t in local_state.items()}
        for path in plan.paths[id(old)]:
            centrals.add(f"{path}.cores.{layer.central_index}")
            for local, digest in local_digests.items():
                references[f"{path}.{local}"] = digest
                if f"{path}.{local}" in plan.sketches:
                    rebuilt_cores[f"{path}.{local}"] = local_state[local]
        plan.shells[name] = layer
    digests: dict[int, str] = {}
    for key, t in plan.targets.items():
        if id(t) not in digests:
            digests[id(t)] = io.tensor_sha256(t)
        references[key] = digests[id(t)]
    wrong = [k for k, want in plan.rebuilt.items() if references[k] != want]
    # a core rebuilt with other float rounding (another thread count, another BLAS): its
    # bits differ, its values agree with the recorded sketch
    wrong = [k for k in wrong if not (k in rebuilt_cores and _sketches_agree(
        core_sketch(rebuilt_cores[k]), plan.sketches[k], rebuilt_cores[k].numel()))]
    in_heads = [k for k in wrong if any(k.startswith(h + ".") for h in plan.heads)]
    if wrong and len(in_heads) == len(wrong):
        heads = sorted({k.split(".", 1)[0] for k in in_heads})
        raise ValueError(
            f"the task checkpoint {plan.where.parent} leaves the task head {heads} to the base "
            f"model, frozen, and the base model's differs ({some_names(sorted(in_heads), 3)}): "
            f"{plan.base_name} initialises that head anew when it is loaded from a base "
            "checkpoint, so a task must train and save it. The checkpoint was saved with "
            "modules_to_save leaving the head out; save the task again with the head trained "
            "(modules_to_save=None, the default, or a list naming it), or load it onto the very "
            "model object (same head weights) it was trained from")
    drawn = [k for k in wrong if NEW_HEADS.intersection(k.split(".")[:-1])]
    if wrong and len(drawn) == len(wrong):
        raise ValueError(
            f"the task checkpoint {plan.where.parent} leaves {some_names(sorted(drawn), 3)} to "
            f"the base model, frozen, and the base model's differ: transformers draws them at "
            f"random when it loads a base checkpoint that lacks them (a pooler, {plan.base_name} "
            "reports them as missing), so a newly loaded base model cannot match. Load it onto a "
            "base model whose files hold these tensors, or save the task again from the trained "
            "model with lightweight=False (every tensor)")
    if wrong:
        core = [k for k in wrong if k in centrals]
        why = _other_base(plan)
        if core and not plan.sketches:  # saved before cores were sketched: bits only
            why += ("; or this machine decomposes it with other float rounding (another "
                    "thread count or BLAS changes the cores' bits, and this checkpoint "
                    "records their SHA-256 only): load with the thread count it was saved "
                    "with (OMP_NUM_THREADS), or save it again with this tnlm")
        raise ValueError(
            f"the task checkpoint {plan.where.parent} leaves {len(plan.rebuilt)} tensors to the "
            f"base model, and {len(wrong)} of them differ from what it recorded "
            f"({len(core)} rebuilt central cores; e.g. "
            f"{some_names(sorted(core) or sorted(wrong), 3)}): {why}")
    for key, t in plan.rest.items():  # load_state_dict and copy_ would cast
        _check_dtype(plan.where.parent, key, t, plan.targets[key].dtype, plan.base_name)
    for name, layer in plan.shells.items():
        state = {local: plan.saved[(name, local)]
                 for local in io.module_tensor_shapes(plan.entries[name])
                 if (name, local) in plan.saved}
        own = layer.state_dict()
        for local, t in state.items():
            _check_dtype(plan.where.parent, f"{name}.{local}", t, own[local].dtype,
                         plan.base_name)
        try:
            layer.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ValueError(f"cannot load the saved tensors of {name!r}: "
                             f"{' '.join(str(err).split())[:400]}") from err
    plan.references = references


def _other_base(plan: LoadPlan) -> str:
    saved_on = f" ({plan.name_or_path!r})" if plan.name_or_path else ""
    return (f"the base model {plan.base_name} is not the one the task was saved on{saved_on}; "
            "load it onto that base model (same weights, same dtype)")
