"""Layer-by-layer compression on torch.distributed (2 gloo ranks, torch.multiprocessing)
against the single-process run, and its resumable per-block checkpoint."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.common import free_port, join_gloo_group, launch_ranks
from tnlm.compress.calibration import collect_input_stats
from tnlm.compress.distributed import shard_batches
from tnlm.compress.layerwise import LayerwiseConfig, compress_layerwise
from tnlm.compress.layerwise import loop as lw  # the loop: what the tests patch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRAM_LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
BATCH = 2
#: the runs compared across processes: name -> settings
RUNS = {
    "whitened": dict(method="whitened", fit_steps=0, budget=0.5),
    "spectrum": dict(method="whitened", fit_steps=0, budget=0.5, allocation="residual"),
    # the spectra from the first two batches: one on each rank
    "spectrum-first": dict(method="whitened", fit_steps=0, budget=0.5, allocation="residual",
                           allocation_sequences=2 * BATCH),
    "tnlm": dict(method="tnlm", fit_steps=6, budget=0.5, cross=True, fit_lr=3e-3),
    # every rank measures every target on the same probe; rank 0's ranks are everyone's
    "sensitivity": dict(method="whitened", fit_steps=0, budget=0.5, allocation="sensitivity",
                        sensitivity_sequences=3),
}


def tiny(layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def sequences(n: int = 8, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n, T), generator=torch.Generator().manual_seed(seed))


def config(name: str, **kw) -> LayerwiseConfig:
    return LayerwiseConfig(TARGETS, batch_size=BATCH, **{**RUNS[name], **kw})


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=sequences(), use_cache=False).logits.double()


def grams(batches: list[torch.Tensor], reduce: bool) -> dict[str, torch.Tensor]:
    stats = collect_input_stats(tiny(), [dict(input_ids=b) for b in batches], GRAM_LAYERS,
                                reduce=reduce)
    return {n: s.gram for n, s in stats.items()}


def save(path: Path, model: torch.nn.Module, result=None, **extra) -> None:
    from safetensors.torch import save_file

    tensors = {f"w.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors["logits"] = logits(model)
    tensors.update(extra)
    save_file(tensors, str(path))
    if result is not None:
        path.with_suffix(".json").write_text(json.dumps(dict(
            ranks=result.ranks, errors=result.errors, block_errors=result.block_errors)))


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------- the ranks' side
def _worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    import torch.distributed as dist

    join_gloo_group(rank, world, port, timeout_s=20)
    out = Path(out)
    try:
        seqs = sequences()
        if mode == "full":
            mine = [seqs[s] for s in shard_batches(len(seqs), BATCH, rank, world)]
            g = grams(mine, reduce=True)
            from safetensors.torch import save_file
            save_file({n: t for n, t in g.items()}, str(out / f"gram_rank{rank}.safetensors"))
            computed: dict[str, list[int]] = {}  # per run: truncations this rank computed
            real_layer = lw.WhitenedLayer.layer

            def counting(self, *a, **kw):
                computed[current].append(int(self.W.shape[0] * self.W.shape[1]))
                return real_layer(self, *a, **kw)
            lw.WhitenedLayer.layer = counting
            for name in RUNS:
                current = name
                computed[name] = []
                model = tiny()
                r = compress_layerwise(model, seqs, config(name), progress=False)
                save(out / f"{name}_rank{rank}.safetensors", model, r)
            (out / f"computed_rank{rank}.json").write_text(json.dumps(computed))

            def failing(self, *a, **kw):  # rank 1's truncations fail
                if rank == 1:
                    raise ArithmeticError("no truncation here")
                return real_layer(self, *a, **kw)
            lw.WhitenedLayer.layer = failing
            model = tiny()
            try:
                compress_layerwise(model, seqs, config("whitened"), progress=False)
                said = "finished"
            except Exception as err:
                said = f"{type(err).__name__}: {err}"
            unchanged = all(type(m).__name__ == "Linear" for n, m in model.named_modules()
                            if n.endswith("_proj"))
            (out / f"owner_failed_rank{rank}.txt").write_text(f"{said}\nunchanged={unchanged}")
            lw.WhitenedLayer.layer = real_layer
            # rank 0 alone (distributed=False) with a checkpoint, rank 1 alive but idle:
            # the checkpoint must not wait for rank 1
            alone = out / "alone.json"
            if rank == 0:
                try:
                    r = compress_layerwise(tiny(), seqs, config("whitened", checkpoint_dir=str(
                        out / "alone")), progress=False, distributed=False)
                    alone.write_text(json.dumps(dict(ranks=r.ranks, files=sorted(
                        p.name for p in (out / "alone").iterdir()))))
                except Exception as err:
                    alone.write_text(json.dumps(f"{type(err).__name__}: {err}"))
            else:
                for _ in range(600):
                    if alone.exists():
                        break
                    time.sleep(0.1)
            # each rank another model (rank 1's one weight nudged), no checkpoint: the
            # ranks compared only their settings then, pooled both models' statistics and
            # rank 0 saved its own weights with layers of both
            model = tiny()
            if rank == 1:
                with torch.no_grad():
                    next(model.parameters()).add_(1e-3)
            try:
                compress_layerwise(model, seqs, config("whitened"), progress=False)
                said = "finished"
            except Exception as err:
                said = f"{type(err).__name__}: {err}"
            (out / f"other_model_rank{rank}.txt").write_text(said)
        elif mode == "fail":  # rank 1 dies once block 0's checkpoint is written
            real = lw.write_checkpoint

            def dying(*a, **kw):
                real(*a, **kw)
                if rank == 1 and a[1] == 0:
                    os._exit(3)
            lw.write_checkpoint = dying
            model = tiny()
            try:
                compress_layerwise(model, seqs, config("tnlm", checkpoint_dir=str(out / "ck")),
                                   progress=False)
                (out / f"fail_rank{rank}.txt").write_text("finished")
            except Exception as err:
                unchanged = all(type(m).__name__ == "Linear" for n, m in model.named_modules()
                                if n.endswith("_proj"))
                (out / f"fail_rank{rank}.txt").write_text(
                    f"{type(err).__name__}: {err}\nunchanged={unchanged}")
        elif mode == "resume":
            model = tiny()
            r = compress_layerwise(model, seqs, config("tnlm", checkpoint_dir=str(out / "ck")),
                                   progress=False, resume=True)
            save(out / f"resume_rank{rank}.safetensors", model, r)
    finally:
        if mode != "fail":
            dist.destroy_process_group()


def _launch(out: Path, mode: str, timeout: float = 240) -> list[int | None]:
    return launch_ranks(_worker, (2, free_port(), str(out), mode), timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    assert _launch(out, "full") == [0, 0]
    return out


def single(name: str) -> tuple[torch.nn.Module, lw.LayerwiseResult]:
    model = tiny()
    return model, compress_layerwise(model, sequences(), config(name), progress=False)


# ---------------------------------------------------------------- tests
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo test runs on POSIX")


def test_shards_are_round_robin_batches():
    assert shard_batches(7, 2, 0, 2) == [slice(0, 2), slice(4, 6)]
    assert shard_batches(7, 2, 1, 2) == [slice(2, 4), slice(6, 7)]
    # a rank outside the world took rank 0's batches a second time
    for args, match in (((10, 4, 2, 2), r"rank must be an int in \[0, 2\), got 2"),
                        ((10, 4, -1, 2), "rank must be"), ((10, 0, 0, 2), "batch_size must"),
                        ((10, 4, 0, 0), "world_size must"), ((-1, 4, 0, 2), "n must"),
                        ((10, 4, True, 2), "rank must")):
        with pytest.raises(ValueError, match=match):
            shard_batches(*args)


def test_gram_statistics_all_reduced(two_ranks):
    seqs = sequences()
    ref = grams([seqs[i:i + BATCH] for i in range(0, len(seqs), BATCH)], reduce=False)
    for r in (0, 1):
        got = load(two_ranks / f"gram_rank{r}.safetensors")
        for n in GRAM_LAYERS:
            assert got[n].dtype == torch.float64
            assert torch.allclose(got[n], ref[n], rtol=0, atol=1e-10 * float(ref[n].abs().max()))


@pytest.mark.parametrize("name", ["whitened", "spectrum", "spectrum-first", "sensitivity"])
def test_truncation_matches_single_process(two_ranks, name):
    model, r = single(name)
    ref = {f"w.{k}": v for k, v in model.state_dict().items()}
    ranks = [json.loads((two_ranks / f"{name}_rank{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["ranks"] == r.ranks
    assert any(v is not None for v in r.ranks.values())
    if name == "spectrum-first":  # the first batches alone allocate otherwise here
        assert r.ranks != single("spectrum")[1].ranks
    for a, b in zip(ranks[0]["block_errors"], r.block_errors):
        assert a == pytest.approx(list(b), rel=1e-9, abs=1e-12)
    assert ranks[0]["errors"] == pytest.approx(r.errors, rel=1e-6, abs=1e-9)
    got = [load(two_ranks / f"{name}_rank{k}.safetensors") for k in (0, 1)]
    for k, v in ref.items():
        assert torch.equal(got[0][k], got[1][k]), k  # the ranks hold the same model
        a, b = got[0][k].double(), v.double()
        if ".cores." in k:  # a singular vector's sign may differ from one BLAS to another
            a, b = a.abs(), b.abs()  # (summed Grams); the logits below check the products
        assert torch.allclose(a, b, rtol=0, atol=1e-6), k
    assert torch.allclose(got[0]["logits"], logits(model), rtol=0, atol=1e-6)


def test_owners_by_cost_is_greedy_largest_first():
    from tnlm.compress.distributed import owners_by_cost

    # SmolLM2's block: q, k, v, o, gate, up, down (I J min(I, J), in units of 576 x 192²)
    costs = [9, 1, 1, 9, 24, 24, 24]
    owners = owners_by_cost(costs, 2)
    assert owners == [1, 1, 1, 1, 0, 1, 0]
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in (0, 1)]
    assert loads == [48, 44]
    assert owners_by_cost(costs, 1) == [0] * 7
    assert owners_by_cost([], 3) == []
    assert owners_by_cost([5, 5, 5], 3) == [0, 1, 2]  # ties: the earlier task, lower rank
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        owners_by_cost([1.0], 0)
    with pytest.raises(ValueError, match="costs must be finite numbers >= 0"):
        owners_by_cost([1.0, float("nan")], 2)


@pytest.mark.parametrize("name", ["whitened", "spectrum", "tnlm"])
def test_truncations_are_shared_among_the_ranks(two_ranks, name):
    """Each truncation is computed by one rank (the others receive it), both ranks work."""
    got = [json.loads((two_ranks / f"computed_rank{k}.json").read_text())[name]
           for k in (0, 1)]
    r = single(name)[1]
    assert len(got[0]) + len(got[1]) == sum(v is not None for v in r.ranks.values())
    assert got[0] and got[1]


def test_a_failed_truncation_stops_every_rank(two_ranks):
    said = [(two_ranks / f"owner_failed_rank{k}.txt").read_text() for k in (0, 1)]
    assert said[1].startswith("ArithmeticError: no truncation here"), said[1]
    assert said[0].startswith("RuntimeError: rank 1 could not truncate block 0's "), said[0]
    assert "ArithmeticError: no truncation here" in said[0]
    assert all(s.endswith("unchanged=True") for s in said)


def test_ranks_holding_different_models_are_refused_without_a_checkpoint(two_ranks):
    said = [(two_ranks / f"other_model_rank{k}.txt").read_text() for k in (0, 1)]
    for s in said:
        assert s.startswith("ValueError: the ranks were given different settings, models"), s


def test_one_rank_alone_in_a_process_group_checkpoints_without_waiting(two_ranks):
    got = json.loads((two_ranks / "alone.json").read_text())
    assert isinstance(got, dict), got
    assert got["ranks"] == single("whitened")[1].ranks
    # after the last block no hidden states are kept
    assert got["files"] == ["block_00000.safetensors", "block_00001.safetensors", "state.json"]


def test_fitting_keeps_ranks_identical(two_ranks):
    got = [load(two_ranks / f"tnlm_rank{k}.safetensors") for k in (0, 1)]
    for k in got[0]:
        assert torch.equal(got[0][k], got[1][k]), k
    res = [json.loads((two_ranks / f"tnlm_rank{k}.json").read_text()) for k in (0, 1)]
    assert res[0] == res[1]
    model, r = single("tnlm")
    assert res[0]["ranks"] == r.ranks
    # truncation (before fitting) sees the same statistics as one process
    assert [e[0] for e in res[0]["block_errors"]][:1] == pytest.approx([r.block_errors[0][0]],
                                                                       rel=1e-6)
    assert all(e[1] <= e[0] for e in res[0]["block_errors"])
    # fitting takes one batch per rank per step (one process: one batch per step), so
    # the trajectories differ; they end close, not equal
    diff = float((got[0]["logits"] - logits(model)).abs().max())
    assert diff < 0.1 * float(logits(model).abs().max())  # measured: 4 %


def test_failed_rank_stops_the_other_and_checkpoint_resumes(two_ranks, tmp_path):
    codes = _launch(tmp_path, "fail", timeout=120)
    assert codes[1] == 3
    msg = (tmp_path / "fail_rank0.txt").read_text()
    assert msg.startswith("RankFailure") and "another rank has stopped" in msg, msg
    assert "unchanged=True" in msg
    state = lw.read_checkpoint_state(tmp_path / "ck")
    assert state["last_block"] == 0
    assert _launch(tmp_path, "resume") == [0, 0]
    ref = load(two_ranks / "tnlm_rank0.safetensors")
    for k in (0, 1):
        got = load(tmp_path / f"resume_rank{k}.safetensors")
        assert torch.allclose(got["logits"], ref["logits"], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "resume_rank0.json").read_text()) == \
        json.loads((two_ranks / "tnlm_rank0.json").read_text())


# ---------------------------------------------------------------- one process
class _Stop(Exception):
    pass


def test_resume_after_interruption_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    cfg = LayerwiseConfig(TARGETS, batch_size=BATCH, method="tnlm", fit_steps=4, budget=0.5,
                          allocation="spectrum", checkpoint_dir=str(tmp_path / "ck"))
    whole = tiny(3)
    r_whole = compress_layerwise(whole, sequences(), cfg, progress=False)
    expected = logits(whole)

    real = lw.write_checkpoint

    def stop_after_block_1(*a, **kw):
        real(*a, **kw)
        if a[1] == 1:
            raise _Stop
    monkeypatch.setattr(lw, "write_checkpoint", stop_after_block_1)
    ck = tmp_path / "ck2"
    cfg2 = LayerwiseConfig(**{**cfg.__dict__, "checkpoint_dir": str(ck)})
    model = tiny(3)
    dense = logits(model)
    with pytest.raises(_Stop):
        compress_layerwise(model, sequences(), cfg2, progress=False)
    assert torch.equal(logits(model), dense)  # rolled back
    assert lw.read_checkpoint_state(ck)["last_block"] == 1
    assert sorted(p.name for p in ck.glob("hidden_*")) == ["hidden_00000_rank0.safetensors",
                                                           "hidden_00001_rank0.safetensors"]
    monkeypatch.setattr(lw, "write_checkpoint", real)

    fresh = tiny(3)
    said = []
    r = compress_layerwise(fresh, sequences(), cfg2, progress=False, resume=True,
                           log=said.append)
    assert said[0].startswith("resumed from") and "after block 1" in said[0]
    assert list(ck.glob("hidden_*")) == []  # none kept after the last block
    assert torch.allclose(logits(fresh), expected, rtol=0, atol=1e-6)
    assert r.ranks == r_whole.ranks and r.errors == r_whole.errors
    assert [tuple(e) for e in r.block_errors] == [tuple(e) for e in r_whole.block_errors]
    assert (r.params_before, r.params_after) == (r_whole.params_before, r_whole.params_after)

    # resuming a finished checkpoint rebuilds the model without compressing again
    again = tiny(3)
    compress_layerwise(again, sequences(), cfg2, progress=False, resume=True)
    assert torch.allclose(logits(again), expected, rtol=0, atol=1e-6)


def test_a_fresh_run_drops_an_earlier_state_before_writing_over_its_files(tmp_path,
                                                                         monkeypatch):
    """Without resume, an earlier state.json in the folder is removed first: a run stopped
    before its own first state cannot leave the old one pointing at the new run's files."""
    ck = tmp_path / "ck"
    cfg = LayerwiseConfig(TARGETS, batch_size=BATCH, method="plain", budget=0.5,
                          checkpoint_dir=str(ck))
    compress_layerwise(tiny(3), sequences(), cfg, progress=False)
    assert lw.read_checkpoint_state(ck) is not None

    def stop(*a, **kw):
        raise _Stop
    monkeypatch.setattr(lw, "write_checkpoint", stop)
    with pytest.raises(_Stop):
        compress_layerwise(tiny(3), sequences(), cfg, progress=False)
    assert lw.read_checkpoint_state(ck) is None


