"""ONNX Runtime: the compressed MiniLM's factorized graph against the dense graph, same run.

Usage:  OMP_NUM_THREADS=1 python benchmarks/bench_onnx.py [--threads 1] [--repeats 7]
            [--budgets 0.5 0.25] [--calibration 512] [--sentences 300]
            [--embedding-block 64] [--per-channel] [--pivoted] [--opsets 18 20]
            [--plot docs/figures/onnx_latency.png] [--workdir DIR]
            [--checkpoint DIR]   (also a saved compressed MiniLM, e.g. tnlm compress --out DIR)
            [--fused]            (also each float32 graph exported with fuse=True)
            [--ort-skip-ln]      (also each float32 graph run with ONNX Runtime's
                                  SkipLayerNormFusion, which tnlm's sessions leave out)
            [--float32-only]     (no int8 graphs)
            [--weight-bits 8 4] [--weight-block 32]
            [--quick]            (smoke run: 16 sentences, batches 1 and 8, one repeat)
            [--replot LOG --plot PNG]  (the figure again from an earlier run's output)

Graphs (all-MiniLM-L6-v2, outputs last_hidden_state and the mean-pooled embedding):
  * dense: the transformers model as loaded, ``export_onnx``;
  * compressed 50 % / 25 %: ``compress_model(..., CompressionConfig(targets, budget=b,
    heal=None))`` on ``--calibration`` sentences of tnlm's generated English (data-aware
    2-site layers ``x @ A @ B`` over the 36 encoder linears; not healed: latency and size
    do not depend on healing, the cosine does), exported keeping the factors;
  * with ``--pivoted`` also each budget with gauge-fixed bonds (``CompressionConfig(...,
    pivoted=True)``: the same parameters buy a larger rank; exported as the chain
    ``(x @ B) @ R``, ``PivotedChain``: r^2 more numbers in the graph than the layer holds,
    see benchmarks/bench_pivoted_onnx.py for the gathered form's cost);
  * checkpoint (``--checkpoint DIR``): a compressed MiniLM that ``tnlm compress --out DIR``
    saved (healed by default), loaded with ``load_compressed``; ``--budgets`` with no
    value leaves out the fresh ones;
  * with ``--opsets A B ...``: each graph is exported at opset A (and quantized as below)
    and, in float32 only, at every further opset (named "... opset B"): opset 20 has
    ``Gelu`` as one operator, which ONNX Runtime fuses with the bias before it
    (``BiasGelu``); at 18 the exporter writes GELU as Div, Erf, Add, Mul, Mul;
  * with ``--fused`` also each float32 graph, the dense one included, exported with
    ``fuse=True``: the projections that read the same hidden states (query/key/value;
    the first factors of MPO layers) as one MatMul and a Split
    (``tnlm.export.fuse_shared_matmuls``), named "... fused";
  * every graph runs in the session tnlm's ``OnnxEncoder`` opens, without ONNX Runtime's
    ``SkipLayerNormFusion`` (``tnlm.export.onnx_graph.SLOW_FUSIONS``); with
    ``--ort-skip-ln`` each float32 graph also runs with every ONNX Runtime fusion, named
    "... (ORT SkipLayerNorm)";
  * each of them (not with ``--float32-only``) with int8 weights (``quantize_int8``: ONNX Runtime dynamic quantization
    of every MatMul weight and Gather table, one scale per tensor: 8-bit, 7-bit for a
    graph with gauge-fixed chains; ``--per-channel``: one 7-bit scale per column),
    and with int8 weights and a 4-bit word-embedding table (``quantize_int8(...,
    embedding_bits=4, block_size=--embedding-block)``: 4-bit codes with a float16 scale
    and offset per row and block of columns, decoded per gathered token);
  * with ``--weight-bits B ...`` each graph again with weight-only B-bit weights
    (``quantize_weights``: ``MatMulNBits``, a scale per ``--weight-block`` rows, float
    activations, the word-embedding table float32), named "... w8", "... w4", and the same
    with the 4-bit word-embedding table, "... w8 + 4-bit emb".

Latency: one ONNX Runtime session per graph (``--threads`` intra-op threads), batches of
1, 8 and 64 sentences x 64 tokens; in each repeat every graph runs every batch once
(interleaved: the machine's load drifts between repeats, not within one); medians over
the repeats, and ratios against the dense float32 graph of the same run.

Size: bytes of each .onnx file. Quality: cosine of each graph's sentence embedding with
the dense float32 PyTorch model's, on ``--sentences`` sentences of SST-2 dev
(``--sst2``, default ``../shared/data/sst2/dev.tsv``, natural English; skipped when
absent). The last lines compare each compressed graph with int8 weights and 4-bit
embeddings against the issue's targets: <= 15 % of the dense float32 bytes, and a
cosine at least the dense int8 graph's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tnlm.compress.pipeline import CompressionConfig, compress_model
from tnlm.compress.text import generated_sentences
from tnlm.export import (
    OnnxEncoder,
    export_onnx,
    load_compressed,
    onnx_weights,
    quantize_int8,
    quantize_weights,
)
from tnlm.integration import load_default_model, mean_pooled
from tnlm.integration.architectures import default_targets

BATCHES = (1, 8, 64)
TOKENS = 64
SST2 = Path("../shared/data/sst2/dev.tsv")
#: --quick: a smoke run that shows the script works (numbers not meaningful)
QUICK = dict(batches=(1, 8), sentences=16, calibration=32, repeats=1)
#: suffixes of the quantized variants of each model
INT8, EMB4, FUSED = " int8", " int8 + 4-bit emb", " fused"
E4 = " + 4-bit emb"  # after a weight-only variant's name
#: a float32 graph in a session with every ONNX Runtime fusion (``--ort-skip-ln``)
ORT_ALL = " (ORT SkipLayerNorm)"
#: the issue's size target for the compressed model with int8 factors
SIZE_TARGET = 0.15


def natural_sentences(n: int, path: Path = SST2) -> list[str] | None:
    """The first ``n`` sentences of SST-2 dev, or None when the file is absent."""
    if not path.is_file():
        return None
    rows = path.read_text(encoding="utf-8").splitlines()[1:]
    return [r.split("\t")[0].strip() for r in rows if r.strip()][:n]


def feeds(enc: OnnxEncoder, tok, batches=BATCHES, seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """Per batch size, inputs of ``TOKENS`` real tokens (random vocabulary ids between
    [CLS] and [SEP], no padding)."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in batches:
        ids = rng.integers(1000, tok.vocab_size, size=(b, TOKENS), dtype=np.int64)
        ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
        out[b] = enc.feed(dict(input_ids=ids, attention_mask=np.ones_like(ids),
                               token_type_ids=np.zeros_like(ids)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25],
                    help="fresh (unhealed) compressions; none with --checkpoint: only it")
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--sst2", default=str(SST2), help="SST-2 dev.tsv for the cosine column")
    ap.add_argument("--embedding-block", type=int, default=64,
                    help="columns per scale of the 4-bit word-embedding table")
    ap.add_argument("--pivoted", action="store_true",
                    help="also compress each budget with gauge-fixed bonds (PivotedLinear)")
    ap.add_argument("--per-channel", action="store_true",  # the export's default since
                    help="int8 weights with one scale per output column")
    ap.add_argument("--opsets", type=int, nargs="+", default=None,
                    help="export every model at each of these ONNX opsets (default: "
                         "export_onnx's); int8 variants at the first only")
    ap.add_argument("--plot", default=None, help="write the latency figure here")
    ap.add_argument("--workdir", default=None, help="keep the .onnx files here")
    ap.add_argument("--checkpoint", default=None,
                    help="also a compressed MiniLM saved by tnlm compress --out (e.g. healed)")
    ap.add_argument("--fused", action="store_true",
                    help="also every float32 graph exported with the MatMuls that share their "
                         "input fused")
    ap.add_argument("--ort-skip-ln", action="store_true",
                    help="also every float32 graph with ONNX Runtime's SkipLayerNormFusion")
    ap.add_argument("--float32-only", action="store_true", help="no int8 graphs")
    ap.add_argument("--weight-bits", type=int, nargs="*", default=[], choices=(8, 4),
                    help="also each graph with weight-only quantized MatMul weights")
    ap.add_argument("--weight-block", type=int, default=32)
    ap.add_argument("--replot", default=None, metavar="LOG",
                    help="draw --plot from the table of an earlier run's output, run nothing")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 sentences, 32 calibration sentences, batches 1 and 8, "
                         "one repeat (shows that the script works; numbers not meaningful)")
    args = ap.parse_args()
    if args.replot:
        if not args.plot:
            ap.error("--replot LOG needs --plot PATH")
        return replot(args.replot, args.plot)
    batches = BATCHES
    if args.quick:
        batches = QUICK["batches"]
        args.sentences = min(args.sentences, QUICK["sentences"])
        args.calibration = min(args.calibration, QUICK["calibration"])
        args.repeats = QUICK["repeats"]
    if not args.budgets and not args.checkpoint:
        ap.error("--budgets with no value needs --checkpoint DIR (else nothing is compressed)")
    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    work.mkdir(parents=True, exist_ok=True)

    dense, tok = load_default_model()
    dense.eval()
    models = {"dense": dense}
    calibration = generated_sentences(args.calibration, seed=1) if args.budgets else []
    variants = [(b, p) for b in args.budgets for p in ((False, True) if args.pivoted
                                                      else (False,))]
    for budget, pivoted in variants:
        t = time.perf_counter()
        res = compress_model(copy.deepcopy(dense), tok, calibration,
                             CompressionConfig(default_targets(dense), budget=budget,
                                               heal=None, pivoted=pivoted),
                             progress=False)
        name = f"{round(budget * 100)} %" + (" pivoted" if pivoted else "")
        models[name] = res.model.eval()
        print(f"compressed {name}: {res.params_after:,} of {res.params_before:,} encoder-linear "
              f"parameters ({res.ratio:.3f}), ranks {sorted(set(res.ranks.values()))}, "
              f"{time.perf_counter() - t:.0f} s")

    if args.checkpoint:
        models["checkpoint"] = load_compressed(args.checkpoint).eval()
        print(f"loaded {args.checkpoint} as 'checkpoint'")

    files: dict[str, Path] = {}
    opsets = args.opsets or [None]
    for name, model in models.items():
        stem = (name if name in ("dense", "checkpoint") else f"mpo{name.split()[0]}"
                + ("p" if name.endswith("pivoted") else ""))
        for opset in opsets[1:]:  # the same model at another opset: float32 only
            res = export_onnx(model, tok, work / f"{stem}.op{opset}.onnx", pooling="mean",
                              opset=opset)
            files[f"{name} opset {res.opset}"] = res.path
        t = time.perf_counter()
        kw = {} if opsets[0] is None else {"opset": opsets[0]}
        res = export_onnx(model, tok, work / f"{stem}.onnx", pooling="mean", **kw)
        files[name] = res.path
        if args.fused:
            files[name + FUSED] = export_onnx(model, tok, work / f"{stem}.fused.onnx",
                                              pooling="mean", fuse=True, **kw).path
        if args.ort_skip_ln:
            files[name + ORT_ALL] = res.path
        if not args.float32_only:
            files[name + INT8] = work / f"{stem}.int8.onnx"
            quantize_int8(res.path, files[name + INT8], per_channel=args.per_channel)
            files[name + EMB4] = work / f"{stem}.int8.emb4.onnx"
            quantize_int8(res.path, files[name + EMB4], per_channel=args.per_channel,
                          embedding_bits=4, block_size=args.embedding_block)
        for bits in args.weight_bits:
            files[f"{name} w{bits}"] = work / f"{stem}.w{bits}.onnx"
            quantize_weights(res.path, files[f"{name} w{bits}"], bits=bits,
                             block_size=args.weight_block)
            files[f"{name} w{bits}{E4}"] = work / f"{stem}.w{bits}.emb4.onnx"
            quantize_weights(res.path, files[f"{name} w{bits}{E4}"], bits=bits,
                             block_size=args.weight_block, embedding_bits=4,
                             embedding_block=args.embedding_block)
        print(f"exported {name}: {res.weights:,} weights in the graph, {res.mpo_layers} "
              f"factorized layers, {res.fused_matmuls} MatMul nodes fused away, "
              f"{time.perf_counter() - t:.0f} s")

    encoders = {n: OnnxEncoder(p, tok, threads=args.threads,
                               **(dict(disabled_optimizers=()) if n.endswith(ORT_ALL) else {}))
                for n, p in files.items()}
    sizes = {n: p.stat().st_size for n, p in files.items()}

    sents = natural_sentences(args.sentences, Path(args.sst2))
    cosines: dict[str, float] = {}
    if sents is not None:
        ref = mean_pooled(dense, tok, sents).numpy()
        for n, enc in encoders.items():
            cosines[n] = float((enc.encode(sents) * ref).sum(1).mean())
        torch_cos = {n: float((mean_pooled(m, tok, sents).numpy() * ref).sum(1).mean())
                     for n, m in models.items() if n != "dense"}
        print("torch cosines (float32 compressed vs dense): "
              + ", ".join(f"{n} {c:.4f}" for n, c in torch_cos.items()))
    else:
        print(f"{args.sst2} absent: no natural-text cosine")

    inputs = {n: feeds(enc, tok, batches) for n, enc in encoders.items()}
    for n, enc in encoders.items():  # warm-up
        for b in batches:
            enc.session.run(None, inputs[n][b])
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in encoders for b in batches}
    for _ in range(args.repeats):
        for b in batches:
            for n, enc in encoders.items():
                t = time.perf_counter()
                enc.session.run(None, inputs[n][b])
                times[n, b].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}

    quant = "per-channel (7-bit)" if args.per_channel else \
        "per-tensor (8-bit; 7-bit for graphs with gauge-fixed chains)"
    print(f"\nONNX Runtime {args.threads} thread(s), {TOKENS} tokens, median of "
          f"{args.repeats} interleaved repeats; ratios against dense float32; int8 {quant}, "
          f"4-bit embeddings in blocks of {args.embedding_block}\n")
    head = "| graph | MB | size vs dense | " + " | ".join(
        f"batch {b} ms | ratio" for b in batches) + " | cosine to dense (SST-2) |"
    print(head)
    print("|" + "---|" * (3 + 2 * len(batches) + 1))
    for n in encoders:
        cells = [n, f"{sizes[n] / 1e6:.1f}", f"{sizes[n] / sizes['dense']:.3f}"]
        for b in batches:
            cells += [f"{med[n, b] * 1e3:.1f}", f"{med[n, b] / med['dense', b]:.3f}"]
        cells.append(f"{cosines[n]:.4f}" if n in cosines else "-")
        print("| " + " | ".join(cells) + " |")
    for n in files:
        if n != "dense":
            w = onnx_weights(files[n])
            print(f"{n}: {w['total']:,} stored elements (a byte of 4-bit codes: one), largest {w['largest'][:2]}")
    print()
    for name in models:
        if name == "dense" or args.float32_only:
            continue
        for n in [name + EMB4] + [f"{name} w{b}{E4}" for b in args.weight_bits]:
            size = sizes[n] / sizes["dense"]
            line = (f"target check {n}: {size:.3f} of the dense float32 bytes "
                    f"({'<=' if size <= SIZE_TARGET else '>'} {SIZE_TARGET})")
            if n in cosines:
                for peer in ["dense" + INT8] + [f"dense w{b}" for b in args.weight_bits]:
                    ref8 = cosines[peer]
                    line += (f"; SST-2 cosine {cosines[n]:.4f} vs {peer} {ref8:.4f} "
                             f"({'>=' if cosines[n] >= ref8 else '<'})")
            print(line)

    if args.plot:
        names = [n for n in encoders if n != "dense"]
        plot_latency({n: [med[n, b] / med["dense", b] for b in batches] for n in names},
                     batches, args.threads, args.plot)


