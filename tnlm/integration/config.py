"""``MPOConfig``: which modules of a model become MPOs, and how.

Target patterns follow PEFT: a list of strings matches a module whose name equals
a pattern or ends with ``"." + pattern``; a single string is a regular expression
that must match the whole name. Every pattern must match at least one
supported module (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``),
otherwise :func:`~tnlm.integration.model.get_mpo_model` raises: a misspelled
target is never silently ignored.

Overrides use the same matching (suffix patterns; regular expressions when
``target_modules`` is a regex) and every override pattern must match at least one
target. When several override patterns match one module, **the most specific
wins**: they are applied from the shortest pattern to the longest, so
``"attention.output.dense"`` wins over ``"dense"`` whatever the order of the dict.
Two matching patterns of the same length that set one option to different values
are an error (neither is more specific).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from tnlm.bridge.finetune import check_train
from tnlm.core.policy import TruncationPolicy
from tnlm.core.spec import GAUGES, DecompositionSpec
from tnlm.core.validation import check_n_sites, check_positive_int, check_shape

__all__ = ["MPOConfig", "TRAIN_MODES"]

#: the sets of :mod:`tnlm.bridge.finetune`'s table an MPO model trains (its names, its sets)
TRAIN_MODES = ("lightweight", "auxiliary", "all")
_POLICY_KEYS = ("max_bond", "cutoff", "max_error", "in_shape", "out_shape", "n_sites", "gauge",
                "mode", "pad")


@dataclass
class MPOConfig:
    """Configuration of an MPO model.

    Attributes:
        target_modules: module name patterns to decompose (see the module docstring).
        n_sites: number of sites when no shape is given, 1 to 32 (``MAX_SITES``).
        in_shapes / out_shapes: site shapes by dimension, e.g. ``{384: (2, 4, 4, 4, 3)}``;
            a dimension not listed is factorized by :func:`tnlm.factorize`. Keys are ints
            >= 1 (or strings of digits, as :meth:`to_dict` writes them; a bool or a float
            is refused); :func:`~tnlm.integration.get_mpo_model` refuses a key that is no
            target's input (``in_shapes``) or output (``out_shapes``) dimension.
        max_bond / cutoff / max_error: truncation policies for every target
            (see :mod:`tnlm.core.policy`; ``cutoff`` is relative to ||W||_F).
        overrides: per-pattern settings that win over the above, e.g.
            ``{"intermediate.dense": {"max_bond": 32}}``; keys among ``max_bond``,
            ``cutoff``, ``max_error``, ``in_shape``, ``out_shape``, ``n_sites``,
            ``gauge``, ``mode``, ``pad``. The longest (most specific) matching pattern
            wins; each pattern must match a target.
        modules_to_save: patterns of modules that must train and be saved in a task
            checkpoint whatever ``train`` says (a single string is one pattern); each must
            match a module. Every parameter of such a module trains, except the central
            tensors of MPO layers inside it (unless ``train="all"``). ``None`` (the
            default): the task head of a task architecture, as PEFT does for its task
            types (:func:`~tnlm.integration.peft.task_heads`: e.g. ``classifier`` of
            ``BertForSequenceClassification``, ``score`` of
            ``GPT2ForSequenceClassification``, ``qa_outputs`` of ``*ForQuestionAnswering``);
            the head is newly initialised when such a model is loaded from a base
            checkpoint, so it must train and be saved. A list replaces that choice
            (``["classifier", "pooler"]``); ``[]`` opts out (only the auxiliary tensors
            train in ``"lightweight"``).
        train: what trains, a name of :data:`TRAIN_MODES` (the sets of those names in
            :mod:`tnlm.bridge.finetune`; see
            :meth:`~tnlm.integration.model.MPOModel.setup_training`): ``"lightweight"``
            (the default, what a PEFT user expects: only the auxiliary tensors of the MPO
            layers and ``modules_to_save``, by default the task head; a task checkpoint
            then holds only those), ``"auxiliary"`` (the paper's setting: every parameter
            except the central tensors, i.e. also embeddings, LayerNorms, biases and
            heads) or ``"all"`` (every parameter). Healing's sets (``"cores"``, ...) are
            not accepted here.
        gauge: the gauge the cores start from: ``"symmetric"`` (the paper's; the default,
            chosen by the SST-2 experiment in docs/results.md), ``"central"``
            (orthogonality center on the central tensor) or ``"left"``.
        mode: forward mode of the MPO modules (``"auto"``, ``"contract"``, ``"dense"``).
        pad: zero-pad dimensions without a balanced factorization (e.g. a vocabulary).

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range, naming it (an
            ``in_shapes`` / ``out_shapes`` key that is a bool or a float among them).
    """

    target_modules: list[str] | str
    n_sites: int = 5
    in_shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    out_shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    max_bond: int | list[int] | None = None
    cutoff: float | list[float] | None = None
    max_error: float | list[float] | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    train: str = "lightweight"
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
        check_train(self.train, TRAIN_MODES)
        if self.gauge not in GAUGES:
            raise ValueError(f"gauge must be one of {GAUGES}, got {self.gauge!r}")
        if self.mode not in ("auto", "contract", "dense"):
            raise ValueError(f"mode must be 'auto', 'contract' or 'dense', got {self.mode!r}")
        self.n_sites = check_n_sites(self.n_sites)
        TruncationPolicy.check(self.max_bond, self.cutoff, self.max_error)
        if not isinstance(self.pad, bool):
            raise TypeError(f"pad must be a bool, got {self.pad!r}")
        if not isinstance(self.overrides, dict):
            raise TypeError(f"overrides must be a dict of pattern -> options, got "
                            f"{type(self.overrides).__name__}")
        for pattern, opts in self.overrides.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"overrides keys must be non-empty name patterns, got "
                                 f"{pattern!r}")
            if not isinstance(opts, dict):
                raise TypeError(f"overrides[{pattern!r}] must be a dict of options, got "
                                f"{type(opts).__name__}")
            bad = set(opts) - set(_POLICY_KEYS)
            if bad:
                hints = {b: difflib.get_close_matches(b, _POLICY_KEYS, n=1) for b in bad}
                hint = "; ".join(f"{b!r}: did you mean {h[0]!r}?" for b, h in
                                 sorted(hints.items()) if h)
                raise ValueError(f"overrides[{pattern!r}] has unknown keys {sorted(bad)}; "
                                 f"allowed: {_POLICY_KEYS}{'; ' + hint if hint else ''}")
            self._check_options(f"overrides[{pattern!r}]", opts)
        self.in_shapes = self._shapes("in_shapes", self.in_shapes)
        self.out_shapes = self._shapes("out_shapes", self.out_shapes)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        elif self.modules_to_save is not None and (
                not isinstance(self.modules_to_save, (list, tuple)) or not all(
                    isinstance(p, str) and p for p in self.modules_to_save)):
            raise ValueError("modules_to_save must be a module name pattern, a list of them or "
                             f"None (the task head), got {self.modules_to_save!r}")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @staticmethod
    def _shapes(name: str, shapes: Any) -> dict[int, tuple[int, ...]]:
        if not isinstance(shapes, dict):
            raise TypeError(f"{name} must be a dict of dimension -> site shape, got "
                            f"{type(shapes).__name__}")
        out = {}
        for k, v in shapes.items():
            # a JSON config's keys are strings of digits (to_dict); True or 32.9 must not
            # become 1 or 32
            dim = int(k) if isinstance(k, str) and k.isdecimal() else check_positive_int(
                k, f"{name} key (a dimension)")
            out[dim] = check_shape(v, f"{name}[{dim}]")
        return out

    @staticmethod
    def _check_options(where: str, opts: dict[str, Any]) -> None:
        """Types and ranges of one override's options (before any work)."""
        try:
            if "n_sites" in opts:
                check_n_sites(opts["n_sites"])
            for key in ("in_shape", "out_shape"):
                if opts.get(key) is not None:
                    check_shape(opts[key], key)
            TruncationPolicy.check(opts.get("max_bond"), opts.get("cutoff"),
                                   opts.get("max_error"))
            if "gauge" in opts and opts["gauge"] not in GAUGES:
                raise ValueError(f"gauge must be one of {GAUGES}, got {opts['gauge']!r}")
            if "mode" in opts and opts["mode"] not in ("auto", "contract", "dense"):
                raise ValueError(f"mode must be 'auto', 'contract' or 'dense', got "
                                 f"{opts['mode']!r}")
            if "pad" in opts and not isinstance(opts["pad"], bool):
                raise TypeError(f"pad must be a bool, got {opts['pad']!r}")
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from err

    #: attributes peft reads from its method configs (get_peft_model starts with these)
    _PEFT_ATTRIBUTES = ("base_model_name_or_path", "peft_type", "task_type", "revision",
                        "is_prompt_learning", "inference_mode")

    def __getattr__(self, name: str) -> Any:
        if name in MPOConfig._PEFT_ATTRIBUTES:
            raise AttributeError(
                f"MPOConfig is not a peft method config (no {name!r}): peft registers methods "
                "only through its own PeftType enum, so peft.get_peft_model cannot build an MPO "
                "model; use tnlm.get_mpo_model(model, config), which returns a PEFT-like "
                "MPOModel (LoRA can then go on top with tnlm.integration."
                "lora_config_for_mpo)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ matching
    @staticmethod
    def pattern_matches(pattern: str, name: str) -> bool:
        return name == pattern or name.endswith("." + pattern)

    def is_target(self, name: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(self.pattern_matches(p, name) for p in self.target_modules)

    def override_matches(self, pattern: str, name: str) -> bool:
        """Whether override ``pattern`` applies to module ``name`` (a suffix pattern, or a
        regex matching the whole name when ``target_modules`` is a regex)."""
        if self.pattern_matches(pattern, name):
            return True
        if isinstance(self.target_modules, str):
            try:
                return re.fullmatch(pattern, name) is not None
            except re.error:
                return False
        return False

    def overrides_for(self, name: str) -> list[str]:
        """The override patterns that apply to ``name``, least specific first (the order
        they are applied in: the longest pattern wins)."""
        return sorted((p for p in self.overrides if self.override_matches(p, name)),
                      key=lambda p: (len(p), p))

    def options_for(self, name: str, in_dim: int, out_dim: int) -> dict[str, Any]:
        """Decomposition keyword arguments for module ``name`` of shape (in_dim, out_dim).

        Matching overrides are applied from the least to the most specific (longest)
        pattern; two matching patterns of equal length that set one option to different
        values raise ``ValueError``.
        """
        opts: dict[str, Any] = dict(
            n_sites=self.n_sites, in_shape=self.in_shapes.get(in_dim),
            out_shape=self.out_shapes.get(out_dim), max_bond=self.max_bond,
            cutoff=self.cutoff, max_error=self.max_error, gauge=self.gauge, mode=self.mode,
            pad=self.pad)
        matching = self.overrides_for(name)
        for i, a in enumerate(matching):  # every pair of equally specific patterns
            for b in matching[i + 1:]:
                if len(a) != len(b):
                    break  # sorted by length: no later pattern is as specific as a
                clash = sorted(k for k in set(self.overrides[a]) & set(self.overrides[b])
                               if self.overrides[a][k] != self.overrides[b][k])
                if clash:
                    raise ValueError(f"overrides {a!r} and {b!r} both match module {name!r}, "
                                     f"are equally specific and disagree on {clash}; make "
                                     "one pattern more specific")
        for pattern in matching:
            opts.update(self.overrides[pattern])
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
