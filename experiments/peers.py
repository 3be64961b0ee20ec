"""tnlm's main job against the peers a user would pick instead, measured on natural text.

One run = one method at one size and seed, written as JSON. Every trained method sees the
same text (the main job's split of its text for that seed: held-out sentences never
trained on) and the same number of steps and batch size; the measures are on natural
sentences never used for healing or calibration (SST-2 dev, CoLA dev, SICK trial; their
mean is ``cos_natural``), the shipped natural-prose sentences held out of every default
text (``cos_lm``: what ``tnlm compress`` reports), plus SICK relatedness:

- ``tnlm``: the main job (``tnlm compress``: whitened truncation, sensitivity allocation,
  block reconstruction, healing) on its default text; ``--text grammar`` on the former
  default text (no shipped natural-prose sentences).
- ``plain``: the same job with plain SVD of the weights (no whitening) and a uniform rank.
- ``whitened``: SVD-LLM-style whitened low rank -- the same job with its data-aware
  (whitened) truncation at a uniform rank, without the sensitivity allocation: what is
  left of tnlm's job when only the allocation is taken away.
- ``layerdrop``: sentence-transformers-style layer dropping -- keep ``--layers`` of the six
  layers evenly spaced (the last one kept), then distil every parameter on the same text
  and steps; student layer k is fitted to the teacher layer it stands in for (k-th of
  ``--layers`` equal groups) and the pooled embedding's cosine.
- ``int8``: the dense model with torch dynamic int8 quantization of every ``nn.Linear``
  (no training).

Usage:
    python experiments/peers.py --method tnlm --budget 0.5 --seed 0 --out results/peers/x.json
    python experiments/peers.py --method layerdrop --layers 3 --seed 0 --out ...
    python experiments/peers_table.py results/peers/*.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.screening import write_result  # noqa: E402
from tnlm.compress.distill import HealConfig, length_bucketed_draws, mean_pool  # noqa: E402
from tnlm.compress.encoder import EncoderRecipe, compress_encoder, split_text  # noqa: E402
from tnlm.compress.quality import embedding_cosine, read_sick, sick_spearman  # noqa: E402
from tnlm.compress.text import default_text, lm_held_out, read_sentences  # noqa: E402
from tnlm.integration import default_model_path  # noqa: E402

DATA = Path("../shared/data")
#: the methods that run the main job (truncation, reconstruction, healing) with other settings
LOW_RANK = ("tnlm", "plain", "whitened")


def natural_sets(data: Path = DATA, n: int = 500) -> dict[str, list[str]]:
    """Natural sentences never healed on: the first ``n`` of SST-2 dev and CoLA dev, and
    the distinct sentences of the SICK trial pairs (first ``n``)."""
    sst = read_sentences(data / "sst2/dev.tsv", column=0)[1:n + 1]  # header
    cola = read_sentences(data / "cola/dev.tsv", column=0)[:n]  # no header
    sick = []
    for row in read_sick(data / "sick/trial.tsv"):
        sick += [row["sentence_A"], row["sentence_B"]]
    return {"sst2": sst, "cola": cola, "sick": list(dict.fromkeys(sick))[:n]}


def measure_natural(student: nn.Module, teacher: nn.Module, tok, sets: dict[str, list[str]],
                    data: Path = DATA) -> dict[str, float]:
    out: dict[str, float] = {}
    means = []
    for name, sents in sets.items():
        cos = embedding_cosine(student, teacher, tok, sents)
        out[f"cos_{name}"] = float(cos.mean())
        out[f"cos_{name}_min"] = float(cos.min())
        means.append(float(cos.mean()))
    out["cos_natural"] = sum(means) / len(means)
    out["cos_lm"] = float(embedding_cosine(student, teacher, tok, lm_held_out()).mean())
    out["sick_spearman"] = sick_spearman(student, tok, data / "sick/trial.tsv")
    out["sick_spearman_original"] = sick_spearman(teacher, tok, data / "sick/trial.tsv")
    return out


def linear_params(model: nn.Module) -> int:
    """Parameters of the encoder layers' linears (what the budget counts)."""
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".layer." in f".{n}")


