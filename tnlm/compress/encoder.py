"""The encoder job: what ``tnlm compress`` does to an encoder (MiniLM, BERT, ...).

:func:`compress_encoder` is what ``tnlm compress`` runs on an encoder, and what Python
users and the experiments call; every default of the job lives in :class:`EncoderRecipe`::

    text     = the user's sentences, or the default mix (generated sentences,
               docstrings and shipped natural prose, tnlm.compress.text.default_text),
               distinct
    split    = min(256, n // 4) held out, ``calibration`` (512) to calibrate, the rest
               heals with them (split_text)
    student  = compress_model (tnlm.compress.pipeline): sensitivity allocation of the
               budget, data-aware truncation, 100 reconstruction steps per block, then
               2500 healing steps at lr 5e-4 that train everything but the embeddings
    measures = the held-out embedding cosine to the original (mean, min), the same on
               256 natural-prose sentences never in any text the job trains on
               (tnlm.compress.text.lm_held_out) and, given a SICK file, both models'
               relatedness Spearman (measure)

:class:`~tnlm.compress.pipeline.CompressionConfig` keeps the mechanism's own cheaper
defaults (uniform allocation, no reconstruction, :class:`~tnlm.compress.distill.HealConfig`'s
300 steps); :meth:`EncoderRecipe.compression_config` is the job's. Causal LMs have their
own job: :mod:`tnlm.compress.decoder.job`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnlm.compress.distill import HealConfig
from tnlm.compress.pipeline import (
    CompressionConfig,
    CompressionResult,
    compress_model,
    target_shapes,
)
from tnlm.compress.quality import (
    EMBED_MAX_LENGTH,
    embed,
    embedding_cosine,
    read_sick,
    sick_spearman,
)
from tnlm.compress.text import (
    DEFAULT_TEXT_SOURCE,
    check_texts,
    compression_sizes,
    default_text,
    lm_held_out,
    read_sentences,
    split_sentences,
)
from tnlm.core.validation import check_bool_fields
from tnlm.integration import MPOModel
from tnlm.integration.architectures import default_targets
from tnlm.integration.surgery import Swap

__all__ = ["DEFAULT_SICK", "EncoderRecipe", "EncoderResult", "TextSplit", "compress_encoder",
           "encoder_text", "measure", "split_text"]

#: SICK relatedness pairs the CLI measures on when the file is there (the shared data
#: folder beside the working directory)
DEFAULT_SICK = Path("../shared/data/sick/trial.tsv")


def _check_calibration(calibration: Any) -> None:
    """``ValueError`` unless ``calibration`` (a number of sentences) is an int >= 1."""
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise ValueError(f"calibration must be an int >= 1 (sentences), got {calibration!r}")


@dataclass
class EncoderRecipe:
    """Defaults of the encoder job (``tnlm compress`` on an encoder; its flags set them).

    Attributes:
        budget: fraction of the targeted linears' parameters kept, model-wide, in (0, 1].
        allocation: how the budget is spread over the layers
            (:data:`tnlm.compress.pipeline.ALLOCATIONS`).
        target_modules: patterns; ``None``: the architecture's
            (:func:`tnlm.integration.architectures.default_targets`).
        calibration: calibration sentences (at most; :func:`split_text`).
        reconstruct_steps: block-by-block reconstruction steps per block (0: none).
        heal_steps: distillation steps after truncation (0: no healing).
        lr: healing learning rate.
        heal_train: what healing trains (:data:`tnlm.compress.distill.TRAIN_CHOICES`;
            the sets of :mod:`tnlm.bridge.finetune`): ``"cores+linears"`` (the default,
            formerly spelled ``"all"``, which is now refused here with a message naming
            it) trains the MPO cores and biases, the norms and the linears kept dense.
        teacher_bf16: run the teacher under bfloat16 during healing; ``None``: when the CPU
            has bf16 instructions (:func:`tnlm.compress.distill.fast_bf16`).
        whiten: data-aware truncation; ``False``: plain SVD of the weights (the baseline).
        seed: the text split, the default text, block reconstruction's batches and healing's draws.
        pivoted: fix each truncated layer's bond gauge (``CompressionConfig.pivoted``):
            ``r (I + J - r)`` numbers a rank-r layer, a larger rank at the same budget;
            the saved layers are :class:`~tnlm.bridge.pivoted.PivotedLinear`.

    The healing numbers, the calibration count and the target patterns are checked when
    the recipe is made; the budget and allocation when the job builds its
    :class:`~tnlm.compress.pipeline.CompressionConfig` (before any work).
    """

    budget: float = 0.5
    allocation: str = "sensitivity"
    target_modules: list[str] | str | None = None
    calibration: int = 512
    reconstruct_steps: int = 100
    heal_steps: int = 2500
    lr: float = 5e-4
    heal_train: str = "cores+linears"
    teacher_bf16: bool | None = None
    whiten: bool = True
    seed: int = 0
    pivoted: bool = False

    def __post_init__(self) -> None:
        _check_calibration(self.calibration)
        check_bool_fields(self, "pivoted", "whiten")
        self.heal_config()
        if self.target_modules is not None:
            self.compression_config()

    def heal_config(self, **overrides: Any) -> HealConfig:
        """The job's :class:`~tnlm.compress.distill.HealConfig`; ``overrides`` set other
        fields (loss weights, ``checkpoint_dir``, ...)."""
        settings = dict(steps=self.heal_steps, lr=self.lr, seed=self.seed, train=self.heal_train,
                        teacher_bf16=self.teacher_bf16)
        return HealConfig(**{**settings, **overrides})

    def compression_config(self, model: nn.Module | None = None,
                           heal: HealConfig | None = None) -> CompressionConfig:
        """The job's :class:`~tnlm.compress.pipeline.CompressionConfig` for ``model`` (whose
        architecture gives the targets when ``target_modules`` is ``None``); ``heal``:
        healing settings instead of :meth:`heal_config`'s."""
        targets = self.target_modules
        if targets is None:
            if model is None:
                raise ValueError("target_modules is None: pass the model, whose architecture "
                                 "names the targets")
            targets = default_targets(model)
        return CompressionConfig(targets, budget=self.budget, allocation=self.allocation,
                                 reconstruct_steps=self.reconstruct_steps, whiten=self.whiten,
                                 pivoted=self.pivoted, seed=self.seed,
                                 heal=self.heal_config() if heal is None else heal)


