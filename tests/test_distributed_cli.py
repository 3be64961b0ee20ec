"""``torchrun --nproc_per_node 2 -m tnlm compress MODEL`` on a tiny random Llama: the ranks
compress and heal together, rank 0 alone prints and saves; a rank that dies stops the
other with RankFailure; an encoder is refused under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.common import free_port, launch_ranks

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--budget", "0.5", "--heal-steps", "4", "--json", "--quiet"]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo test runs on POSIX")


def llm_folder(tmp: Path) -> Path:
    from tests.common import make_causal_lm, make_word_tokenizer

    folder = tmp / "llm"
    if not folder.is_dir():
        make_causal_lm("llama").save_pretrained(folder)
        make_word_tokenizer().save_pretrained(folder)
    return folder


def test_torchrun_compresses_with_two_processes(tmp_path, monkeypatch, capsys):
    import torch

    from tnlm.cli import main
    from tnlm.export import load_compressed

    folder = llm_folder(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "tnlm", "compress", str(folder),
           *ARGS, "--out", str(out)]
    # tmp_path as the working directory: no ../shared/data, the same evaluation text below
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # one summary: rank 0's
    assert summary["processes"] == 2 and summary["architecture"] == "llama"
    assert 0.4 < summary["ratio"] <= 0.5
    assert summary["perplexity"] > 0
    assert "tnlm: error" not in proc.stderr
    alone = load_compressed(out)
    with torch.no_grad():
        assert alone.generate(torch.tensor([[2, 6, 7]]), max_new_tokens=4,
                              do_sample=False).shape == (1, 7)

    # one process on the same model: rank 0's text was every rank's, the statistics
    # were all-reduced, so the allocation and the kept parameters are the same
    monkeypatch.chdir(tmp_path)
    assert main(["compress", str(folder), *ARGS, "--out", ""]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["processes"] == 1
    assert (one["params_before"], one["params_after"]) == (summary["params_before"],
                                                           summary["params_after"])
    assert one["perplexity_dense"] == pytest.approx(summary["perplexity_dense"], rel=1e-6)


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    """A process as torchrun starts it (its environment), running the CLI in-process;
    rank 1 dies when healing starts."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import torch

    torch.set_num_threads(1)
    from tnlm.cli import main
    from tnlm.compress.decoder import job as llm

    real = llm.heal_causal

    def dying(*a, **kw):
        if rank == 1:
            os._exit(3)
        return real(*a, **kw)
    llm.heal_causal = dying
    err = Path(out) / f"stderr_rank{rank}.txt"
    with open(err, "w") as f:
        sys.stderr = f
        code = main(["compress", folder, *ARGS, "--out", "", "--dist-timeout", "1"])
        sys.stderr = sys.__stderr__
    err.with_suffix(".code").write_text(str(code))


def test_a_dead_rank_stops_the_job_with_a_clear_error(tmp_path, monkeypatch):
    folder = llm_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    codes = launch_ranks(_worker, (2, free_port(), str(folder), str(tmp_path)), timeout=180)
    assert codes == [0, 3]  # rank 0 returned from main (its status below), rank 1 died
    assert (tmp_path / "stderr_rank0.code").read_text() == "1"
    said = (tmp_path / "stderr_rank0.txt").read_text().strip().splitlines()[-1]
    assert said.startswith("tnlm: error: rank 0 of 2: the collective of "), said
    assert "another rank has stopped" in said


def test_encoders_and_bad_settings_are_refused_under_torchrun(monkeypatch, capsys, tmp_path):
    from tnlm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["compress", "--heal-steps", "0"]) == 2  # the embedded MiniLM
    err = capsys.readouterr().err
    assert err.startswith("tnlm: error (rank 1 of 2): several processes (torchrun) "
                          "compress causal LMs only"), err
    folder = llm_folder(tmp_path)
    assert main(["compress", str(folder), "--dist-timeout", "0"]) == 2
    assert "--dist-timeout must be a number of minutes > 0, got 0.0" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert main(["compress", str(folder), "--out", ""]) == 2
    assert "8 processes: healing shares each step's batch of 4 sequences, so at most 4 " \
        "processes can heal" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")  # 128 calibration sequences: 16 batches of 8
    assert main(["compress", str(folder), "--out", ""]) == 2
    assert ("3 processes (--nproc_per_node): the 128 calibration sequences make 16 batches "
            "of 8, which must be shared equally (a number of processes that divides 16)"
            ) in capsys.readouterr().err
    monkeypatch.setenv("RANK", "x")
    assert main(["compress", str(folder)]) == 2
    assert "RANK 'x' must be integers" in capsys.readouterr().err