def test_resume_refuses_other_settings_or_sequences(tmp_path):
    cfg = LayerwiseConfig(TARGETS, batch_size=BATCH, method="whitened", fit_steps=0,
                          budget=0.5, checkpoint_dir=str(tmp_path))
    compress_layerwise(tiny(), sequences(), cfg, progress=False)
    other = LayerwiseConfig(**{**cfg.__dict__, "budget": 0.4})
    with pytest.raises(ValueError, match=r"settings\.budget: 0\.5 in the checkpoint, 0\.4 now"):
        compress_layerwise(tiny(), sequences(), other, progress=False, resume=True)
    with pytest.raises(ValueError, match="sequences: "):
        compress_layerwise(tiny(), sequences(seed=2), cfg, progress=False, resume=True)
    model = tiny(3)
    dense = logits(model)
    with pytest.raises(ValueError, match=r"model\.config\.num_hidden_layers: 2 in the "
                       r"checkpoint, 3 now"):
        compress_layerwise(model, sequences(), cfg, progress=False, resume=True)
    assert torch.equal(logits(model), dense)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        compress_layerwise(tiny(), sequences(), LayerwiseConfig(TARGETS), progress=False,
                           resume=True)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def test_resume_refuses_other_weights_and_ignores_where_the_model_came_from(tmp_path):
    cfg = LayerwiseConfig(TARGETS, batch_size=BATCH, method="whitened", fit_steps=0,
                          budget=0.5, checkpoint_dir=str(tmp_path))
    done = tiny()
    compress_layerwise(done, sequences(), cfg, progress=False)
    model = tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    before = _state(model)
    with pytest.raises(ValueError, match="the model's weights differ") as err:
        compress_layerwise(model, sequences(), cfg, progress=False, resume=True)
    assert "model.config" not in str(err.value)
    assert _same(model, before)
    with pytest.raises(ValueError, match=r"model\.dtype: 'torch\.float32' in the checkpoint, "
                       r"'torch\.float64' now"):
        compress_layerwise(tiny().double(), sequences(), cfg, progress=False, resume=True)
    # where the model was loaded from and by which transformers do not matter
    model = tiny()
    model.config._name_or_path = "/elsewhere"
    model.config.transformers_version = "0.0.1"
    compress_layerwise(model, sequences(), cfg, progress=False, resume=True)
    assert torch.equal(logits(model), logits(done))


