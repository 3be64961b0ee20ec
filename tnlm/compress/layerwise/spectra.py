"""What the non-uniform allocations measure on the dense model: each target's whitened
spectrum on its own inputs (:func:`dense_spectra`) and, for ``"sensitivity"``, the error
each target alone causes at the last block's output (:class:`Sensitivity`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tnlm.bridge import kind_of, weight_xw
from tnlm.bridge.kinds import dense_module, extras_of
from tnlm.compress import distributed as dist_
from tnlm.compress.allocate import rank_for_fraction
from tnlm.compress.calibration import InputStats, collect_input_stats
from tnlm.compress.data_aware import WhitenedLayer
from tnlm.compress.layerwise.blocks import BlockCall, block_error, check_output_error
from tnlm.core.budget import check_fraction
from tnlm.core.pivot import pivoted_rank_for_fraction

__all__ = ["Sensitivity", "dense_spectra"]

@torch.no_grad()
def dense_spectra(blocks: nn.ModuleList, data: list[tuple], per_block: list[list[str]],
                  prefix: str, ridge: float = 1e-6, progress: bool = False,
                  reduce: bool = False, error: str = "total",
                  sensitivity: Sensitivity | None = None
                  ) -> tuple[dict[str, tuple[int, int, Any]], dict[str, float]]:
    """The dense blocks run in turn on the captured inputs ``data``; per target, its
    whitened spectrum on its own dense inputs. With ``reduce``, ``data`` is this rank's
    share and the Grams and output energies are summed over the ranks of the
    ``torch.distributed`` process group; each spectrum is computed by one rank (by cost)
    and sent to the others, so every rank gets the same spectra.

    Returns:
        ``(spectra, block_share)``: ``name -> (in, out, tail)`` with ``tail[r]`` the
        squared singular values a rank-r truncation discards, and ``name -> tail[0] / E``,
        the target's output energy relative to the residual stream ``h`` its block
        writes, ``E`` as ``error`` (:data:`OUTPUT_ERRORS`) measures it: ``"total"``,
        ``E = Σ_p ||h_p||²``; ``"position"``, ``E = N² / Σ_p ||h_p||⁻²`` over the ``N``
        positions, so that ``tail[r] / E`` is the mean over positions of
        ``||e_p||² / ||h_p||²`` for an error ``e`` spread evenly over the positions (a
        position with massive activations then weighs as little as it does after the
        next norm, instead of setting ``E`` alone).

    With ``sensitivity`` (:meth:`Sensitivity.start` called) each target is also truncated
    alone, at its uniform rank, and the last block's output error it causes on the
    sensitivity's probe is recorded in ``sensitivity.errors``; with ``reduce`` every rank
    computes every spectrum then (from the summed statistics) and measures on its probe.

    Raises ``ValueError`` for an ``error`` not in :data:`OUTPUT_ERRORS`.
    """
    check_output_error("error", error)
    spectra: dict[str, tuple[int, int, Any]] = {}
    share: dict[str, float] = {}
    xs = [d[0] for d in data]
    for i in tqdm(range(len(blocks)), desc="spectra", disable=not progress, leave=False):
        call = BlockCall(blocks[i])
        names = per_block[i]
        ys: list[torch.Tensor] = []  # the block's outputs, from the statistics' pass
        if names:
            stats = collect_input_stats(call, [dict(x=x, extra=d[1]) for x, d in zip(xs, data)],
                                        [f"block.{n}" for n in names], reduce=reduce,
                                        outputs=ys)
        else:
            ys = [call(x, d[1]) for x, d in zip(xs, data)]
        if error == "total":
            energy = sum(float((y.double() ** 2).sum()) for y in ys)
            if reduce:
                energy = dist_.all_reduce_floats([energy], "output energies")[0]
        else:
            sq = [(y.double() ** 2).sum(-1).clamp_min(1e-30) for y in ys]
            inv, count = sum(float((1 / q).sum()) for q in sq), sum(q.numel() for q in sq)
            if reduce:
                inv, count = dist_.all_reduce_floats([inv, float(count)], "output energies")
            energy = count ** 2 / inv if inv else 0.0
        energy = energy or 1.0
        Ws = [weight_xw(blocks[i].get_submodule(n)) for n in names]
        own = [stats[f"block.{n}"] for n in names]
        if sensitivity is not None:  # one whitened layer alive at a time
            all_tails = []
            for n, W, st in zip(names, Ws, own):
                wl = WhitenedLayer(W, st, ridge, vectors=True)
                sensitivity.measure(i, n, f"{prefix}.{i}.{n}", wl)
                all_tails.append(wl.tails)
                del wl
        else:
            all_tails = _tails(Ws, own, ridge, reduce, i)
        for n, W, tails in zip(names, Ws, all_tails):
            key = f"{prefix}.{i}.{n}"
            spectra[key] = (int(W.shape[0]), int(W.shape[1]), tails)
            share[key] = float(tails[0]) / energy
        if sensitivity is not None:
            sensitivity.advance(i)
        xs = ys
    return spectra, share


class Sensitivity:
    """End-to-end sensitivities of the targets, measured on the dense model for the
    ``"sensitivity"`` allocation: target ``n`` of block ``i`` alone truncated (whitened,
    its statistics from the calibration batches) at the rank ``r_n`` the budget gives it
    uniformly, the blocks ``i .. L-1`` run on the probe sequences, and the error of the
    last block's output against the dense one, position by position
    (:func:`block_error` ``"position"``: what the final norm passes to the head) is
    ``errors[n]``. :meth:`weights` turns them into the per-target weights of
    :func:`~tnlm.compress.allocate.spectrum_ranks`::

        w_n = errors[n] / (tail_n[r_n] / tail_n[0])

    so that the allocation minimises ``Σ_n errors[n] · tail_n[r] / tail_n[r_n]``: each
    target's measured end-to-end error, scaled linearly with its own whitened output
    error. Unlike the ``"residual"`` weights, which compare a target's error with its
    block's output energy, this counts what an error does downstream (through every later
    block and after the massive activations a few positions carry), at the budget asked.
    Cost: ``L - i`` block forwards on the probe per target of block ``i`` (from 0), about
    ``(L + 1) / 2`` passes of the model per target kind. With one shared block applied
    many times (ALBERT's layer group) the "last block's output" is one application of
    it, not the model's output.

    Args:
        budget: the fraction kept; each target's measuring rank is the uniform rank.
        pivoted: count ranks gauge-fixed (:func:`pivoted_rank_for_fraction`).

    Use: :meth:`start` with the blocks and the probe (block 0's inputs, as
    :func:`capture_block_inputs` gives them), then per block ``i`` in order
    :meth:`measure` each target and :meth:`advance`.
    """

    def __init__(self, budget: float, *, pivoted: bool = False) -> None:
        self.budget = check_fraction("budget", budget)
        self.pivoted = pivoted
        self.errors: dict[str, float] = {}
        self.relative: dict[str, float] = {}
        self._blocks: nn.ModuleList | None = None
        self._probe: list[tuple] = []
        self._x: list[torch.Tensor] = []
        self._reference: list[torch.Tensor] = []
        self._at = 0

    @torch.no_grad()
    def start(self, blocks: nn.ModuleList, probe: list[tuple]) -> None:
        """Keep the probe (``(x, extra)`` per batch, block 0's inputs) and the dense
        model's last-block outputs on it."""
        if not probe:
            raise ValueError("the sensitivity probe needs at least one batch")
        self._blocks, self._probe, self._at = blocks, list(probe), 0
        self._x = [x for x, _ in self._probe]
        self._reference = [self._run(0, x, extra) for x, extra in self._probe]

    @torch.no_grad()
    def _run(self, start: int, x: torch.Tensor, extra: tuple) -> torch.Tensor:
        for b in range(start, len(self._blocks)):
            x = BlockCall(self._blocks[b])(x, extra)
        return x

    def rank(self, in_dim: int, out_dim: int) -> int:
        """The measuring rank of an ``in_dim x out_dim`` target (the uniform one)."""
        uniform = pivoted_rank_for_fraction if self.pivoted else rank_for_fraction
        return int(uniform(in_dim, out_dim, self.budget))

    @torch.no_grad()
    def measure(self, block: int, name: str, key: str, layer: WhitenedLayer) -> None:
        """Truncate ``name`` of ``block`` (the block :meth:`advance` reached) alone and
        record its end-to-end error under ``key``; ``layer`` is its
        ``WhitenedLayer(..., vectors=True)``."""
        from tnlm.integration.surgery import temporary

        if block != self._at:
            raise ValueError(f"the probe is at block {self._at}, not {block}")
        I, J = layer.shape
        r = self.rank(I, J)
        tail = layer.tails
        self.relative[key] = float(tail[min(r, len(tail) - 1)]) / (float(tail[0]) or 1.0)
        if r >= min(I, J):  # the uniform rank keeps it whole: nothing to measure
            self.errors[key] = 0.0
            return
        like = self._blocks[block].get_submodule(name)
        # the truncation's function as a plain module of the layer's kind (the MPO layer
        # computes the same; building it would decompose the matrix again)
        new = dense_module(kind_of(like), layer.truncated(r).to(like.weight.dtype), like.bias,
                           extras_of(like))
        with temporary(self._blocks[block], {name: new.to(like.weight.device)}):
            errs = [block_error(self._run(block, x, extra).double(), ref.double(), "position")
                    for x, (_, extra), ref in zip(self._x, self._probe, self._reference)]
        err = float(sum(float(e) for e in errs) / len(errs))
        if not math.isfinite(err):
            raise FloatingPointError(f"the sensitivity of {key} is {err}: the last block's "
                                     "output overflowed on the probe (use another allocation "
                                     "or a float32 model)")
        self.errors[key] = err

    @torch.no_grad()
    def advance(self, block: int) -> None:
        """Move the probe through the dense ``block`` (the one just measured)."""
        if block != self._at:
            raise ValueError(f"the probe is at block {self._at}, not {block}")
        call = BlockCall(self._blocks[block])
        self._x = [call(x, extra) for x, (_, extra) in zip(self._x, self._probe)]
        self._at += 1

    def weights(self) -> dict[str, float]:
        """``key -> w_n`` (class docstring). A target whose uniform rank already loses
        nothing (relative error 0) weighs as the median measured target."""
        w = {k: self.errors[k] / rel for k, rel in self.relative.items() if rel > 0}
        fill = float(sorted(w.values())[len(w) // 2]) if w else 1.0
        return {k: w.get(k, fill) for k in self.relative}


def _tails(Ws: list[torch.Tensor], stats: list[InputStats], ridge: float, reduce: bool,
           block: int) -> list[Any]:
    """:attr:`WhitenedLayer.tails` of each weight (in, out) with its statistics. With
    ``reduce`` under ``torch.distributed`` each is computed by one rank
    (:func:`~tnlm.compress.distributed.owners_by_cost`, cost ``I J min(I, J)``) and all are
    gathered by one float64 sum over the ranks (the others add zeros: exact)."""
    rank, size = dist_.world() if reduce else (0, 1)
    if size == 1:
        return [WhitenedLayer(W, st, ridge).tails for W, st in zip(Ws, stats)]
    dims = [(int(W.shape[0]), int(W.shape[1])) for W in Ws]
    owners = dist_.owners_by_cost([I * J * min(I, J) for I, J in dims], size)
    lengths = [min(I, J) + 1 for I, J in dims]
    # one more slot per rank: 1 where that rank's share failed, so every rank raises
    flat = torch.zeros(sum(lengths) + size, dtype=torch.float64)
    at, failed = 0, None
    for W, st, owner, n in zip(Ws, stats, owners, lengths):
        if owner == rank and failed is None:
            try:
                flat[at:at + n] = torch.as_tensor(WhitenedLayer(W, st, ridge).tails,
                                                  dtype=torch.float64)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the others know
                failed = err
                flat[sum(lengths) + rank] = 1.0
        at += n
    dist_.all_reduce_sum(flat, f"block {block}'s spectra")
    bad = [r for r in range(size) if flat[sum(lengths) + r] > 0]
    if failed is not None:
        raise failed
    if bad:
        raise RuntimeError(f"rank {bad[0]} could not compute block {block}'s spectra; "
                           "see its error")
    return [part.numpy() for part in torch.split(flat[:sum(lengths)], lengths)]
