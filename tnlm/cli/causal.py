"""``tnlm compress`` on a causal LM: layer-by-layer compression, healing by next-token KL,
held-out perplexity against the dense model's, under torchrun as well."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from tnlm.cli.common import (
    HealingDiverged,
    UserError,
    check_budget_and_healing,
    encoder_only_defaults,
    launched,
    make_out,
    note,
    remove_empty,
    replace_folder,
    text_error,
)

__all__ = ["compress_causal", "DIST_TIMEOUT", "LAYERWISE_DIR"]


def compress_causal(args: argparse.Namespace, source, arch) -> int:
    """``tnlm compress`` on a causal LM (a folder or a .gguf file): layer-by-layer
    compression, next-token-KL healing, held-out perplexity against the dense model's
    (:mod:`tnlm.compress.decoder.job`). Inputs are checked before the model is loaded.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this: the process group is
    initialized after the inputs are checked (gloo on CPU, nccl with CUDA; timeout
    ``--dist-timeout``) and destroyed at the end; the ranks compress and heal together
    (:func:`~tnlm.compress.decoder.job.compress_causal_lm`); rank 0 alone measures perplexity,
    prints and writes ``--out`` (each rank writes its own hidden states to the per-block
    checkpoint ``--out/layerwise``, :func:`_compress_causal_job`)."""
    import math
    from datetime import timedelta

    from tnlm.compress.decoder.job import CausalLMRecipe, has_checkpoint, remove_checkpoint
    from tnlm.compress.decoder.text import split_held_out
    from tnlm.compress.distributed import process_group_from_env
    from tnlm.compress.text import read_sentences
    from tnlm.core.validation import FieldError

    rank, size = launched()
    if args.dist_timeout is None:
        args.dist_timeout = DIST_TIMEOUT
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise UserError(f"--dist-timeout must be a number of minutes > 0, got "
                        f"{args.dist_timeout}")
    recipe = CausalLMRecipe()
    args.budget = recipe.budget if args.budget is None else args.budget  # not an encoder's
    heal_steps = recipe.heal.steps if args.heal_steps is None else args.heal_steps
    lr = recipe.heal.lr if args.lr is None else args.lr
    check_budget_and_healing(args.budget, heal_steps, lr)
    if heal_steps == 0:
        for flag, value in (("--lr", args.lr), ("--heal-optimizer", args.heal_optimizer),
                            ("--heal-chunk", args.heal_chunk)):
            if value is not None:
                raise UserError(f"{flag} sets healing; with --heal-steps 0 nothing heals")
    for flag, default in encoder_only_defaults().items():
        if getattr(args, flag[2:].replace("-", "_")) != default:
            raise UserError(f"{flag} applies to encoders; {source} is a causal LM")
    from tnlm.compress.layerwise import ALLOCATIONS

    if args.allocation is not None and args.allocation not in ALLOCATIONS:
        raise UserError(f"--allocation {args.allocation} applies to encoders; {source} is a "
                        f"causal LM, whose are {', '.join(ALLOCATIONS)}")
    if args.resume and not args.out:
        raise UserError("--resume continues the layer-by-layer compression saved in --out "
                        "DIR: it needs --out")
    if args.resume and not has_checkpoint(Path(args.out) / LAYERWISE_DIR):
        raise UserError(f"--resume: {Path(args.out) / LAYERWISE_DIR} holds no layer-by-layer "
                        "checkpoint to resume")
    text = own_text = None
    if args.text and args.lm_text is not None:
        raise UserError("--lm-text chooses the text when no --text is given; pass one of them")
    starts = None
    if args.lm_starts is not None:
        if args.text or args.lm_text == "prose":
            raise UserError("--lm-starts are the lines the model's own texts start from; with "
                            + ("--text" if args.text else "--lm-text prose")
                            + " it writes none")
        try:
            starts = read_sentences(args.lm_starts)
        except (OSError, ValueError) as err:
            raise UserError(f"--lm-starts: {err}") from None  # also: no line in it
    for flag, value, what in (("--lm-texts", args.lm_texts,
                               "how many texts the model writes itself"),
                              ("--lm-top-k", args.lm_top_k,
                               "how the model samples its own texts")):
        if value is not None and (args.text or args.lm_text == "prose"):
            raise UserError(f"{flag} sets {what}; with "
                            + ("--text" if args.text else "--lm-text prose") + " it writes none")
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.lm_prose is not None and (args.text or args.lm_text in ("prose", "both")):
        raise UserError("--lm-prose adds the shipped prose after the model's own texts; with "
                        + ("--text your text is used as it is (its last lines held out)"
                           if args.text else
                           f"--lm-text {args.lm_text} all of the prose is there already"))
    if args.lm_prose is not None and not 0 <= args.lm_prose <= 1:
        raise UserError(f"--lm-prose must be a fraction in [0, 1], got {args.lm_prose}")
    if args.lm_calibration is not None and args.lm_calibration < 1:
        raise UserError(f"--lm-calibration must be at least 1 (calibration sequences), got "
                        f"{args.lm_calibration}")
    n_calibration = recipe.n_calibration if args.lm_calibration is None \
        else args.lm_calibration
    allocation = args.allocation or dataclasses.replace(
        recipe, method=args.method or recipe.method).resolved_allocation()
    if args.sensitivity_sequences is not None:
        if allocation != "sensitivity":
            raise UserError("--sensitivity-sequences sets the probe of --allocation "
                            "sensitivity (--method tnlm's default); this job allocates by "
                            f"{allocation}")
        if args.sensitivity_sequences < 1:
            raise UserError(f"--sensitivity-sequences must be at least 1, got "
                            f"{args.sensitivity_sequences}")
        if args.sensitivity_sequences > n_calibration:
            raise UserError(f"--sensitivity-sequences is measured on the first calibration "
                            f"sequences: at most {n_calibration} (--lm-calibration), got "
                            f"{args.sensitivity_sequences}")
    elif recipe.sensitivity_sequences > n_calibration and allocation == "sensitivity":
        raise UserError(f"--lm-calibration {n_calibration}: the sensitivity probe takes the "
                        f"first {recipe.sensitivity_sequences} calibration sequences; give at "
                        f"least that, or a smaller --sensitivity-sequences")
    if args.lm_text == "mixed" and args.lm_texts is not None and args.lm_texts < 2:
        raise UserError(f"--lm-texts must be at least 2 with --lm-text mixed (half "
                        f"continuations, half chat answers), got {args.lm_texts}")
    if args.text:
        try:
            text = read_sentences(args.text, column=args.text_column)
        except (OSError, ValueError) as err:
            raise text_error(err) from None
        if len(set(text)) < 4:
            raise UserError(f"--text {args.text} holds {len(set(text))} distinct line(s): at "
                            f"least 4 are needed")
        # the last lines are held out (at least a tenth of the characters, at most
        # OWN_HELD_OUT_CHARS): the job measures perplexity on the user's own text
        try:
            text, own_text = split_held_out(text, OWN_HELD_OUT, OWN_HELD_OUT_CHARS)
        except ValueError as err:
            raise UserError(f"--text {args.text}: {err}") from None
    targets = args.targets.split(",") if args.targets else list(arch.targets)
    job = recipe.heal  # the job's defaults (every one not set here is kept)
    chunk = job.chunk if args.heal_chunk is None else (args.heal_chunk or None)
    try:
        heal = dataclasses.replace(job, steps=heal_steps, lr=lr, seed=args.seed,
                                   optimizer=args.heal_optimizer or job.optimizer,
                                   chunk=chunk)
    except ValueError as err:
        raise UserError(f"--heal-chunk / --heal-optimizer: {err}") from None
    if size > 1 and heal_steps and heal.batch_size < size:
        raise UserError(f"{size} processes: healing shares each step's batch of "
                        f"{heal.batch_size} sequences, so at most {heal.batch_size} "
                        "processes can heal (--nproc_per_node)")
    stages = tuple(args.lm_stages or ())
    if args.lm_stage_steps is not None and not stages:
        raise UserError("--lm-stage-steps sets the healing steps of each --lm-stages cut: "
                        "give --lm-stages too")
    stage_steps = None if args.lm_stage_steps is None else tuple(args.lm_stage_steps)
    if stages and not heal_steps:
        raise UserError("--lm-stages heal between their cuts; with --heal-steps 0 nothing "
                        "heals")
    try:  # the recipe's own checks, before loading, in one line naming the flag
        recipe = CausalLMRecipe(
            budget=args.budget, method=args.method or recipe.method, target_modules=targets,
            stages=stages, stage_heal_steps=stage_steps,
            heal=heal, seed=args.seed, text_source=args.lm_text or recipe.text_source,
            n_texts=recipe.n_texts if args.lm_texts is None else args.lm_texts,
            n_calibration=n_calibration,
            gen_top_k=args.lm_top_k, allocation=args.allocation, prose_fraction=args.lm_prose,
            starts=starts,
            pivoted=recipe.pivoted if args.pivoted is None else args.pivoted,
            sensitivity_sequences=recipe.sensitivity_sequences if args.sensitivity_sequences
            is None else args.sensitivity_sequences)
    except FieldError as err:
        raise UserError(f"{_FLAGS.get(err.field, err.field)}: {err}") from None
    if size > 1:  # the calibration batches the ranks share in block fitting, before loading
        from tnlm.compress.layerwise import LayerwiseConfig, shared_batches

        per = LayerwiseConfig.batch_size
        fitting = recipe.method == "tnlm" and recipe.fit_steps > 0
        n_batches, ok = shared_batches(recipe.n_calibration, per, size, fitting)
        if not ok:
            raise UserError(
                f"{size} processes (--nproc_per_node): the {recipe.n_calibration} calibration "
                f"sequences make {n_batches} batches of {per}, which "
                + ("must be shared equally (a number of processes that divides "
                   f"{n_batches})" if fitting else f"at most {n_batches} processes can share"))
    out, created = make_out(args.out, own=(LAYERWISE_DIR,)) if rank == 0 else (None, [])

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
            return _compress_causal_job(args, source, arch, recipe, text, own_text, out, say,
                                        rank, size)
    except BaseException as err:
        if out is not None:
            ckpt = out / LAYERWISE_DIR
            if has_checkpoint(ckpt):
                # with --lm-stages the checkpoint holds the first cut only: the later
                # ones start from healed weights and are compressed again
                later = " (the later --lm-stages cuts are compressed again)" \
                    if recipe.stages else ""
                if isinstance(err, HealingDiverged):  # the blocks are done; heal otherwise
                    note(f"the layer-by-layer checkpoint in {ckpt} is kept: the command "
                         "with --resume and a lower --lr compresses no block "
                         f"{'of the first cut ' if later else ''}again and heals "
                         f"afresh{later}")
                elif not isinstance(err, (UserError, ValueError)):
                    note(f"the layer-by-layer checkpoint in {ckpt} is kept: the same "
                         "command with --resume continues after its last finished block"
                         f"{later}")
            else:  # nothing resumable: the pieces of an unfinished first block, if any
                remove_checkpoint(ckpt)
        remove_empty(created)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()


#: minutes a process waits for the others at a collective (``--dist-timeout``)
DIST_TIMEOUT = 30.0
#: the folder of ``--out`` that holds a causal LM's per-block checkpoint while it runs
LAYERWISE_DIR = "layerwise"
#: the share of --text's characters (its last lines) held out to measure the result, and
#: at most this many characters (about 50,000 tokens of English: the default held-out
#: text has 35,362): rank 0 scores them twice while the other ranks wait
OWN_HELD_OUT = 0.1
OWN_HELD_OUT_CHARS = 200_000
#: the job's perplexity windows: tokens a window, and how far each moves (non-overlapping)
WINDOW = 256

#: the flag that sets each field a resumed checkpoint names (its recipe's, its text's or
#: its layer-by-layer settings')
_FLAGS = {"budget": "--budget", "seed": "--seed", "method": "--method",
          "pivoted": "--pivoted", "target_modules": "--targets", "n_texts": "--lm-texts",
          "gen_top_k": "--lm-top-k", "text_source": "--lm-text", "starts": "--lm-starts",
          "starts_sha256": "--lm-starts",
          "allocation": "--allocation", "prose_fraction": "--lm-prose",
          "sequences": "--lm-calibration, or the text", "n_calibration": "--lm-calibration",
          "stages": "--lm-stages", "stage_heal_steps": "--lm-stage-steps",
          "sensitivity_sequences": "--sensitivity-sequences",
          "heal": "--heal-steps / --lr / --heal-optimizer / --heal-chunk"}


def with_flags(message: str) -> str:
    """``message`` with the command-line flag after each field it names as ``field:`` or
    ``settings.field:`` (``n_texts (--lm-texts): 64 in the checkpoint, 256 now``)."""
    import re

    pattern = r"(?<![\w.])((?:settings\.)?(" + "|".join(_FLAGS) + r")):"

    def flag(m: re.Match) -> str:
        field = m.group(2)
        name = _SETTINGS_FLAGS.get(field) if m.group(1).startswith("settings.") else None
        return f"{m.group(1)} ({name or _FLAGS[field]}):"

    return re.sub(pattern, flag, message)


#: the flag of a layer-by-layer setting a checkpoint names where it is not the recipe
#: field's: the checkpointed cut is the first of --lm-stages when they are given
_SETTINGS_FLAGS = {"budget": "--budget, or the first of --lm-stages"}


def _causal_resume_state(args, model, tok, recipe, text, ckpt: Path | None, rank: int,
                         size: int) -> None:
    """``--resume`` checked (rank 0 reads the checkpoint, every rank gets its verdict) or,
    without it, a checkpoint of an earlier run in ``ckpt`` discarded with a notice; on the
    loaded model, before any work."""
    from tnlm.compress import distributed as dist_
    from tnlm.compress.decoder.job import check_resume, has_checkpoint, remove_checkpoint

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
                verdict = {"error": f"--resume: {with_flags(str(err))}; {fix}, or drop "
                                    "--resume to start afresh"}
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
            note(f"resuming the layer-by-layer compression in {ckpt} " +
                 ("on its calibration text (no block was finished)" if last is None else
                  f"after block {last} ({last + 1} of {n} blocks finished)"))
        return
    failed = ""
    if rank == 0 and ckpt.is_dir():
        if has_checkpoint(ckpt):
            note(f"discarding the layer-by-layer checkpoint of an earlier run in {ckpt} "
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



def _compress_causal_job(args, source, arch, recipe, text, own_text, out, say, rank,
                         size) -> int:
    """The work of :func:`compress_causal` once the inputs are checked (and, under
    torchrun, the process group is up); perplexity, printing and saving on rank 0 only.

    With ``--out DIR`` the per-block checkpoint is written to ``DIR/layerwise`` (every
    rank: the folder must be one they share) and removed once the model is saved."""
    import json

    import torch

    from tnlm.compress.decoder.job import compress_causal_lm, remove_checkpoint
    from tnlm.compress.decoder.quality import natural_eval_text, perplexity
    from tnlm.compress.decoder.text import token_sequences
    from tnlm.compress.layerwise import check_targets_and_budget
    from tnlm.compress.memory import mmap_large_allocations, peak_rss_mb, rss_mb, start_stage
    from tnlm.integration import MPOConfig, MPOModel
    from tnlm.integration.loading import load_pretrained

    targets, heal_steps = recipe.target_modules, recipe.heal.steps
    ckpt = Path(args.out) / LAYERWISE_DIR if args.out else None  # on every rank
    seconds: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    resets = []  # whether every stage's peak could be reset (Linux), else running maxima
    t_job = time.perf_counter()
    mapped = False
    if args.low_memory:  # every block >= 128 KiB mapped and unmapped, not kept in glibc's
        # heaps: on SmolLM2 at 60 % the healing peak 2.06x the loaded model instead of
        # 3.07x, the healing 1.7x slower, in an older job (the default job now peaks at
        # 2.35-2.46x without it; tnlm.compress.memory.mmap_large_allocations)
        mapped = mmap_large_allocations()
        if not mapped and rank == 0:
            note("--low-memory has no effect here: the C library is not glibc, or "
                 "MALLOC_MMAP_THRESHOLD_ is set in the environment (then it applies)")

    def score(texts: list[str] | None) -> Any:
        """The perplexity of ``texts`` in the job's windows (None: no text, no score)."""
        return None if texts is None else perplexity(model, tok, texts, max_length=WINDOW,
                                                     stride=WINDOW)

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
            seqs = token_sequences(tok, text, recipe.seq_len)
        except ValueError as err:
            raise UserError(f"--text {args.text}: {err} (its last {len(own_text)} lines are "
                            f"held out to measure the result)") from None
        try:  # several processes: enough sequences for each to get a calibration batch
            recipe.calibration_count(seqs.shape[0], size)
        except ValueError as err:
            raise UserError(f"--text {args.text} with {size} processes (--nproc_per_node): "
                            f"{err}") from None
    if text is None and recipe.text_source in ("chat", "mixed") and not getattr(
            tok, "chat_template", None):
        name = source.folder / source.gguf_file if source.gguf_file else source.folder
        raise UserError(f"--lm-text {recipe.text_source}: the tokenizer of {name} has no "
                        "chat template; use --lm-text self, prose or both")
    if text is None and recipe.starts is not None:  # each line fits the model's positions
        from tnlm.compress.decoder.text import check_starts_fit

        try:
            for chat in {"self": (False,), "both": (False,), "chat": (True,),
                         "mixed": (False, True)}[recipe.text_source]:
                check_starts_fit(model, tok, recipe.starts, recipe.gen_tokens, chat)
        except ValueError as err:
            raise UserError(f"--lm-starts {args.lm_starts}: {err}") from None
    try:  # the targets and the budget on the loaded model, before any expensive step
        check_targets_and_budget(model, recipe.layerwise_config(model, None))
    except ValueError as err:
        flag = "--budget" if str(err).startswith("budget") else "--targets"
        raise UserError(f"{flag}: {err}") from None
    _causal_resume_state(args, model, tok, recipe, text, ckpt, rank, size)
    if rank == 0 and out is not None and (out / "config.json").is_file():
        note(f"--out {out} holds a model of an earlier run: this run replaces it when it "
             "succeeds")
    if rank == 0:
        eval_text = natural_eval_text()
        eval_source = "natural held-out text (../shared/data dev splits)"
        if eval_text is None:
            from tnlm.compress.text import lm_held_out
            eval_text = ["\n".join(lm_held_out())]
            eval_source = ("tnlm's held-out prose (tnlm/data/lm_held_out.txt.gz: topics the "
                           "healing prose never names)")
        with stage("dense_perplexity"):
            dense, dense_own = score(eval_text), score(own_text)
    res = compress_causal_lm(model, tok, recipe, text=text,
                             progress=not args.quiet and rank == 0, log=say,
                             checkpoint_dir=ckpt, resume=args.resume)
    stopped = [(k + 1, st["heal_stopped"]) for k, st in enumerate(res.stages[:-1])
               if st["heal_stopped"]]  # --lm-stages: a cut before the last
    if res.heal is not None and res.heal.stopped:
        stopped.append((len(res.stages), res.heal.stopped))
    if stopped:  # a model whose healing was cut short would pass for a healed one
        k, why = stopped[0]
        raise HealingDiverged(f"healing {why}" + (f" (stage {k} of {len(res.stages)})"
                                                  if res.stages else "")
                              + "; nothing was saved as a model" + (f" in {out}" if out else ""))
    healed_steps = heal_steps if res.heal is not None else 0  # none: nothing truncated
    if rank != 0:
        return 0
    # compress_causal_lm's stages in their place (its "total" is theirs alone)
    seconds.update({k: v for k, v in res.seconds.items() if k != "total"})
    peaks.update(res.peak_rss_mb)
    with stage("perplexity"):
        ppl, own = score(eval_text), score(own_text)
    if out is not None:
        from tnlm.export import save_self_contained

        try:
            with stage("saving"):
                wrapped = MPOModel(model, MPOConfig(target_modules=targets))
                # written beside --out and renamed into place: never a mix with an
                # earlier model (its layer-by-layer checkpoint goes with the earlier folder)
                replace_folder(out, lambda d: save_self_contained(
                    wrapped, tok, d, sentence_transformers=False, shown_as=out),
                    drop=(LAYERWISE_DIR,))
        except Exception:  # the run's measures are not lost with the model
            print(f"not saved; perplexity dense {dense.ppl:.4f}, compressed {ppl.ppl:.4f} "
                  f"({ppl.ppl / dense.ppl:.4f}x)", file=sys.stderr)
            raise
    seconds["total"] = time.perf_counter() - t_job
    # the stage whose peak is highest; none where the peaks could not be reset per stage
    known = {k: v for k, v in peaks.items() if v is not None} if all(resets) else {}
    top = max(known, key=known.get) if known else None
    summary = dict(model=str(source), architecture=arch.name, method=recipe.method,
                   budget=args.budget, allocation=recipe.resolved_allocation(),
                   # the probe the sensitivities were measured on (calibration sequences;
                   # a resumed run's: its checkpoint's)
                   sensitivity_sequences=res.layerwise.sensitivity_sequences,
                   pivoted=recipe.pivoted, ratio=res.ratio,
                   params_before=res.layerwise.params_before,
                   # the steps healing ran for: 0 where nothing was truncated
                   params_after=res.layerwise.params_after, heal_steps=healed_steps,
                   # --lm-stages: each stage's budget, parameters kept and healing steps
                   stages=res.stages or None,
                   heal_optimizer=recipe.heal.optimizer, low_memory=mapped,
                   text=("--text " + str(args.text)) if args.text else recipe.text_source,
                   seed=args.seed,
                   # the model's own texts: how many, and the top-k they were drawn among
                   lm_texts=None if args.text or recipe.text_source == "prose"
                   else recipe.n_texts,
                   # the text's sequences of seq_len tokens (calibration and healing)
                   sequences=res.n_sequences,
                   # the text's first sequences that calibrate (all, where fewer)
                   lm_calibration=recipe.calibration_count(res.n_sequences, size),
                   lm_top_k=None if args.text or recipe.text_source == "prose"
                   else recipe.gen_top_k,
                   # the user's lines the model's own texts started from
                   lm_starts=None if recipe.starts is None else dict(
                       file=str(args.lm_starts), lines=len(recipe.starts)),
                   # the share of the shipped prose healed on after the model's texts
                   lm_prose=None if args.text or recipe.text_source in ("prose", "both")
                   else recipe.resolved_prose_fraction(),
                   perplexity_dense=dense.ppl, perplexity=ppl.ppl,
                   perplexity_ratio=ppl.ppl / dense.ppl, eval_tokens=ppl.n_tokens,
                   eval_text=eval_source,
                   # the held-out last lines of --text (never calibrated or healed on)
                   own_text=None if own is None else dict(
                       lines=len(own_text), chars=sum(map(len, own_text)),
                       tokens=own.n_tokens, perplexity_dense=dense_own.ppl,
                       perplexity=own.ppl, perplexity_ratio=own.ppl / dense_own.ppl),
                   seconds=seconds, peak_rss_mb=peaks,
                   rss_after_load_mb=loaded_mb, peak_stage=top,
                   peak_over_loaded=(known[top] / loaded_mb if top and loaded_mb else None),
                   processes=size)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"kept {res.layerwise.params_after:,} of {res.layerwise.params_before:,} "
              f"parameters of the targeted layers ({res.ratio:.1%}); method "
              f"{recipe.method}; " + (f"healing {healed_steps} steps ({recipe.heal.optimizer})"
                                      if healed_steps else "no healing"))
        print(f"perplexity on {ppl.n_tokens:,} tokens of {eval_source}: dense "
              f"{dense.ppl:.2f}, compressed {ppl.ppl:.2f} ({ppl.ppl / dense.ppl:.3f}x)")
        if own is not None:
            print(f"perplexity on {own.n_tokens:,} tokens of the last {len(own_text)} lines of "
                  f"--text {args.text} ({sum(map(len, own_text)):,} characters, held out): "
                  f"dense {dense_own.ppl:.2f}, "
                  f"compressed {own.ppl:.2f} ({own.ppl / dense_own.ppl:.3f}x)")
        if summary["peak_over_loaded"] is not None:
            print(f"peak memory {known[top]:,.0f} MiB ({top}), "
                  f"{summary['peak_over_loaded']:.2f}x the {loaded_mb:,.0f} MiB after loading")
    if out is not None:
        if ckpt is not None:
            remove_checkpoint(ckpt)  # the model is saved: nothing left to resume
        say(f"saved to {out} (tnlm.export.load_compressed(DIR) rebuilds it)")
    return 0