@dataclass
class TextSplit:
    """The job's text split: held out (measured on, never trained on), calibration, the rest
    (healed on, with the calibration sentences)."""

    held_out: list[str]
    calibration: list[str]
    rest: list[str]

    @property
    def heal_text(self) -> list[str]:
        """What healing (and block reconstruction) trains on: calibration, then the rest."""
        return self.calibration + self.rest

    @property
    def n_sentences(self) -> int:
        return len(self.held_out) + len(self.calibration) + len(self.rest)


def encoder_text(path: str | os.PathLike | None = None, *, column: int | None = None,
                 with_default_text: bool = False, seed: int = 0) -> tuple[list[str], str]:
    """The job's sentences, distinct, in order, and where they come from: the lines (or the
    tab-separated ``column``) of ``path``, followed by the default text if
    ``with_default_text``; without ``path``, the default text
    (:func:`tnlm.compress.text.default_text`).

    Raises:
        OSError, ValueError: ``path`` cannot be read as sentences
            (:func:`tnlm.compress.text.read_sentences`; the message says which).
    """
    if path is None:
        return list(dict.fromkeys(default_text(seed=seed))), DEFAULT_TEXT_SOURCE
    text = read_sentences(path, column=column)
    source = str(path)
    if with_default_text:
        text = text + default_text(seed=seed)
        source = f"{path} and {DEFAULT_TEXT_SOURCE}"
    return list(dict.fromkeys(text)), source


def split_text(text: Sequence[str], calibration: int = EncoderRecipe.calibration,
               seed: int = 0) -> TextSplit:
    """The job's split of ``text`` (distinct sentences, shuffled by ``seed``):
    :func:`tnlm.compress.text.compression_sizes` held out and calibration sentences, the
    rest for healing.

    Raises:
        TypeError: ``text`` is one string (its characters would be the sentences).
        ValueError: ``calibration`` is not an int >= 1; fewer than 4 distinct sentences
            (nothing would be held out or calibrate).
    """
    _check_calibration(calibration)
    text = list(dict.fromkeys(check_texts(text, "text")))
    n_eval, n_cal = compression_sizes(len(text), calibration)
    if n_eval < 1 or n_cal < 1:
        raise ValueError(f"the text has {len(text)} distinct sentences: at least 4 are needed "
                         f"(a quarter is held out to measure the result)")
    held_out, cal, rest = split_sentences(text, [n_eval, n_cal, -1], seed=seed)
    return TextSplit(held_out, cal, rest)