def drop_layers(teacher: nn.Module, n_keep: int) -> tuple[nn.Module, list[int]]:
    """A copy of ``teacher`` with ``n_keep`` of its layers, evenly spaced, the last kept;
    returns the student and, for each kept layer, the teacher hidden state it stands in
    for (index into ``hidden_states``)."""
    n = teacher.config.num_hidden_layers
    if not 1 <= n_keep <= n:
        raise ValueError(f"--layers must be in 1..{n}, got {n_keep}")
    targets = [round((k + 1) * n / n_keep) for k in range(n_keep)]  # group ends, 1-based
    keep = [t - 1 for t in targets]
    student = copy.deepcopy(teacher)
    student.encoder.layer = nn.ModuleList(student.encoder.layer[i] for i in keep)
    student.config.num_hidden_layers = n_keep
    return student, targets


def distil_dropped(student: nn.Module, teacher: nn.Module, tok, sentences: list[str],
                   targets: list[int], cfg: HealConfig, lr: float) -> list[float]:
    """Distil every parameter of the layer-dropped ``student`` (the main job's loss: relative
    hidden-state error per kept layer against its teacher layer, plus 1 - pooled cosine)."""
    rng = random.Random(cfg.seed)
    lengths = [len(ids) for ids in tok(sentences, truncation=True,
                                       max_length=cfg.max_length)["input_ids"]]
    draws = length_bucketed_draws(lengths, cfg.batch_size, cfg.steps, cfg.bucket, rng)
    params = [p for p in student.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / cfg.warmup) * max(0.0, 1 - t / cfg.steps))
    teacher.eval()
    student.train()
    for m in student.modules():  # no dropout, as the main job's healing
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    losses = []
    for draw in tqdm(draws, desc="layer-drop distillation"):
        batch = tok([sentences[i] for i in draw], padding=True, truncation=True,
                    max_length=cfg.max_length, return_tensors="pt")
        mask = batch["attention_mask"]
        with torch.no_grad():
            th = teacher(**batch, output_hidden_states=True).hidden_states
        sh = student(**batch, output_hidden_states=True).hidden_states
        m = mask.unsqueeze(-1).float()
        hid = sum(((sh[k + 1] - th[t]) ** 2 * m).sum() / (th[t] ** 2 * m).sum()
                  for k, t in enumerate(targets)) / len(targets)
        cos = 1 - F.cosine_similarity(mean_pool(sh[-1], mask), mean_pool(th[-1], mask)).mean()
        loss = cfg.w_hidden * hid + cfg.w_cos * cos
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
    student.eval()
    return losses


def llm_text_sentences(paths: list[str]) -> list[str]:
    """Distinct sentences of the JSON lists of texts ``paths``, in order, split and kept
    as the shipped prose (a chat sample: the assistant's answer only)."""
    from make_lm_sentences import sentences_of

    out: list[str] = []
    for path in paths:
        for t in json.loads(Path(path).read_text()):
            out += sentences_of(t.split("<|im_start|>assistant")[-1].split("<|im_end|>")[0])
    return list(dict.fromkeys(out))