def test_resume_checks_the_checkpoint_before_touching_the_model(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = LayerwiseConfig(["q_proj", "down_proj"], batch_size=BATCH, method="whitened",
                          fit_steps=0, budget=0.5, checkpoint_dir=str(tmp_path))
    compress_layerwise(tiny(3), sequences(), cfg, progress=False)
    state = json.loads((tmp_path / "state.json").read_text())
    state["last_block"] = 0  # as if stopped after block 0 (its hidden states are gone)
    (tmp_path / "state.json").write_text(json.dumps(state))
    model = tiny(3)
    before = _state(model)
    with pytest.raises(ValueError, match="hidden_00000_rank0.safetensors is missing"):
        compress_layerwise(model, sequences(), cfg, progress=False, resume=True)
    assert _same(model, before)

    # hidden states of the wrong shape are refused before the model changes
    save_file({f"{a}.{k}": torch.zeros(BATCH, 5, 32) for a in ("xs", "xt") for k in range(4)},
              str(tmp_path / "hidden_00000_rank0.safetensors"))
    with pytest.raises(ValueError, match="does not hold this rank's 4 batches"):
        compress_layerwise(model, sequences(), cfg, progress=False, resume=True)
    assert _same(model, before)

    # a block file that fails to load after another block was restored: everything the
    # restore overwrote (non-target linears included) comes back
    save_file({f"{a}.{k}": torch.zeros(BATCH, 12, 32) for a in ("xs", "xt") for k in range(4)},
              str(tmp_path / "hidden_00000_rank0.safetensors"))
    state["last_block"] = 1
    (tmp_path / "state.json").write_text(json.dumps(state))
    save_file({k: v + 1 for k, v in load_file(str(tmp_path / "block_00000.safetensors")).items()},
              str(tmp_path / "block_00000.safetensors"))
    b1 = load_file(str(tmp_path / "block_00001.safetensors"))
    b1.pop("mlp.up_proj.weight")
    save_file(b1, str(tmp_path / "block_00001.safetensors"))
    save_file({f"{a}.{k}": torch.zeros(BATCH, 12, 32) for a in ("xs", "xt") for k in range(4)},
              str(tmp_path / "hidden_00001_rank0.safetensors"))
    with pytest.raises(RuntimeError, match="up_proj"):
        compress_layerwise(model, sequences(), cfg, progress=False, resume=True)
    assert _same(model, before)
    assert all(type(m).__name__ == "Linear" for n, m in model.named_modules()
               if n.endswith("_proj"))


def test_resume_refuses_another_checkpoint_version(tmp_path):
    cfg = LayerwiseConfig(TARGETS, batch_size=BATCH, method="plain", fit_steps=0,
                          budget=0.5, checkpoint_dir=str(tmp_path))
    compress_layerwise(tiny(), sequences(), cfg, progress=False)
    state = json.loads((tmp_path / "state.json").read_text())
    state["version"] = 1
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="checkpoint version 1; this tnlm reads version 2"):
        compress_layerwise(tiny(), sequences(), cfg, progress=False, resume=True)


