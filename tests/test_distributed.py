"""DDP (gloo) with 2 processes through torchrun: both ranks end with identical auxiliary
tensors, the auxiliaries moved, the central tensors did not."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform == "win32", reason="gloo/torchrun test runs on POSIX")
def test_ddp_two_ranks_identical_auxiliaries(tmp_path):
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node", "2", "--master_port", "29517",
        str(ROOT / "experiments" / "ddp_finetune.py"), "--steps", "3",
        "--out", str(tmp_path / "ddp.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-1500:], proc.stderr[-2500:])
    result = json.loads((tmp_path / "ddp.json").read_text())
    assert result["world_size"] == 2
    assert result["identical"] and result["aux_moved"] and result["central_frozen"]
