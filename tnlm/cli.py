"""Command-line interface: ``tnlm <command> [MODEL_DIR] ...``.

Commands default to the embedded MiniLM when MODEL_DIR is omitted. User
mistakes print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["main"]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line."""


def _model_path(model_dir: str | None) -> Path:
    from tnlm.integration import default_model_path

    path = Path(model_dir) if model_dir else default_model_path()
    if not (path / "config.json").is_file():
        raise UserError(f"MODEL_DIR {path} is not a transformers model folder (no config.json)")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise UserError(f"MODEL_DIR {path} holds no model.safetensors")
    return path


def _load_matrices(model_dir: str | None, embeddings: bool = True) -> dict[str, np.ndarray]:
    """W (in, out) of every module an MPO can replace, in the ``y = x @ W`` convention."""
    from transformers import AutoModel

    from tnlm.bridge import kind_of, weight_xw
    from tnlm.bridge.kinds import MATRIX_KINDS

    model = AutoModel.from_pretrained(str(_model_path(model_dir)))
    out = {}
    for name, m in model.named_modules():
        kind = kind_of(m)
        if name and kind is not None and (embeddings or kind in MATRIX_KINDS):
            out[name] = weight_xw(m).double().numpy()
    return out


def cmd_decompose(args: argparse.Namespace) -> int:
    """Decompose every 2-D weight exactly and print bond dimensions, errors and entropies."""
    from tqdm.auto import tqdm

    from tnlm import MPO

    mats = _load_matrices(args.model_dir)
    mats = {n: W for n, W in mats.items()
            if not n.endswith(("position_embeddings", "token_type_embeddings"))}
    if not mats:
        raise UserError("no linear or embedding weights found in the model")
    print(f"{'module':44s} {'I x J':>12s} {'in_shape':>18s} {'out_shape':>16s} "
          f"{'bond_dims':>22s} {'rel.err':>8s} {'S_central':>9s}")
    for name, W in tqdm(mats.items(), desc="decompose", leave=False, disable=args.quiet):
        mpo = MPO.from_matrix(W, n_sites=args.n_sites, pad=True)
        err = np.linalg.norm(mpo.to_matrix() - W) / np.linalg.norm(W)
        s = mpo.central_entropy()
        print(f"{name:44s} {str(W.shape):>12s} {str(mpo.in_shape):>18s} "
              f"{str(mpo.out_shape):>16s} {str(mpo.bond_dims):>22s} {err:8.1e} {s:9.3f}")
    return 0


COMMANDS = ("compress", "inspect", "report", "decompose", "export")
HEAL_TRAIN_CHOICES = ("cores", "cores-central", "cores+linears")  # = distill.TRAIN_CHOICES
#: healing's former names (= tnlm.bridge.finetune.HEALING_RENAMED, tested)
HEAL_TRAIN_RENAMED = {"all": "cores+linears", "auxiliary": "cores-central"}


def _heal_train(value: str) -> str:
    """``--heal-train``'s value; a former name is refused naming its new spelling."""
    if value in HEAL_TRAIN_RENAMED:
        raise argparse.ArgumentTypeError(
            f"{value!r} is now spelled {HEAL_TRAIN_RENAMED[value]!r} (what trains: "
            "tnlm.bridge.finetune)")
    return value


