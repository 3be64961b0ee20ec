"""What :func:`~tnlm.compress.layerwise.loop.compress_layerwise` is asked to do
(:class:`LayerwiseConfig`, with its choices :data:`METHODS`, :data:`ALLOCATIONS`,
:data:`OUTPUT_ERRORS`) and what it gives back (:class:`LayerwiseResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tnlm.core.budget import check_fraction
from tnlm.core.validation import check_bool_fields, check_seed
from tnlm.integration.config import MPOConfig

__all__ = ["METHODS", "ALLOCATIONS", "OUTPUT_ERRORS", "LayerwiseConfig", "LayerwiseResult"]

#: ``tnlm``: error-feedback whitening + block fitting; ``whitened``: SVD-LLM-style whitened
#: low rank on the dense model's activations; ``plain``: the weight's own truncated SVD
METHODS = ("tnlm", "whitened", "plain")

#: ``uniform``: every target keeps ``budget`` of its parameters; ``spectrum``: ranks from
#: the dense model's whitened spectra minimising the summed relative output errors of the
#: targets (:func:`tnlm.compress.allocate.spectrum_ranks`); ``residual``: the same with each
#: target's error relative to its block's output (the residual stream) instead of its own;
#: ``sensitivity``: the same with each target's error weighted by what it does
#: to the last block's output when truncated alone (:class:`Sensitivity`)
ALLOCATIONS = ("uniform", "spectrum", "residual", "sensitivity")

#: how a block's output error is measured (:func:`block_error`): what block fitting
#: minimises, what the ``"residual"`` allocation weighs each target's error against and
#: what the result reports
OUTPUT_ERRORS = ("total", "position")


@dataclass
class LayerwiseConfig:
    """What :func:`compress_layerwise` does.

    Attributes:
        target_modules: MPOConfig suffix patterns of the linears to compress.
        budget: fraction of the targeted linears' parameters kept, in (0, 1]. With
            ``allocation="uniform"`` each layer gets the largest rank r with
            ``r (I + J) <= budget · I J`` (``r (I + J - r)`` with ``pivoted``), at least
            1; where rank 1 of a small layer keeps more than its share, the other layers
            give up the difference (:func:`tnlm.compress.allocate.uniform_ranks`); the
            other allocations share the budget over the targets unevenly. Every total
            stays within the budget. Budget 1 keeps every layer dense
            (error 0), as does a rank reaching ``min(I, J)``.
        method: one of :data:`METHODS`.
        fit_steps: optimizer steps of block fitting per block (method ``tnlm`` only).
        fit_lr: peak learning rate of block fitting (AdamW, warm-up, cosine decay).
        output_error: one of :data:`OUTPUT_ERRORS` (:func:`block_error`): the block
            output error fitting minimises, the ``"residual"`` allocation weighs against
            (:func:`dense_spectra`) and :attr:`LayerwiseResult.block_errors` reports:
            ``"total"`` (default), the error of all positions at once, which massive
            activations dominate; ``"position"``, each token's relative error averaged.
            On SmolLM2 at 60 % "position" fitting changed nothing (3.51x vs 3.48x the
            dense perplexity) and the "position" allocation was far worse (5.52x): it
            takes budget from the early blocks, whose errors reach every later block
            (docs/results.md).
        batch_size: calibration sequences per block forward.
        ridge: relative Cholesky regularisation of the Grams.
        gauge: gauge of the resulting cores.
        allocation: one of :data:`ALLOCATIONS`: how ``budget`` is shared among the
            targets (the non-uniform ones add a pass of the dense model over the
            calibration sequences to measure the spectra first; ``"sensitivity"`` also
            about ``(L + 1) / 2`` passes over its probe per target kind).
        cross: method ``tnlm`` only: truncate against the teacher's outputs through the
            cross Gram ``X_sᵀ X_t`` (error feedback in the statistics); default: the
            student's own inputs ``X_s`` only, the error left to block fitting (measured
            better on SmolLM2: the cross-Gram regression on a few thousand tokens
            overfits, docs/results.md).
        seed: seeds block fitting's batch order (block i uses ``seed + i``).
        pivoted: count (and allocate) each truncated layer's parameters with its bond's
            gauge fixed, ``r (I + J - r)`` instead of ``r (I + J)``
            (:mod:`tnlm.core.pivot`): at the same budget every rank is larger. The layers
            stay 2-site MPOs here (fitting and healing train them as such);
            :func:`tnlm.bridge.pivoted.pivot_layers` turns them into the gauge-fixed
            :class:`~tnlm.bridge.pivoted.PivotedLinear` that stores that count.
        checkpoint_dir: a directory for a resumable checkpoint after every block
            (:func:`write_checkpoint`; ``compress_layerwise(..., resume=True)``
            continues from it); None: no checkpoint. Not part of the settings a resume
            must match.
        sensitivity_sequences: allocation ``"sensitivity"``: how many of the first
            calibration sequences the end-to-end errors are measured on
            (:class:`Sensitivity`; its time grows with them).
        allocation_sequences: the allocations other than ``"uniform"``: how many of the
            first calibration sequences the dense pass measures the spectra on (None: all
            of them). Its time grows with them; the truncations themselves still use every
            calibration sequence. A multiple of ``batch_size``.

    Raises:
        TypeError: ``budget`` is not a real number (a bool included).
        ValueError: ``budget`` not in (0, 1], ``fit_lr`` not a finite number > 0, an
            unknown ``method``, ``allocation`` or ``output_error``,
            ``fit_steps``/``batch_size``/``sensitivity_sequences`` not an int
            (>= 0 / >= 1 / >= 1), ``allocation_sequences`` neither None nor a positive
            multiple of ``batch_size``, malformed ``target_modules``, ``pivoted`` or
            ``cross`` not a bool, ``cross`` with a method other than ``"tnlm"``,
            ``ridge`` not a finite number >= 0, ``seed`` not an int in [0, 2**63 - 1].
    """

    target_modules: list[str]
    budget: float = 0.6
    method: str = "tnlm"
    fit_steps: int = 64
    fit_lr: float = 1e-3
    batch_size: int = 8
    ridge: float = 1e-6
    gauge: str = "symmetric"
    cross: bool = False
    seed: int = 0
    allocation: str = "uniform"
    checkpoint_dir: str | None = None
    output_error: str = "total"
    pivoted: bool = False
    sensitivity_sequences: int = 8
    allocation_sequences: int | None = None

    def __post_init__(self) -> None:
        self.budget = check_fraction("budget", self.budget)  # a numpy float: a float (JSON)
        check_bool_fields(self, "pivoted", "cross")
        r = self.ridge
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (
                math.isfinite(r) and r >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {r!r}")
        self.seed = check_seed(self.seed)
        if self.output_error not in OUTPUT_ERRORS:
            raise ValueError(f"output_error must be one of {OUTPUT_ERRORS}, got "
                             f"{self.output_error!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.cross and self.method != "tnlm":
            raise ValueError(f"cross applies to method 'tnlm' only, got method "
                             f"{self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, "
                             f"got {self.allocation!r}")
        for name in ("fit_steps", "batch_size", "sensitivity_sequences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "fit_steps"
                                                                       else 1):
                raise ValueError(f"{name} must be an int >= "
                                 f"{0 if name == 'fit_steps' else 1}, got {v!r}")
        a = self.allocation_sequences
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1
                              or a % self.batch_size):
            raise ValueError(f"allocation_sequences must be None or a positive multiple of "
                             f"batch_size ({self.batch_size}): whole batches, got {a!r}")
        lr = self.fit_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
                math.isfinite(lr) and lr > 0):
            raise ValueError(f"fit_lr must be a finite number > 0, got {lr!r}")
        MPOConfig(target_modules=self.target_modules)  # validates the patterns' form


@dataclass
class LayerwiseResult:
    ranks: dict[str, int | None]        # None: kept dense
    #: per layer, its relative calibration output error ``||X (W - W')|| / ||X W||``, not
    #: squared (plain too: on the teacher's inputs, not W's)
    errors: dict[str, float]
    #: per block, :func:`block_error` of its output before / after fitting: relative and
    #: *squared* (``||y - t||² / ||t||²``, or per position with ``output_error``
    #: ``"position"``); the encoder's ``CompressionResult.block_errors`` are not squared
    block_errors: list[tuple[float, float]]
    params_before: int
    params_after: int
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    #: the calibration sequences the ``"sensitivity"`` allocation measured its ranks on
    #: (read from the checkpoint on a resume); None for another allocation, a budget of
    #: 1, or a checkpoint written before it was recorded
    sensitivity_sequences: int | None = None

    @property
    def ratio(self) -> float:
        """Kept fraction of the targeted parameters (dense-kept layers count whole)."""
        return self.params_after / self.params_before if self.params_before else 0.0
