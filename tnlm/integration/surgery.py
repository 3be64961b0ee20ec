"""Model surgery: modules put in place by dotted path, and changes undone together.

:class:`Swap` is the one way tnlm changes a model it may have to give back as it was::

    with Swap(model) as swap:              # undone if the block raises, kept otherwise
        swap.replace({"encoder.layer.0.attention.self.query": new})
        ...                                # train, set flags, copy values

    with temporary(model, {name: new}):    # always undone at the end of the block
        measure(model)

A module held under several paths (a shared module, e.g. ALBERT's one layer group) is
replaced under every one of them. Undoing puts back, in reverse order, every replaced
module object and every value saved with :meth:`Swap.save_value`, runs the callbacks
given to :meth:`Swap.on_undo`, then restores what was recorded when the swap began:
the ``requires_grad`` flag of every parameter, and on request the train/eval mode of
every module and the whole state dict. Flags, modes and state are recorded by name, so
they are restored on the modules that are in place after undoing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["Swap", "checkpointed", "module_paths", "set_module", "temporary", "weight_sharers"]


def module_paths(root: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every dotted path under which ``root`` holds it (shared modules
    have several)."""
    paths: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def weight_sharers(root: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """Per module of ``names`` (dotted paths under ``root``) whose ``weight`` another module
    of ``root`` also holds (tied weights: a causal LM's head and its word embeddings), the
    other modules' paths, sorted; modules whose weight is their own are left out."""
    owners: dict[int, set[str]] = {}
    for mname, module in root.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(prefix=mname, recurse=False,
                                                    remove_duplicate=False):
            owners.setdefault(id(param), set()).add(pname.rpartition(".")[0])
    paths = module_paths(root)
    out = {}
    for name in names:
        module = root.get_submodule(name)
        others = owners.get(id(module.weight), set()) - set(paths[id(module)])
        if others:
            out[name] = sorted(others)
    return out


def _parent(root: nn.Module, name: str, what: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute)`` of the submodule at ``name``; ``what`` names the
    argument in the error."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be the dotted path of a submodule, got {name!r}")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:
        parent = None
    if parent is None or not isinstance(parent._modules.get(child), nn.Module):
        raise ValueError(f"{what} {name!r} is not a module of {type(root).__name__}")
    return parent, child


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the module at the dotted path ``name`` of ``root``
    (that path only; see :meth:`Swap.replace` for every path of a shared module).

    Raises:
        ValueError: ``root`` holds no module at ``name``.
        TypeError: ``new`` is not an ``nn.Module`` (``None`` would remove the module).
    """
    if not isinstance(new, nn.Module):
        raise TypeError(f"new must be an nn.Module, got {type(new).__name__}")
    parent, child = _parent(root, name, "name")
    setattr(parent, child, new)


class Swap:
    """Changes to ``root`` that are undone together (module docstring).

    Used as a context manager it undoes everything when the block raises (any
    exception, ``KeyboardInterrupt`` included) and keeps the changes otherwise.

    Args:
        root: the model changed.
        modes: also record the train/eval mode of every module of ``root``.
        state: also record a copy of ``root``'s state dict (every value, restored
            after the module objects and callbacks; costs a copy of the model).
    """

    def __init__(self, root: nn.Module, *, modes: bool = False, state: bool = False) -> None:
        if not isinstance(root, nn.Module):
            raise TypeError(f"root must be an nn.Module, got {type(root).__name__}")
        self.root = root
        self._log: list[Callable[[], None]] = []
        self._flags = {n: p.requires_grad for n, p in root.named_parameters()}
        self._modes = {n: m.training for n, m in root.named_modules()} if modes else None
        self._state = ({k: v.detach().clone() for k, v in root.state_dict().items()}
                       if state else None)

    def put(self, path: str, new: nn.Module) -> nn.Module:
        """Put ``new`` at the dotted ``path`` (that path only); returns the module that was
        there.

        Raises:
            ValueError: ``root`` holds no module at ``path`` (nothing changed).
            TypeError: ``new`` is not an ``nn.Module``.
        """
        if not isinstance(new, nn.Module):
            raise TypeError(f"new must be an nn.Module, got {type(new).__name__}")
        parent, child = _parent(self.root, path, "path")
        old = parent._modules[child]
        set_module(self.root, path, new)
        self._log.append(lambda: setattr(parent, child, old))
        return old

    def replace(self, new: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """Put each module of ``new`` (dotted name -> module) in place of the module at
        that name, under every path ``root`` holds that module (a shared module is
        replaced everywhere); returns the replaced modules by name.

        Raises:
            ValueError: a name of ``new`` is not a module of ``root``, two names of one
                shared module get different modules, or a name lies inside another
                replaced module (``"0.0"`` beside ``"0"``: which one ends up in place would
                depend on the order); checked before anything changes.
            TypeError: a value of ``new`` is not an ``nn.Module``.
        """
        olds: dict[str, nn.Module] = {}
        by_module: dict[int, tuple[str, nn.Module]] = {}
        for name, module in new.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"new: {name!r} must map to an nn.Module, got "
                                f"{type(module).__name__}")
            parent, child = _parent(self.root, name, "new: the name")
            old = olds[name] = parent._modules[child]
            seen = by_module.setdefault(id(old), (name, module))
            if seen[1] is not module:
                raise ValueError(f"new: {seen[0]!r} and {name!r} are one shared module of "
                                 f"{type(self.root).__name__} but get different modules")
        replaced = {id(old): name for name, old in olds.items()}
        for outer, old in olds.items():  # by object: a shared module nests under every path
            for inner in old.modules():
                name = replaced.get(id(inner))
                if inner is not old and name is not None:
                    raise ValueError(f"new: {name!r} lies inside {outer!r}, which is replaced "
                                     "too: replace one of them")
        paths = module_paths(self.root)
        for key, (_, module) in by_module.items():
            for path in paths[key]:
                self.put(path, module)
        return olds

    @torch.no_grad()
    def save_value(self, tensor: torch.Tensor) -> None:
        """Record ``tensor``'s value before an in-place change; undoing copies it back."""
        saved = tensor.detach().clone()
        self._log.append(lambda: tensor.detach().copy_(saved))

    def on_undo(self, undo: Callable[[], Any]) -> None:
        """Call ``undo()`` when undoing, in reverse order with the other changes (before
        the recorded state, flags and modes are restored)."""
        self._log.append(undo)

    def undo(self) -> None:
        """Undo every change (module docstring); the swap can then be used again."""
        with torch.no_grad():
            while self._log:
                self._log.pop()()
            if self._state is not None:
                self.root.load_state_dict(self._state)
        for n, p in self.root.named_parameters():
            if n in self._flags:
                p.requires_grad_(self._flags[n])
        if self._modes is not None:
            for n, m in self.root.named_modules():
                if n in self._modes:
                    m.training = self._modes[n]

    def __enter__(self) -> Swap:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.undo()


