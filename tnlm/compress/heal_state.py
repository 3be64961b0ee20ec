"""The healing checkpoint on disk: what a healing run depends on, and its saved state.

A folder holds two files: :data:`STATE_TENSORS` (safetensors: the trained parameters and
AdamW's moments, no pickle) and :data:`STATE_FILE` (JSON: the step, the losses and the
settings the run was made with, :func:`heal_settings`). Both are written to a temporary
file and renamed; the JSON also rides in the tensors' header (:data:`STATE_KEY`), so a
process killed between the two renames leaves tensors that say which step they are.
:func:`check_resumable` refuses a state made with other settings, naming every setting
that differs; :func:`load_heal_state` puts a checked state back into the parameters and
the optimizer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnlm.bridge.finetune import HEALING_RENAMED

__all__ = ["STATE_FILE", "STATE_TENSORS", "STATE_KEY", "heal_settings", "read_heal_state",
           "check_resumable", "save_heal_state", "load_heal_state"]

#: the healing checkpoint's JSON (step, losses, settings) and tensors, in ``checkpoint_dir``
STATE_FILE, STATE_TENSORS = "heal_state.json", "heal_state.safetensors"
#: the key of the tensors file's header metadata that holds the state it belongs to
STATE_KEY = "tnlm_heal_state"


#: HealConfig fields that do not change what healing computes
_NOT_SETTINGS = ("checkpoint_dir", "checkpoint_every")


def _digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def heal_settings(config: Any, sentences: Sequence[str], teacher: nn.Module,
                  context: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a healing run's result depends on, as JSON values: the fields of ``config``
    (a :class:`~tnlm.compress.distill.HealConfig`; not where or how often it checkpoints;
    its term's :meth:`~tnlm.compress.distill.HealTerm.settings`), the number of sentences
    and a hash of them (as :func:`~tnlm.compress.distill.heal` keeps them: non-empty
    strings), a hash of the teacher's state and the caller's ``context`` (e.g. the budget
    that made the student). Stored in every checkpoint; healing resumes only from a
    checkpoint with the same settings."""
    kept = [s for s in sentences if isinstance(s, str) and s.strip()]
    cfg = {f: getattr(config, f) for f in config.__dataclass_fields__ if f not in _NOT_SETTINGS}
    cfg["term"] = config.term.settings() if config.term is not None else None
    out = dict(cfg, sentences=len(kept),
               text_sha256=hashlib.sha256(json.dumps(kept).encode()).hexdigest(),
               teacher_sha256=_digest(teacher), context=context or {})
    return json.loads(json.dumps(out))  # tuples as lists, as read back


