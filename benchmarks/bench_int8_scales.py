"""int8 scales against quality: every ``quantize_int8`` variant on dense, low-rank and
gauge-fixed MiniLM graphs, SST-2 dev cosine to the dense float32 model.

The 50 % models are compressed without healing (``compress_model``, uniform ranks, 512
generated calibration sentences), exported with ``export_onnx``; the gauge-fixed one
twice: its chain in the balanced gauge (the exporter's) and, for comparison, in the
former gauge (the identity beside the coefficients, and ``right``). Each graph is then
quantized per tensor at 8 and 7 bits and per column at 7 bits (the default). Prints one
line per graph and variant; docs/export.md has the table.

    OMP_NUM_THREADS=1 python benchmarks/bench_int8_scales.py [--sentences 300]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tnlm.export.factorized as factorized  # noqa: E402
from benchmarks.bench_onnx import SST2, natural_sentences  # noqa: E402
from tnlm.compress.pipeline import CompressionConfig, compress_model  # noqa: E402
from tnlm.compress.text import generated_sentences  # noqa: E402
from tnlm.export import OnnxEncoder, export_onnx, quantize_int8  # noqa: E402
from tnlm.integration import load_default_model, mean_pooled  # noqa: E402
from tnlm.integration.architectures import default_targets  # noqa: E402

# 8 bits forced: quantize_int8 would choose 7 for a file with gauge-fixed chains (it warns)
VARIANTS = {"per tensor, 8-bit": dict(per_channel=False, reduce_range=False),
            "per tensor, 7-bit": dict(per_channel=False, reduce_range=True),
            "per column, 7-bit": dict(per_channel=True)}


@contextmanager
def former_gauge():
    """Export gauge-fixed layers as before: B = the identity beside the coefficients."""
    balanced = factorized.balanced_factors
    factorized.balanced_factors = lambda left, right: (left, right)
    try:
        yield
    finally:
        factorized.balanced_factors = balanced


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--budget", type=float, default=0.5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sents = natural_sentences(args.sentences, SST2)
    if sents is None:
        print(f"{SST2} absent: nothing to measure on")
        return 2
    dense, tok = load_default_model()
    dense.eval()
    ref = mean_pooled(dense, tok, sents).numpy()
    calibration = generated_sentences(512, seed=1)
    models = {"dense": (dense, False)}
    for pivoted in (False, True):
        res = compress_model(copy.deepcopy(dense), tok, calibration,
                             CompressionConfig(default_targets(dense), budget=args.budget,
                                               heal=None, pivoted=pivoted), progress=False)
        models["gauge-fixed" if pivoted else "low rank"] = (res.model.eval(), False)
        if pivoted:
            models["gauge-fixed, former chain"] = (res.model, True)
    with tempfile.TemporaryDirectory(prefix="bench_int8_") as tmp:
        for k, (name, (model, former)) in enumerate(models.items()):
            path = Path(tmp) / f"m{k}.onnx"
            if former:
                with former_gauge():
                    export_onnx(model, tok, path, pooling="mean")
            else:
                export_onnx(model, tok, path, pooling="mean")
            files = {"float32": path}
            for variant, kw in VARIANTS.items():
                files[variant] = Path(tmp) / f"m{k}.{len(files)}.onnx"
                with warnings.catch_warnings():  # the forced 8 bits warn, on purpose
                    warnings.simplefilter("ignore", UserWarning)
                    quantize_int8(path, files[variant], **kw)
            for variant, f in files.items():
                cos = float((OnnxEncoder(f, tok, threads=1).encode(sents) * ref).sum(1).mean())
                print(f"{name:28s} {variant:20s} {cos:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