def _make_out(out: str | None) -> tuple[Path | None, list[Path]]:
    """The output folder, created (with its parents) and a probe file written and removed
    there, before any work (``os.access`` says yes to root even where writing fails);
    returns it and the folders this created, innermost last."""
    if not out:
        return None, []
    d = Path(out)
    missing = []
    p = d
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise UserError(f"--out {d}: {p} is a file, not a folder")
    created: list[Path] = []
    try:
        for m in reversed(missing):
            m.mkdir()
            created.append(m)
        probe = d / f".tnlm-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        _remove_empty(created)
        raise UserError(f"--out {d} cannot be written: {err.strerror or err}") from None
    return d, created


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders (innermost last) that are still empty; keep the others."""
    for f in reversed(folders):
        try:
            f.rmdir()
        except OSError:
            return


def _drop_heal_state(folder: Path) -> None:
    """Remove a healing checkpoint (its two files, then the folder if it is empty)."""
    from tnlm.compress.distill import STATE_FILE, STATE_TENSORS

    for name in (STATE_FILE, STATE_TENSORS):
        (folder / name).unlink(missing_ok=True)
    _remove_empty([folder])


def _note(message: str) -> None:
    """A notice the user must see (on stderr, even with --quiet or --json)."""
    print(f"tnlm: {message}", file=sys.stderr)


def _read_text(args: argparse.Namespace) -> tuple[list[str], str]:
    """The sentences of --text (or the default text), distinct, checked, and their source."""
    from tnlm.compress.encoder import encoder_text

    if args.with_default_text and not args.text:
        raise UserError("--with-default-text adds the default text to --text FILE: pass --text")
    try:
        return encoder_text(args.text or None, column=args.text_column,
                            with_default_text=args.with_default_text, seed=args.seed)
    except (OSError, ValueError) as err:
        if not args.text:  # the default text's own files (a broken install), not --text
            raise UserError(f"the default text: {err}") from None
        flag = "--text-column" if str(err).startswith("column ") else "--text"
        raise UserError(f"{flag}: {err}") from None


def _check_budget_and_healing(budget: float, heal_steps: int, lr: float) -> None:
    """The checks both compress paths (encoder, causal LM) make of their shared numbers."""
    import math

    from tnlm.core.budget import check_fraction

    try:
        check_fraction("--budget", budget)
    except (TypeError, ValueError) as err:
        raise UserError(str(err)) from None
    if heal_steps < 0:
        raise UserError(f"--heal-steps must be >= 0, got {heal_steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {lr}")


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress a model's linear layers to a budget (data-aware MPOs, healed), report, save.

    On an encoder this is :func:`tnlm.compress.encoder.compress_encoder` (its defaults:
    :class:`~tnlm.compress.encoder.EncoderRecipe`); on a causal LM
    :func:`tnlm.compress.llm.compress_causal_lm`.

    Every input is checked before the model is loaded: the numbers, --text (UTF-8, enough
    sentences, the column), --sick (a SICK file), --out (created and written to, and
    removed again if the run then fails before writing anything there); the budget and
    --resume are checked on the loaded model, before any compression.

    A healing state left in ``--out/healing`` by an interrupted run is continued only
    with --resume, which refuses a state made with other settings (text, lr, seed,
    budget, steps, ...); without --resume it is discarded, with a notice. A model already
    in --out is replaced, with a notice, once this run succeeds (it stays until then).
    After success the healing state is removed. Healing that blows up exits with status 1
    and one line naming what was kept on disk; nothing is saved as a model.

    A causal LM keeps the per-block checkpoint of its layer-by-layer compression (and its
    own text, --lm-text) in ``--out/layerwise`` the same way: continued after the last
    finished block only with --resume, refused if made with other settings (named),
    discarded with a notice without --resume, removed once the model is saved.
    """

    from tnlm.compress.distill import STATE_FILE
    from tnlm.compress.encoder import DEFAULT_SICK, EncoderRecipe, split_text
    from tnlm.compress.quality import read_sick

    source_arch = _architecture(args.model_dir, targets_given=bool(args.targets))
    if source_arch is not None and source_arch[1].causal:
        return _compress_causal(args, *source_arch)
    if _launched()[1] > 1:
        raise UserError("several processes (torchrun) compress causal LMs only; run an "
                        "encoder's compression as one process")
    if args.method is not None:
        raise UserError("--method applies to causal LMs; for an encoder see --allocation")
    if args.heal_optimizer is not None:
        raise UserError("--heal-optimizer applies to causal LMs; an encoder heals with AdamW")
    if args.heal_chunk is not None:
        raise UserError("--heal-chunk applies to causal LMs")
    if args.lm_text is not None:
        raise UserError("--lm-text applies to causal LMs; an encoder's text without --text is "
                        "tnlm's default text")
    if args.lm_texts is not None:
        raise UserError("--lm-texts applies to causal LMs (how many texts the model writes)")
    args.heal_steps = EncoderRecipe.heal_steps if args.heal_steps is None else args.heal_steps
    args.lr = EncoderRecipe.lr if args.lr is None else args.lr
    _check_budget_and_healing(args.budget, args.heal_steps, args.lr)
    if args.reconstruct_steps < 0:
        raise UserError(f"--reconstruct-steps must be >= 0, got {args.reconstruct_steps}")
    if args.calibration < 1:
        raise UserError(f"--calibration must be >= 1 (calibration sentences), got "
                        f"{args.calibration}")
    if args.resume and not (args.out and args.heal_steps):
        raise UserError("--resume continues the healing saved in --out DIR: it needs --out "
                        "and --heal-steps > 0")
    path = _model_path(args.model_dir)
    text, source = _read_text(args)
    try:
        split = split_text(text, args.calibration, seed=args.seed)
    except ValueError:
        raise UserError(f"--text {source} has {len(text)} distinct sentences: at least 4 are "
                        f"needed (a quarter is held out to measure the result)") from None
    sick = Path(args.sick) if args.sick else None
    if args.sick is None and DEFAULT_SICK.is_file():
        sick = DEFAULT_SICK
    if sick is not None:
        if not sick.is_file():
            raise UserError(f"--sick {sick} " + ("is a directory, not a file" if sick.is_dir()
                                                 else "does not exist"))
        try:
            read_sick(sick)
        except (OSError, ValueError) as err:
            raise UserError(f"--sick: {err}") from None
    # no --targets: the architecture's (tnlm.integration.architectures), found on the model
    recipe = EncoderRecipe(
        budget=args.budget, allocation=args.allocation,
        target_modules=args.targets.split(",") if args.targets else None,
        calibration=args.calibration, reconstruct_steps=args.reconstruct_steps,
        heal_steps=args.heal_steps, lr=args.lr, heal_train=args.heal_train,
        teacher_bf16=args.teacher_bf16, seed=args.seed, pivoted=args.pivoted)
    out, created = _make_out(args.out)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:  # transformers' "Loading weights" bars too
        hf_logging.disable_progress_bar()
    try:
        return _compress(args, path, text, source, split, sick, recipe, out)
    except BaseException as err:
        if out is not None:
            if (out / "healing" / STATE_FILE).is_file():
                if not isinstance(err, (UserError, HealingDiverged)):
                    _note(f"the healing state in {out / 'healing'} is kept: the same command "
                          "with --resume continues it")
            elif (out / "healing").is_dir():
                _remove_empty([out / "healing"])
            _remove_empty(created)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _compress(args, path, text, source, split, sick, recipe, out) -> int:
    """``tnlm compress`` on an encoder after its inputs were checked (:func:`cmd_compress`):
    load, check the budget and --resume, :func:`~tnlm.compress.encoder.compress_encoder`,
    print, save."""
    import json

    import torch
    from transformers import AutoModel, AutoTokenizer

    from tnlm.compress.distill import STATE_FILE, check_resumable, heal_settings
    from tnlm.compress.encoder import compress_encoder
    from tnlm.compress.pipeline import check_budget, run_context
    from tnlm.integration import format_report
    from tnlm.integration.io import CONFIG_NAME

    def say(*parts: object) -> None:
        if not args.quiet:  # with --json, stdout carries the JSON only
            print(*parts, file=sys.stderr if args.json else sys.stdout)

    torch.manual_seed(args.seed)  # weights a checkpoint lacks are drawn alike in every run
    healing = out / "healing" if out and recipe.heal_steps else None
    heal = recipe.heal_config(checkpoint_dir=str(healing) if healing else None)
    say(f"text: {len(text):,} sentences from {source}; {len(split.calibration)} for "
        f"calibration, {len(split.heal_text):,} for healing, {len(split.held_out)} held out")
    model = AutoModel.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    cfg = recipe.compression_config(model, heal)
    check_budget(model, cfg, name="--budget")
    if healing is not None and args.resume:
        settings = heal_settings(heal, split.heal_text, model, run_context(cfg))
        try:
            step = check_resumable(healing, settings)
        except FileNotFoundError:
            raise UserError(f"--resume: {healing} holds no healing state to resume") from None
        except ValueError as err:
            fix = ("pass the settings of that run" if "other settings" in str(err) else
                   "it cannot be resumed")
            raise UserError(f"--resume: {err}; {fix}, or drop --resume to start afresh") \
                from None
        _note(f"resuming the healing in {healing} at step {step} of {recipe.heal_steps}")
    elif out is not None and (out / "healing" / STATE_FILE).exists():
        _note(f"discarding the healing state of an earlier run in {out / 'healing'} "
              "(pass --resume to continue it)")
        _drop_heal_state(out / "healing")
    if out is not None and (out / CONFIG_NAME).is_file():
        _note(f"--out {out} holds a model of an earlier run: this run replaces it when it "
              "succeeds")
    try:
        res = compress_encoder(model, tok, recipe, text=text, heal=heal, sick=sick,
                               progress=not args.quiet)
    except FloatingPointError as err:
        raise HealingDiverged(f"{err}; the compressed model was discarded: nothing was saved "
                              f"as a model" + (f" in {out}" if out else "")) from None
    if not args.json:
        say(format_report(res.model.compression_report()))
    summary = res.summary()
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        dense = summary["dense_layers"]
        healed = (f"healing {recipe.heal_steps} steps" if res.compression.heal is not None else
                  "no healing" + (" (nothing was truncated)" if recipe.heal_steps else ""))
        print(f"kept {res.compression.params_after:,} of {res.compression.params_before:,} "
              f"parameters of the targeted layers ({res.ratio:.1%}; "
              f"{len(res.compression.ranks) - dense} MPO layers, {dense} kept dense); {healed}")
        print(f"embedding cosine to the original on {len(split.held_out)} held-out sentences: "
              f"mean {summary['cosine_mean']:.4f}, min {summary['cosine_min']:.4f}")
        if "cosine_natural_mean" in summary:
            print(f"the same on {summary['natural_held_out']} natural-prose sentences "
                  f"never healed on (shipped with tnlm): mean "
                  f"{summary['cosine_natural_mean']:.4f}, min {summary['cosine_natural_min']:.4f}")
        if sick is not None:
            print(f"SICK relatedness Spearman ({sick}): original "
                  f"{summary['sick_spearman_original']:.4f}, compressed "
                  f"{summary['sick_spearman']:.4f}")
        else:
            print("SICK relatedness: skipped (pass --sick PATH to measure it)")
    if out is not None:
        from tnlm.export import save_self_contained

        # config, tokenizer and sentence-transformers files beside the MPO weights:
        # tnlm.export.load_compressed(out) / sentence_transformer(out) need nothing else
        save_self_contained(res.model, tok, out)
        if healing is not None:
            _drop_heal_state(healing)  # the model is saved: nothing left to resume
        say(f"saved to {out}")
    return 0


