"""Per-stage memory measures (tnlm.compress.memory)."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from tnlm.compress.memory import peak_rss_mb, release_memory, reset_peak_rss, rss_mb, start_stage

linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="per-stage peaks need Linux /proc")


@linux
def test_peak_memory_resets_per_stage():
    """A 400 MiB buffer freed before the reset no longer counts in the peak after it."""
    before = peak_rss_mb()
    buf = torch.ones(100 * 2**20)  # 400 MiB, touched
    high = peak_rss_mb()
    assert high >= before and high > 300
    del buf
    assert reset_peak_rss()
    assert peak_rss_mb() < high - 300


@linux
def test_release_memory_gives_back_what_the_heap_kept():
    """200 MiB of small blocks freed around survivors stay resident (the heap cannot shrink
    past a live block) until release_memory trims it; a stage started after it peaks at
    the live memory, not at what the earlier stage left."""
    if not release_memory():
        pytest.skip("not glibc: no malloc_trim")
    base = rss_mb()
    blocks = [bytes(2000) + bytes([i % 256]) for i in range(100_000)]  # ~200 MiB, malloc'd
    keep = blocks[::50]  # one survivor in every 50 blocks pins the heap's pages
    del blocks
    gc.collect()
    kept = rss_mb()
    assert kept > base + 150  # freed, but resident
    assert start_stage()
    assert rss_mb() < kept - 120  # given back
    assert peak_rss_mb() < kept - 120  # the new stage's peak starts from there
    assert len(keep) == 2000


def test_rss_is_not_above_the_peak():
    now, peak = rss_mb(), peak_rss_mb()
    if now is None:
        pytest.skip("no /proc")
    assert 0 < now <= peak + 1


_HOLES = """
import sys, gc, torch
from tnlm.compress.memory import mmap_large_allocations, rss_mb
if sys.argv[1] == "on":
    assert mmap_large_allocations()
warm = torch.ones(2**20); del warm  # 4 MiB mapped and freed: glibc raises its threshold
base = rss_mb()
big, small = [], []
for i in range(64):
    big.append(torch.ones(2**20))        # 4 MiB each, touched
    small.append(torch.ones(64 * 1024))  # 256 KiB survivors between them
del big
gc.collect()
print(rss_mb() - base - 64 * 0.25)       # MiB still resident beyond the survivors
"""


@linux
def test_mmap_large_allocations_returns_freed_tensors_to_the_system(tmp_path):
    """256 MiB of 4 MiB tensors freed between live small ones: with glibc's dynamic
    threshold they stay resident (heap holes); mapped one by one they go back."""
    import subprocess

    script = tmp_path / "holes.py"
    script.write_text(_HOLES)

    def retained(mode):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True,
                             text=True, check=True, env={"OMP_NUM_THREADS": "1",
                                                         "PATH": "/usr/bin:/bin",
                                                         "PYTHONPATH": ":".join(sys.path)})
        return float(out.stdout.strip().splitlines()[-1])

    on = retained("on")
    assert on < 32
    off = retained("off")
    if off < 128:
        pytest.skip(f"this C library kept only {off:.0f} MiB without the setting")
    assert on < off - 128


def test_mmap_large_allocations_refuses_a_bad_threshold():
    from tnlm.compress.memory import mmap_large_allocations

    for bad in (0, 100, True, 1.5e5):
        with pytest.raises(ValueError, match="^threshold must be an int >= 4096"):
            mmap_large_allocations(bad)
