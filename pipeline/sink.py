"""Writing the output: latents and errors as Parquet, and ``_SUCCESS`` last.

Layout under OUTPUT:
  latents/part-<hash>.parquet   one row per clip; the hash is of the clip ids inside
  errors/err-<hash>.parquet     one row per input (or clip) that could not be encoded
  _markers/vid-<hash>.parquet   per video: the ids of all its clips, once they are all cut
  report.html                   throughput over time, errors by type, clips per video
  _SUCCESS                      JSON written when the run completes, last

File names derive from ids, never from input names, so a retried task rewrites the same file.
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata as importlib_metadata

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import Config
from pipeline.model import ModelInfo

LATENTS_DIR = "latents"
ERRORS_DIR = "errors"
MARKERS_DIR = "_markers"  # a leading underscore: Parquet dataset readers of OUTPUT skip it
SUCCESS = "_SUCCESS"
REPORT = "report.html"
METADATA_KEY = b"video_latents"
LAYOUT = "TCHW"
STAGES = ("list", "read", "decode", "sample", "encode", "write")

CLIP_COLUMNS = {
    "clip_id": pa.string(),
    "source_uri": pa.string(),
    "clip_index": pa.int32(),
    "start_frame": pa.int32(),
    "num_frames": pa.int32(),
    "fps": pa.float64(),
    "height": pa.int32(),
    "width": pa.int32(),
}
MARKER_SCHEMA = pa.schema([("source_uri", pa.string()), ("clip_ids", pa.list_(pa.string()))])
ERROR_SCHEMA = pa.schema([
    ("source_uri", pa.string()),
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
    ("clip_id", pa.string()),  # set for a clip that failed to encode; null for a whole input
])
_VERSIONED = ("video-latents", "torch", "diffusers", "av", "ray", "pyarrow", "numpy")


def tensor_columns(latent_mode: str) -> tuple[str, ...]:
    return ("latents_mean", "latents_logvar") if latent_mode == "dist" else ("latents",)


def _versions() -> dict:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def dataset_metadata(cfg: Config, info: ModelInfo) -> str:
    """The JSON stored in every latents file's schema metadata under ``video_latents``."""
    return json.dumps({
        "model": cfg.model,
        "subfolder": info.subfolder,
        "vae_class": info.class_name,
        **info.normalization(),
        "normalization_applied": cfg.latent_mode != "dist",
        "latent_mode": cfg.latent_mode,
        "seed": cfg.seed if cfg.latent_mode == "sample" else None,
        "layout": LAYOUT,
        "latent_shape": list(info.latent_shape(cfg.num_frames, cfg.height, cfg.width)),
        "latent_dtype": cfg.latent_dtype,
        "compute_dtype": cfg.dtype,
        "resize": cfg.resize,
        "versions": _versions(),
    }, sort_keys=True)


def _name(prefix: str, keys) -> str:
    digest = hashlib.blake2b("\n".join(sorted(keys)).encode(), digest_size=12).hexdigest()
    return f"{prefix}-{digest}.parquet"


def _write_table(cfg: Config, folder: str, name: str, table: pa.Table) -> str:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    uri = storage.join(cfg.output, folder, name)
    storage.write_bytes_atomic(uri, buf.getvalue().to_pybytes(), cfg.s3_endpoint)
    return uri


def tensor_array(values: np.ndarray) -> pa.ExtensionArray:
    """[N, ...] -> Arrow's canonical fixed_shape_tensor, row-major with no ``permutation``.

    Built from its storage, zero-copy: ``from_numpy_ndarray`` records even the identity
    permutation, and some readers mishandle or ignore that attribute.
    """
    values = np.ascontiguousarray(values)
    tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(values.dtype), list(values.shape[1:]))
    flat = pa.array(values.reshape(-1))
    storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(values.shape[1:])))
    return pa.ExtensionArray.from_storage(tensor_type, storage)


def passthrough_columns(batch: dict) -> tuple[str, ...]:
    """The columns that travel unchanged from the decode step to the writer."""
    return tuple(CLIP_COLUMNS) + (("extra",) if "extra" in batch else ())


def _extra_arrays(batch: dict, cfg: Config):
    """A manifest's own columns, from the JSON each clip row carries, with the manifest's types."""
    records = [json.loads(x) for x in np.asarray(batch["extra"]).tolist()]
    for name, alias in cfg.extra_columns:
        typ = pa.type_for_alias(alias)
        values = [r.get(name) for r in records]
        if pa.types.is_string(typ) or pa.types.is_large_string(typ):
            values = [None if v is None else str(v) for v in values]
        yield name, pa.array(values, type=typ)