def _architecture(model_dir: str | None, targets_given: bool = False):
    """``(source, architecture)`` of MODEL_DIR (a folder or a .gguf file), checked without
    loading it; ``None`` for the embedded MiniLM."""
    from tnlm.integration.architectures import architecture_of
    from tnlm.integration.loading import check_model_source

    if model_dir is None:
        return None
    try:
        source = check_model_source(model_dir)
    except ValueError as err:
        if targets_given and Path(model_dir).is_dir() and "is not supported" in str(err):
            return None  # an encoder tnlm has no entry for: the user named its targets
        raise UserError(f"MODEL_DIR: {err}" + ("; or name the layers to compress with "
                                                "--targets" if "is not supported" in str(err)
                                                else "")) from None

    class _Cfg:
        model_type = source.model_type
    return source, architecture_of(_Cfg())


def _launched() -> tuple[int, int]:
    """``(rank, world_size)`` torchrun (or another launcher) gave this process."""
    from tnlm.compress.distributed import launched_world

    try:
        return launched_world()
    except ValueError as err:
        raise UserError(str(err)) from None


def _compress_causal(args: argparse.Namespace, source, arch) -> int:
    """``tnlm compress`` on a causal LM (a folder or a .gguf file): layer-by-layer
    compression, next-token-KL healing, held-out perplexity against the dense model's
    (:mod:`tnlm.compress.llm`). Inputs are checked before the model is loaded.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this: the process group is
    initialized after the inputs are checked (gloo on CPU, nccl with CUDA; timeout
    ``--dist-timeout``) and destroyed at the end; the ranks compress and heal together
    (:func:`~tnlm.compress.llm.compress_causal_lm`); rank 0 alone measures perplexity,
    prints and writes ``--out`` (each rank writes its own hidden states to the per-block
    checkpoint ``--out/layerwise``, :func:`_compress_causal_job`)."""
    import math
    from datetime import timedelta

    from tnlm.compress.causal import CausalHealConfig
    from tnlm.compress.distributed import process_group_from_env
    from tnlm.compress.llm import CausalLMRecipe, has_checkpoint, remove_checkpoint
    from tnlm.compress.text import read_sentences

    rank, size = _launched()
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise UserError(f"--dist-timeout must be a number of minutes > 0, got "
                        f"{args.dist_timeout}")
    recipe = CausalLMRecipe()
    heal_steps = recipe.heal.steps if args.heal_steps is None else args.heal_steps
    lr = recipe.heal.lr if args.lr is None else args.lr
    _check_budget_and_healing(args.budget, heal_steps, lr)
    defaults = build_parser().parse_args(["compress"])
    for flag in ("--sick", "--with-default-text", "--heal-train", "--teacher-bf16",
                 "--reconstruct-steps", "--allocation", "--calibration"):
        dest = flag[2:].replace("-", "_")
        if getattr(args, dest) != getattr(defaults, dest):
            raise UserError(f"{flag} applies to encoders; {source} is a causal LM")
    if args.resume and not args.out:
        raise UserError("--resume continues the layer-by-layer compression saved in --out "
                        "DIR: it needs --out")
    text = None
    if args.text and args.lm_text is not None:
        raise UserError("--lm-text chooses the text when no --text is given; pass one of them")
    if args.lm_texts is not None and (args.text or args.lm_text == "prose"):
        raise UserError("--lm-texts sets how many texts the model writes itself; with "
                        + ("--text" if args.text else "--lm-text prose") + " it writes none")
    if args.lm_texts is not None and args.lm_texts < 1:
        raise UserError(f"--lm-texts must be at least 1, got {args.lm_texts}")
    if args.text:
        try:
            text = read_sentences(args.text, column=args.text_column)
        except (OSError, ValueError) as err:
            raise UserError(f"--text: {err}") from None
        if len(text) < 4:
            raise UserError(f"--text {args.text} has {len(text)} lines: at least 4 are needed")
    targets = args.targets.split(",") if args.targets else list(arch.targets)
    job = recipe.heal  # the job's defaults
    chunk = job.chunk if args.heal_chunk is None else (args.heal_chunk or None)
    try:
        heal = CausalHealConfig(steps=heal_steps, lr=lr, seed=args.seed,
                                optimizer=args.heal_optimizer or job.optimizer, chunk=chunk)
    except ValueError as err:
        raise UserError(f"--heal-chunk / --heal-optimizer: {err}") from None
    if size > 1 and heal_steps and heal.batch_size < size:
        raise UserError(f"{size} processes: healing shares each step's batch of "
                        f"{heal.batch_size} sequences, so at most {heal.batch_size} "
                        "processes can heal (--nproc_per_node)")
    recipe = CausalLMRecipe(
        budget=args.budget, method=args.method or recipe.method, target_modules=targets,
        heal=heal, seed=args.seed, text_source=args.lm_text or recipe.text_source,
        n_texts=recipe.n_texts if args.lm_texts is None else args.lm_texts,
        pivoted=args.pivoted or recipe.pivoted)
    out, created = _make_out(args.out) if rank == 0 else (None, [])

    def say(*parts: object) -> None:
        if not args.quiet and rank == 0:
            print(*parts, file=sys.stderr if args.json else sys.stdout)

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet or rank != 0:  # transformers' "Loading weights" bars too
        hf_logging.disable_progress_bar()
    try:
        # gloo: the CLI loads and compresses on the CPU, whatever GPUs the machine has
        with process_group_from_env(timedelta(minutes=args.dist_timeout),
                                    backend="gloo") as (rank, size):
            return _compress_causal_job(args, source, arch, recipe, text, out, say, rank,
                                        size)
    except BaseException as err:
        if out is not None:
            ckpt = out / LAYERWISE_DIR
            if has_checkpoint(ckpt):
                if isinstance(err, HealingDiverged):  # the blocks are done; heal otherwise
                    _note(f"the layer-by-layer checkpoint in {ckpt} is kept: the command "
                          "with --resume and a lower --lr compresses no block again and "
                          "heals afresh")
                elif not isinstance(err, (UserError, ValueError)):
                    _note(f"the layer-by-layer checkpoint in {ckpt} is kept: the same "
                          "command with --resume continues after its last finished block")
            else:  # nothing resumable: the pieces of an unfinished first block, if any
                remove_checkpoint(ckpt)
        _remove_empty(created)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()


