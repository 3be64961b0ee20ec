"""``tnlm export DIR --format {onnx,hf,st} [--int8 [--embedding-bits 4]] --out PATH``: ship a
compressed model.

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
  :func:`tnlm.export.quantize_int8`);
* ``hf``: a transformers folder with merged dense weights (loads without tnlm; as big
  as the dense model);
* ``st``: a self-contained folder (MPO weights, config, tokenizer, sentence-transformers
  files) that :func:`tnlm.export.load_compressed` and
  :func:`tnlm.export.sentence_transformer` read.

DIR is a tnlm checkpoint (``tnlm compress --out``, ``MPOModel.save_pretrained`` or a
folder of format ``st``). Its architecture and tokenizer come from DIR when it holds
``config.json``, else from ``--base`` (default: the embedded MiniLM, the model
``tnlm compress`` compresses by default).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["add_export_parser", "cmd_export", "ExportError", "FORMATS"]

FORMATS = ("onnx", "hf", "st")


class ExportError(ValueError):
    """A wrong argument of ``tnlm export``: one line naming it and what was expected."""


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``); returns
    its parser, whose ``func`` default is :func:`cmd_export`."""
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
    p.add_argument("--embedding-bits", type=int, choices=(8, 4), default=8,
                   help="with --int8: 4 stores the word-embedding table as 4-bit codes with a "
                        "float16 scale and offset per row and block of --embedding-block "
                        "columns")
    p.add_argument("--embedding-block", type=int, default=64,
                   help="with --embedding-bits 4: columns per scale (even)")
    p.add_argument("--base", default=None,
                   help="transformers model folder giving the architecture and tokenizer when "
                        "DIR has no config.json (default: the embedded MiniLM)")
    p.add_argument("--opset", type=int, default=20, help="onnx only: the ONNX opset "
                   "(default 20: GELU as one operator, fused by ONNX Runtime)")
    p.add_argument("--fuse", action="store_true",
                   help="onnx only: the projections reading the same states (query/key/value, "
                        "gate/up) as one MatMul and a Split (the same numbers; measured no "
                        "faster on MiniLM, docs/export.md)")
    p.add_argument("--no-pooling", action="store_true",
                   help="onnx only: no sentence_embedding output (the mean-pooled, normalised "
                        "embedding is added for models without a language-model head)")
    p.set_defaults(func=cmd_export)
    return p


def _check_args(args: argparse.Namespace) -> tuple[Path, Path, Path | None]:
    """``(dir, out, base)`` after checking every argument, or :class:`ExportError`."""
    from tnlm.export.folder import check_checkpoint

    d = Path(args.directory)
    try:
        check_checkpoint(d)
    except ValueError as err:
        raise ExportError(f"DIR: {err}") from None
    if args.format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.fuse and args.format != "onnx":
        raise ExportError(f"--fuse applies to --format onnx only, not --format "
                          f"{args.format}")
    if args.fuse and args.per_tensor:
        raise ExportError("--fuse with --per-tensor would give query, key and value one int8 "
                          "scale for their fused weight; per column (the default) quantizes "
                          "it as the separate weights")
    if args.int8 and args.format != "onnx":
        raise ExportError(f"--int8 applies to --format onnx only (int8 ONNX weights), not "
                          f"--format {args.format}")
    if args.per_tensor and not args.int8:
        raise ExportError("--per-tensor applies with --int8 only (how int8 weights are scaled)")
    if args.embedding_bits not in (8, 4):
        raise ExportError(f"--embedding-bits must be 8 or 4, got {args.embedding_bits}")
    if args.embedding_bits == 4 and not args.int8:
        raise ExportError("--embedding-bits 4 applies with --int8 only (the rest of the graph "
                          "int8, the word embeddings 4-bit)")
    if args.embedding_block < 2 or args.embedding_block % 2:
        raise ExportError(f"--embedding-block must be an even number of columns >= 2, got "
                          f"{args.embedding_block}")
    out = Path(args.out)
    if args.format == "onnx":
        if out.suffix != ".onnx":
            raise ExportError(f"--out must be a file name ending in .onnx for --format onnx, "
                              f"got {out}")
        if out.is_dir():
            raise ExportError(f"--out {out} is a folder; expected a .onnx file name")
        if not 7 <= args.opset <= 23:
            raise ExportError(f"--opset must be an ONNX opset between 7 and 23, got {args.opset}")
    elif out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; expected a folder for --format "
                          f"{args.format}")
    if out.resolve() == d.resolve():
        raise ExportError(f"--out must differ from DIR ({d})")
    base = Path(args.base) if args.base else None
    if base is not None and not (base / "config.json").is_file():
        raise ExportError(f"--base {base} is not a transformers model folder (no config.json)")
    if base is None and not (d / "config.json").is_file():
        from tnlm.integration import default_model_path

        try:
            default_model_path()
        except FileNotFoundError as err:
            raise ExportError(f"DIR {d} has no config.json and --base is not given: {err}") \
                from None
    return d, out, base