@contextlib.contextmanager
def temporary(root: nn.Module, new: Mapping[str, nn.Module] | None = None, *,
              modes: bool = False, state: bool = False) -> Iterator[Swap]:
    """A :class:`Swap` of ``root`` that is always undone at the end of the block, whether
    or not it raises; the modules of ``new`` (as :meth:`Swap.replace`) are put in place
    first. ``modes`` and ``state`` as for :class:`Swap`."""
    swap = Swap(root, modes=modes, state=state)
    try:
        if new:
            swap.replace(new)
        yield swap
    finally:
        swap.undo()


@contextlib.contextmanager
def checkpointed(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Activation checkpointing of each of ``modules`` for the duration of the block.

    While gradients are being recorded, each module's forward runs through
    ``torch.utils.checkpoint`` (non-reentrant, positional and keyword arguments passed
    on): only its inputs are kept for the backward pass, which runs the forward again.
    Peak memory of a stack of L blocks falls from L blocks' activations to one block's
    (plus the L inputs), for one more forward pass of each block. Outputs and gradients
    are those of the plain forward. Without gradients (``torch.no_grad``) the forward
    is the plain one. Each module's own ``forward`` is put back at the end, also when
    the block raises.

    Raises:
        TypeError: an element of ``modules`` is not an ``nn.Module``.
    """
    from torch.utils.checkpoint import checkpoint

    modules = list(modules)
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules[{i}] must be an nn.Module, got {type(m).__name__}")
    saved: list[tuple[nn.Module, Any]] = []

    def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    try:
        for m in modules:
            if any(m is s for s, _ in saved):
                continue
            saved.append((m, m.__dict__.get("forward", _MISSING)))
            m.forward = wrap(m.forward)
        yield
    finally:
        for m, own in reversed(saved):
            if own is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = own


_MISSING = object()
