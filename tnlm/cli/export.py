"""``tnlm export DIR --format {onnx,hf,st} [--int8 [--embedding-bits 4] | --weight-bits
{8,4} [--weight-compute int8|float]] --out PATH``: ship a compressed model.

:func:`add_export_parser` adds the sub-command to ``tnlm``'s sub-parsers (it sets
``func=cmd_export``); :func:`cmd_export` runs it. Mistakes raise :class:`ExportError`
(a ``ValueError``) with one line naming the argument and what was expected, before
anything is loaded or written.

Formats:

* ``onnx``: one ``.onnx`` file keeping the MPO layers factorized; for a causal LM the
  graph takes and returns its key/value cache (:func:`tnlm.export.export_onnx_decoder`,
  run by :class:`tnlm.export.OnnxCausalLM`) (with ``--int8``: the
  file holds int8 weights, ONNX Runtime dynamic quantization, 7-bit with one scale per
  column; ``--per-tensor``: one 8-bit scale a tensor, 7-bit for a model with gauge-fixed
  layers, whose chains saturate at 8 bits; adding ``--embedding-bits
  4`` stores the word-embedding table with 4-bit codes, see
  :func:`tnlm.export.quantize_int8`; with ``--weight-bits 8|4`` instead: weight-only
  quantization, each MatMul weight in 8 or 4 bits with a scale per block of
  ``--weight-block`` rows, the activations quantized per block at run time for int8
  products (``--weight-compute``; the default at 8 bits) or kept in float,
  :func:`tnlm.export.quantize_weights`);
* ``hf``: a transformers folder with merged dense weights (loads without tnlm; as big
  as the dense model);
* ``st``: a self-contained folder (MPO weights, config, tokenizer, sentence-transformers
  files) that :func:`tnlm.export.load_compressed` and
  :func:`tnlm.export.sentence_transformer` read.

DIR is a tnlm checkpoint (``tnlm compress --out``, ``MPOModel.save_pretrained`` or a
folder of format ``st``). Its architecture comes from DIR when it holds ``config.json``
(``--base`` then gives the tokenizer only, when DIR has none), else from ``--base``
(default: the embedded MiniLM, the model ``tnlm compress`` compresses by default).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["add_export_parser", "cmd_export", "ExportError", "FORMATS"]

FORMATS = ("onnx", "hf", "st")
#: ``--opset``'s, ``--embedding-block``'s and ``--weight-block``'s defaults
OPSET, EMBEDDING_BLOCK, WEIGHT_BLOCK = 20, 64, 32


class ExportError(ValueError):
    """A wrong argument of ``tnlm export``: one line naming it and what was expected."""


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``); returns
    its parser, whose ``func`` default is :func:`cmd_export`."""
    from tnlm.export.weight_only import WEIGHT_BLOCKS
    p = subparsers.add_parser(
        "export", help="write a compressed model as ONNX, a transformers folder or a "
                       "self-contained sentence-transformers folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("directory", metavar="DIR",
                   help="a tnlm checkpoint (tnlm compress --out, MPOModel.save_pretrained)")
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="onnx: one .onnx file keeping the MPO factors; hf: transformers folder "
                        "with merged dense weights (no tnlm needed, dense size); st: "
                        "self-contained folder with sentence-transformers files (encoders)")
    p.add_argument("--out", required=True, help="the .onnx file (onnx) or the folder (hf, st)")
    p.add_argument("--int8", action="store_true",
                   help="onnx only: int8 weights (ONNX Runtime dynamic quantization)")
    p.add_argument("--per-tensor", action="store_true",
                   help="with --int8: one scale per weight tensor, 8-bit (7-bit for a model "
                        "with gauge-fixed layers), instead of one per output column, 7-bit "
                        "(the default: MiniLM's SST-2 cosine to the dense model 0.990 against "
                        "0.957 per tensor; 50 %% gauge-fixed 0.731 against 0.693 per tensor at "
                        "7 bits and 0.079 at 8, docs/export.md)")
    p.add_argument("--embedding-bits", type=int, choices=(8, 4), default=None,
                   help="the word-embedding table: with --int8, 8 (the default) or 4; with "
                        "--weight-bits, 4 (without it the table stays float32); 4 stores it "
                        "as 4-bit codes with a float16 scale and offset per row and block of "
                        "--embedding-block columns")
    p.add_argument("--embedding-block", type=int, default=None,
                   help=f"with --embedding-bits 4: columns per scale (even, at most the "
                        f"table's width; default {EMBEDDING_BLOCK}, or the width where that "
                        "is fewer)")
    p.add_argument("--weight-bits", type=int, choices=(8, 4), default=None,
                   help="onnx only, instead of --int8: weight-only quantization, every MatMul "
                        "weight in 8 or 4 bits with one scale per block of --weight-block "
                        "input rows, the activations in float (ONNX Runtime's MatMulNBits; "
                        "keeps a decoder's answers where --int8 does not, docs/export.md)")
    p.add_argument("--weight-block", type=int, default=None,
                   help=f"with --weight-bits: input rows per scale (one of "
                        f"{', '.join(map(str, WEIGHT_BLOCKS))}; default {WEIGHT_BLOCK})")
    p.add_argument("--weight-compute", choices=("int8", "float"), default=None,
                   help="with --weight-bits: the products of MatMulNBits in int8 (the "
                        "activations quantized per block at run time; the default for 8 "
                        "bits, whose float path ONNX Runtime runs about 20x slower) or in "
                        "float32 (the default for 4 bits)")
    p.add_argument("--base", default=None,
                   help="transformers model folder giving the architecture when DIR has no "
                        "config.json, and the tokenizer when DIR has none (default: the "
                        "embedded MiniLM)")
    p.add_argument("--opset", type=int, default=None, help=f"onnx only: the ONNX opset "
                   f"(default {OPSET}: GELU as one operator, fused by ONNX Runtime)")
    p.add_argument("--fuse", action="store_true",
                   help="onnx only: the projections reading the same states (query/key/value, "
                        "gate/up) as one MatMul and a Split (the same numbers; measured no "
                        "faster on MiniLM, docs/export.md)")
    p.add_argument("--no-pooling", action="store_true",
                   help="onnx only: no sentence_embedding output (the mean-pooled, normalised "
                        "embedding is added for models without a language-model head)")
    p.set_defaults(func=cmd_export)
    return p


