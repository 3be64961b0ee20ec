"""``MPOConfig``: which modules of a model become MPOs, and how.

Target patterns follow PEFT: a list of strings matches a module whose name equals
a pattern or ends with ``"." + pattern``; a single string is a regular expression
that must match the whole name. Every pattern must match at least one
supported module (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``),
otherwise :func:`~tnlm.integration.model.get_mpo_model` raises: a misspelled
target is never silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from tnlm.core.spec import GAUGES, DecompositionSpec

__all__ = ["MPOConfig", "TRAIN_MODES"]

TRAIN_MODES = ("auxiliary", "all")
_POLICY_KEYS = ("max_bond", "cutoff", "max_error", "in_shape", "out_shape", "n_sites", "gauge",
                "mode", "pad")


@dataclass
class MPOConfig:
    """Configuration of an MPO model.

    Attributes:
        target_modules: module name patterns to decompose (see the module docstring).
        n_sites: number of sites when no shape is given.
        in_shapes / out_shapes: site shapes by dimension, e.g. ``{384: (2, 4, 4, 4, 3)}``;
            a dimension not listed is factorized by :func:`tnlm.factorize`.
        max_bond / cutoff / max_error: truncation policies for every target
            (see :mod:`tnlm.core.policy`; ``cutoff`` is relative to ||W||_F).
        overrides: per-pattern settings that win over the above, e.g.
            ``{"intermediate.dense": {"max_bond": 32}}``; keys among ``max_bond``,
            ``cutoff``, ``max_error``, ``in_shape``, ``out_shape``, ``n_sites``,
            ``gauge``, ``mode``, ``pad``.
        modules_to_save: patterns of modules that are not decomposed but must train and
            be saved (e.g. a task head ``"classifier"``); each must match a module.
        train: ``"auxiliary"`` (the paper's lightweight fine-tuning: everything trains
            except the central tensors) or ``"all"``.
        gauge: the gauge the cores start from: ``"symmetric"`` (the paper's; the default,
            chosen by the SST-2 experiment in docs/results.md), ``"central"``
            (orthogonality center on the central tensor) or ``"left"``.
        mode: forward mode of the MPO modules (``"auto"``, ``"contract"``, ``"dense"``).
        pad: zero-pad dimensions without a balanced factorization (e.g. a vocabulary).
    """

    target_modules: list[str] | str
    n_sites: int = 5
    in_shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    out_shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    max_bond: int | list[int] | None = None
    cutoff: float | list[float] | None = None
    max_error: float | list[float] | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    train: str = "auxiliary"
    gauge: str = "symmetric"
    mode: str = "auto"
    pad: bool = True

    def __post_init__(self) -> None:
        t = self.target_modules
        if isinstance(t, str):
            try:
                re.compile(t)
            except re.error as err:
                raise ValueError(f"target_modules is not a valid regex: {err}") from err
        elif not isinstance(t, (list, tuple)) or not t or not all(isinstance(p, str) for p in t):
            raise ValueError("target_modules must be a non-empty list of name patterns or a regex "
                             f"string, got {t!r}")
        else:
            self.target_modules = list(t)
        if self.train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {self.train!r}")
        if self.gauge not in GAUGES:
            raise ValueError(f"gauge must be one of {GAUGES}, got {self.gauge!r}")
        if self.mode not in ("auto", "contract", "dense"):
            raise ValueError(f"mode must be 'auto', 'contract' or 'dense', got {self.mode!r}")
        if isinstance(self.n_sites, bool) or not isinstance(self.n_sites, int) or self.n_sites < 1:
            raise ValueError(f"n_sites must be an int >= 1, got {self.n_sites!r}")
        for pattern, opts in self.overrides.items():
            bad = set(opts) - set(_POLICY_KEYS)
            if bad:
                raise ValueError(f"overrides[{pattern!r}] has unknown keys {sorted(bad)}; "
                                 f"allowed: {_POLICY_KEYS}")
        self.in_shapes = {int(k): tuple(v) for k, v in self.in_shapes.items()}
        self.out_shapes = {int(k): tuple(v) for k, v in self.out_shapes.items()}
        self.modules_to_save = list(self.modules_to_save)

    # ------------------------------------------------------------------ matching
    @staticmethod
    def pattern_matches(pattern: str, name: str) -> bool:
        return name == pattern or name.endswith("." + pattern)

    def is_target(self, name: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(self.pattern_matches(p, name) for p in self.target_modules)

    def options_for(self, name: str, in_dim: int, out_dim: int) -> dict[str, Any]:
        """Decomposition keyword arguments for module ``name`` of shape (in_dim, out_dim)."""
        opts: dict[str, Any] = dict(
            n_sites=self.n_sites, in_shape=self.in_shapes.get(in_dim),
            out_shape=self.out_shapes.get(out_dim), max_bond=self.max_bond,
            cutoff=self.cutoff, max_error=self.max_error, gauge=self.gauge, mode=self.mode,
            pad=self.pad)
        for pattern, extra in self.overrides.items():
            if self.pattern_matches(pattern, name) or (
                    isinstance(self.target_modules, str) and re.fullmatch(pattern, name)):
                opts.update(extra)
        return opts

    def spec_for(self, name: str, in_dim: int, out_dim: int) -> tuple[DecompositionSpec, str]:
        """The :class:`~tnlm.core.spec.DecompositionSpec` and forward mode of module
        ``name`` of shape (in_dim, out_dim)."""
        opts = self.options_for(name, in_dim, out_dim)
        mode = opts.pop("mode")
        return DecompositionSpec(**opts), mode

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["in_shapes"] = {str(k): list(v) for k, v in self.in_shapes.items()}
        d["out_shapes"] = {str(k): list(v) for k, v in self.out_shapes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MPOConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MPOConfig fields {sorted(unknown)}")
        return cls(**d)