def measure(student: nn.Module, teacher: nn.Module, tokenizer: Any, held_out: Sequence[str],
            *, sick: str | os.PathLike | None = None, dev: Sequence[str] | None = None,
            sick_train: str | os.PathLike | None = None,
            natural: Sequence[str] | None = None) -> dict[str, float]:
    """The job's measures: the held-out embedding cosine of the student to the teacher
    (``cosine_mean``, ``cosine_min``); with ``natural`` (natural prose never trained on;
    the job passes :func:`tnlm.compress.text.lm_held_out`), its cosine
    (``cosine_natural_mean``, ``cosine_natural_min``, ``natural_held_out``: how many); with
    ``dev`` (other natural text), its mean cosine (``cosine_dev_mean``); with ``sick``, both
    models' SICK relatedness Spearman (``sick_spearman_original``, ``sick_spearman``); with
    ``sick_train``, the same on that file (``sick_train_spearman_original``,
    ``sick_train_spearman``).

    Raises:
        TypeError: ``held_out``, ``dev`` or ``natural`` is one string (its characters would
            be the sentences) or holds items that are not strings.
        ValueError: ``held_out`` is empty; ``sick`` or ``sick_train`` is not a SICK file
            (:func:`tnlm.compress.quality.read_sick`).
    """
    held_out = check_texts(held_out, "held_out")
    dev = None if dev is None else check_texts(dev, "dev")
    natural = None if natural is None else check_texts(natural, "natural")
    cos = embedding_cosine(student, teacher, tokenizer, held_out)
    out = dict(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
    if natural:
        nat = embedding_cosine(student, teacher, tokenizer, natural)
        out.update(cosine_natural_mean=float(nat.mean()), cosine_natural_min=float(nat.min()),
                   natural_held_out=len(natural))
    if dev:
        out["cosine_dev_mean"] = float(embedding_cosine(student, teacher, tokenizer, dev).mean())
    if sick:
        out.update(sick_spearman_original=sick_spearman(teacher, tokenizer, sick),
                   sick_spearman=sick_spearman(student, tokenizer, sick))
    if sick_train:
        out.update(sick_train_spearman_original=sick_spearman(teacher, tokenizer, sick_train),
                   sick_train_spearman=sick_spearman(student, tokenizer, sick_train))
    return out


@dataclass
class EncoderResult:
    """What :func:`compress_encoder` made and measured."""

    compression: CompressionResult
    config: CompressionConfig
    split: TextSplit
    measures: dict[str, float]
    teacher: nn.Module

    @property
    def model(self) -> nn.Module:
        """The compressed model (an :class:`~tnlm.integration.MPOModel`)."""
        return self.compression.model

    @property
    def ratio(self) -> float:
        return self.compression.ratio

    def summary(self) -> dict[str, Any]:
        """JSON values: the settings, sizes, seconds, measures, ranks and calibration errors
        (what ``tnlm compress --json`` prints)."""
        res, m = self.compression, self.measures
        heal_steps = self.config.heal.steps if self.config.heal is not None else 0
        out = dict(
            budget=self.config.budget, pivoted=self.config.pivoted,
            params_before=res.params_before,
            params_after=res.params_after, ratio=res.ratio,
            dense_layers=sum(r is None for r in res.ranks.values()), heal_steps=heal_steps,
            healed=res.heal is not None, seconds=res.seconds,
            # the steps run: none where nothing was truncated (budget 1)
            reconstruct_steps=self.config.reconstruct_steps if res.block_errors else 0,
            block_errors=res.block_errors,
            cosine_mean=m["cosine_mean"], cosine_min=m["cosine_min"],
            held_out=len(self.split.held_out), text_sentences=self.split.n_sentences,
            ranks=res.ranks, calibration_errors=res.errors)
        out.update({k: v for k, v in m.items() if k not in out})
        return out


def compress_encoder(model: nn.Module, tokenizer: Any, recipe: EncoderRecipe | None = None,
                     *, text: Sequence[str] | None = None, heal: HealConfig | None = None,
                     sick: str | os.PathLike | None = None, dev: Sequence[str] | None = None,
                     sick_train: str | os.PathLike | None = None, progress: bool = True,
                     log: Callable[[str], None] | None = None) -> EncoderResult:
    """Compress an encoder in place as ``tnlm compress`` does (module docstring).

    Args:
        model: a transformers encoder (not an ``MPOModel``); compressed in place.
        tokenizer: its tokenizer.
        recipe: the job's settings (default: :class:`EncoderRecipe`'s defaults).
        text: sentences (default: the default text of ``recipe.seed``); split by
            :func:`split_text`.
        heal: healing settings instead of ``recipe.heal_config()`` (other loss weights,
            a ``checkpoint_dir``, ...).
        sick, dev, sick_train: what :func:`measure` measures besides the held-out cosine.

    Returns:
        An :class:`EncoderResult`; its ``teacher`` is a copy of the model as it came in.

    Raises:
        ValueError: too little text, a pattern matching no layer, a budget the allocation
            cannot meet, ``sick`` or ``sick_train`` not a SICK file
            (:func:`tnlm.compress.quality.read_sick`), a model that cannot embed the
            measured sentences (e.g. fewer positions than their tokens, up to
            :data:`~tnlm.compress.quality.EMBED_MAX_LENGTH`), ...: before any work.
        FileNotFoundError: no ``sick`` or ``sick_train`` file: before any work.
        TypeError: ``text`` or ``dev`` is one string: before any work.
        FloatingPointError: healing diverged.

        The model is unchanged then (:func:`tnlm.compress.pipeline.compress_model`), also
        when the final measures fail.
    """
    if isinstance(model, MPOModel):
        raise ValueError("model is already an MPOModel; compress the original model")
    recipe = recipe or EncoderRecipe()
    sentences = default_text(seed=recipe.seed) if text is None else text
    split = split_text(sentences, recipe.calibration, seed=recipe.seed)
    healed = set(split.heal_text)  # read before the long work: a broken install fails now
    natural = [s for s in lm_held_out() if s not in healed]
    # what the final measures read, read and checked now, not after the long work
    dev = None if dev is None else check_texts(dev, "dev")
    pairs = []
    for name, path in (("sick", sick), ("sick_train", sick_train)):
        if path:
            try:
                rows = read_sick(path)  # a missing file: FileNotFoundError naming it
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            pairs += [r[k] for r in rows for k in ("sentence_A", "sentence_B")]
    config = recipe.compression_config(model, heal)
    _check_measurable(model, tokenizer, split.held_out + natural + (dev or []) + pairs)
    torch.manual_seed(recipe.seed)
    teacher = copy.deepcopy(model).eval()
    # a failure of the final measures puts the model back as it came in, as compress_model
    # does for its own failures: the layers, then the values, flags and modes
    names = list(target_shapes(model, config))  # the layers come back from the teacher:
    undo = Swap(model, modes=True)  # no second copy of them is held through the work
    undo.on_undo(lambda: model.load_state_dict(teacher.state_dict()))
    undo.on_undo(lambda: Swap(model).replace(
        {n: copy.deepcopy(teacher.get_submodule(n)) for n in names}))
    res = compress_model(model, tokenizer, split.calibration, config,
                         heal_text=split.heal_text, progress=progress, log=log)
    try:
        measures = measure(res.model, teacher, tokenizer, split.held_out, sick=sick, dev=dev,
                           sick_train=sick_train, natural=natural)
    except BaseException:
        undo.undo()
        raise
    return EncoderResult(res, config, split, measures, teacher)


def _check_measurable(model: nn.Module, tokenizer: Any, texts: list[str]) -> None:
    """Embed the longest of ``texts`` (in tokens, as :func:`measure` truncates them) with
    ``model`` (in eval mode, nothing changed): a model that cannot, e.g. one with fewer
    positions than those tokens, is refused before the long work instead of after it."""
    if not texts:
        return
    ids = tokenizer(texts, truncation=True, max_length=EMBED_MAX_LENGTH)["input_ids"]
    longest = max(range(len(texts)), key=lambda i: len(ids[i]))
    try:
        embed(model, tokenizer, [texts[longest]])
    except (RuntimeError, IndexError) as err:
        raise ValueError(f"the model cannot embed the sentences the job measures on: the "
                         f"longest ({len(ids[longest])} tokens; the measures embed up to "
                         f"{EMBED_MAX_LENGTH}) fails with {type(err).__name__}: {err}; "
                         "nothing was done to the model") from err