def plot_latency(ratios: dict[str, list[float]], batches, threads: int, path: str) -> None:
    """Bars of each graph's latency over the dense graph's, per batch (one colour each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.6))
    width = 0.8 / len(ratios)
    colours = plt.get_cmap("tab20").colors
    for k, (n, r) in enumerate(ratios.items()):
        xs = [i + (k - (len(ratios) - 1) / 2) * width for i in range(len(batches))]
        ax.bar(xs, r, width, label=n, color=colours[k % len(colours)])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(batches)), [f"batch {b} x {TOKENS}" for b in batches])
    ax.set_ylabel("latency / dense float32")
    ax.set_title(f"all-MiniLM-L6-v2, ONNX Runtime, {threads} thread(s)")
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def replot(log: str, path: str) -> None:
    """The figure again from the table a run of this script printed (``--replot LOG``)."""
    import re

    text = Path(log).read_text(encoding="utf-8")
    threads = int(re.search(r"ONNX Runtime (\d+) thread", text).group(1))
    head = next(line for line in text.splitlines() if line.startswith("| graph |"))
    batches = [int(b) for b in re.findall(r"batch (\d+) ms", head)]
    ratios = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 + 2 * len(batches) and \
                cells[0] not in ("graph", "dense"):
            ratios[cells[0]] = [float(cells[4 + 2 * i]) for i in range(len(batches))]
    plot_latency(ratios, batches, threads, path)

if __name__ == "__main__":
    main()
