"""Dimension squeezing: the paper's greedy bond truncation across stacked MPO layers.

Algorithm (MPOP, Algorithm 2), as implemented here::

    p  <- evaluate(model)                       # loss of the fine-tuned full-rank model
    repeat until max_iters, or target_params (core parameters) reached:
        for every MPO module m and candidate bond k of m (default: the two bonds of
        the central tensor), with current dimension d and cached spectrum s:
            added(m, k) = Σ_{r = d-step}^{d-1} s_r² / ||W_m||²     (no new SVD)
        cut the (m, k) with the least added error: truncate m's MPO in canonical form
            to d-step at bond k, re-gauge, replace the cores
        finetune(model)                           # auxiliary tensors, central frozen;
                                                  # a fresh optimizer (shapes changed)
        p~ <- evaluate(model)
        if |p - p~| > delta: restore the model before this cut and stop

If a cut, ``finetune``, ``evaluate`` or ``log`` raises, the model is restored to
its state before that iteration's cuts (cores, values, ``requires_grad`` flags,
error estimates) and the exception propagates: the model is always in its last
accepted state.

Each module's estimated relative error is ``sqrt(Σ_k Σ_discarded s² / ||W||²)``
(the TT-SVD bound). It is an estimate: the cached spectra are those of the model
when squeezing starts, sliced as bonds are cut (the paper's estimate), while
recovery fine-tuning changes the cores in between; ``refresh_spectra=True``
recomputes a module's spectra from its current cores after each of its cuts.
A cut module's ``truncation_error`` is set to this estimate.

Sizes (``target_params``, ``SqueezeResult.start_params``/``final_params``,
``SqueezeStep.params``, :meth:`DimensionSqueezer.mpo_params`) count the MPO cores'
numbers only: the modules' biases, which squeezing never changes, are left out.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tnlm.bridge import MPOModule, mpo_modules
from tnlm.core.spec import GAUGES
from tnlm.core.spectra import tail_sums
from tnlm.integration import MPOModel
from tnlm.integration.surgery import Swap

__all__ = ["DimensionSqueezer", "SqueezeStep", "SqueezeResult"]


@dataclass
class SqueezeStep:
    """One iteration of the squeezing loop (also logged)."""

    iteration: int
    module: str
    bond: int
    old_dim: int
    new_dim: int
    added_error: float        # relative squared weight discarded by this cut (estimate)
    module_error: float       # the module's estimated relative error after the cut
    loss: float
    loss_change: float        # |p - p~| against the starting loss
    params: int               # core parameters of all MPO modules after the cut (biases
                              # not counted)
    accepted: bool

    def __str__(self) -> str:
        return (f"[squeeze {self.iteration:3d}] {self.module} bond {self.bond}: "
                f"{self.old_dim} -> {self.new_dim}  added {self.added_error:.2e}  "
                f"module err {self.module_error:.3f}  loss {self.loss:.4f} "
                f"(|dp| {self.loss_change:.4f})  params {self.params:,}  "
                f"{'ok' if self.accepted else 'REJECTED'}")


@dataclass
class SqueezeResult:
    history: list[SqueezeStep] = field(default_factory=list)
    start_loss: float = float("nan")
    final_loss: float = float("nan")
    start_params: int = 0     # core parameters of all MPO modules (biases not counted)
    final_params: int = 0
    reason: str = ""

    def table(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.history]


class DimensionSqueezer:
    """Greedy bond squeezing over all MPO modules of ``model``.

    Args:
        model: a model containing MPO modules (e.g. an ``MPOModel``), modified in place.
        evaluate: ``evaluate(model) -> loss`` on held-out data.
        finetune: ``finetune(model) -> None``: brief training after each cut; it must
            build its optimizer from the current parameters (core shapes change).
            ``None`` skips recovery.
        delta: stop when ``|p - p~|`` exceeds it (p: the starting loss).
        step: bond dimensions cut per iteration.
        max_iters: iteration limit.
        target_params: stop once the MPO modules' cores hold at most this many numbers
            (core parameters, :meth:`mpo_params`: biases not counted).
        bonds: ``"central"`` (the central tensor's two bonds) or ``"all"``.
        gauge: the gauge the cut module's cores are put back in
            (:func:`tnlm.core.spec.apply_gauge`).
        min_dim: never cut a bond below this.
        refresh_spectra: recompute a module's spectra after cutting it (an SVD sweep).
        cuts_per_iter: cuts made before each recovery and evaluation, chosen greedily by
            estimate as :meth:`schedule` does (a bond may be cut more than once); 1 is the
            paper's loop, more trades fidelity for fewer evaluations.
        log: called with each :class:`SqueezeStep` (default: print a line).

    Raises:
        ValueError: an argument out of range or of the wrong type (named), before any
            evaluation; a model without MPO modules.
    """

    def __init__(self, model: nn.Module, evaluate: Callable[[nn.Module], float],
                 finetune: Callable[[nn.Module], None] | None = None, *, delta: float,
                 step: int = 1, max_iters: int = 100, target_params: int | None = None,
                 bonds: str = "central", gauge: str = "symmetric", min_dim: int = 1,
                 refresh_spectra: bool = False, cuts_per_iter: int = 1,
                 log: Callable[[SqueezeStep], None] | None = print) -> None:
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (
                delta > 0):  # NaN fails the comparison; inf: never stop on the loss
            raise ValueError(f"delta must be > 0 (a number; inf: no limit), got {delta!r}")
        for name, v, lo in (("step", step, 1), ("max_iters", max_iters, 0),
                            ("min_dim", min_dim, 1), ("cuts_per_iter", cuts_per_iter, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if target_params is not None and (isinstance(target_params, bool) or not isinstance(
                target_params, int) or target_params < 1):
            raise ValueError(f"target_params must be None or an int >= 1, got "
                             f"{target_params!r}")
        if bonds not in ("central", "all"):
            raise ValueError(f"bonds must be 'central' or 'all', got {bonds!r}")
        if gauge not in GAUGES:
            raise ValueError(f"gauge must be one of {GAUGES}, got {gauge!r}")
        if not isinstance(refresh_spectra, bool):
            raise ValueError(f"refresh_spectra must be a bool, got {refresh_spectra!r}")
        self.model = model
        root = model.base_model if isinstance(model, MPOModel) else model
        self.modules: dict[str, MPOModule] = dict(mpo_modules(root))
        if not self.modules:
            raise ValueError("model contains no MPO modules to squeeze")
        self.evaluate, self.finetune = evaluate, finetune
        self.delta, self.step, self.max_iters = float(delta), step, max_iters
        self.target_params, self.bonds, self.gauge = target_params, bonds, gauge
        self.min_dim, self.refresh_spectra, self.log = min_dim, refresh_spectra, log
        self.cuts_per_iter = cuts_per_iter
        self._spectra: dict[str, list[np.ndarray]] = {}
        self._norm_sq: dict[str, float] = {}
        self._err_sq: dict[str, float] = {}
        for name, m in self.modules.items():
            self._load_spectra(name, m)
            self._err_sq[name] = float(m.truncation_error) ** 2

    # ------------------------------------------------------------------ estimates
    def _load_spectra(self, name: str, m: MPOModule) -> None:
        spectra = m.to_mpo().bond_spectra()
        self._spectra[name] = spectra
        self._norm_sq[name] = float(np.sum(spectra[0] ** 2)) or 1.0

    def _candidate_bonds(self, m: MPOModule) -> list[int]:
        if self.bonds == "all":
            return list(range(m.n_sites - 1))
        c = m.central_index
        return [b for b in (c - 1, c) if 0 <= b < m.n_sites - 1]

    def _added(self, name: str, bond: int, dim: int) -> float:
        """Relative squared weight discarded by cutting ``bond`` of ``name`` from ``dim``
        to ``dim - step`` (from the cached spectrum)."""
        tail = tail_sums(self._spectra[name][bond][:dim])
        return float(tail[dim - self.step]) / self._norm_sq[name]

    def _moves(self, dims: dict[str, list[int]]) -> list[tuple[float, str, int, int]]:
        out = []
        for name, m in self.modules.items():
            for b in self._candidate_bonds(m):
                d = dims[name][b]
                if d - self.step >= self.min_dim:
                    out.append((self._added(name, b, d), name, b, d - self.step))
        out.sort(key=lambda c: (c[0], c[1], c[2]))
        return out

    def candidates(self) -> list[tuple[float, str, int, int]]:
        """``(added_error, module, bond, new_dim)`` for every possible next cut, best first."""
        return self._moves({k: list(m.bond_dims) for k, m in self.modules.items()})

    def schedule(self, n: int = 10) -> list[tuple[str, int, int, float]]:
        """The next ``n`` cuts the greedy would make by estimate alone (a dry run):
        ``(module, bond, new_dim, added_error)``."""
        dims = {k: list(m.bond_dims) for k, m in self.modules.items()}
        plan = []
        for _ in range(n):
            moves = self._moves(dims)
            if not moves:
                break
            added, name, b, new = moves[0]
            plan.append((name, b, new, added))
            dims[name][b] = new
        return plan

    def mpo_params(self) -> int:
        """Core parameters: the numbers held by the cores of all MPO modules (their
        biases, which squeezing does not change, are not counted)."""
        return sum(sum(c.numel() for c in m.cores) for m in self.modules.values())

    # ------------------------------------------------------------------ the loop
    def _cut(self, name: str, bond: int, new_dim: int) -> None:
        m = self.modules[name]
        dims = list(m.bond_dims)
        dims[bond] = new_dim
        m.retruncate(max_bond=dims, gauge=self.gauge)

    @torch.no_grad()
    def _transaction(self, names: list[str]) -> Swap:
        """A :class:`~tnlm.integration.surgery.Swap` of the model that undoes everything an
        iteration cutting ``names`` may change: core shapes, values, ``requires_grad``
        flags, train/eval modes, and the cached spectra, norms and error estimates of
        ``names``."""
        swap = Swap(self.model, modes=True, state=True)
        cores = {k: tuple(c.detach().clone() for c in m.cores) for k, m in self.modules.items()}
        saved = {name: (copy.deepcopy(self._spectra[name]), self._norm_sq[name],
                        self._err_sq[name], self.modules[name].truncation_error)
                 for name in names}

        def undo() -> None:  # core shapes first: the state dict is loaded after it
            for k, m in self.modules.items():
                if m.core_shapes != tuple(tuple(c.shape) for c in cores[k]):
                    m.set_cores(list(cores[k]))
            for name, (spectra, norm_sq, err_sq, err) in saved.items():
                self._spectra[name], self._norm_sq[name] = spectra, norm_sq
                self._err_sq[name] = err_sq
                self.modules[name].truncation_error = err

        swap.on_undo(undo)
        return swap

    def run(self) -> SqueezeResult:
        """Squeeze until a stopping rule fires; the model ends in its last accepted state.

        Raises:
            ValueError: ``evaluate`` returned a non-finite (NaN or infinite) starting loss:
                no cut is made (every later loss change would be NaN or infinite).
        """
        res = SqueezeResult(start_params=self.mpo_params())
        p = float(self.evaluate(self.model))
        if not math.isfinite(p):
            raise ValueError(f"evaluate returned a non-finite starting loss ({p}); it must "
                             f"return a finite loss for the model before squeezing")
        res.start_loss = res.final_loss = p
        for it in range(1, self.max_iters + 1):
            if self.target_params is not None and self.mpo_params() <= self.target_params:
                res.reason = f"target of {self.target_params:,} core parameters reached"
                break
            # the greedy's next cuts, each chosen after the ones before it (as schedule()):
            # the same bond may be cut again in one iteration
            chosen = self.schedule(self.cuts_per_iter)
            if not chosen:
                res.reason = "no bond left to cut"
                break
            # a cut, the recovery, the evaluation or the log fails: the model goes back
            # to the last accepted state and the exception propagates
            with self._transaction(list(dict.fromkeys(name for name, *_ in chosen))) as swap:
                cuts = []
                for name, bond, new_dim, added in chosen:
                    old_dim = self.modules[name].bond_dims[bond]
                    self._cut(name, bond, new_dim)
                    self._err_sq[name] += added
                    self.modules[name].truncation_error = float(np.sqrt(self._err_sq[name]))
                    if self.refresh_spectra:
                        self._load_spectra(name, self.modules[name])
                    else:
                        self._spectra[name][bond] = self._spectra[name][bond][:new_dim]
                    cuts.append((name, bond, old_dim, new_dim, added))
                if self.finetune is not None:
                    self.finetune(self.model)
                loss = float(self.evaluate(self.model))
                change = abs(p - loss)
                ok = change <= self.delta
                params = self.mpo_params()
                for name, bond, old_dim, new_dim, added in cuts:
                    step = SqueezeStep(it, name, bond, old_dim, new_dim, added,
                                       float(np.sqrt(self._err_sq[name])), loss, change, params,
                                       ok)
                    res.history.append(step)
                    if self.log is not None:
                        self.log(step)
            if not ok:
                swap.undo()
                res.reason = f"|p - p~| = {change:.4f} > delta = {self.delta}"
                break
            res.final_loss = loss
        else:  # the last iteration may have reached the target: that is why it stopped
            if self.target_params is not None and self.mpo_params() <= self.target_params:
                res.reason = f"target of {self.target_params:,} core parameters reached"
            else:
                res.reason = f"iteration limit {self.max_iters}"
        res.final_params = self.mpo_params()
        return res