def latents_table(batch: dict, cfg: Config, metadata_json: str) -> pa.Table:
    arrays, fields = [], []
    for name, typ in CLIP_COLUMNS.items():
        arrays.append(pa.array(np.asarray(batch[name]).tolist(), type=typ))
        fields.append(pa.field(name, typ))
    if cfg.extra_columns and "extra" in batch:
        for name, array in _extra_arrays(batch, cfg):
            arrays.append(array)
            fields.append(pa.field(name, array.type))
    for name in tensor_columns(cfg.latent_mode):
        tensor = tensor_array(batch[name])
        arrays.append(tensor)
        fields.append(pa.field(name, tensor.type))
    schema = pa.schema(fields, metadata={METADATA_KEY: metadata_json.encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def _by_latent_shape(batch: dict, cfg: Config) -> list[dict]:
    """Split a batch into sub-batches of one latent shape each (one unless --buckets), with the
    tensor columns stacked into [N, T, C, h, w] arrays."""
    first = batch[tensor_columns(cfg.latent_mode)[0]]
    if first.dtype != object:
        return [batch]
    groups: dict[tuple, list[int]] = {}
    for i, value in enumerate(first):
        groups.setdefault(np.asarray(value).shape, []).append(i)
    parts = []
    for idx in groups.values():
        part = {}
        for name, values in batch.items():
            values = np.asarray(values)
            part[name] = np.stack([values[i] for i in idx]) if name in tensor_columns(cfg.latent_mode) \
                else values[idx]
        parts.append(part)
    return parts


def write_latents(batch: dict, cfg: Config, metadata_json: str) -> dict:
    """Ray Data map_batches step: write the batch as Parquet, one file per latent shape (one file
    unless --buckets); return what was written."""
    paths, counts, sources = [], [], []
    for part in _by_latent_shape(batch, cfg) if len(batch["clip_id"]) else []:
        meta = json.loads(metadata_json)
        if "latent_shape" in meta:  # per file: with --buckets, files differ
            meta["latent_shape"] = list(part[tensor_columns(cfg.latent_mode)[0]].shape[1:])
        table = latents_table(part, cfg, json.dumps(meta, sort_keys=True))
        paths.append(_write_table(cfg, LATENTS_DIR, _name("part", part["clip_id"]), table))
        counts.append(len(part["clip_id"]))
        sources.append("\n".join(sorted(set(np.asarray(part["source_uri"]).tolist()))))  # for progress
    return {"path": np.array(paths, dtype=object), "num_rows": np.array(counts, dtype=np.int64),
            "sources": np.array(sources, dtype=object)}


def error_row(source_uri: str, stage: str, error_type: str, message: str,
              clip_id: str | None = None) -> dict:
    assert stage in STAGES, stage
    return {"source_uri": source_uri, "stage": stage, "error_type": error_type,
            "message": message.strip().splitlines()[0][:2000] if message.strip() else error_type,
            "clip_id": clip_id}


def write_errors(cfg: Config, rows: list[dict]) -> str:
    """Write error rows to their own file, named from the failing inputs (and clips): a retry
    or a rerun overwrites it, so an input never has more than one outcome."""
    table = pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)
    keys = [f"{r['source_uri']}\0{r['clip_id'] or ''}" for r in rows]
    return _write_table(cfg, ERRORS_DIR, _name("err", keys), table)


def write_marker(cfg: Config, source_uri: str, clip_ids: list[str]) -> str:
    """Record that every clip of a video was cut: once all are written, a rerun skips it."""
    table = pa.Table.from_pylist([{"source_uri": source_uri, "clip_ids": clip_ids}], schema=MARKER_SCHEMA)
    return _write_table(cfg, MARKERS_DIR, _name("vid", [source_uri]), table)


def read_columns(cfg: Config, folder: str, columns: list[str]) -> pa.Table | None:
    """Some columns of every Parquet file under OUTPUT/folder (None when there is none)."""
    fs, path = storage.resolve(storage.join(cfg.output, folder), cfg.s3_endpoint)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    return dataset.to_table(columns=columns) if dataset.files else None


def count_rows(cfg: Config, folder: str) -> int:
    fs, path = storage.resolve(storage.join(cfg.output, folder), cfg.s3_endpoint)
    try:
        return pads.dataset(path, filesystem=fs, format="parquet").count_rows()
    except (FileNotFoundError, OSError):
        return 0


def remove_success(cfg: Config) -> None:
    """Before changing OUTPUT: no reader may take it for finished while a run is under way."""
    _delete(cfg, [SUCCESS])


def prepare_output(cfg: Config) -> None:
    """With --overwrite, remove a previous run's output (``_SUCCESS`` first, so no reader
    mistakes a half-deleted folder for a finished one)."""
    if cfg.overwrite:
        _delete(cfg, [SUCCESS, REPORT, LATENTS_DIR, ERRORS_DIR, MARKERS_DIR])


def _delete(cfg: Config, names: list[str]) -> None:
    for name in names:
        fs, path = storage.resolve(storage.join(cfg.output, name), cfg.s3_endpoint)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)


def write_success(cfg: Config, summary: dict) -> None:
    body = json.dumps({**summary, "config": cfg.to_dict()}, indent=2, sort_keys=True, default=str)
    storage.write_bytes_atomic(storage.join(cfg.output, SUCCESS), body.encode(), cfg.s3_endpoint)
