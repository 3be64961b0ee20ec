"""GLUE TSV loading, batching and metrics."""

from pathlib import Path

import numpy as np
import pytest

from experiments.data import Batches, load_task
from experiments.training import matthews

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.mark.parametrize("task, n_dev", [("sst2", 872), ("cola", 516)])
def test_load_task(task, n_dev):
    if not (DATA / task / "dev.tsv").is_file():
        pytest.skip(f"{DATA / task} not present")
    x, y = load_task(task, "dev", DATA)
    assert len(x) == len(y) == n_dev and set(np.unique(y)) <= {0, 1}
    assert "sentence" not in x[0]  # the header is not a row
    sub, _ = load_task(task, "train", DATA, limit=10, seed=3)
    assert len(sub) == 10 and sub == load_task(task, "train", DATA, limit=10, seed=3)[0]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        load_task("mnli", "dev", tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        load_task("sst2", "test", tmp_path)
    with pytest.raises(FileNotFoundError, match="sst2/dev.tsv not found"):
        load_task("sst2", "dev", tmp_path)
    with pytest.raises(ValueError, match="sentences is empty"):
        Batches(None, [], np.array([]))
    with pytest.raises(ValueError, match="differ in length"):
        Batches(None, ["a", "b"], np.array([1]))


def test_matthews():
    gold = np.array([1, 1, 0, 0])
    assert matthews(gold, gold) == pytest.approx(1.0)
    assert matthews(1 - gold, gold) == pytest.approx(-1.0)
    assert matthews(np.ones(4, int), gold) == 0.0  # undefined -> 0
    pred = np.array([1, 0, 0, 0])
    assert matthews(pred, gold) == pytest.approx(1 / np.sqrt(3))