def _check_args(args: argparse.Namespace
                ) -> tuple[Path, Path, Path | None, dict[str, Any]]:
    """``(dir, out, base, the checkpoint's parsed mpo_config.json)`` after checking every
    argument, or :class:`ExportError`;
    fills in ``args.opset``, ``args.embedding_bits`` and ``args.weight_block`` when they
    were not given (``args.embedding_block`` once the table's width is known)."""
    from tnlm.export.folder import check_checkpoint, has_tokenizer, recorded_class_generates

    d = Path(args.directory)
    try:
        meta = check_checkpoint(d)
    except ValueError as err:
        raise ExportError(f"DIR: {err}") from None
    if args.format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    for flag, given in (("--fuse", args.fuse), ("--int8", args.int8),
                        ("--weight-bits", args.weight_bits is not None),
                        ("--opset", args.opset is not None), ("--no-pooling", args.no_pooling)):
        if given and args.format != "onnx":
            raise ExportError(f"{flag} applies to --format onnx only, not --format "
                              f"{args.format}")
    if args.fuse and args.per_tensor:
        raise ExportError("--fuse with --per-tensor would give query, key and value one int8 "
                          "scale for their fused weight; per column (the default) quantizes "
                          "it as the separate weights")
    if args.per_tensor and not args.int8:
        raise ExportError("--per-tensor applies with --int8 only (how int8 weights are scaled)")
    if args.embedding_bits not in (None, 8, 4):
        raise ExportError(f"--embedding-bits must be 8 or 4, got {args.embedding_bits}")
    if args.embedding_bits is not None and not (args.int8 or args.weight_bits):
        raise ExportError(f"--embedding-bits {args.embedding_bits} applies with --int8 or "
                          "--weight-bits only (the rest of the graph quantized, the word "
                          "embeddings too)")
    if args.embedding_bits == 8 and args.weight_bits:
        raise ExportError("--embedding-bits 8 applies with --int8 only: with --weight-bits the "
                          "word-embedding table stays float32, or 4-bit with --embedding-bits 4")
    if args.embedding_bits is None:
        args.embedding_bits = 8 if args.int8 else None
    if args.embedding_block is not None and args.embedding_bits != 4:
        raise ExportError("--embedding-block applies with --embedding-bits 4 only (the columns "
                          "sharing one scale of the 4-bit table)")
    if args.weight_bits is not None and args.int8:
        raise ExportError("--weight-bits quantizes the weights (a scale per block of rows); "
                          "--int8 quantizes weights and activations per tensor or column: "
                          "pass one of them")
    if args.weight_bits is not None and args.weight_bits not in (8, 4):
        raise ExportError(f"--weight-bits must be 8 or 4, got {args.weight_bits}")
    if args.weight_block is not None and args.weight_bits is None:
        raise ExportError("--weight-block applies with --weight-bits only (the input rows "
                          "sharing one scale)")
    if args.weight_compute is not None and args.weight_bits is None:
        raise ExportError(f"--weight-compute {args.weight_compute} applies with --weight-bits "
                          "only (the products of the weight-only MatMuls)")
    args.weight_block = WEIGHT_BLOCK if args.weight_block is None else args.weight_block
    from tnlm.export.onnx_graph import MIN_OPSET, newest_opset, opset_in_range
    from tnlm.export.weight_only import WEIGHT_BLOCKS

    if args.weight_block not in WEIGHT_BLOCKS:
        raise ExportError(f"--weight-block must be one of {', '.join(map(str, WEIGHT_BLOCKS))} "
                          f"(input rows per scale), got {args.weight_block}")
    if args.embedding_block is not None and (args.embedding_block < 2
                                             or args.embedding_block % 2):
        raise ExportError(f"--embedding-block must be an even number of columns >= 2, got "
                          f"{args.embedding_block}")
    args.opset = OPSET if args.opset is None else args.opset
    out = Path(args.out)
    if args.format == "onnx":
        if out.suffix != ".onnx":
            raise ExportError(f"--out must be a file name ending in .onnx for --format onnx, "
                              f"got {out}")
        if out.is_dir():
            raise ExportError(f"--out {out} is a folder; expected a .onnx file name")
        if not opset_in_range(args.opset):
            raise ExportError(f"--opset must be an ONNX opset between {MIN_OPSET} and "
                              f"{newest_opset() or 'the newest'} (the installed onnx's "
                              f"newest), got {args.opset}")
    elif out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; expected a folder for --format "
                          f"{args.format}")
    if out.resolve() == d.resolve():
        raise ExportError(f"--out must differ from DIR ({d})")
    if args.format != "onnx" and out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out} is a folder that is not empty; expected a new or empty "
                          f"folder (files of another model beside the export would be read as "
                          f"part of it)")
    _probe(out.parent if args.format == "onnx" else out, out)
    if args.format == "st" and recorded_class_generates(meta):
        raise ExportError(f"--format st: {d} holds a causal LM ({meta['base_model_class']}); "
                          "sentence-transformers files are written for encoders only: use "
                          "--format hf or onnx, or load it with tnlm.export.load_compressed")
    if args.no_pooling and recorded_class_generates(meta):
        raise ExportError(f"--no-pooling: {d} holds a causal LM ({meta['base_model_class']}), "
                          "whose graph has no pooled output to leave out")
    base = Path(args.base) if args.base else None
    if base is not None and not (base / "config.json").is_file():
        raise ExportError(f"--base {base} is not a transformers model folder (no config.json)")
    if base is not None and not meta.get("lightweight") and (d / "config.json").is_file() \
            and has_tokenizer(d):
        raise ExportError(f"--base gives the architecture and the tokenizer a DIR lacks; {d} "
                          "holds its own config.json and tokenizer: pass no --base")
    if base is not None and not meta.get("lightweight") and (d / "config.json").is_file():
        # DIR's own architecture, the base's tokenizer: the base must be the same model
        from transformers import AutoConfig

        from tnlm.integration.loading import TASK_CONFIG, config_differences

        # a fine-tuned model's own base differs in its task head's fields only
        diff = config_differences(AutoConfig.from_pretrained(str(d)),
                                  AutoConfig.from_pretrained(str(base)), ignore=TASK_CONFIG)
        if diff:
            shown = ", ".join(diff[:6]) + (", ..." if len(diff) > 6 else "")
            raise ExportError(f"--base {base} is not the model in {d}: their config.json "
                              f"differ in {shown}; its tokenizer would not be this model's")
    if base is None and not (d / "config.json").is_file():
        from tnlm.integration import default_model_path

        try:
            default_model_path()
        except FileNotFoundError as err:
            raise ExportError(f"DIR {d} has no config.json and --base is not given: {err}") \
                from None
    return d, out, base, meta