def _resume_worker(rank: int, world: int, ports: list[int], folder: str, text: str,
                   out: str) -> None:
    """Three runs of the CLI in a rank as torchrun starts it: one stopped in block 1 (on
    every rank), the same command with --resume, and an uninterrupted one into another
    folder; what each run fitted and returned is written to ``log_rank<r>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import torch

    torch.set_num_threads(1)
    from tnlm.cli import main
    from tnlm.compress.layerwise import loop as lw

    real, fail_at, blocks = lw.fit_block, [1], []

    def fit(block, *a, seed=0, **kw):  # seed: the run's seed 0 plus the block's index
        blocks.append(seed)
        if seed == fail_at[0]:
            raise RuntimeError(f"stopped in block {seed}")
        return real(block, *a, seed=seed, **kw)

    lw.fit_block = fit
    out_ = Path(out)
    base = ["compress", folder, "--budget", "0.5", "--heal-steps", "1", "--text", text,
            "--json", "--quiet", "--dist-timeout", "2"]
    log: dict = {}
    for name, port, extra in (("stopped", ports[0], ["--out", str(out_ / "a")]),
                              ("resumed", ports[1], ["--out", str(out_ / "a"), "--resume"]),
                              ("whole", ports[2], ["--out", str(out_ / "b")])):
        os.environ["MASTER_PORT"] = str(port)
        blocks.clear()
        with open(out_ / f"{name}_rank{rank}.err", "w") as e, \
                open(out_ / f"{name}_rank{rank}.out", "w") as o:
            sys.stderr, sys.stdout = e, o
            code = main([*base, *extra])
            sys.stderr, sys.stdout = sys.__stderr__, sys.__stdout__
        log[name] = {"code": code, "blocks": list(blocks)}
        if name == "stopped":
            fail_at[0] = None
            log["files"] = sorted(p.name for p in (out_ / "a" / "layerwise").iterdir())
    (out_ / f"log_rank{rank}.json").write_text(json.dumps(log))


def test_torchrun_resumes_after_the_last_finished_block(tmp_path):
    """Under torchrun --out DIR/layerwise gets each rank's hidden states and rank 0's
    blocks and state; --resume on every rank fits the unfinished block only, and rank 0
    saves the model of an uninterrupted two-process run (the same tensors, bit for bit)."""
    import torch
    from safetensors.torch import load_file

    folder = llm_folder(tmp_path)
    text = tmp_path / "text.txt"
    words = ["the", "cat", "sat", "on", "mat", ".", "dog", "is", "blue", "and", "sky", "day"]
    text.write_text("\n".join(" ".join(words[(i * 7 + j * (5 + i // 12)) % len(words)]
                                       for j in range(40)) for i in range(40)) + "\n")
    codes = launch_ranks(_resume_worker, (2, [free_port() for _ in range(3)], str(folder),
                                          str(text), str(tmp_path)), timeout=300)
    assert codes == [0, 0], [(tmp_path / f"{n}_rank{r}.err").read_text()
                             for r in (0, 1) for n in ("stopped", "resumed", "whole")
                             if (tmp_path / f"{n}_rank{r}.err").exists()]
    logs = [json.loads((tmp_path / f"log_rank{r}.json").read_text()) for r in (0, 1)]
    ckpt = tmp_path / "a" / "layerwise"
    for log in logs:
        assert log["stopped"] == {"code": 1, "blocks": [0, 1]}
        assert log["files"] == ["block_00000.safetensors", "hidden_00000_rank0.safetensors",
                                "hidden_00000_rank1.safetensors", "state.json"]
        assert log["resumed"] == {"code": 0, "blocks": [1]}  # block 0 read back
        assert log["whole"] == {"code": 0, "blocks": [0, 1]}
    assert f"the layer-by-layer checkpoint in {ckpt} is kept" in \
        (tmp_path / "stopped_rank0.err").read_text()
    assert f"resuming the layer-by-layer compression in {ckpt} after block 0" in \
        (tmp_path / "resumed_rank0.err").read_text()
    assert (tmp_path / "resumed_rank1.out").read_text() == ""  # rank 0 alone prints
    assert not ckpt.exists()
    resumed = json.loads((tmp_path / "resumed_rank0.out").read_text())
    whole = json.loads((tmp_path / "whole_rank0.out").read_text())
    assert resumed["processes"] == 2
    assert resumed["params_after"] == whole["params_after"]
    files = sorted(f.name for f in (tmp_path / "a").glob("*.safetensors"))
    assert files and files == sorted(f.name for f in (tmp_path / "b").glob("*.safetensors"))
    for name in files:
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_short_text_calibrates_on_the_most_sequences_the_ranks_can_share():
    """A text of fewer sequences than n_calibration calibrates on all of them in one
    process; on several ranks on the most that they can share in batches of 8 (block
    fitting: equal shares), instead of an error after loading. A given n_calibration is
    never rounded."""
    from tnlm.compress.decoder.job import CausalLMRecipe

    r = CausalLMRecipe()  # 128 calibration sequences, block fitting
    assert r.calibration_count(500) == r.calibration_count(500, 4) == 128
    assert r.calibration_count(100) == 100
    assert r.calibration_count(100, 2) == 96  # 13 batches: not two equal shares
    assert r.calibration_count(100, 4) == 96
    assert r.calibration_count(80, 2) == 80  # 10 batches: five each
    assert r.calibration_count(63, 3) == 48
    assert r.calibration_count(31, 4) == 31  # four batches, the last of 7
    with pytest.raises(ValueError, match="makes 24 sequences of 128 tokens: 4 ranks need at "
                                         "least 25"):
        r.calibration_count(24, 4)  # three batches; 25 make four, the last of one
    plain = CausalLMRecipe(method="whitened")  # no fitting: every rank a batch is enough
    assert plain.calibration_count(100, 4) == 100
    assert CausalLMRecipe(n_calibration=100).calibration_count(500, 2) == 100