#: the folder of ``--out`` that holds a causal LM's per-block checkpoint while it runs
LAYERWISE_DIR = "layerwise"


def _causal_resume_state(args, model, tok, recipe, text, ckpt: Path | None, rank: int,
                         size: int) -> None:
    """``--resume`` checked (rank 0 reads the checkpoint, every rank gets its verdict) or,
    without it, a checkpoint of an earlier run in ``ckpt`` discarded with a notice; on the
    loaded model, before any work."""
    from tnlm.compress import distributed as dist_
    from tnlm.compress.llm import check_resume, has_checkpoint, remove_checkpoint

    if ckpt is None:
        return
    if args.resume:
        verdict: dict = {}
        if rank == 0:
            try:
                verdict = {"last": check_resume(model, tok, recipe, ckpt, text=text,
                                                world_size=size)}
            except FileNotFoundError:
                verdict = {"error": f"--resume: {ckpt} holds no layer-by-layer checkpoint "
                                    "to resume"}
            except ValueError as err:
                fix = ("pass the settings of that run" if "other inputs" in str(err) else
                       "it cannot be resumed")
                verdict = {"error": f"--resume: {err}; {fix}, or drop --resume to start "
                                    "afresh"}
            except Exception as err:  # noqa: BLE001 -- the others must not wait for it
                verdict = {"error": f"--resume: reading {ckpt} failed: "
                                    f"{type(err).__name__}: {err}"}
        if size > 1:  # the others wait for rank 0's verdict (each rank reads it again)
            verdict = dist_.broadcast_json(verdict, 0, "the --resume check")
        if "error" in verdict:
            raise UserError(verdict["error"])
        if rank == 0:
            from tnlm.integration.architectures import blocks_of

            last, n = verdict["last"], len(blocks_of(model))
            _note(f"resuming the layer-by-layer compression in {ckpt} " +
                  ("on its calibration text (no block was finished)" if last is None else
                   f"after block {last} ({last + 1} of {n} blocks finished)"))
        return
    failed = ""
    if rank == 0 and ckpt.is_dir():
        if has_checkpoint(ckpt):
            _note(f"discarding the layer-by-layer checkpoint of an earlier run in {ckpt} "
                  "(pass --resume to continue it)")
        try:
            remove_checkpoint(ckpt)  # also the pieces of an unfinished first block
        except OSError as err:
            failed = f"cannot remove the earlier checkpoint in {ckpt}: {err}"
    if size > 1:  # no rank writes there before rank 0 has cleared it (or failed to)
        failed = dist_.broadcast_json({"error": failed}, 0, "the removal of an earlier "
                                      "checkpoint")["error"]
    if failed:
        raise UserError(failed)