def _tokenizer(d: Path, base: Path | None, causal: bool = False) -> Any:
    """The tokenizer saved in DIR, else the one of ``base`` (default: the embedded MiniLM,
    except for a causal LM, which gets None: MiniLM's tokenizer is not its own)."""
    from transformers import AutoTokenizer

    if any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return AutoTokenizer.from_pretrained(str(d))
    if base is None and causal:
        return None
    if base is None:
        from tnlm.integration import default_model_path

        base = default_model_path()
    return AutoTokenizer.from_pretrained(str(base))


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``tnlm export``; prints what was written (one line, with its size)."""
    from tnlm.export.folder import load_compressed, save_self_contained
    from tnlm.export.hf import export_hf

    d, out, base = _check_args(args)
    model = load_compressed(d, base=base)
    causal = model.get_output_embeddings() is not None
    tok = _tokenizer(d, base, causal)
    if args.format == "hf":
        export_hf(model, out, tok)
        return 0
    if args.format == "st":
        try:
            save_self_contained(model, tok, out, sentence_transformers=True)
        except ValueError as err:  # a causal LM: no sentence-transformers files for it
            raise ExportError(f"--format st: {d}: {err}; use --format hf or onnx, or load it "
                              "with tnlm.export.load_compressed") from None
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{out}: self-contained compressed folder, {size / 1e6:.1f} MB; load with "
              f"tnlm.export.sentence_transformer({str(out)!r}) or "
              f"tnlm.export.load_compressed({str(out)!r})")
        return 0
    from tnlm.export.onnx_graph import export_onnx, gauge_fixed_chains
    from tnlm.export.quantize import quantize_int8

    pooling = None if args.no_pooling or causal else "mean"

    def write(path: Path) -> Any:
        if causal:  # a causal LM: the graph with its key/value cache
            from tnlm.export.onnx_decoder import export_onnx_decoder

            return export_onnx_decoder(model, path, opset=args.opset, fuse=args.fuse)
        return export_onnx(model, tok, path, opset=args.opset, pooling=pooling,
                           fuse=args.fuse)

    def outputs(res: Any) -> str:
        if causal:
            layers = res["cache"][0]
            return (f"outputs logits and present.{{0..{layers - 1}}}.key/value (key/value "
                    f"cache in and out; run with tnlm.export.OnnxCausalLM)")
        return f"outputs {', '.join(res['outputs'])}"

    if not args.int8:
        res = write(out)
        print(f"{out}: ONNX graph, {res['bytes'] / 1e6:.1f} MB, {res['mpo_layers']} MPO layers "
              f"kept factorized, {outputs(res)}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        fp32 = Path(tmp) / "model.onnx"
        res = write(fp32)
        # per tensor: 7 bits for gauge-fixed layers' chains, whose 8-bit codes saturate
        # ONNX Runtime's u8 x s8 sums (MiniLM at 50 %: cosine 0.079; quantize_int8)
        pivoted = args.per_tensor and bool(gauge_fixed_chains(fp32))
        size = quantize_int8(fp32, out, per_channel=not args.per_tensor,
                             embedding_bits=args.embedding_bits,
                             block_size=args.embedding_block)
    emb = "" if args.embedding_bits == 8 else \
        f" and 4-bit word embeddings (blocks of {args.embedding_block})"
    scale = ("7-bit, one scale per column" if not args.per_tensor else
             "7-bit, one scale per tensor: gauge-fixed layers saturate at 8 bits" if pivoted
             else "one scale per tensor")
    print(f"{out}: ONNX graph with int8 weights ({scale}){emb}, {size / 1e6:.1f} MB (float32: "
          f"{res['bytes'] / 1e6:.1f} MB, {size / res['bytes']:.3f} of it), {res['mpo_layers']} "
          f"MPO layers kept factorized, {outputs(res)}")
    return 0
