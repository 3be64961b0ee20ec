"""``tnlm compress``: the inputs checked before any model is loaded, then the encoder's
job here or a causal LM's (:mod:`tnlm.cli.causal`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tnlm.cli.causal import compress_causal
from tnlm.cli.common import (
    HealingDiverged,
    UserError,
    check_budget_and_healing,
    launched,
    make_out,
    model_path,
    note,
    remove_empty,
    replace_folder,
    text_error,
)
from tnlm.core.validation import MAX_SEED

__all__ = ["cmd_compress"]


# An encoder refuses these flags, each with what it is for (or the encoder's own flag):
# "--FLAG applies to causal LMs" + the reason
CAUSAL_ONLY: tuple[tuple[str, str], ...] = (
    ("dist_timeout", " under torchrun"),
    ("method", "; for an encoder see --allocation"),
    ("heal_optimizer", "; an encoder heals with AdamW"),
    ("heal_chunk", ""),
    ("low_memory", ""),
    ("lm_text", "; an encoder's text without --text is tnlm's default text"),
    ("lm_texts", " (how many texts the model writes)"),
    ("lm_starts", " (the lines their own texts start from); an encoder heals on --text or "
                  "tnlm's default text"),
    ("lm_top_k", " (how the model's texts are sampled)"),
    ("lm_prose", " (prose added to the model's texts)"),
    ("lm_stage_steps", " (the healing steps of each --lm-stages cut)"),
    ("lm_stages", " (budgets compressed to and healed at before --budget)"),
    ("lm_calibration", " (their calibration sequences); an encoder's is --calibration"),
    ("sensitivity_sequences", " (the probe of their sensitivity allocation)"),
)


def _drop_heal_state(folder: Path) -> None:
    """Remove a healing checkpoint (its two files, then the folder if it is empty)."""
    from tnlm.compress.heal_state import STATE_FILE, STATE_TENSORS

    for name in (STATE_FILE, STATE_TENSORS):
        (folder / name).unlink(missing_ok=True)
    remove_empty([folder])



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
        raise text_error(err) from None



def _tokenizer(path: Path) -> object:
    """MODEL_DIR's tokenizer, loaded before the model; :class:`UserError` naming MODEL_DIR
    when it holds none (transformers then builds an empty one: every word unknown)."""
    from tnlm.integration.loading import load_tokenizer

    try:
        return load_tokenizer(path, f"MODEL_DIR {path}")
    except ValueError as err:
        raise UserError(str(err)) from None


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress a model's linear layers to a budget (data-aware MPOs, healed), report, save.

    On an encoder this is :func:`tnlm.compress.encoder.compress_encoder` (its defaults:
    :class:`~tnlm.compress.encoder.EncoderRecipe`); on a causal LM
    :func:`tnlm.compress.decoder.job.compress_causal_lm`.

    Every input is checked before the model is loaded: the numbers, --text (UTF-8, enough
    sentences, the column), --sick (a SICK file), MODEL_DIR's tokenizer (a folder without
    one is refused), --out (created and written to, and removed again if the run then
    fails before writing anything there); the budget and --resume are checked on the
    loaded model, before any compression.

    A healing state left in ``--out/healing`` by an interrupted run is continued only
    with --resume, which refuses a state made with other settings (text, lr, seed,
    budget, steps, ...); without --resume it is discarded, with a notice. A model already
    in --out is replaced, with a notice, once this run succeeds (it stays until then): the
    new model is written beside --out and renamed into place
    (:func:`~tnlm.cli.common.replace_folder`), so --out holds the earlier folder or the
    whole new model, never a mix.
    After success the healing state is removed. Healing that blows up exits with status 1
    and one line naming what was kept on disk; nothing is saved as a model.

    A causal LM keeps the per-block checkpoint of its layer-by-layer compression (and its
    own text, --lm-text) in ``--out/layerwise`` the same way: continued after the last
    finished block only with --resume, refused if made with other settings (named),
    discarded with a notice without --resume, removed once the model is saved.
    """

    from tnlm.compress.encoder import DEFAULT_SICK, EncoderRecipe, split_text
    from tnlm.compress.heal_state import STATE_FILE
    from tnlm.compress.quality import read_sick

    if args.text is not None and not args.text.strip():
        raise UserError("--text is empty: pass a file of one sentence a line (leave --text "
                        "out for the default text)")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    if args.text_column is not None and not args.text:
        raise UserError("--text-column picks the column of --text FILE: pass --text")
    if args.targets is not None and not all(t.strip() for t in args.targets.split(",")):
        raise UserError(f"--targets {args.targets!r} names an empty module pattern: pass "
                        "comma-separated patterns (query,key,...), or leave --targets out "
                        "for the architecture's targets")
    source_arch = _architecture(args.model_dir, targets_given=bool(args.targets))
    if args.out is None:  # named after the model: a causal LM's is not out/minilm-mpo
        args.out = default_out(args.model_dir)
    if source_arch is not None and source_arch[1].causal:
        return compress_causal(args, *source_arch)
    _refuse_task_head(args.model_dir)
    if launched()[1] > 1:
        raise UserError("several processes (torchrun) compress causal LMs only; run an "
                        "encoder's compression as one process")
    for dest, why in CAUSAL_ONLY:
        value = getattr(args, dest)  # given: not None, and not store_true's False (0 is given)
        if value is not None and value is not False:
            raise UserError(f"--{dest.replace('_', '-')} applies to causal LMs{why}")
    from tnlm.compress.pipeline import ALLOCATIONS

    if args.allocation is None:
        args.allocation = EncoderRecipe.allocation
    elif args.allocation not in ALLOCATIONS:
        raise UserError(f"--allocation {args.allocation} applies to causal LMs; an encoder's "
                        f"are {', '.join(ALLOCATIONS)}")
    args.heal_steps = EncoderRecipe.heal_steps if args.heal_steps is None else args.heal_steps
    if args.heal_steps == 0:
        for flag, value in (("--lr", args.lr), ("--heal-train", args.heal_train),
                            ("--teacher-bf16", args.teacher_bf16)):
            if value is not None:
                raise UserError(f"{flag} sets healing; with --heal-steps 0 nothing heals")
    args.lr = EncoderRecipe.lr if args.lr is None else args.lr
    for name in ("heal_train", "reconstruct_steps", "calibration"):  # not given: the recipe's
        if getattr(args, name) is None:
            setattr(args, name, getattr(EncoderRecipe, name))
    args.budget = EncoderRecipe.budget if args.budget is None else args.budget
    check_budget_and_healing(args.budget, args.heal_steps, args.lr)
    if args.reconstruct_steps < 0:
        raise UserError(f"--reconstruct-steps must be >= 0, got {args.reconstruct_steps}")
    if args.calibration < 1:
        raise UserError(f"--calibration must be >= 1 (calibration sentences), got "
                        f"{args.calibration}")
    if args.resume and not (args.out and args.heal_steps):
        raise UserError("--resume continues the healing saved in --out DIR: it needs --out "
                        "and --heal-steps > 0")
    path = model_path(args.model_dir)
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
        teacher_bf16=args.teacher_bf16, seed=args.seed,
        pivoted=EncoderRecipe.pivoted if args.pivoted is None else args.pivoted)
    tok = _tokenizer(path)
    out, created = make_out(args.out, own=("healing",))
    from transformers.utils import logging as hf_logging

    def state_stamp() -> tuple[int, int] | None:
        try:
            st = (out / "healing" / STATE_FILE).stat()
        except (OSError, TypeError):
            return None
        return st.st_mtime_ns, st.st_size

    before = state_stamp()  # an earlier run's state, if any
    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:  # transformers' "Loading weights" bars too
        hf_logging.disable_progress_bar()
    try:
        return _encoder_job(args, path, tok, text, source, split, sick, recipe, out)
    except BaseException as err:
        if out is not None:
            if (out / "healing" / STATE_FILE).is_file():
                # a state this run saved, or one --resume had checked and the run did
                # not get to (an interrupt, no memory): worth the same command again; one
                # it found and never checked (a failed --budget) or refused is not
                if not isinstance(err, (UserError, HealingDiverged)) and (
                        state_stamp() != before
                        or args.resume and not isinstance(err, ValueError)):
                    note(f"the healing state in {out / 'healing'} is kept: the same command "
                         "with --resume continues it")
            elif (out / "healing").is_dir():
                remove_empty([out / "healing"])
            remove_empty(created)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _encoder_job(args, path, tok, text, source, split, sick, recipe, out) -> int:
    """``tnlm compress`` on an encoder after its inputs were checked (:func:`cmd_compress`):
    load, check the budget and --resume, :func:`~tnlm.compress.encoder.compress_encoder`,
    print, save."""
    import json

    import torch
    from transformers import AutoModel

    from tnlm.compress.encoder import compress_encoder
    from tnlm.compress.heal_state import STATE_FILE, check_resumable, heal_settings
    from tnlm.compress.pipeline import check_budget, run_context
    from tnlm.integration import format_report
    from tnlm.integration.io import CONFIG_NAME
    from tnlm.integration.loading import check_block_weights

    def say(*parts: object) -> None:
        if not args.quiet:  # with --json, stdout carries the JSON only
            print(*parts, file=sys.stderr if args.json else sys.stdout)

    torch.manual_seed(args.seed)  # weights a checkpoint lacks are drawn alike in every run
    healing = out / "healing" if out and recipe.heal_steps else None
    heal = recipe.heal_config(checkpoint_dir=str(healing) if healing else None)
    say(f"text: {len(text):,} sentences from {source}; {len(split.calibration)} for "
        f"calibration, {len(split.heal_text):,} for healing, {len(split.held_out)} held out")
    # float32 whatever the stored dtype (as a causal LM's): the job's steps need it
    model, info = AutoModel.from_pretrained(str(path), dtype=torch.float32,
                                            output_loading_info=True)
    try:
        check_block_weights(path, info)
    except ValueError as err:
        raise UserError(str(err)) from None
    model.eval()
    cfg = recipe.compression_config(model, heal)
    check_budget(model, cfg, name="--budget")
    if healing is not None and args.resume:
        settings = heal_settings(heal, split.heal_text, model,
                                 run_context(cfg, split.calibration))
        try:
            step = check_resumable(healing, settings)
        except FileNotFoundError:
            raise UserError(f"--resume: {healing} holds no healing state to resume") from None
        except ValueError as err:
            fix = ("pass the settings of that run" if "other settings" in str(err) else
                   "it cannot be resumed")
            raise UserError(f"--resume: {err}; {fix}, or drop --resume to start afresh") \
                from None
        note(f"resuming the healing in {healing} at step {step} of {recipe.heal_steps}")
    elif out is not None and (out / "healing" / STATE_FILE).exists():
        note(f"discarding the healing state of an earlier run in {out / 'healing'} "
             "(pass --resume to continue it)")
        _drop_heal_state(out / "healing")
    if out is not None and (out / CONFIG_NAME).is_file():
        note(f"--out {out} holds a model of an earlier run: this run replaces it when it "
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
        # tnlm.export.load_compressed(out) / sentence_transformer(out) need nothing else;
        # written beside --out and renamed into place: never a mix with an earlier model
        replace_folder(out, lambda d: save_self_contained(res.model, tok, d, shown_as=out),
                       drop=("healing",))
        if healing is not None:
            _drop_heal_state(healing)  # the model is saved: nothing left to resume
        say(f"saved to {out}")
    return 0



def default_out(model_dir: str | None) -> str:
    """``--out``'s default: ``out/minilm-mpo`` for the embedded MiniLM, else
    ``out/NAME-mpo`` with NAME the model folder's name or the .gguf file's stem."""
    if model_dir is None:
        return "out/minilm-mpo"
    p = Path(os.path.abspath(model_dir))  # not resolved: a link keeps its own name
    name = (p.stem if p.is_file() else p.name) or "model"
    return f"out/{name}-mpo"


def _decoder_name(folder: Path) -> str | None:
    """The architecture a model folder's ``config.json`` names when it is a causal LM
    (``architectures`` ending in ForCausalLM / LMHeadModel, or ``is_decoder``), else None."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    names = [str(a) for a in cfg.get("architectures") or []]
    causal = [a for a in names if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if causal:
        return causal[0]
    if cfg.get("is_decoder") is True:
        return f"model_type {cfg.get('model_type')!r} (is_decoder)"
    return None


#: class-name endings of an encoder checkpoint whose head is its pre-training's (masked
#: language model, ELECTRA's discriminator): the encoder job makes an embedding model of it
_PRETRAINING_HEADS = ("ForMaskedLM", "ForPreTraining")


def _refuse_task_head(model_dir: str | None) -> None:
    """:class:`UserError` when MODEL_DIR's ``config.json`` names (``architectures``) an
    encoder with another head than its pre-training's (``*ForSequenceClassification``,
    ``*ForTokenClassification``, ``*ForQuestionAnswering``, ...): the encoder's job loads
    the bare encoder (``AutoModel``) and would silently drop that head (the saved
    ``config.json`` would still name it; after export it would be random). Nothing is
    loaded; a folder whose ``config.json`` cannot be read, or names no architecture, passes."""
    if model_dir is None or not Path(model_dir).is_dir():
        return
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        names = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        return
    heads = [a for a in names if ("For" in a or a.endswith("LMHeadModel"))
             and not a.endswith(_PRETRAINING_HEADS)]
    if heads:
        raise UserError(f"MODEL_DIR {model_dir} holds a {heads[0]} (config.json's "
                        "architectures), a model with a task head: tnlm compress makes an "
                        "encoder's embedding model from the bare encoder and would drop that "
                        "head; supported are a bare encoder (e.g. BertModel), an encoder's "
                        "pre-training checkpoint (*ForMaskedLM, *ForPreTraining) or a causal "
                        "LM (*ForCausalLM, *LMHeadModel); compress a task model from Python "
                        "(tnlm.compress.pipeline.compress_model keeps its head)")


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
            decoder = _decoder_name(Path(model_dir))
            if decoder is not None:  # the encoder job would drop its head and score cosines
                raise UserError(f"MODEL_DIR: {err}; {decoder} is a causal LM, and --targets "
                                "names the layers of an encoder tnlm has no entry for "
                                "(a causal LM needs its architecture's entry: block "
                                "structure, cache and head)") from None
            return None  # an encoder tnlm has no entry for: the user named its targets
        raise UserError(f"MODEL_DIR: {err}" + ("; or name the layers to compress with "
                                                "--targets" if "is not supported" in str(err)
                                                else "")) from None

    class _Cfg:
        model_type = source.model_type
    arch = architecture_of(_Cfg())
    if source.gguf_file and not arch.causal:
        raise UserError(f"MODEL_DIR: {model_dir} is a GGUF file of {source.model_type!r}, an "
                        "encoder; GGUF files are read for causal LMs only: pass the "
                        "encoder's transformers folder")
    return source, arch