def _compress_causal_job(args, source, arch, recipe, text, out, say, rank, size) -> int:
    """The work of :func:`_compress_causal` once the inputs are checked (and, under
    torchrun, the process group is up); perplexity, printing and saving on rank 0 only.

    With ``--out DIR`` the per-block checkpoint is written to ``DIR/layerwise`` (every
    rank: the folder must be one they share) and removed once the model is saved."""
    import json

    import torch

    from tnlm.compress.causal import token_sequences
    from tnlm.compress.llm import compress_causal_lm, remove_checkpoint
    from tnlm.compress.lm_quality import natural_eval_text, perplexity
    from tnlm.compress.memory import mmap_large_allocations, peak_rss_mb, rss_mb, start_stage
    from tnlm.integration import MPOConfig, MPOModel
    from tnlm.integration.loading import load_pretrained

    targets, heal_steps = recipe.target_modules, recipe.heal.steps
    ckpt = Path(args.out) / LAYERWISE_DIR if args.out else None  # on every rank
    seconds: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    resets = []  # whether every stage's peak could be reset (Linux), else running maxima
    t_job = time.perf_counter()
    # large blocks mapped and unmapped, not kept in glibc's heaps: the healing stage's
    # peak 0.73x of glibc's default (tnlm.compress.memory.mmap_large_allocations)
    mmap_large_allocations()

    @contextlib.contextmanager
    def stage(name: str):
        """Seconds and peak memory of one of the job's own stages (rank 0's)."""
        resets.append(start_stage())
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds[name] = time.perf_counter() - t0
            peaks[name] = peak_rss_mb()

    torch.manual_seed(args.seed)
    with stage("loading"):
        model, tok = load_pretrained(source.folder / source.gguf_file if source.gguf_file
                                     else source.folder)
    resets.append(start_stage())
    loaded_mb = rss_mb()  # what every peak is compared with: the model and the libraries
    if text is not None:  # enough tokens for one sequence, before any expensive step
        try:
            token_sequences(tok, text, recipe.seq_len)
        except ValueError as err:
            raise UserError(f"--text {args.text}: {err}") from None
    if text is None and recipe.text_source in ("chat", "mixed") and not getattr(
            tok, "chat_template", None):
        name = source.folder / source.gguf_file if source.gguf_file else source.folder
        raise UserError(f"--lm-text {recipe.text_source}: the tokenizer of {name} has no "
                        "chat template; use --lm-text self, prose or both")
    _causal_resume_state(args, model, tok, recipe, text, ckpt, rank, size)
    if rank == 0:
        eval_text = natural_eval_text()
        eval_source = "natural held-out text (../shared/data dev splits)"
        if eval_text is None:
            from tnlm.compress.text import lm_held_out
            eval_text = ["\n".join(lm_held_out())]
            eval_source = ("tnlm's held-out prose (tnlm/data/lm_held_out.txt.gz: topics the "
                           "healing prose never names)")
        with stage("dense_perplexity"):
            dense = perplexity(model, tok, eval_text, max_length=256, stride=256)
    res = compress_causal_lm(model, tok, recipe, text=text,
                             progress=not args.quiet and rank == 0, log=say,
                             checkpoint_dir=ckpt, resume=args.resume)
    if res.heal is not None and res.heal.stopped:
        raise HealingDiverged(f"healing {res.heal.stopped}; nothing was saved as a model"
                              + (f" in {out}" if out else ""))
    if rank != 0:
        return 0
    # compress_causal_lm's stages in their place (its "total" is theirs alone)
    seconds.update({k: v for k, v in res.seconds.items() if k != "total"})
    peaks.update(res.peak_rss_mb)
    with stage("perplexity"):
        ppl = perplexity(model, tok, eval_text, max_length=256, stride=256)
    if out is not None:
        from tnlm.export import save_self_contained

        try:
            with stage("saving"):
                wrapped = MPOModel(model, MPOConfig(target_modules=targets))
                save_self_contained(wrapped, tok, out, sentence_transformers=False)
        except Exception:  # the run's measures are not lost with the model
            print(f"not saved; perplexity dense {dense.ppl:.4f}, compressed {ppl.ppl:.4f} "
                  f"({ppl.ppl / dense.ppl:.4f}x)", file=sys.stderr)
            raise
    seconds["total"] = time.perf_counter() - t_job
    # the stage whose peak is highest; none where the peaks could not be reset per stage
    known = {k: v for k, v in peaks.items() if v is not None} if all(resets) else {}
    top = max(known, key=known.get) if known else None
    summary = dict(model=str(source), architecture=arch.name, method=recipe.method,
                   budget=args.budget, pivoted=recipe.pivoted, ratio=res.ratio,
                   params_before=res.layerwise.params_before,
                   params_after=res.layerwise.params_after, heal_steps=heal_steps,
                   heal_optimizer=recipe.heal.optimizer,
                   text=("--text " + str(args.text)) if args.text else recipe.text_source,
                   perplexity_dense=dense.ppl, perplexity=ppl.ppl,
                   perplexity_ratio=ppl.ppl / dense.ppl, eval_tokens=ppl.n_tokens,
                   eval_text=eval_source, seconds=seconds, peak_rss_mb=peaks,
                   rss_after_load_mb=loaded_mb, peak_stage=top,
                   peak_over_loaded=(known[top] / loaded_mb if top and loaded_mb else None),
                   processes=size)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"kept {res.layerwise.params_after:,} of {res.layerwise.params_before:,} "
              f"parameters of the targeted layers ({res.ratio:.1%}); method "
              f"{recipe.method}; healing {heal_steps} steps ({recipe.heal.optimizer})")
        print(f"perplexity on {ppl.n_tokens:,} tokens of {eval_source}: dense "
              f"{dense.ppl:.2f}, compressed {ppl.ppl:.2f} ({ppl.ppl / dense.ppl:.3f}x)")
        if summary["peak_over_loaded"] is not None:
            print(f"peak memory {known[top]:,.0f} MiB ({top}), "
                  f"{summary['peak_over_loaded']:.2f}x the {loaded_mb:,.0f} MiB after loading")
    if out is not None:
        if ckpt is not None:
            remove_checkpoint(ckpt)  # the model is saved: nothing left to resume
        say(f"saved to {out} (tnlm.export.load_compressed(DIR) rebuilds it)")
    return 0


