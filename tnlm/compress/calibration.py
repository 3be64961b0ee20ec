"""Calibration: the input statistics of target layers, recorded with forward hooks.

For a layer ``y = x @ W`` the output error of a replacement W' on calibration
inputs X (rows = non-padding tokens) is ``||X (W - W')||_F``; it depends on X only
through the Gram matrix ``G = Xᵀ X`` (in, in). When the replacement sees inputs
``X_s`` of an already-compressed model while the original saw ``X_t``, the error
``||X_s W' - X_t W||_F`` also needs the cross Gram ``C = X_sᵀ X_t``.
:func:`collect_input_stats` records both, in float64, over the tokens whose
attention mask is 1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import kind_of, weight_xw
from tnlm.compress.distributed import all_reduce_stats

__all__ = ["InputStats", "collect_input_stats"]


@dataclass
class InputStats:
    """Input statistics of one layer over ``n_tokens`` calibration tokens.

    Attributes:
        gram: ``Σ x xᵀ`` (in, in), float64, inputs as the layer sees them.
        n_tokens: number of tokens summed.
        cross: ``Σ x_s x_tᵀ`` (in, in) between these inputs and a reference model's
            inputs to the same layer, or ``None`` (the inputs are the reference's).
        ref_gram: ``Σ x_t x_tᵀ`` of the reference's inputs (set with ``cross``).
    """

    gram: torch.Tensor
    n_tokens: int
    cross: torch.Tensor | None = None
    ref_gram: torch.Tensor | None = None


def _masked_rows(x: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """The rows of layer ``name``'s input ``x`` whose ``mask`` entry is 1: ``x`` laid out as
    the mask, ``(batch, seq, width)``, or as its rows flattened in that order,
    ``(batch · seq, width)`` (OPT's feed-forward); any other layout (sequence-first as in
    XLNet, one row per sentence as a pooler's) is refused, since the mask would pick the
    wrong rows."""
    if mask is not None:
        if tuple(x.shape[:-1]) != tuple(mask.shape) and \
                (x.dim() != 2 or x.shape[0] != mask.numel()):
            raise ValueError(
                f"layer {name!r} received inputs of shape {tuple(x.shape)} but "
                f"attention_mask has shape {tuple(mask.shape)}: the mask can only select "
                "the tokens of inputs laid out as (batch, seq, width) or (batch · seq, "
                "width), not sequence-first ones (XLNet) or one row per sentence (a "
                "pooler); leave this layer out")
        x = x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()]
    else:
        x = x.reshape(-1, x.shape[-1])
    return x.to(torch.float64)


def _zeros(w: int) -> torch.Tensor:
    return torch.zeros(w, w, dtype=torch.float64)


@torch.no_grad()
def collect_input_stats(model: nn.Module, batches: Iterable[dict], module_names: Sequence[str],
                        *, reference: nn.Module | None = None, progress: bool = False,
                        reduce: bool = False, outputs: list | None = None,
                        reference_outputs: list | None = None) -> dict[str, InputStats]:
    """Run ``model`` on ``batches`` and record each named layer's input Gram matrix.

    Args:
        model: a model whose modules ``module_names`` (``nn.Linear``, ``Conv1D`` or MPO
            layers) are to be calibrated; run in eval mode, restored afterwards.
        batches: dicts of model inputs (e.g. tokenizer output); tokens where
            ``batch["attention_mask"]`` is 0 are left out.
        module_names: dotted names in ``model.named_modules()``.
        reference: optionally a second model with the same module names (e.g. the
            original dense model while ``model`` is partly compressed): it runs on the
            same batches and :attr:`InputStats.cross` records ``X_modelᵀ X_reference``,
            pairing a layer's calls in order (a layer called several times per forward,
            as ALBERT's shared one, is paired call by call).
        progress: show a progress bar.
        reduce: sum the statistics (float64) over the ranks of the initialized
            ``torch.distributed`` process group, each rank having run its own share of
            the batches (:func:`tnlm.compress.distributed.all_reduce_stats`); every rank
            must call this with the same ``module_names``. Without a process group, or
            with one rank, nothing changes.
        outputs: a list to which each batch's output of ``model`` is appended (the
            forward the statistics need: running the model again for its outputs would
            repeat it).
        reference_outputs: the same for ``reference``.

    Layers that read one input tensor (a block's q/k/v projections, its gate and up
    projections) share its products: each Gram is computed once a batch and added to
    every such layer's statistics (the same float64 sums as computing it for each).

    Raises:
        ValueError: no module names, an unknown name, no calibration tokens, a layer
            whose inputs are not laid out as the attention mask (``(batch, seq, width)``
            or ``(batch · seq, width)``), or a layer that ``reference`` calls a different
            number of times per batch than ``model`` (each named in the message).
    """
    if not module_names:
        raise ValueError("module_names must name at least one layer")
    mods = dict(model.named_modules())
    ref_mods = dict(reference.named_modules()) if reference is not None else {}
    for n in module_names:
        if n not in mods:
            raise ValueError(f"module_names: {n!r} is not a module of {type(model).__name__}")
        if reference is not None and n not in ref_mods:
            raise ValueError(f"module_names: {n!r} is not a module of the reference model")
    stats: dict[str, InputStats] = {}
    state: dict[str, object] = {}
    ref_inputs: dict[str, deque[torch.Tensor]] = {n: deque() for n in module_names}
    calls: dict[str, int] = dict.fromkeys(module_names, 0)  # the model's, this batch

    def width(m: nn.Module) -> int:
        if kind_of(m) is not None:
            return int(weight_xw(m).shape[0])
        return int(m.in_dim)  # an MPO layer

    for n in module_names:
        w = width(mods[n])
        stats[n] = InputStats(_zeros(w), 0, *((None, None) if reference is None
                                               else (_zeros(w), _zeros(w))))

    # the last input tensor read -> its rows and their products, computed once for the
    # layers that read it in turn (q/k/v, gate/up); another input (or the same tensor
    # changed in place: its version moved) clears it, so it holds one input's rows and
    # products at a time (for a w-wide input: up to three w x w float64 products, 57 MB
    # at w = 1536). Each entry keeps the tensors it is keyed by alive, so an id in a key
    # always names the same tensor.
    memo: dict[tuple, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}
    last: list = [None, -1]  # the input the memo holds, and its version then

    def forget() -> None:
        memo.clear()
        last[:] = [None, -1]

    def once(key: str, of: tuple[torch.Tensor, ...], make) -> torch.Tensor:
        k = (key, *(id(t) for t in of))
        if k not in memo:
            memo[k] = (of, make())
        return memo[k][1]

    def rows(t: torch.Tensor, name: str) -> torch.Tensor:
        if last[0] is not t or last[1] != t._version:
            forget()  # another input: what the last one shared is done
            last[:] = [t, t._version]
        return once("rows", (t,), lambda: _masked_rows(t, state.get("mask"), name))

    def ref_hook(name):
        def fn(mod, inp, out):
            ref_inputs[name].append(rows(inp[0], name))
        return fn

    def hook(name):
        def fn(mod, inp, out):
            x = rows(inp[0], name)
            s = stats[name]
            if x.shape[1] != s.gram.shape[0]:
                raise ValueError(f"layer {name!r} received inputs of width {x.shape[1]}, "
                                 f"expected {s.gram.shape[0]}")
            s.gram += once("gram", (x,), lambda: x.T @ x)
            s.n_tokens += int(x.shape[0])
            calls[name] += 1
            if s.cross is not None:
                if not ref_inputs[name]:
                    raise ValueError(f"layer {name!r} ran at least {calls[name]} times in "
                                     f"the model but {calls[name] - 1} times in the "
                                     "reference on the same batch: its inputs cannot be "
                                     "paired")
                xt = ref_inputs[name].popleft()
                s.cross += once("cross", (x, xt), lambda: x.T @ xt)
                s.ref_gram += once("gram", (xt,), lambda: xt.T @ xt)
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in module_names]
    handles += [ref_mods[n].register_forward_hook(ref_hook(n)) for n in module_names
                if reference is not None]
    models = [model] + ([reference] if reference is not None else [])
    was_training = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
            state["mask"] = batch.get("attention_mask")
            forget()
            if reference is not None:
                out = reference(**batch)
                if reference_outputs is not None:
                    reference_outputs.append(out)
                calls.update(dict.fromkeys(module_names, 0))
            out = model(**batch)
            if outputs is not None:
                outputs.append(out)
            if reference is not None:
                for n in module_names:
                    if ref_inputs[n]:
                        raise ValueError(
                            f"layer {n!r} ran {calls[n]} times in the model but "
                            f"{calls[n] + len(ref_inputs[n])} times in the reference on "
                            "the same batch: its inputs cannot be paired")
    finally:
        forget()
        for h in handles:
            h.remove()
        for m, t in zip(models, was_training):
            m.train(t)
    if reduce:
        all_reduce_stats(stats)
    if not any(s.n_tokens for s in stats.values()):
        raise ValueError("batches held no calibration tokens (empty input or all-zero masks)")
    return stats
