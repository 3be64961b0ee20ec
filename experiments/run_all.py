"""Run every arm of experiments/glue.py (one process each, one after another) and write
the results table and plot.

Usage:
    python experiments/run_all.py --task sst2 [--arms dense,mpo_lfa,...] [--steps 313]
    python experiments/run_all.py --task sst2 --report-only    # tables from existing JSONs

Writes results/<task>/<arm>.json, docs/figures/results_<task>.png and the section
``<!-- results:<task> -->`` of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ["dense", "mpo_full", "mpo_lfa", "mpo_lfa_sym", "lora", "mpo_dir", "mpop"]
LABELS = {"dense": "full fine-tuning (dense)", "mpo_full": "MPO_full (all tensors)",
          "mpo_lfa": "MPO_full + LFA (central gauge)",
          "mpo_lfa_sym": "MPO_full + LFA (symmetric gauge)", "lora": "LoRA (peft)",
          "mpo_dir": "MPO_dir (50%) + LFA", "mpop": "MPOP (dimension squeezing)"}


def table(results: list[dict], task: str) -> str:
    metric = "mcc" if task == "cola" else "accuracy"
    name = "Matthews corr. ×100" if task == "cola" else "dev accuracy"
    lines = [f"| arm | {name} | trained params | trained in adapted layers | adapted layers total "
             "| total params | s/step | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {LABELS.get(r['arm'], r['arm'])}{' ' + r['tag'] if r.get('tag') else ''} | "
            f"{100 * r['dev'][metric]:.2f} | "
            f"{r['trained_params'] / 1e6:.2f}M | {r['adapted_trained'] / 1e6:.2f}M | "
            f"{r['adapted_total'] / 1e6:.2f}M | {r['total_params'] / 1e6:.2f}M | "
            f"{r['sec_per_step']:.2f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    metric = "mcc" if task == "cola" else "accuracy"
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for r in results:
        ax.scatter(r["adapted_trained"] / 1e6, 100 * r["dev"][metric], s=40)
        label = r["arm"] + (f" {r['tag']}" if r.get("tag") else "")
        ax.annotate(label, (r["adapted_trained"] / 1e6, 100 * r["dev"][metric]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters in the adapted (MPO / LoRA / dense) layers [M]")
    ax.set_ylabel(("Matthews corr." if task == "cola" else "dev accuracy") + " [%]")
    ax.set_title(f"{task.upper()}: MiniLM fine-tuning arms")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_docs(task: str, results: list[dict], cmd: str) -> None:
    r0 = results[0]
    body = (f"Command: `{cmd}`\n\nSetup: {r0['train_size']} training examples "
            f"(fixed seed {r0['seed']}), {r0['steps']} steps of batch {r0['batch_size']}, "
            f"AdamW with linear warm-up/decay, lr {r0['lr']} (LoRA: its own lr, see JSON), "
            f"dev set in full. s/step and peak RSS here were measured while other work shared "
            f"the machine; see the timing table for clean figures.\n\n"
            f"{table(results, task)}\n\n![{task}](figures/results_{task}.png)")
    write_section(f"results:{task}", body)


def timing_table(results: list[dict]) -> str:
    lines = ["| arm | s/step | relative to dense | peak RSS (MB) |", "|---|---|---|---|"]
    base = next((r["sec_per_step"] for r in results if r["arm"] == "dense"), None)
    for r in results:
        rel = f"{r['sec_per_step'] / base:.2f}" if base else "-"
        lines.append(f"| {LABELS.get(r['arm'], r['arm'])} | {r['sec_per_step']:.3f} | {rel} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def write_section(key: str, body: str) -> None:
    doc = ROOT / "docs" / "results.md"
    text = doc.read_text() if doc.exists() else "# Results\n"
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    block = f"{start}\n\n{body}\n\n{end}"
    if start in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--timing", action="store_true",
                    help="short runs (20 steps) of every arm but mpop, one at a time on an idle "
                         "machine, for the time-per-step and memory table")
    args, extra = ap.parse_known_args()
    arms = args.arms.split(",")
    out_dir = ROOT / "results" / args.task
    if args.timing:
        arms = [a for a in arms if a != "mpop"]
        extra = ["--steps", "20", "--train-size", "640", "--eval-size", "32", *extra]
        out_dir = ROOT / "results" / f"{args.task}-timing"
    for arm in arms if not args.report_only else []:
        t0 = time.time()
        cmd = [sys.executable, str(ROOT / "experiments" / "glue.py"), "--arm", arm, "--task",
               args.task, "--out", str(out_dir / f"{arm}.json"), "--no-progress",
               "--models", str(ROOT / "results" / "models" / args.task), *extra]
        print(f"== {arm}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
        print(f"== {arm} done in {time.time() - t0:.0f} s", flush=True)
    if args.timing:
        results = [json.loads((out_dir / f"{a}.json").read_text()) for a in arms
                   if (out_dir / f"{a}.json").exists()]
        body = (f"Command: `python experiments/run_all.py --task {args.task} --timing`: 20 steps "
                "per arm (batch 32, max length 64), each arm alone in its own process on the "
                "otherwise idle 2-core machine; the first steps (warm-up, plan building) "
                f"included.\n\n{timing_table(results)}")
        print(timing_table(results))
        write_section(f"timing:{args.task}", body)
        return
    results = [json.loads((out_dir / f"{a}.json").read_text()) for a in ARMS
               if (out_dir / f"{a}.json").exists()]
    results += [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))
                if p.stem not in ARMS]  # variant runs (glue.py --tag ...)
    if not results:
        sys.exit("no results to report")
    print(table(results, args.task))
    plot(results, args.task, ROOT / "docs" / "figures" / f"results_{args.task}.png")
    cmd = "python experiments/run_all.py --task " + args.task + (" " + " ".join(extra) if extra
                                                                  else "")
    write_docs(args.task, results, cmd)


if __name__ == "__main__":
    main()
