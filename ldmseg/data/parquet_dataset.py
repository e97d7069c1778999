"""Training readers over preprocessed Parquet shards, without Ray.

:class:`ShardDataset` is a PyTorch ``IterableDataset`` yielding ready tensors; the Ray Train
stage reads the same files through Ray Data and decodes with the same :func:`decode_columns`
(columnar batches as Ray Data yields them) or :func:`decode_rows` (row dicts).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ldmseg.data.manifest import check_schema_version, list_split_files, open_fs, read_manifest
from ldmseg.data.shards import decode_image, decode_slot_map, valid_mask
from ldmseg.data.slots import repermute_slots

# Columns a training step needs (the rest is provenance).
TRAIN_COLUMNS = ["image_id", "resolution", "image", "image_format", "slot_map", "scaled_height", "scaled_width"]


def decode_rows(rows: Iterable[dict[str, Any]], num_slots: int,
                generator: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Shard rows → a training batch.

    Returns ``image`` (B, 3, R, R) float32 in [-1, 1], ``slot_map`` (B, R, R) int64,
    ``valid`` (B, R, R) bool and ``image_id`` (B,) int64. ``generator``: re-permute slots per sample.
    """
    rows = list(rows)
    keys = set().union(*(r.keys() for r in rows)) if rows else set(TRAIN_COLUMNS)
    return decode_columns({k: [r.get(k) for r in rows] for k in keys}, num_slots, generator)


def decode_columns(cols: Mapping[str, Any], num_slots: int,
                   generator: np.random.Generator | None = None, *, compact: bool = False) -> dict[str, torch.Tensor]:
    """A columnar batch → a training batch, without going through row dicts.

    ``cols`` maps column names (at least :data:`TRAIN_COLUMNS`) to equal-length columns: numpy
    arrays (Ray Data's ``batch_format="numpy"``), lists, or pyarrow arrays. Returns the same
    tensors as :func:`decode_rows` on the same rows with the same ``generator`` (slots are
    re-permuted sample after sample, in order). Raw images of one resolution are read with one
    ``np.frombuffer`` over the batch and converted to float once.

    ``compact=True`` (a batch bound for a GPU): ``image`` stays (B, R, R, 3) uint8 and ``slot_map``
    is uint8 (int16 beyond 256 slots), 7× fewer bytes to copy to the device;
    :func:`to_training_batch` converts them there to the float32 / int64 tensors above, bit for bit.
    """
    image_col = cols["image"]
    n = len(image_col)
    res_list = _as_list(cols["resolution"])
    resolutions = {int(r) for r in res_list}
    if len(resolutions) > 1:
        raise ValueError(f"a batch mixes resolutions {sorted(resolutions)}; preprocess at one resolution")
    res = resolutions.pop() if resolutions else 0
    formats = [str(f) for f in _as_list(cols["image_format"])]

    images_u8 = _images_u8(image_col, formats, res, n)
    image = images_u8 if compact else _to_float(images_u8)
    slot_maps = np.empty((n, res, res), dtype=(np.uint8 if num_slots <= 256 else np.int16) if compact else np.int64)
    for i, data in enumerate(_slot_values(cols["slot_map"], res)):
        slot_maps[i] = _slot_map(data, res, num_slots, generator)
    valid = np.zeros((n, res, res), dtype=bool)
    for i, (h, w) in enumerate(zip(_as_list(cols["scaled_height"]), _as_list(cols["scaled_width"]))):
        valid[i, : int(h), : int(w)] = True  # the top-left rectangle

    image_ids = [int(v) for v in _as_list(cols["image_id"])]
    return {"image": torch.from_numpy(image), "slot_map": torch.from_numpy(slot_maps),
            "valid": torch.from_numpy(valid), "image_id": torch.tensor(image_ids, dtype=torch.int64)}