def read_heal_state(directory: str | Path, steps: int | None = None) -> dict[str, Any]:
    """The parsed :data:`STATE_FILE` of a healing checkpoint folder, checked: a JSON object
    with ``step`` an int in [0, ``steps``] and ``losses`` a list of ``step`` numbers, beside
    a :data:`STATE_TENSORS` file whose header reads. Where that header holds its own copy
    of the state (:data:`STATE_KEY`, written since the tensors carry it), that copy is
    returned, checked alike and with the same settings: it is the state of the tensors on
    disk, where the JSON may be one save behind.

    Raises:
        FileNotFoundError: no state file; ValueError: anything else wrong, naming the file.
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no healing state: {path} does not exist")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"healing state {path} is corrupt (not JSON: {err})") from None
    top = steps if steps is not None else math.inf

    def checked(state: Any, where: Path) -> dict[str, Any]:
        if not isinstance(state, dict):
            raise ValueError(f"healing state {where} is corrupt (not a JSON object)")
        step, losses = state.get("step"), state.get("losses")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= top:
            raise ValueError(f"healing state {where} is corrupt: step {step!r} is not an int "
                             f"in [0, {top}] (the run's healing steps)")
        if not isinstance(losses, list) or len(losses) != step or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in losses):
            raise ValueError(f"healing state {where} is corrupt: losses must be a list of "
                             f"{step} numbers")
        return state

    meta = checked(meta, path)
    tensors = Path(directory) / STATE_TENSORS
    if not tensors.is_file():
        raise ValueError(f"healing state {path} has no {STATE_TENSORS} beside it")
    from safetensors import safe_open

    try:  # the header only: cheap, and a resume is refused before any work
        with safe_open(str(tensors), "pt") as f:
            f.keys()
            header = (f.metadata() or {}).get(STATE_KEY)
        own = None if header is None else json.loads(header)
    except Exception as err:  # safetensors' own error types, or the header's JSON
        raise ValueError(f"healing state {tensors} is corrupt ({err})") from None
    if own is None:  # written before the state rode in the tensors' header
        return meta
    # the tensors' own state: the JSON beside them may be one save behind (a process
    # killed between the two renames), never of another run
    own = checked(own, tensors)
    if own.get("settings") != meta.get("settings"):
        raise ValueError(f"healing state {tensors} was written with other settings than "
                         f"{path} records: remove the folder")
    return own


#: settings a healing state recorded before the screened loss terms moved to
#: ``experiments/heal_terms.py``, at the values that switched them off
_FORMER_TERMS = {"w_rel": 0.0, "neighbours": False, "twins": 0, "twin_words": 0.15,
                 "w_twin": 10.0, "w_attn": 0.0, "attn_relations": ["qk"]}


def check_resumable(directory: str | Path, settings: dict[str, Any]) -> int:
    """The step the healing state in ``directory`` resumes from, after checking that it was
    made with ``settings`` (:func:`heal_settings`).

    A state recorded before healing's sets were renamed is read with their new names
    (``train="all"`` as ``"cores+linears"``, ``"auxiliary"`` as ``"cores-central"``:
    :data:`~tnlm.bridge.finetune.HEALING_RENAMED`; in a healing state those words can
    only mean those sets), so it resumes under the new spelling and is refused under any
    other, as for every setting. Where the set itself grew (norm layers other than
    ``nn.LayerNorm``, ``Conv1D`` layers), the saved tensors do not cover it and the
    resume is refused when they are loaded, naming the first missing parameter. A state
    recorded before the screened loss terms left the library resumes as ``term=None`` when
    every one of them was off; with one on it is refused (``term`` differs).

    Raises:
        FileNotFoundError: no state; ValueError: a corrupt state or other settings, naming
        the file and every setting that differs.
    """
    try:
        meta = read_heal_state(directory, settings.get("steps"))
    except ValueError as err:
        # a state past this run's steps but within its own: a run asked for fewer steps
        # than the state has made, a settings mismatch (named below), not corruption
        try:
            meta = read_heal_state(directory)
        except ValueError:
            raise err from None
        own = (meta.get("settings") or {}).get("steps") \
            if isinstance(meta.get("settings"), dict) else None
        if isinstance(own, bool) or not isinstance(own, int) or meta["step"] > own \
                or own == settings.get("steps"):
            raise err from None
    path = Path(directory) / STATE_FILE
    saved = meta.get("settings")
    if not isinstance(saved, dict):
        raise ValueError(f"healing state {path} records no settings (an older tnlm wrote "
                         f"it): it cannot be checked, so it is not resumed; remove it")
    if saved.get("train") in HEALING_RENAMED:  # written before the rename: the same set
        saved = dict(saved, train=HEALING_RENAMED[saved["train"]])
    if "term" not in saved and all(saved.get(k, v) == v for k, v in _FORMER_TERMS.items()):
        # written before the screened terms left the library, none of them on: no term
        saved = {k: v for k, v in saved.items() if k not in _FORMER_TERMS}
        saved["term"] = None
    keys = sorted(set(saved) | set(settings))
    diff = [k for k in keys if saved.get(k) != settings.get(k)]
    if diff:
        def show(v: Any) -> str:
            return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else repr(v)
        parts = []
        for k in diff:
            a, b = saved.get(k), settings.get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                parts += [f"{k}.{j}: {show(a.get(j))} there, {show(b.get(j))} now"
                          for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
            else:
                parts.append(f"{k}: {show(a)} there, {show(b)} now")
        raise ValueError(f"healing state {path} was made with other settings ("
                         + "; ".join(parts) + ")")
    return int(meta["step"])


def check_heal_dir(config: Any, sentences: Sequence[str], teacher: nn.Module,
                   context: dict[str, Any] | None = None) -> None:
    """Before any work: ``config.checkpoint_dir`` (a :class:`~tnlm.compress.distill.
    HealConfig`'s) is a folder or can be made one, and a healing state in it was made with
    the settings healing will record (:func:`heal_settings` of the same arguments), so a
    state of another run is refused now, not after the truncation and reconstruction.

    Raises:
        ValueError: ``checkpoint_dir`` is a file; a state there is corrupt or was made
            with other settings (each named).
    """
    d = getattr(config, "checkpoint_dir", None)
    if not d:
        return
    d = Path(d)
    if d.exists() and not d.is_dir():
        raise ValueError(f"checkpoint_dir {d} is a file; expected a folder for the healing "
                         "state")
    if (d / STATE_FILE).exists():
        check_resumable(d, heal_settings(config, sentences, teacher, context))


def save_heal_state(d: Path, step: int, params: Sequence[tuple[str, nn.Parameter]],
                    opt: torch.optim.Optimizer, losses: list[float],
                    settings: dict[str, Any]) -> None:
    """Write the state after ``step`` healing steps into the folder ``d`` (made if missing):
    ``params`` (name, parameter) pairs, AdamW's moments and step, ``losses`` and
    ``settings``; each file staged and renamed."""
    from safetensors.torch import save_file

    from tnlm.integration.io import atomic_write

    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params}
    for i, (_, p) in enumerate(params):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"opt.{i}.{k}"] = st[k].contiguous()
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    state = json.dumps({"step": step, "losses": losses, "settings": settings})
    # the state rides in the tensors' header too: a process killed between the two renames
    # leaves tensors whose own header says which step they are (the JSON: a readable copy)
    atomic_write(d / STATE_TENSORS, lambda t: save_file(tensors, str(t),
                                                        metadata={STATE_KEY: state}))
    atomic_write(d / STATE_FILE, lambda t: t.write_text(state))


@torch.no_grad()
def load_heal_state(d: Path, params: Sequence[tuple[str, nn.Parameter]],
                    opt: torch.optim.Optimizer,
                    settings: dict[str, Any]) -> tuple[int, list[float]]:
    """Put the state in the folder ``d`` back into ``params`` and ``opt``; returns its step
    and losses.

    Raises:
        ValueError: a state made with other settings (:func:`check_resumable`), corrupt
        tensors, or tensors that do not match ``params`` (naming the first one).
    """
    from safetensors.torch import load_file

    check_resumable(d, settings)
    meta = read_heal_state(d, settings["steps"])  # the tensors' own step where recorded
    try:
        tensors = load_file(str(d / STATE_TENSORS))
    except Exception as err:  # safetensors' own error types
        raise ValueError(f"healing state {d / STATE_TENSORS} is corrupt ({err})") from None
    for i, (n, p) in enumerate(params):
        key = f"param.{n}"
        if key not in tensors or tensors[key].shape != p.shape:
            raise ValueError(f"healing state {d / STATE_TENSORS} does not match this student "
                             f"({n})")
        p.copy_(tensors[key])
        if f"opt.{i}.exp_avg" in tensors:
            # the moments are stored by position: the i-th must be this parameter's shape
            # (a state of another set of parameters would shift them onto the wrong ones)
            for k in ("exp_avg", "exp_avg_sq"):
                got = tensors.get(f"opt.{i}.{k}")
                if got is None or got.shape != p.shape:
                    raise ValueError(f"healing state {d / STATE_TENSORS} does not match this "
                                     f"student (the optimizer's {k} of {n})")
            opt.state[p] = {"exp_avg": tensors[f"opt.{i}.exp_avg"].clone(),
                            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].clone(),
                            "step": tensors[f"opt.{i}.step"].reshape(()).float()}
    return int(meta["step"]), list(meta["losses"])