def _probe(target: Path, out: Path) -> None:
    """:class:`ExportError` (naming ``--out out``) unless a file can be written in
    ``target``'s nearest existing folder (a probe file written and removed there; nothing
    else created)."""
    p = target
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ExportError(f"--out {out}: {p} is a file, not a folder")
    probe = p / f".tnlm-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ExportError(f"--out {out} cannot be written: {err.strerror or err}") from None


def _tokenizer_source(d: Path, base: Path | None, meta: dict[str, Any]
                      ) -> tuple[Path | None, str]:
    """The folder whose tokenizer the export takes and how an error names it: DIR when it
    holds a tokenizer's files, else ``base``, else the base model a lightweight checkpoint
    names; ``(None, "")`` when none of them (:func:`_tokenizer` then decides)."""
    from tnlm.export.folder import has_tokenizer, lightweight_base

    if has_tokenizer(d):
        return d, f"DIR {d}"
    if base is not None:
        return base, f"--base {base}"
    named = lightweight_base(meta)
    if named is not None and (named / "config.json").is_file():
        return named, f"the base model {named} that DIR {d} names"
    return None, ""


def _load_tokenizer(source: Path, shown: str) -> Any:
    """The tokenizer of ``source``; :class:`ExportError` naming ``shown`` (DIR, --base)
    when it holds none (transformers then builds an empty one: every word unknown)."""
    from tnlm.integration.loading import load_tokenizer

    try:
        return load_tokenizer(source, shown)
    except ValueError as err:
        raise ExportError(str(err)) from None