class HealingDiverged(Exception):
    """Healing blew up: reported in one line, exit status 1."""


def _weights_for_profile(model_dir: str | None, embeddings: bool = True) -> dict[str, np.ndarray]:
    """2-D weights (``y = x @ W``) without the position and token-type tables."""
    return {n: W for n, W in _load_matrices(model_dir, embeddings).items()
            if not n.endswith(("position_embeddings", "token_type_embeddings"))}


def cmd_inspect(args: argparse.Namespace) -> int:
    """Per-matrix table: shape, site shapes, bond dims, central-bond entropy vs random."""
    from tqdm.auto import tqdm

    from tnlm.analysis import matrix_profile, reference_for

    mats = _weights_for_profile(args.model_dir, args.embeddings)
    rows = []
    if not args.json:
        print(f"{'module':44s} {'I x J':>12s} {'bond_dims':>20s} {'S_central':>9s} "
              f"{'S_random':>8s} {'ln d_c':>6s} {'central %':>9s}")
    for name, W in tqdm(mats.items(), desc="profile", leave=False, disable=args.quiet):
        prof = matrix_profile(W, n_sites=args.n_sites, name=name, pad=True)
        ref = reference_for(prof) if args.reference else None
        d = prof["bond_dims"][prof["central_bond"]]  # the bond S_central is measured at
        row = dict(name=name, shape=list(W.shape), bond_dims=list(prof["bond_dims"]),
                   central_bond=prof["central_bond"], central_entropy=prof["central_entropy"],
                   random_central_entropy=ref["central_entropy"] if ref else None,
                   max_central_entropy=float(np.log(d)),
                   central_fraction=prof["central_fraction"])
        rows.append(row)
        if not args.json:
            s_ref = f"{ref['central_entropy']:8.3f}" if ref else f"{'-':>8s}"
            print(f"{name:44s} {str(tuple(W.shape)):>12s} {str(tuple(prof['bond_dims'])):>20s} "
                  f"{prof['central_entropy']:9.3f} {s_ref} {np.log(d):6.3f} "
                  f"{100 * prof['central_fraction']:8.1f}%")
    if args.json:
        import json

        print(json.dumps(rows, indent=1))
    return 0


def _saved_mpos(directory: Path) -> dict:
    """MPOs of a checkpoint written by ``MPOModel.save_pretrained`` (hash verified; read
    without the base model)."""
    from tnlm import MPO
    from tnlm.integration import load_tensors

    meta, tensors = load_tensors(directory)
    out = {}
    for name, spec in meta["modules"].items():
        if spec.get("layout") == "pivoted":  # a gauge-fixed bond: the 2-site MPO it fixes
            I, J, r = spec["in_dim"], spec["out_dim"], spec["rank"]
            left = np.zeros((I, r))
            left[tensors[f"{name}.pivots"]] = np.eye(r)
            left[tensors[f"{name}.rest"]] = tensors[f"{name}.coef"]
            cores = [left.reshape(1, I, 1, r),
                     tensors[f"{name}.right"].astype(np.float64).reshape(r, 1, J, 1)]
        else:
            cores = [tensors[f"{name}.cores.{k}"].astype(np.float64)
                     for k in range(len(spec["core_shapes"]))]
        out[name] = MPO(cores, in_dim=spec["in_dim"], out_dim=spec["out_dim"])
    return out


