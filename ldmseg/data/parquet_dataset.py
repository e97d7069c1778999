"""Training readers over preprocessed Parquet shards, without Ray.

:class:`ShardDataset` is a PyTorch ``IterableDataset`` yielding ready tensors; the Ray Train
stage reads the same files through Ray Data and decodes with the same :func:`decode_rows`.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from ldmseg.data.manifest import list_split_files, open_fs
from ldmseg.data.shards import decode_row

# Columns a training step needs (the rest is provenance).
TRAIN_COLUMNS = ["image_id", "resolution", "image", "image_format", "slot_map", "valid", "resize_mode",
                 "scaled_height", "scaled_width"]


def decode_rows(rows: Iterable[dict[str, Any]], num_slots: int,
                generator: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Shard rows → a training batch.

    Returns ``image`` (B, 3, R, R) float32 in [-1, 1], ``slot_map`` (B, R, R) int64,
    ``valid`` (B, R, R) bool and ``image_id`` (B,) int64. ``generator``: re-permute slots per sample.
    """
    samples = [decode_row(r, num_slots, generator) for r in rows]
    ids = [int(r["image_id"]) for r in rows]
    return collate(samples, ids)


def collate(samples: list[dict[str, np.ndarray]], image_ids: list[int]) -> dict[str, torch.Tensor]:
    return {
        "image": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "slot_map": torch.from_numpy(np.stack([s["slot_map"] for s in samples])),
        "valid": torch.from_numpy(np.stack([s["valid"] for s in samples])),
        "image_id": torch.tensor(image_ids, dtype=torch.int64),
    }


def columns_to_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A columnar batch (dict of arrays, as Ray Data yields) → list of row dicts."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples of one split of a preprocessed output (local path or ``s3://``).

    ``train=True``: files and rows shuffled (buffer of ``shuffle_buffer`` rows), slots
    re-permuted per sample, repeated forever when ``repeat``. ``train=False``: file order, stored
    deterministic slots, one pass. Each item is a dict of one sample's tensors
    (``image`` (3, R, R) float32, ``slot_map`` (R, R) int64, ``valid`` (R, R) bool, ``image_id``).
    """

    def __init__(self, output: str, split: str, num_slots: int, *, train: bool = True, seed: int = 0,
                 shuffle_buffer: int = 256, repeat: bool = False, storage_options: dict | None = None):
        super().__init__()
        self.fs, root = open_fs(output, storage_options)
        self.files = list_split_files(self.fs, root, split)
        if not self.files:
            raise FileNotFoundError(f"split {split!r} of {output} has no Parquet files")
        self.num_slots, self.train, self.seed = num_slots, train, seed
        self.shuffle_buffer, self.repeat = shuffle_buffer, repeat

    def _rows(self, files: list[str]) -> Iterator[dict[str, Any]]:
        for path in files:
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=TRAIN_COLUMNS)
            yield from table.to_pylist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, worker])
        files = self.files[worker::num_workers]
        epoch = 0
        while True:
            order = list(files)
            if self.train:
                rng.shuffle(order)
            buffer: list[dict[str, Any]] = []
            for row in self._rows(order):
                if not self.train:
                    yield self._decode(row, None)
                    continue
                buffer.append(row)
                if len(buffer) >= self.shuffle_buffer:
                    yield self._decode(buffer.pop(int(rng.integers(len(buffer)))), rng)
            rng.shuffle(buffer)
            for row in buffer:
                yield self._decode(row, rng)
            epoch += 1
            if not self.repeat:
                return

    def _decode(self, row: dict[str, Any], rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in decode_rows([row], self.num_slots, rng).items()}


def iterate_batches(dataset: Iterable[dict[str, torch.Tensor]], batch_size: int,
                    drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Group single samples into batches (stacked tensors)."""
    chunk: list[dict[str, torch.Tensor]] = []
    for sample in dataset:
        chunk.append(sample)
        if len(chunk) == batch_size:
            yield {k: torch.stack([s[k] for s in chunk]) for k in chunk[0]}
            chunk = []
    if chunk and not drop_last:
        yield {k: torch.stack([s[k] for s in chunk]) for k in chunk[0]}
