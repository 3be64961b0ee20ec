"""GLUE single-sentence tasks from local TSV files (SST-2, CoLA), tokenized into batches.

The data lives outside the project (``../shared/data`` by default); nothing is
downloaded. ``sst2`` files have a ``sentence<TAB>label`` header; ``cola`` files none.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["TASKS", "default_data_dir", "load_task", "Batches"]

TASKS = {"sst2": True, "cola": False}  # task -> file has a header row


def default_data_dir() -> Path:
    """``$TNLM_DATA``, else ``shared/data`` beside the repository (``<repo>/../shared/data``),
    whatever the working directory."""
    env = os.environ.get("TNLM_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def load_task(task: str, split: str, data_dir: str | os.PathLike | None = None,
              limit: int | None = None, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Sentences and integer labels of ``task`` (``"sst2"``/``"cola"``), ``split`` train/dev.

    ``limit`` keeps a random subset of that many rows (fixed ``seed``).

    Raises:
        ValueError: unknown task or split. FileNotFoundError: the TSV is absent.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    path = Path(data_dir or default_data_dir()) / task / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (see ../shared/data/README.md)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if TASKS[task]:
        rows = rows[1:]
    sentences = [r[0].strip() for r in rows]
    labels = np.array([int(r[1]) for r in rows], dtype=np.int64)
    if limit is not None and limit < len(sentences):
        idx = np.random.default_rng(seed).permutation(len(sentences))[:limit]
        sentences, labels = [sentences[i] for i in idx], labels[idx]
    return sentences, labels


@dataclass
class Batches:
    """Tokenized mini-batches of a sentence classification set.

    Iterating yields dicts of ``input_ids``, ``attention_mask``, ``token_type_ids``
    (if the tokenizer makes them) and ``labels``, each batch padded to its own
    longest sentence. ``shuffle`` reshuffles each epoch from ``seed``.
    """

    tokenizer: object
    sentences: list[str]
    labels: np.ndarray
    batch_size: int = 32
    max_length: int = 64
    shuffle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.sentences) == 0:
            raise ValueError("sentences is empty: no batches to make")
        if len(self.sentences) != len(self.labels):
            raise ValueError(f"sentences ({len(self.sentences)}) and labels "
                             f"({len(self.labels)}) differ in length")
        self._epoch = 0
        enc = self.tokenizer(self.sentences, truncation=True, max_length=self.max_length)
        self._enc = {k: v for k, v in enc.items()}

    def __len__(self) -> int:
        return (len(self.sentences) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = np.arange(len(self.sentences))
        if self.shuffle:
            order = np.random.default_rng(self.seed + self._epoch).permutation(order)
            self._epoch += 1
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            feats = [{k: v[i] for k, v in self._enc.items()} for i in idx]
            batch = self.tokenizer.pad(feats, return_tensors="pt")
            batch["labels"] = torch.as_tensor(self.labels[idx])
            yield dict(batch)

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches epoch after epoch."""
        while True:
            yield from self
