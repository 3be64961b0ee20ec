"""Layer-by-layer methods on SmolLM2-135M without healing: held-out perplexity ratio.

The dense model writes 64 texts (seed 0, cached in results/llm/text/selfgen_s0_n64.json);
32 sequences of 128 tokens calibrate; the held-out text is the first 300 SST-2 dev sentences (7,280
tokens, non-overlapping 256-token windows). Each argument is METHOD:FIT_STEPS[:x] (x: the
cross-Gram error feedback), optionally followed by @ALLOCATION (default uniform); one
line per argument on stdout.

    python experiments/llm_noheal_screen.py whitened:0 tnlm:0:x tnlm:16:x tnlm:16
    python experiments/llm_noheal_screen.py tnlm:16@spectrum tnlm:16@residual
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tnlm.compress.decoder.quality import natural_eval_text, perplexity  # noqa: E402
from tnlm.compress.decoder.text import self_generated_text, token_sequences  # noqa: E402
from tnlm.compress.layerwise import LayerwiseConfig, compress_layerwise  # noqa: E402
from tnlm.integration.architectures import default_targets  # noqa: E402
from tnlm.integration.loading import default_llm_path, load_pretrained  # noqa: E402


def main(argv: list[str]) -> int:
    torch.manual_seed(0)
    model, tok = load_pretrained(default_llm_path())
    cache = Path(__file__).resolve().parents[1] / "results/llm/text/selfgen_s0_n64.json"
    if cache.is_file():
        texts = json.loads(cache.read_text())
    else:
        texts = self_generated_text(model, tok, 64, seed=0, batch_size=32)
        cache.write_text(json.dumps(texts))
    seqs = token_sequences(tok, texts, 128)
    ev = ["\n".join(natural_eval_text()[0].split("\n")[:300])]
    dense = perplexity(model, tok, ev, max_length=256, stride=256)
    print("dense", dense.ppl, dense.n_tokens, flush=True)
    for full in argv:
        arg, _, alloc = full.partition("@")
        method, fit = arg.split(":")[0], int(arg.split(":")[1])
        cross = arg.endswith(":x")
        m = copy.deepcopy(model)
        t = time.time()
        r = compress_layerwise(m, seqs[:32], LayerwiseConfig(
            default_targets(m), budget=0.6, method=method, fit_steps=fit, cross=cross,
            allocation=alloc or "uniform"),
            progress=False)
        p = perplexity(m, tok, ev, max_length=256, stride=256)
        print(full, "kept", round(r.ratio, 4), "times", r.seconds, "ppl", p.ppl,
              "ratio", p.ppl / dense.ppl,
              "secs", time.time() - t, [round(b, 3) for _, b in r.block_errors], flush=True)
        del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
