"""Which causal architectures export to ONNX with their key/value cache, compressed.

For every causal entry of ``tnlm/integration/architectures.py``, the tiny random-init
model of ``tests/test_architectures_causal.py`` gets MPO layers on its default targets
(2 sites), is exported with :func:`tnlm.export.export_onnx_decoder` and run with ONNX
Runtime (:class:`tnlm.export.OnnxCausalLM`): the largest logit difference to torch on one
prompt, and whether 4 greedy tokens equal transformers' ``generate``. Prints a markdown
table (docs/export.md)::

    python experiments/onnx_architectures.py [MODEL_TYPE ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_architectures_causal import CAUSAL, tiny  # noqa: E402
from tnlm.export import OnnxCausalLM, export_onnx_decoder  # noqa: E402
from tnlm.integration import MPOConfig, get_mpo_model  # noqa: E402
from tnlm.integration.architectures import architecture_of, default_targets  # noqa: E402


def check(model_type: str, folder: Path) -> tuple[str, str]:
    model = tiny(model_type)
    mpo = get_mpo_model(model, MPOConfig(target_modules=default_targets(model), n_sites=2),
                        progress=False).eval()
    path = folder / f"{model_type}.onnx"
    try:
        export_onnx_decoder(mpo, path)
    except (ValueError, RuntimeError) as err:
        return "refused" if isinstance(err, ValueError) else "failed", str(err).split(";")[0]
    runner = OnnxCausalLM(path)
    ids = torch.tensor([[2, 5, 7, 9, 11]])
    with torch.no_grad():
        want = mpo(ids).logits.numpy()
        tokens = mpo.generate(ids, max_new_tokens=4, do_sample=False).numpy()
    err = float(np.abs(runner.logits(ids.numpy()) - want).max())
    same = np.array_equal(runner.generate(ids.numpy(), max_new_tokens=4), tokens)
    return "exported", f"max abs logit difference {err:.1e}; greedy tokens equal: {same}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("types", nargs="*", default=CAUSAL, help="model types (default: all)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    print("| model type | family | ONNX with cache | detail | s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for mt in args.types:
            t0 = time.perf_counter()
            status, detail = check(mt, Path(d))
            family = architecture_of(tiny(mt)).name
            print(f"| {mt} | {family} | {status} | {detail} | {time.perf_counter() - t0:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