def to_training_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :func:`decode_columns` batch with ``compact=True`` (on its device) → the training batch:
    ``image`` (B, 3, R, R) float32 in [-1, 1] (the same values as the uint8 / 127.5 - 1 of the CPU
    path), ``slot_map`` int64. A batch already in that form is returned as it is."""
    if batch["image"].dtype != torch.uint8:
        return batch
    image = batch["image"].permute(0, 3, 1, 2).to(torch.float32).div_(127.5).sub_(1.0)
    return {**batch, "image": image.contiguous(), "slot_map": batch["slot_map"].long()}


def _to_float(images: np.ndarray) -> np.ndarray:
    """(N, R, R, 3) uint8 → (N, 3, R, R) float32 in [-1, 1]: channels first, to float and / 127.5
    in one pass over the pixels, then - 1 (the same float32 values as ``/ 127.5 - 1`` in torch)."""
    n, h, w, _ = images.shape
    out = np.empty((n, 3, h, w), dtype=np.float32)
    np.divide(images.transpose(0, 3, 1, 2), np.float32(127.5), out=out, dtype=np.float32)
    np.subtract(out, np.float32(1.0), out=out)
    return out


def _slot_map(data: Any, res: int, num_slots: int, generator: np.random.Generator | None) -> np.ndarray:
    """A stored slot map → (R, R) slots (a view), re-permuted when ``generator`` is given."""
    slot_map = decode_slot_map(data, res)
    return slot_map if generator is None else repermute_slots(slot_map, num_slots, generator)


def _slot_values(col: Any, res: int) -> Any:
    """The slot-map column's values: rows of one (N, R·R) uint8 view of the column when it is
    pyarrow with one-byte slots (no copy), else its values."""
    chunks = _binary_chunks(col)
    view = _raw_view(chunks, res * res) if chunks is not None else None
    return view if view is not None else _as_list(col)


def _as_list(col: Any) -> list:
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return col.to_pylist()
    if isinstance(col, np.ndarray):
        return list(col) if col.dtype == object else col.tolist()
    return list(col)


def _binary_chunks(col: Any) -> list[pa.Array] | None:
    if isinstance(col, pa.ChunkedArray):
        chunks = col.chunks
    elif isinstance(col, pa.Array):
        chunks = [col]
    else:
        return None
    if not all(pa.types.is_binary(c.type) or pa.types.is_large_binary(c.type) for c in chunks):
        return None
    return chunks


def _raw_view(chunks: list[pa.Array], size: int) -> np.ndarray | None:
    """(N, size) uint8 view of binary chunks whose values all hold ``size`` bytes (else None)."""
    parts = []
    for c in chunks:
        if len(c) == 0:
            continue
        if c.null_count:
            return None
        off_type = np.int64 if pa.types.is_large_binary(c.type) else np.int32
        offsets = np.frombuffer(c.buffers()[1], dtype=off_type)[c.offset: c.offset + len(c) + 1]
        if not np.all(np.diff(offsets) == size):
            return None
        data = np.frombuffer(c.buffers()[2], dtype=np.uint8)
        parts.append(data[int(offsets[0]): int(offsets[-1])].reshape(len(c), size))
    if not parts:
        return np.empty((0, size), dtype=np.uint8)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _images_u8(col: Any, formats: list[str], res: int, n: int) -> np.ndarray:
    """The batch's images as one (N, R, R, 3) uint8 array (a view of raw bytes when possible)."""
    size = res * res * 3
    if n and all(f == "raw" for f in formats):
        chunks = _binary_chunks(col)
        if chunks is not None:
            view = _raw_view(chunks, size)
            if view is not None:
                return view.reshape(n, res, res, 3)
        else:
            values = col if isinstance(col, (list, tuple)) else list(col)
            if all(isinstance(v, np.ndarray) and v.size == size and v.dtype == np.uint8 for v in values):
                if n == 1:
                    return values[0].reshape(1, res, res, 3)
                return np.stack([v.reshape(res, res, 3) for v in values])
            if all(len(memoryview(v).cast("B")) == size for v in values):
                data = values[0] if n == 1 else b"".join(values)
                return np.frombuffer(data, dtype=np.uint8).reshape(n, res, res, 3)
    values = _as_list(col)
    if not n:
        return np.empty((0, res, res, 3), dtype=np.uint8)
    return np.stack([decode_image(v, f, res) for v, f in zip(values, formats)])


def columns_to_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A columnar batch (dict of arrays, as Ray Data yields) → list of row dicts."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


class _Block:
    """The training columns of one Parquet file, read once; samples are decoded from it by index."""

    def __init__(self, table: pa.Table):
        self.n = table.num_rows
        self.cols: dict[str, Any] = {}
        for name in table.column_names:
            if name not in ("image", "slot_map"):
                self.cols[name] = table.column(name).to_pylist()
        res = {int(r) for r in self.cols.get("resolution", [])}
        self.res = res.pop() if len(res) == 1 else 0
        image = table.column("image")
        self.images = None
        if self.res and all(f == "raw" for f in self.cols["image_format"]):
            chunks = _binary_chunks(image)
            self.images = _raw_view(chunks, self.res * self.res * 3) if chunks is not None else None  # no copy
        self.image_values = image.to_pylist() if self.images is None else None
        self.slot_maps = _slot_values(table.column("slot_map"), self.res) if self.res else None

    def columns(self, i: int) -> dict[str, list]:
        """Row ``i`` as the one-row columns :func:`decode_columns` takes."""
        out = {k: [v[i]] for k, v in self.cols.items()}
        out["image"] = [self.images[i] if self.images is not None else self.image_values[i]]
        out["slot_map"] = [self.slot_maps[i]]
        return out


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
        manifest = read_manifest(self.fs, root)
        if manifest is not None:
            check_schema_version(manifest, output)
        self.files = list_split_files(self.fs, root, split)
        if not self.files:
            raise FileNotFoundError(f"split {split!r} of {output} has no Parquet files")
        self.num_slots, self.train, self.seed = num_slots, train, seed
        self.shuffle_buffer, self.repeat = shuffle_buffer, repeat

    def _rows(self, files: list[str]) -> Iterator[tuple[_Block, int]]:
        """(block, index) per row: the columns are read per file and sliced per sample (no row dicts)."""
        for path in files:
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=TRAIN_COLUMNS)
            block = _Block(table)
            for i in range(block.n):
                yield block, i

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
            buffer: list[tuple[_Block, int]] = []
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

    def _decode(self, row: tuple[_Block, int], rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        block, i = row
        if block.images is None:
            return {k: v[0] for k, v in decode_columns(block.columns(i), self.num_slots, rng).items()}
        # the common case (raw images of one resolution) without the batch decoder's generality:
        # the same arrays as decode_columns on this one row
        res = block.res
        slot_map = _slot_map(block.slot_maps[i], res, self.num_slots, rng).astype(np.int64)
        valid = valid_mask(res, int(block.cols["scaled_height"][i]), int(block.cols["scaled_width"][i]))
        return {"image": torch.from_numpy(_to_float(block.images[i].reshape(1, res, res, 3))[0]),
                "slot_map": torch.from_numpy(slot_map), "valid": torch.from_numpy(valid),
                "image_id": torch.from_numpy(np.array(block.cols["image_id"][i], dtype=np.int64))}


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