def cmd_report(args: argparse.Namespace) -> int:
    """Plots to files: entropy heat map (layer x module type), spectra, entropy profiles.

    Matrices that cannot be profiled (NaN or inf entries, ...) are left out of every
    figure, each named on stderr with the reason (``tnlm report: skipped NAME: REASON``);
    when none can be profiled the command fails, naming them.
    """
    import matplotlib

    matplotlib.use("Agg")
    from tnlm.analysis import (
        model_profile,
        model_profile_from_mpos,
        plot_entropy_heatmap,
        plot_entropy_profile,
        plot_spectra,
        reference_for,
    )
    from tnlm.integration.io import CONFIG_NAME

    if args.modules < 1:
        raise UserError(f"--modules must be >= 1 (modules with their own figures), got "
                        f"{args.modules}")
    src = Path(args.directory) if args.directory else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if src is not None and (src / CONFIG_NAME).is_file():
        profile = model_profile_from_mpos(_saved_mpos(src))
    else:
        profile = model_profile(_weights_for_profile(args.directory), n_sites=args.n_sites)
    rows = profile["rows"]
    skipped = profile.get("skipped", [])
    for name, reason in skipped:
        print(f"tnlm report: skipped {name}: {reason}", file=sys.stderr)
    if not rows:
        raise UserError("no matrices to report on")
    written = []
    fig = plot_entropy_heatmap(profile)
    fig.savefig(out / "entropy_heatmap.png", dpi=120)
    written.append("entropy_heatmap.png")
    for r in rows[: args.modules]:
        stem = r["name"].replace(".", "_")
        plot_spectra(r).savefig(out / f"spectra_{stem}.png", dpi=120)
        plot_entropy_profile(r, reference=reference_for(r)).savefig(
            out / f"entropy_{stem}.png", dpi=120)
        written += [f"spectra_{stem}.png", f"entropy_{stem}.png"]
    left_out = f" ({len(skipped)} matrices left out, named on stderr)" if skipped else ""
    print(f"wrote {len(written)} figures to {out}{left_out}: " + ", ".join(written))
    return 0


def _short(x: float) -> str:
    """``5e-4`` for 0.0005: a learning rate as the help text writes it."""
    return np.format_float_scientific(x, trim="-", exp_digits=1)


