"""Healing's best-state snapshot (tnlm.compress.snapshot) and its use in causal healing."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys

import pytest
import torch

from tests.common import VOCAB, make_causal_lm
from tnlm.compress.decoder.heal import CausalHealConfig, heal_causal
from tnlm.compress.layerwise import LayerwiseConfig, compress_layerwise
from tnlm.compress.memory import rss_mb
from tnlm.compress.snapshot import ParameterSnapshot
from tnlm.integration.architectures import default_targets


def _params():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return [torch.randn(3, 4, 5, generator=g), torch.randn(7, generator=g).to(torch.bfloat16),
            base.t(),  # not contiguous
            torch.nn.Parameter(torch.randn(2, 3, generator=g)), torch.empty(0)]


@pytest.mark.parametrize("where", ["disk", "memory"])
def test_restore_gives_back_the_values_of_take_exactly(where):
    params = _params()
    want = [p.detach().clone() for p in params]
    with ParameterSnapshot(params, where) as snap:
        snap.take()
        with torch.no_grad():
            for p in params:
                p.add_(1.0) if p.numel() else None
        assert not torch.equal(params[0], want[0])
        snap.restore()
        for p, w in zip(params, want):
            assert p.dtype == w.dtype and p.shape == w.shape and torch.equal(p, w)
        assert not params[2].is_contiguous()  # restored in place, layout kept
        assert snap.nbytes == sum(w.numel() * w.element_size() for w in want)


def test_disk_snapshot_has_no_name_and_refuses_use_after_close(tmp_path):
    params = _params()
    snap = ParameterSnapshot(params, "disk", directory=tmp_path)
    snap.take()
    snap.take()
    assert snap.file_bytes == snap.nbytes
    if sys.platform != "win32":  # (there a file deleted when closed)
        assert list(tmp_path.iterdir()) == []  # nothing with a name, even while it lives
    snap.close()
    snap.close()  # idempotent
    assert snap.file_bytes is None
    with pytest.raises(ValueError, match="closed"):
        snap.take()
    with pytest.raises(ValueError, match="closed"):
        snap.restore()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL, O_TMPFILE")
def test_a_killed_process_leaves_nothing_in_the_temporary_folder(tmp_path):
    """A run killed by a signal (no Python clean-up at all) leaves no snapshot behind;
    the file's blocks go back to the file system with the process."""
    code = (
        "import os, signal, sys, torch\n"
        "from tnlm.compress.snapshot import ParameterSnapshot\n"
        f"snap = ParameterSnapshot([torch.randn(256, 1024)], 'disk', directory={str(tmp_path)!r})\n"
        "snap.take()\n"
        "assert snap.file_bytes == 2**20\n"
        "print('taken', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.strip() == "taken", proc.stderr
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_snapshot_in_memory_from_then_on(monkeypatch):
    """A write that fails half-way warns, takes the values in memory and stays there;
    a take that fails altogether leaves nothing to restore, not a part of a snapshot."""
    params = _params()
    with ParameterSnapshot(params, "disk") as snap:
        snap.take()
        with torch.no_grad():
            params[0].mul_(3)
        want = [p.detach().clone() for p in params]

        def broken(f, ps):
            f.seek(0)
            f.write(b"half")
            raise OSError("disk full")
        monkeypatch.setattr("tnlm.compress.snapshot._write", broken)
        with pytest.warns(UserWarning, match="disk full.*keeping it in memory"):
            snap.take()
        monkeypatch.undo()
        assert snap.where == "memory" and snap.file_bytes is None  # the file went with it
        with torch.no_grad():
            params[0].add_(1)
        snap.restore()  # the values of the failed take, from memory
        assert torch.equal(params[0], want[0])
        with torch.no_grad():
            params[0].add_(1)

        def oom(*_a, **_k):
            raise MemoryError
        monkeypatch.setattr(torch.Tensor, "copy_", oom)
        with pytest.raises(MemoryError):
            snap.take()
        monkeypatch.undo()
        with pytest.raises(ValueError, match="no snapshot was taken"):
            snap.restore()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/dev/full")
def test_a_full_disk_falls_back_to_memory():
    """A real ENOSPC, also for bytes still in the file's buffer when it is dropped: the
    snapshot warns, keeps the values in memory and restores them."""
    params = [torch.ones(4), torch.full((300, 300), 2.0)]  # the first fits the buffer
    with ParameterSnapshot(params, "disk") as snap:
        snap._file.close()
        snap._file = open("/dev/full", "r+b")  # noqa: SIM115 - every write: ENOSPC
        with pytest.warns(UserWarning, match="keeping it in memory"):
            snap.take()
        assert snap.where == "memory" and snap.file_bytes is None
        with torch.no_grad():
            for p in params:
                p.zero_()
        snap.restore()
        assert float(params[0].sum()) == 4 and float(params[1].sum()) == 2 * 300 * 300


def test_snapshot_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="where must be one of 'disk', 'memory', got 'gpu'"):
        ParameterSnapshot([torch.ones(2)], "gpu")
    with pytest.raises(ValueError, match="directory must be an existing folder"):
        ParameterSnapshot([torch.ones(2)], "disk", directory=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"params\[1\] must be a tensor, got str"):
        ParameterSnapshot([torch.ones(2), "x"], "memory")
    meta = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"params\[0\] is on the meta device"):
        ParameterSnapshot([meta], "disk")
    with ParameterSnapshot([meta], "memory") as snap:  # another device than the CPU
        snap.take()
        snap.restore()
    closed = ParameterSnapshot([torch.ones(2)], "memory")
    closed.take()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        closed.restore()  # not a silent no-op
    with ParameterSnapshot([torch.ones(2)], "memory") as snap, \
            pytest.raises(ValueError, match="no snapshot was taken"):
        snap.restore()
    with ParameterSnapshot([torch.ones(2)], "disk") as snap:
        snap.take()
        snap._file.truncate(3)  # cut short: refused, nothing read
        with pytest.raises(ValueError, match="holds 3 bytes, the parameters 8"):
            snap.restore()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc")
