"""Reading an OUTPUT back: a Ray Dataset, or a torch Dataset for a training loop. Local or S3.

    ds = pipeline.read_latents("s3://bucket/latents-run/")          # ray.data.Dataset
    data = pipeline.LatentDataset("s3://bucket/latents-run/")       # torch map-style Dataset
    data = pipeline.LatentDataset(out, streaming=True)              # torch IterableDataset
    item = data[0]; item["latents"]                                 # torch [T, C, h, w]
"""
from __future__ import annotations

import json
from collections import OrderedDict

import pyarrow.dataset as pads
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from pipeline import layout, storage
from pipeline.schema import ALL_TENSOR_COLUMNS as TENSOR_COLUMNS, METADATA_KEY



def _latents_dataset(output: str, s3_endpoint: str | None):
    fs, path = storage.resolve(storage.join(output, layout.LATENTS_DIR), storage.default_endpoint(s3_endpoint))
    return fs, path, pads.dataset(path, filesystem=fs, format="parquet")


def read_latents(output: str, *, s3_endpoint: str | None = None, columns: list[str] | None = None):
    """OUTPUT's latents as a ``ray.data.Dataset`` (tensor columns come back as ndarrays)."""
    import ray

    fs, path, _ = _latents_dataset(output, s3_endpoint)
    return ray.data.read_parquet(path, filesystem=fs, columns=columns)


def _rows(table) -> list[dict]:
    """Rows of an Arrow table: tensor columns as torch tensors, the rest as Python values."""
    plain = table.drop_columns([c for c in TENSOR_COLUMNS if c in table.column_names]).to_pylist()
    for name in TENSOR_COLUMNS:
        if name in table.column_names:
            values = torch.from_numpy(table.column(name).combine_chunks().to_numpy_ndarray().copy())
            for row, value in zip(plain, values):
                row[name] = value
    return plain


class _Base:
    def _open(self, output, s3_endpoint, columns):
        self.fs, _, dataset = _latents_dataset(output, s3_endpoint)
        self.files = sorted(dataset.files)  # a fixed order: the same index means the same clip
        self.columns = columns
        self.metadata = json.loads(dataset.schema.metadata[METADATA_KEY]) if self.files else {}

    def _read(self, path):
        return pads.dataset(path, filesystem=self.fs, format="parquet").to_table(columns=self.columns)


class LatentDataset(_Base, Dataset):
    """Map-style torch Dataset over OUTPUT's clips; ``streaming=True`` gives the iterable one.

    Each item is a dict: ``latents`` (torch [T, C, h, w]; ``latents_mean``/``latents_logvar`` in
    dist mode) and the row's other columns. ``.metadata`` holds the model and normalisation.
    """

    def __new__(cls, output: str, *args, streaming: bool = False, **kwargs):
        if streaming and cls is LatentDataset:
            return LatentIterableDataset(output, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, output: str, *, s3_endpoint: str | None = None, columns: list[str] | None = None,
                 streaming: bool = False, cache_files: int = 2):
        self._open(output, s3_endpoint, columns)
        counts = [pads.dataset(f, filesystem=self.fs, format="parquet").count_rows() for f in self.files]
        self.starts = [sum(counts[:i]) for i in range(len(counts) + 1)]
        self.cache: OrderedDict[str, list[dict]] = OrderedDict()
        self.cache_files = cache_files

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        f = next(i for i in range(len(self.files)) if self.starts[i + 1] > index)
        return self._file_rows(self.files[f])[index - self.starts[f]]

    def _file_rows(self, path: str) -> list[dict]:
        if path not in self.cache:
            self.cache[path] = _rows(self._read(path))
            while len(self.cache) > self.cache_files:
                self.cache.popitem(last=False)
        self.cache.move_to_end(path)
        return self.cache[path]


class LatentIterableDataset(_Base, IterableDataset):
    """Streams OUTPUT's clips file by file; DataLoader workers each take every n-th file."""

    def __init__(self, output: str, *, s3_endpoint: str | None = None, columns: list[str] | None = None):
        self._open(output, s3_endpoint, columns)

    def __iter__(self):
        info = get_worker_info()
        files = self.files[info.id::info.num_workers] if info else self.files
        for path in files:
            yield from _rows(self._read(path))