def test_the_result_names_the_probe_its_ranks_were_measured_on(tmp_path):
    """LayerwiseResult.sensitivity_sequences: the probe used (cut to the calibration
    sequences, with a warning); a resume reports the checkpoint's probe, not the one
    asked for now; None for another allocation."""
    cfg = LayerwiseConfig(TARGETS, batch_size=BATCH, method="whitened", fit_steps=0,
                          budget=0.5, allocation="sensitivity", sensitivity_sequences=3,
                          checkpoint_dir=str(tmp_path))
    assert compress_layerwise(tiny(), sequences(), cfg,
                              progress=False).sensitivity_sequences == 3
    cfg.sensitivity_sequences = 2  # the checkpoint's ranks were measured on 3
    assert compress_layerwise(tiny(), sequences(), cfg, progress=False,
                              resume=True).sensitivity_sequences == 3
    n = int(sequences().shape[0])
    cfg.sensitivity_sequences, cfg.checkpoint_dir = n + 5, None
    with pytest.warns(UserWarning, match=f"a probe of {n + 5} sequences, but only {n} "
                                         f"calibration sequences: measured on {n}"):
        assert compress_layerwise(tiny(), sequences(), cfg,
                                  progress=False).sensitivity_sequences == n
    cfg.allocation = "residual"
    assert compress_layerwise(tiny(), sequences(), cfg,
                              progress=False).sensitivity_sequences is None