def user_sentences(path: str) -> list[str]:
    """Distinct non-empty lines of ``path``: a JSON list of documents (each split at its
    newlines) or a text file of one sentence a line."""
    raw = Path(path).read_text(encoding="utf-8")
    docs = json.loads(raw) if path.endswith(".json") else [raw]
    lines = (line.strip() for doc in docs for line in doc.split("\n"))
    return list(dict.fromkeys(x for x in lines if x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("tnlm", "plain", "whitened", "layerdrop", "int8"),
                    required=True)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--layers", type=int, default=3, help="layerdrop: layers kept")
    ap.add_argument("--text", choices=("default", "grammar"), default="default",
                    help="grammar: the former default text (generated sentences and "
                         "docstrings, no LM sentences)")
    ap.add_argument("--heal-steps", type=int, default=EncoderRecipe.heal_steps)
    ap.add_argument("--lr", type=float, default=None,
                    help="default: the main job's for tnlm/plain/whitened, 1e-4 for layerdrop")
    ap.add_argument("--pivoted", action="store_true",
                    help="tnlm/plain/whitened: fix each truncated bond's gauge, r (I + J - r) "
                         "numbers")
    ap.add_argument("--extra-llm-text", nargs="+", default=[], metavar="JSON",
                    help="after the default text, the sentences (kept as the shipped prose "
                         "keeps them: experiments/make_lm_sentences.sentences_of) of these "
                         "JSON lists of SmolLM2 texts (the decoder experiments' caches, "
                         "results/llm/text/*.json; a chat sample: its answer only)")
    ap.add_argument("--user-text", metavar="FILE", default=None,
                    help="after the default text, a user's own sentences: a JSON list of "
                         "documents, one sentence a line (experiments/indomain_text.py), or a "
                         "text file of one sentence a line; a sentence of the natural sets "
                         "is refused")
    ap.add_argument("--calibration", type=int, default=EncoderRecipe.calibration,
                    help="calibration sentences (the main job's --calibration; default "
                         f"{EncoderRecipe.calibration})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", metavar="DIR", default=None,
                    help="tnlm/plain/whitened: also save the compressed model there as "
                         "`tnlm compress --out` does (self-contained; `tnlm export`, "
                         "benchmarks/bench_onnx.py --checkpoint read it)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    for flag, value in (("--pivoted", args.pivoted), ("--save", args.save)):
        if value and args.method not in LOW_RANK:
            ap.error(f"{flag} applies to {', '.join(LOW_RANK)}, not to {args.method}")
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    sets = natural_sets()
    path = str(default_model_path())
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = copy.deepcopy(model).eval()
    before = linear_params(model)
    if args.text == "grammar":
        text = default_text(seed=args.seed, n_lm=0)
    else:
        text = default_text(seed=args.seed)
    if args.extra_llm_text:
        seen = set(text)
        text += [x for x in llm_text_sentences(args.extra_llm_text) if x not in seen]
    n_user = 0
    if args.user_text:
        user = user_sentences(args.user_text)
        shared = set(user) & {x for v in sets.values() for x in v}
        if shared:
            ap.error(f"--user-text holds {len(shared)} sentences of the natural sets, "
                     f"e.g. {sorted(shared)[0]!r}")
        seen = set(text)
        user = [x for x in user if x not in seen]
        n_user = len(user)
        text += user
    split = split_text(text, args.calibration, seed=args.seed)
    extra: dict = dict(user_sentences=n_user) if args.user_text else {}
    torch.manual_seed(args.seed)
    if args.method in LOW_RANK:
        recipe = EncoderRecipe(budget=args.budget, heal_steps=args.heal_steps,
                               allocation="sensitivity" if args.method == "tnlm" else "uniform",
                               lr=args.lr or EncoderRecipe.lr, whiten=args.method != "plain",
                               seed=args.seed, pivoted=args.pivoted,
                               calibration=args.calibration)
        res = compress_encoder(model, tok, recipe, text=text, progress=False)
        student = res.model
        kept = res.ratio
        extra.update(cosine_held_out=res.measures["cosine_mean"])
        if args.save:
            from tnlm.export import save_self_contained

            save_self_contained(student, tok, args.save)
    elif args.method == "layerdrop":
        student, targets = drop_layers(model, args.layers)
        cfg = EncoderRecipe(heal_steps=args.heal_steps, seed=args.seed).heal_config()
        losses = distil_dropped(student, teacher, tok, split.heal_text, targets, cfg,
                                args.lr or 1e-4)
        kept = linear_params(student) / before
        extra.update(final_loss=losses[-1], layer_targets=targets,
                     cosine_held_out=float(embedding_cosine(student, teacher, tok,
                                                            split.held_out).mean()))
    else:
        student = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        kept = 1.0
    res = measure_natural(student, teacher, tok, sets)
    out = dict(vars(args), kept=kept, wall_seconds=time.perf_counter() - t0,
               text_sentences=len(text), **extra, **res)
    write_result(out, args.out, ("method", "kept", "cos_natural", "cos_sst2", "cos_cola",
                                 "cos_sick", "sick_spearman", "wall_seconds"))


if __name__ == "__main__":
    main()
