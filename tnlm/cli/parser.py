"""The ``tnlm`` command line's parser: every command, flag, default and help text."""

from __future__ import annotations

import argparse

import numpy as np

from tnlm.cli.causal import DIST_TIMEOUT
from tnlm.cli.common import encoder_only_defaults
from tnlm.cli.compress import cmd_compress
from tnlm.cli.weights import cmd_decompose, cmd_inspect, cmd_report

__all__ = ["COMMANDS", "HEAL_TRAIN_CHOICES", "HEAL_TRAIN_RENAMED", "build_parser"]


COMMANDS = ("compress", "inspect", "report", "decompose", "export", "eval")
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



def _short(x: float) -> str:
    """``5e-4`` for 0.0005: a learning rate as the help text writes it."""
    return np.format_float_scientific(x, trim="-", exp_digits=1)


def build_parser() -> argparse.ArgumentParser:
    from tnlm import __version__
    from tnlm.compress.decoder.heal import OPTIMIZERS, CausalHealConfig
    from tnlm.compress.decoder.job import (
        DEFAULT_PROSE_FRACTION,
        JOB_HEAL,
        TEXT_SOURCES,
        CausalLMRecipe,
    )
    from tnlm.compress.encoder import DEFAULT_SICK, EncoderRecipe
    from tnlm.compress.layerwise import ALLOCATIONS as LAYERWISE_ALLOCATIONS
    from tnlm.compress.pipeline import ALLOCATIONS

    enc = EncoderRecipe  # the encoder job's defaults (class attributes of the dataclass)
    only = encoder_only_defaults()  # the flags a causal LM's job refuses, at these defaults

    ap = argparse.ArgumentParser(prog="tnlm", description="MPO compression of language models")
    ap.add_argument("--version", action="version", version=f"tnlm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("compress", help="compress a model's linear layers to a budget and heal it",
                       formatter_class=fmt)
    p.add_argument("model_dir", nargs="?", default=None,
                   help="a transformers model folder or a .gguf file (causal LMs: Llama, "
                        "Mistral, Qwen2, GPT-2, OPT, ...); default: the embedded MiniLM")
    p.add_argument("--budget", type=float, default=None,
                   help=f"fraction of the targeted layers' parameters to keep, model-wide; 1 "
                        f"keeps every layer dense; a budget below the smallest model the "
                        f"allocation can make is refused; default {enc.budget} for an "
                        f"encoder, {CausalLMRecipe.budget} for a causal LM")
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
                   default=only["--heal-train"],
                   help="what healing trains: every MPO core ('cores'), the cores but the "
                        "central ones ('cores-central'), or also the linears the allocation "
                        "kept dense ('cores+linears', the default; formerly 'all'); norms "
                        "and MPO biases always")
    p.add_argument("--teacher-bf16", action=argparse.BooleanOptionalAction,
                   default=only["--teacher-bf16"],
                   help="run the teacher in bfloat16 during healing (default: when the CPU "
                        "has bf16 instructions; pooled outputs within 1e-4 cosine)")
    p.add_argument("--heal-optimizer", choices=OPTIMIZERS, default=None,
                   help="causal LMs: healing's optimizer; adafactor keeps factored second "
                        "moments instead of AdamW's two moment buffers (twice the trained "
                        "parameters' bytes), at the same --lr (default: "
                        f"{JOB_HEAL['optimizer']})")
    p.add_argument("--heal-chunk", type=int, default=None, metavar="POSITIONS",
                   help="causal LMs: compute healing's next-token KL over chunks of this "
                        "many positions, one at a time (less memory); 0: "
                        f"the whole sequence at once (default: {JOB_HEAL['chunk']})")
    p.add_argument("--low-memory", action="store_true",
                   help="causal LMs: have the C allocator map every block of 128 KiB or more "
                        "on its own and unmap it when freed, so freed tensors do not stay "
                        "resident (SmolLM2-135M at 60 %%: healing peak 2.06x the loaded "
                        "model instead of 3.07x, healing 1.7x slower, in an older job; the "
                        "default job now peaks at 2.35-2.46x without it; glibc only)")
    p.add_argument("--lm-text", choices=TEXT_SOURCES, default=None,
                   help="causal LMs without --text: calibrate and heal on the model's own "
                        "samples (self), the prose that ships with tnlm (prose: nothing to "
                        "sample), both, its own answers to chat prompts in its chat "
                        "format (chat), or half samples, half answers (mixed); after "
                        "samples, healing also draws from --lm-prose of the prose (default: "
                        f"{CausalLMRecipe.text_source})")
    p.add_argument("--lm-starts", default=None, metavar="FILE",
                   help="causal LMs without --text: a few lines of your kind of text (one a "
                        "line; examples, not a corpus): the model's own texts start with "
                        "them and continue them (--lm-text chat: it answers them) instead "
                        "of tnlm's sentences; the text stays data-free otherwise")
    p.add_argument("--lm-texts", type=int, default=None, metavar="N",
                   help="causal LMs: how many texts the model writes for its own calibration "
                        "and healing (--lm-text self, both, chat, mixed); more heal better "
                        "and take longer to write, about 0.7 s each on 2 CPU cores for "
                        f"SmolLM2-135M (default: {CausalLMRecipe.n_texts})")
    p.add_argument("--lm-calibration", type=int, default=None, metavar="N",
                   help="causal LMs: how many of the text's first sequences of "
                        f"{CausalLMRecipe.seq_len} tokens calibrate (every target's whitened "
                        "statistics and block fitting; the rest only heals; all of them "
                        "where the text makes fewer); more estimate "
                        "wider layers better and take longer to compress "
                        f"(default: {CausalLMRecipe.n_calibration})")
    p.add_argument("--lm-stages", type=float, nargs="+", default=None, metavar="B",
                   help="causal LMs: budgets above --budget, decreasing, to compress to and "
                        "heal at first (cut, heal, cut further): the healing steps are "
                        "shared by the stages, each stage adds a compression "
                        "(CausalLMRecipe.stages; default: one cut)")
    p.add_argument("--lm-stage-steps", type=int, nargs="+", default=None, metavar="N",
                   help="causal LMs, with --lm-stages: each cut's healing steps (one more "
                        "number than --lm-stages, adding up to --heal-steps) instead of an "
                        "even split; SmolLM2 at 60 %% with --lm-stages 0.8: 25 125 healed "
                        "further than one cut, an even split less far")
    p.add_argument("--lm-prose", type=float, default=None, metavar="F",
                   help="causal LMs: after the model's own texts, heal on this fraction of the "
                        "prose that ships with tnlm too (--lm-text self, chat, mixed; 0: the "
                        "samples alone; default: "
                        f"{DEFAULT_PROSE_FRACTION}, about as many tokens as 256 texts, which "
                        "healed SmolLM2 at 60 %% to 2.56x the dense perplexity against "
                        "2.62x without, one seed)")
    p.add_argument("--lm-top-k", type=int, default=None, metavar="K",
                   help="causal LMs: the model's own texts sampled among its K most likely "
                        "tokens at each step (then the top-0.95 nucleus); default: the "
                        "whole nucleus (K=50, transformers' own default, healed SmolLM2 "
                        "less: 3.52x vs 2.93x the dense perplexity at 60 %% with the "
                        "residual allocation)")
    p.add_argument("--pivoted", action=argparse.BooleanOptionalAction, default=None,
                   help="fix each truncated layer's bond gauge, so a rank-r layer stores "
                        "r (I + J - r) numbers instead of r (I + J): a larger rank at the "
                        "same --budget (saved as PivotedLinear layers); default: "
                        f"{'on' if enc.pivoted else 'off'} for an encoder, "
                        f"{'on' if CausalLMRecipe.pivoted else 'off'} for a causal LM")
    p.add_argument("--reconstruct-steps", type=int, default=only["--reconstruct-steps"],
                   help="block-by-block reconstruction steps per block before healing "
                        f"(encoders; default {enc.reconstruct_steps})")
    causal_allocations = [a for a in LAYERWISE_ALLOCATIONS if a not in ALLOCATIONS]
    p.add_argument("--allocation", choices=[*ALLOCATIONS, *causal_allocations], default=None,
                   help="how the budget is spread over the layers; an encoder: "
                        f"{', '.join(ALLOCATIONS)} (default {enc.allocation}); a causal LM: "
                        f"{', '.join(LAYERWISE_ALLOCATIONS)} (default: sensitivity for "
                        "--method tnlm, uniform for the baselines)")
    p.add_argument("--sensitivity-sequences", type=int, default=None, metavar="N",
                   help="causal LMs, --allocation sensitivity: how many calibration "
                        "sequences each target's end-to-end error is measured on; the "
                        "measurement's time grows with them (SmolLM2 at 60 %%: 250-260 s of "
                        "compression with 4, 314-355 s with 8, the same perplexity within "
                        f"the seeds' spread; default: {CausalLMRecipe.sensitivity_sequences})")
    p.add_argument("--calibration", type=int, default=only["--calibration"],
                   help=f"calibration sentences (encoders; default {enc.calibration})")
    p.add_argument("--text", default=None,
                   help="unlabeled in-domain text, one sentence per line (default: generated "
                        "sentences and docstrings of the installed Python source; in-domain "
                        "text compresses better, docs/results.md)")
    p.add_argument("--text-column", type=int, default=None,
                   help="take this tab-separated column of --text (from 0; every non-empty "
                        "line must have it)")
    p.add_argument("--with-default-text", action="store_true", default=only["--with-default-text"],
                   help="heal on --text and the default text together: in-domain text keeps "
                        "the domain's similarities, the default text the rest "
                        "(docs/results.md)")
    p.add_argument("--sick", default=only["--sick"],
                   help="SICK relatedness file to measure Spearman (default: "
                        f"{DEFAULT_SICK} if present; '' to skip)")
    p.add_argument("--targets", default=None,
                   help="comma-separated module patterns (default: the architecture's targets)")
    p.add_argument("--seed", type=int, default=enc.seed)
    p.add_argument("--out", default=None,
                   help="output folder ('' to skip saving; default: out/minilm-mpo for the "
                        "embedded MiniLM, else out/NAME-mpo, NAME the model folder's or "
                        ".gguf file's name); a model already there is replaced "
                        "when the run succeeds; a folder of other files is refused; while "
                        "the run lasts it holds the encoder's "
                        "healing state (DIR/healing) or a causal LM's per-block checkpoint "
                        "(DIR/layerwise), removed once the model is saved")
    p.add_argument("--resume", action="store_true",
                   help="continue what an interrupted run left in --out DIR: an encoder's "
                        "healing (DIR/healing), a causal LM's layer-by-layer compression "
                        "after its last finished block (DIR/layerwise; also under torchrun, "
                        "with the same number of processes); refused if it was made with "
                        "other settings; without it, a leftover state is discarded")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="causal LMs under torchrun: minutes a process waits for the others "
                        "at a collective before it stops with an error (they wait while "
                        "rank 0 writes the calibration text and measures perplexity; "
                        f"default {DIST_TIMEOUT:g})")
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
    p.add_argument("--n-sites", type=int, default=None,
                   help="sites of each dense weight's MPO (default 5; not for a saved MPO "
                        "model, whose layers keep their own)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("decompose", help="exact MPO of every weight matrix, with a report",
                       formatter_class=fmt)
    p.add_argument("model_dir", nargs="?", default=None, help="default: the embedded MiniLM")
    p.add_argument("--n-sites", type=int, default=5)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_decompose)
    from tnlm.cli.evaluate import add_eval_parser
    from tnlm.cli.export import add_export_parser

    add_export_parser(sub)
    add_eval_parser(sub)
    return ap