def _tokenizer(d: Path, source: Path | None, tok: Any, model: Any,
               causal: bool = False) -> Any:
    """``tok``, the tokenizer :func:`_tokenizer_source` found (at ``source``), else the
    embedded MiniLM's when the model is MiniLM's architecture (a causal LM gets None);
    :class:`ExportError` when that tokenizer is not the model's (MiniLM's for another
    model, or more tokens than the model embeds)."""
    config = model.base_model.config.get_text_config()
    if source is None:
        if causal:
            return None
        from transformers import AutoConfig

        from tnlm.integration import default_model_path

        source = default_model_path()
        minilm = AutoConfig.from_pretrained(str(source))
        if (config.model_type, config.vocab_size) != (minilm.model_type, minilm.vocab_size):
            raise ExportError(f"DIR {d} holds no tokenizer and its model ({config.model_type}, "
                              f"{config.vocab_size} tokens) is not the embedded MiniLM's: "
                              f"pass --base FOLDER holding its tokenizer")
        tok = _load_tokenizer(source, f"the embedded MiniLM {source}")
    if len(tok) > config.vocab_size:
        raise ExportError(f"the tokenizer of {source} has {len(tok)} tokens, more than the "
                          f"model embeds ({config.vocab_size}): it is not this model's; pass "
                          f"--base FOLDER holding its tokenizer")
    return tok


def _check_4bit_table(base: Any, block: int | None, tied_ok: bool = False) -> int:
    """:class:`ExportError` before any export unless the word embeddings are a plain
    table of their own (``tied_ok``: or tied to the language-model head, which
    ``--weight-bits`` gives its own quantized copy), which ``--embedding-bits 4`` can
    store in 4 bits in blocks of ``block`` columns (default: 64, or the table's width),
    no wider than the table; returns the block."""
    from torch import nn

    emb = base.get_input_embeddings()
    head = base.get_output_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ExportError(f"--embedding-bits 4: the word embeddings are a "
                          f"{type(emb).__name__}, not a plain table to store in 4 bits")
    if not tied_ok and head is not None and getattr(head, "weight", None) is emb.weight:
        raise ExportError("--embedding-bits 4: the word-embedding table is tied to the "
                          "language-model head, whose MatMul reads it whole; leave out "
                          "--embedding-bits 4 (the table is then int8), or use --weight-bits, "
                          "which gives the head its own quantized copy")
    from tnlm.export.table4 import table_block

    width = emb.weight.shape[1]
    try:
        return table_block(width, block)
    except ValueError:  # padded to whole blocks: a wider block only adds bytes
        raise ExportError(f"--embedding-block {block} is wider than the word-embedding "
                          f"table ({width} columns); give at most {width + width % 2}") from None