def test_a_disk_snapshot_keeps_its_bytes_out_of_the_process():
    """128 MiB of parameters: kept in memory the snapshot adds their size to the resident
    set; on disk it adds next to nothing (written from the parameters' own memory)."""
    params = [torch.randn(1024, 1024) for _ in range(32)]  # 128 MiB, touched
    grew = {}
    for where in ("disk", "memory"):
        before = rss_mb()
        with ParameterSnapshot(params, where) as snap:
            snap.take()
            snap.take()
            grew[where] = rss_mb() - before
    assert grew["memory"] > 120
    assert grew["disk"] < 32


def _llama():
    return make_causal_lm("llama")


def _compressed():
    teacher = _llama()
    student = copy.deepcopy(teacher)
    seqs = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    compress_layerwise(student, seqs, LayerwiseConfig(default_targets(student), budget=0.3,
                                                      method="plain"), progress=False)
    return teacher, student, seqs


@pytest.mark.parametrize("lr", [3e-3, 1e6])
def test_healing_is_the_same_with_the_snapshot_on_disk_or_in_memory(lr):
    """The same losses and the same final student, also when a blow-up (lr 1e6) makes
    the run restore its snapshot."""
    runs = {}
    for where in ("disk", "memory"):
        teacher, student, seqs = _compressed()
        res = heal_causal(student, teacher, seqs, CausalHealConfig(
            steps=12, lr=lr, batch_size=4, warmup=2, snapshot=where), progress=False)
        runs[where] = (repr(res.losses), res.stopped, res.best_step, student.state_dict())
    assert (runs["disk"][1] is not None) == (lr > 1)
    assert runs["disk"][:3] == runs["memory"][:3]
    for k, v in runs["memory"][3].items():
        assert torch.equal(runs["disk"][3][k], v), k


@pytest.mark.parametrize("every", [1, 3])
def test_a_blowup_restores_the_snapshot_of_the_step_it_names(every, monkeypatch):
    """The run stops on a blow-up; the parameters are then the values the last snapshot
    took, at the step the result names; snapshots are at least ``snapshot_every`` apart."""
    teacher, student, seqs = _compressed()
    steps_seen, taken = [], []
    real = ParameterSnapshot.take

    def spy(self):
        real(self)  # the step being taken: on_step has seen steps 0 .. step
        taken.append((len(steps_seen) - 1, self, [p.detach().clone() for p in self.params]))
    monkeypatch.setattr(ParameterSnapshot, "take", spy)
    res = heal_causal(student, teacher, seqs, CausalHealConfig(
        steps=40, lr=1e6, batch_size=4, warmup=2, snapshot_every=every), progress=False,
        on_step=steps_seen.append)
    assert res.stopped is not None and f"parameters of step {res.best_step} " in res.stopped
    steps = [s for s, _, _ in taken]
    assert steps[0] == 0 and steps[-1] == res.best_step
    assert all(b - a >= every for a, b in zip(steps, steps[1:]))
    _, snap, values = taken[-1]
    assert len(steps_seen) > res.best_step + 2  # updates happened after the snapshot
    for p, v in zip(snap.params, values):
        assert torch.equal(p, v)


def test_snapshot_settings_are_checked():
    with pytest.raises(ValueError, match="snapshot must be one of 'disk', 'memory', got 'ram'"):
        CausalHealConfig(snapshot="ram")
    with pytest.raises(ValueError, match="snapshot_every must be an int >= 1, got 0"):
        CausalHealConfig(snapshot_every=0)