def test_resume_reads_a_checkpoint_from_before_output_error_as_total(tmp_path):
    """A state written before ``output_error`` existed measured whole-tensor errors: it
    resumes with ``output_error="total"`` and is refused, naming the field, otherwise; the
    probe size of the sensitivities is not compared (the checkpoint keeps its ranks)."""
    cfg = LayerwiseConfig(TARGETS, batch_size=BATCH, method="plain", fit_steps=0,
                          budget=0.5, checkpoint_dir=str(tmp_path), output_error="total")
    compress_layerwise(tiny(), sequences(), cfg, progress=False)
    state = json.loads((tmp_path / "state.json").read_text())
    del state["fingerprint"]["settings"]["output_error"]
    # an earlier version recorded the probe size: not compared (the ranks are kept)
    state["fingerprint"]["settings"]["sensitivity_sequences"] = 8
    (tmp_path / "state.json").write_text(json.dumps(state))
    compress_layerwise(tiny(), sequences(), cfg, progress=False, resume=True)
    cfg.sensitivity_sequences = 5  # nor now
    compress_layerwise(tiny(), sequences(), cfg, progress=False, resume=True)
    cfg.output_error = "position"
    with pytest.raises(ValueError, match="output_error: 'total' in the checkpoint, "
                                         "'position' now"):
        compress_layerwise(tiny(), sequences(), cfg, progress=False, resume=True)