@contextlib.contextmanager
def _staged(out: Path, folder: bool) -> Iterator[Path]:
    """Where to write ``out``, so that a failed export leaves nothing behind.

    A folder that exists (empty: checked before) is written in place and emptied again
    if the export fails (it may be a mount point, a symlink or ``.``, which cannot be
    replaced). Otherwise everything is written in a new folder beside ``out`` and moved
    onto it once complete (a folder: renamed; a file: the ``.onnx`` and any external
    data files beside it); on failure that folder is removed, with the parent folders
    this made."""
    if folder and out.is_dir():
        try:
            yield out
        except BaseException:
            for f in out.iterdir():
                if f.is_dir() and not f.is_symlink():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)
            raise
        return
    from tnlm.cli.common import make_out, remove_empty

    _, made = make_out(str(out.parent))
    from tnlm.export.staging import staging_dir

    # named as the library's staging folders: what a killed export left is removed by the
    # next export to the same place (tnlm.export.staging); the umask's mode, as any folder
    # the user makes, since a folder is renamed into place
    try:
        with staging_dir(out, mode=0o777) as tmp:
            if folder:
                yield tmp
                os.replace(tmp, out)
            else:
                yield tmp / out.name
                from tnlm.export.onnx_graph import replace_onnx

                # the .onnx and the data files it names (an earlier export's that nothing
                # names any more are removed)
                replace_onnx(tmp / out.name, out)
    except BaseException:
        remove_empty(made)  # the staging folder is gone by now
        raise


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``tnlm export``; prints what was written (one line, with its size).

    Raises:
        ExportError: a wrong argument (:func:`_check_args`), or a tokenizer that is not
            the model's: DIR or --base holding none (refused before the model is
            loaded), MiniLM's for another model, more tokens than the model embeds.
    """
    from tnlm.export.folder import can_generate, load_compressed, save_self_contained
    from tnlm.export.hf import export_hf

    args = argparse.Namespace(**vars(args))  # _check_args fills in defaults: the caller's stay
    d, out, base, meta = _check_args(args)
    # the tokenizer before the model: a folder without one is refused (named) first
    source, shown = _tokenizer_source(d, base, meta)
    tok = _load_tokenizer(source, shown) if source is not None else None
    # a folder with its own config.json is that model: --base then gives the tokenizer only
    own = (d / "config.json").is_file() and not meta.get("lightweight")
    model = load_compressed(d, base=None if own else base)
    causal = can_generate(model.base_model)
    tok = _tokenizer(d, source, tok, model, causal)
    if tok is None and args.format == "hf":
        raise ExportError(f"DIR {d} holds no tokenizer: the transformers folder would have "
                          "none; pass --base FOLDER holding its tokenizer")
    if args.embedding_bits == 4:
        args.embedding_block = _check_4bit_table(model.base_model, args.embedding_block,
                                                 tied_ok=args.weight_bits is not None)
    if args.format == "hf":
        with _staged(out, folder=True) as tmp:
            res = export_hf(model, tmp, tok, quiet=True, shown_as=out)
        print(res["message"])
        return 0
    if args.format == "st":
        try:
            with _staged(out, folder=True) as tmp:
                save_self_contained(model, tok, tmp, sentence_transformers=True, shown_as=out)
        except ValueError as err:  # e.g. a model that generates: no sentence-transformers files
            raise ExportError(f"--format st: {d}: {err}; use --format hf or onnx, or load it "
                              "with tnlm.export.load_compressed") from None
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{out}: self-contained compressed folder, {size / 1e6:.1f} MB; load with "
              f"tnlm.export.sentence_transformer({str(out)!r}) or "
              f"tnlm.export.load_compressed({str(out)!r})")
        return 0
    from tnlm.export.onnx_graph import export_onnx, gauge_fixed_chains
    from tnlm.export.quantize import quantize_int8

    head = model.base_model.get_output_embeddings() is not None
    if args.no_pooling and head:  # it would do nothing
        raise ExportError(f"--no-pooling: {d} holds a model with an output head "
                          f"({type(model.base_model).__name__}), whose graph has no pooled "
                          "output to leave out")
    pooling = None if args.no_pooling or head else "mean"

    def write(path: Path) -> Any:
        with warnings.catch_warnings():  # another opset than asked: refused below
            warnings.filterwarnings("ignore", message=".*opset .* was asked for")
            if causal:  # a causal LM: the graph with its key/value cache
                from tnlm.export.onnx_decoder import export_onnx_decoder

                res = export_onnx_decoder(model, path, opset=args.opset, fuse=args.fuse)
            else:
                res = export_onnx(model, tok, path, opset=args.opset, pooling=pooling,
                                  fuse=args.fuse)
        if res["opset"] != args.opset:  # the staged file is discarded: nothing is written
            raise ExportError(f"--opset {args.opset}: the exporter could not convert the "
                              f"graph to it, only to opset {res['opset']}; nothing was "
                              f"written (--opset {res['opset']} can be)")
        return res

    def outputs(res: Any) -> str:
        if causal:
            layers = res["cache"][0]
            return (f"outputs logits and present.{{0..{layers - 1}}}.key/value (key/value "
                    f"cache in and out; run with tnlm.export.OnnxCausalLM)")
        return f"outputs {', '.join(res['outputs'])}"

    if not args.int8 and args.weight_bits is None:
        with _staged(out, folder=False) as tmp:
            res = write(tmp)
        print(f"{out}: ONNX graph, {res['bytes'] / 1e6:.1f} MB, {res['mpo_layers']} MPO layers "
              f"kept factorized, {outputs(res)}")
        return 0
    with _staged(out, folder=False) as tmp:
        fp32 = tmp.parent / "float32" / "model.onnx"
        res = write(fp32)
        if args.weight_bits is not None:
            from tnlm.export.weight_only import (
                COMPUTE_FLOAT,
                COMPUTE_INT8,
                default_compute,
                quantize_weights,
            )

            compute = ({"int8": COMPUTE_INT8, "float": COMPUTE_FLOAT}.get(args.weight_compute)
                       or default_compute(args.weight_bits))
            size = quantize_weights(fp32, tmp, bits=args.weight_bits,
                                    block_size=args.weight_block,
                                    embedding_bits=args.embedding_bits,
                                    embedding_block=args.embedding_block,
                                    compute=compute)
            kind = (f"{args.weight_bits}-bit weights (weight-only, a scale per "
                    f"{args.weight_block} rows; "
                    + ("int8 products, the activations quantized per block at run time)"
                       if compute == COMPUTE_INT8 else "float32 products)"))
        else:
            # per tensor: 7 bits for gauge-fixed layers' chains, whose 8-bit codes saturate
            # ONNX Runtime's u8 x s8 sums (MiniLM at 50 %: cosine 0.079; quantize_int8)
            pivoted = args.per_tensor and bool(gauge_fixed_chains(fp32))
            size = quantize_int8(fp32, tmp, per_channel=not args.per_tensor,
                                 embedding_bits=args.embedding_bits,
                                 block_size=args.embedding_block)
            scale = ("7-bit, one scale per column" if not args.per_tensor else
                     "7-bit, one scale per tensor: gauge-fixed layers saturate at 8 bits"
                     if pivoted else "one scale per tensor")
            kind = f"int8 weights ({scale})"
        shutil.rmtree(fp32.parent)
    emb = "" if args.embedding_bits != 4 else \
        f" and 4-bit word embeddings (blocks of {args.embedding_block})"
    print(f"{out}: ONNX graph with {kind}{emb}, {size / 1e6:.1f} MB (float32: "
          f"{res['bytes'] / 1e6:.1f} MB, {size / res['bytes']:.3f} of it), {res['mpo_layers']} "
          f"MPO layers kept factorized, {outputs(res)}")
    return 0