def build_parser() -> argparse.ArgumentParser:
    from tnlm import __version__
    from tnlm.compress.causal import OPTIMIZERS, CausalHealConfig
    from tnlm.compress.encoder import DEFAULT_SICK, EncoderRecipe
    from tnlm.compress.llm import JOB_HEAL, TEXT_SOURCES, CausalLMRecipe
    from tnlm.compress.pipeline import ALLOCATIONS

    enc = EncoderRecipe  # the encoder job's defaults (class attributes of the dataclass)

    ap = argparse.ArgumentParser(prog="tnlm", description="MPO compression of language models")
    ap.add_argument("--version", action="version", version=f"tnlm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("compress", help="compress a model's linear layers to a budget and heal it",
                       formatter_class=fmt)
    p.add_argument("model_dir", nargs="?", default=None,
                   help="a transformers model folder or a .gguf file (causal LMs: Llama, "
                        "Mistral, Qwen2, GPT-2, OPT, ...); default: the embedded MiniLM")
    p.add_argument("--budget", type=float, default=enc.budget,
                   help="fraction of the targeted layers' parameters to keep, model-wide; 1 "
                        "keeps every layer dense; a budget below the smallest model the "
                        "allocation can make is refused")
    p.add_argument("--heal-steps", type=int, default=None,
                   help=f"distillation steps after truncation (0: none); default "
                        f"{enc.heal_steps} for an encoder, {CausalHealConfig.steps} for a "
                        f"causal LM")
    p.add_argument("--lr", type=float, default=None,
                   help=f"healing learning rate; default {_short(enc.lr)} for an encoder, "
                        f"{_short(CausalHealConfig.lr)} for a causal LM")
    p.add_argument("--method", choices=("tnlm", "whitened", "plain"), default=None,
                   help="causal LMs: tnlm (error-feedback whitening + block fitting, the "
                        "default), whitened (SVD-LLM-style low rank) or plain (SVD)")
    p.add_argument("--heal-train", type=_heal_train, choices=HEAL_TRAIN_CHOICES,
                   default=enc.heal_train,
                   help="what healing trains: every MPO core ('cores'), the cores but the "
                        "central ones ('cores-central'), or also the linears the allocation "
                        "kept dense ('cores+linears', the default; formerly 'all'); norms "
                        "and MPO biases always")
    p.add_argument("--teacher-bf16", action=argparse.BooleanOptionalAction,
                   default=enc.teacher_bf16,
                   help="run the teacher in bfloat16 during healing (default: when the CPU "
                        "has bf16 instructions; pooled outputs within 1e-4 cosine)")
    p.add_argument("--heal-optimizer", choices=OPTIMIZERS, default=None,
                   help="causal LMs: healing's optimizer; adafactor keeps factored second "
                        "moments instead of AdamW's two moment buffers (twice the trained "
                        "parameters' bytes), at the same --lr (default: "
                        f"{JOB_HEAL['optimizer']})")
    p.add_argument("--heal-chunk", type=int, default=None, metavar="POSITIONS",
                   help="causal LMs: compute healing's next-token KL over chunks of this "
                        "many positions, recomputed in the backward pass (less memory); 0: "
                        f"the whole sequence at once (default: {JOB_HEAL['chunk']})")
    p.add_argument("--lm-text", choices=TEXT_SOURCES, default=None,
                   help="causal LMs without --text: calibrate and heal on the model's own "
                        "samples (self), the prose that ships with tnlm (prose: nothing to "
                        "sample), both, its own answers to chat prompts in its chat "
                        "format (chat), or half samples, half answers (mixed) (default: "
                        f"{CausalLMRecipe.text_source})")
    p.add_argument("--lm-texts", type=int, default=None, metavar="N",
                   help="causal LMs: how many texts the model writes for its own calibration "
                        "and healing (--lm-text self, both, chat, mixed); more heal better "
                        "and take longer to write, about 0.9 s each on 2 CPU cores for "
                        f"SmolLM2-135M (default: {CausalLMRecipe.n_texts})")
    p.add_argument("--pivoted", action="store_true",
                   help="fix each truncated layer's bond gauge, so a rank-r "
                        "layer stores r (I + J - r) numbers instead of r (I + J): a larger "
                        "rank at the same --budget (saved as PivotedLinear layers)")
    p.add_argument("--reconstruct-steps", type=int, default=enc.reconstruct_steps,
                   help="block-by-block reconstruction steps per block before healing")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=enc.allocation,
                   help="how the budget is spread over the layers")
    p.add_argument("--calibration", type=int, default=enc.calibration,
                   help="calibration sentences")
    p.add_argument("--text", default=None,
                   help="unlabeled in-domain text, one sentence per line (default: generated "
                        "sentences and docstrings of the installed Python source; in-domain "
                        "text compresses better, docs/results.md)")
    p.add_argument("--text-column", type=int, default=None,
                   help="take this tab-separated column of --text (from 0; every non-empty "
                        "line must have it)")
    p.add_argument("--with-default-text", action="store_true",
                   help="heal on --text and the default text together: in-domain text keeps "
                        "the domain's similarities, the default text the rest "
                        "(docs/results.md)")
    p.add_argument("--sick", default=None,
                   help="SICK relatedness file to measure Spearman (default: "
                        f"{DEFAULT_SICK} if present; '' to skip)")
    p.add_argument("--targets", default=None,
                   help="comma-separated module patterns (default: the architecture's targets)")
    p.add_argument("--seed", type=int, default=enc.seed)
    p.add_argument("--out", default="out/minilm-mpo",
                   help="output folder ('' to skip saving); a model already there is replaced "
                        "when the run succeeds; while the run lasts it holds the encoder's "
                        "healing state (DIR/healing) or a causal LM's per-block checkpoint "
                        "(DIR/layerwise), removed once the model is saved")
    p.add_argument("--resume", action="store_true",
                   help="continue what an interrupted run left in --out DIR: an encoder's "
                        "healing (DIR/healing), a causal LM's layer-by-layer compression "
                        "after its last finished block (DIR/layerwise; also under torchrun, "
                        "with the same number of processes); refused if it was made with "
                        "other settings; without it, a leftover state is discarded")
    p.add_argument("--dist-timeout", type=float, default=30.0,
                   help="causal LMs under torchrun: minutes a process waits for the others "
                        "at a collective before it stops with an error (they wait while "
                        "rank 0 writes the calibration text and measures perplexity)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compress)
    p = sub.add_parser("inspect", help="table of weight matrices, bond dims and entropies",
                       formatter_class=fmt)
    p.add_argument("model_dir", nargs="?", default=None, help="default: the embedded MiniLM")
    p.add_argument("--n-sites", type=int, default=5)
    p.add_argument("--embeddings", action="store_true", help="include embedding tables")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the random-matrix reference column")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("report", help="plots of a model (or a saved MPO model) to files",
                       formatter_class=fmt)
    p.add_argument("directory", nargs="?", default=None,
                   help="a saved MPO model, or a model folder (default: the embedded MiniLM)")
    p.add_argument("--out", default="out/report", help="folder for the figures")
    p.add_argument("--modules", type=int, default=2, help="per-module figures for this many")
    p.add_argument("--n-sites", type=int, default=5)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("decompose", help="exact MPO of every weight matrix, with a report",
                       formatter_class=fmt)
    p.add_argument("model_dir", nargs="?", default=None, help="default: the embedded MiniLM")
    p.add_argument("--n-sites", type=int, default=5)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_decompose)
    from tnlm.export.cli import add_export_parser

    add_export_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["compress", *argv]  # the main job: compress the default model
    elif argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        if Path(argv[0]).exists():
            argv = ["compress", *argv]  # ``tnlm MODEL_DIR ...`` compresses that model
        else:
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            print(f"tnlm: error: {argv[0]!r} is neither a command {COMMANDS} nor an existing "
                  f"model folder{hint}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    error = _error_prefix()
    try:
        return args.func(args)
    except (UserError, OSError, ValueError, KeyError, TypeError) as err:
        print(f"{error}{err}", file=sys.stderr)
        return 2
    except HealingDiverged as err:
        print(f"{error}{err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tnlm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback on request
        if os.environ.get("TNLM_DEBUG"):
            raise
        from tnlm.compress.distributed import RankFailure

        if isinstance(err, RankFailure):  # its message names the rank and the step
            print(f"tnlm: error: {err}", file=sys.stderr)
            return 1
        print(f"{error}{type(err).__name__}: {err} (TNLM_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


def _error_prefix() -> str:
    """``"tnlm: error: "``; in one of several processes (torchrun) it names the rank."""
    rank, size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if size not in ("", "1", "0"):
        return f"tnlm: error (rank {rank} of {size}): "
    return "tnlm: error: "
