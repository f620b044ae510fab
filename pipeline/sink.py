"""Writing the output's tables: latents, error rows and markers, each file whole.

Where each file goes and what it is called is ``pipeline.layout``'s; the columns are
``pipeline.schema``'s. Every file carries the job's fingerprint in its schema metadata.
"""
from __future__ import annotations

import json
from importlib import metadata as importlib_metadata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import hooks, layout, storage
from pipeline.config import ROW_GROUP_BYTES, Config
from pipeline.model import ModelInfo
from pipeline.text import text_dtype
from pipeline.schema import (AUDIO_LATENTS, CAPTION, CLIP_COLUMNS, ENCODER_COLUMNS, ERROR_SCHEMA, INPUT, LAYOUT,
                             MARKER_SCHEMA, METADATA_KEY, SCENE_COLUMNS, STAGES, TEXT_COLUMNS, image_columns,
                             tensor_columns)

_VERSIONED = ("video-latents", "torch", "diffusers", "av", "ray", "pyarrow", "numpy")


def installed_versions(names=_VERSIONED) -> dict:
    """{package: version} as installed in this process's environment (None: not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def dataset_metadata(cfg: Config, info: ModelInfo, job: dict | None = None) -> str:
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
        # The VAE's own patchification (LTX-Video, LTX-2, Wan 2.2): part of its spatial ratio, not
        # the transformer's packing, which trainers apply to these latents as they are.
        "vae_patch_size": {k: info.config[k] for k in ("patch_size", "patch_size_t") if k in info.config} or None,
        "latent_dtype": cfg.latent_dtype,
        "compute_dtype": cfg.dtype,
        "resize": cfg.resize,
        "job_fingerprint": cfg.job_fingerprint,
        "job": job["identity"] if job else None,
        "versions": installed_versions(),
        **({"text_encoder": info.text.metadata(text_dtype(cfg))} if cfg.text_embeddings and info.text else {}),
        **({"image_latents": image_latents_metadata(info)} if cfg.image_latents else {}),
        **({"audio_latents": info.audio.metadata(cfg.num_frames, cfg.fps)} if cfg.audio_latents and info.audio else {}),
    }, sort_keys=True)


def image_latents_metadata(info: ModelInfo) -> dict:
    """What --image-latents stores, as the family's image-to-video pipeline prepares it."""
    invert = bool(info.config.get("invert_scale_latents"))
    return {"layout": LAYOUT, "frames": 1, "from": "each clip's first frame, encoded alone",
            "normalization": "z / scaling_factor (invert_scale_latents, as CogVideoXImageToVideoPipeline)"
            if invert else "as latents"}


def _write_table(cfg: Config, folder: str, name: str, table: pa.Table, row_group_rows: int | None = None) -> str:
    if METADATA_KEY not in (table.schema.metadata or {}):
        table = table.replace_schema_metadata(
            {METADATA_KEY: json.dumps({"job_fingerprint": cfg.job_fingerprint}).encode()})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=row_group_rows)
    uri = storage.join(cfg.output, folder, name)
    storage.write_bytes_atomic(uri, buf.getvalue().to_pybytes(), cfg.s3)
    return uri


def tensor_array(values: np.ndarray) -> pa.ExtensionArray:
    """[N, ...] -> Arrow's canonical fixed_shape_tensor, row-major with no ``permutation``.

    Built from its storage, zero-copy: ``from_numpy_ndarray`` records even the identity
    permutation, and some readers mishandle or ignore that attribute.
    """
    values = np.ascontiguousarray(values)
    tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(values.dtype), list(values.shape[1:]))
    flat = pa.array(values.reshape(-1))
    storage_array = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(values.shape[1:])))
    return pa.ExtensionArray.from_storage(tensor_type, storage_array)


def passthrough_columns(batch: dict) -> tuple[str, ...]:
    """The columns that travel unchanged from the decode step to the writer."""
    return tuple(CLIP_COLUMNS) + tuple(c for c in (*SCENE_COLUMNS, "extra", CAPTION) if c in batch)


def _extra_arrays(batch: dict, cfg: Config):
    """A manifest's own columns, from the JSON each clip row carries, with the manifest's types."""
    records = [json.loads(x) for x in np.asarray(batch["extra"]).tolist()]
    for name, alias in cfg.extra_columns:
        typ = pa.type_for_alias(alias)
        values = [r.get(name) for r in records]
        if pa.types.is_string(typ) or pa.types.is_large_string(typ):
            values = [None if v is None else str(v) for v in values]
        yield name, pa.array(values, type=typ)


def output_tensor_columns(cfg: Config, batch: dict) -> tuple[str, ...]:
    """The tensor columns a row of this job carries, in the order they are written."""
    extra = (*TEXT_COLUMNS, *image_columns(cfg.latent_mode), AUDIO_LATENTS)
    return tensor_columns(cfg.latent_mode) + tuple(c for c in extra if c in batch)


def latents_table(batch: dict, cfg: Config, metadata_json: str) -> pa.Table:
    arrays, fields = [], []
    for name, typ in {**CLIP_COLUMNS, **ENCODER_COLUMNS}.items():
        values = batch[name] if name in batch else np.full(len(batch["clip_id"]), cfg.tiling)
        arrays.append(pa.array(np.asarray(values).tolist(), type=typ))
        fields.append(pa.field(name, typ))
    for name, typ in SCENE_COLUMNS.items() if cfg.split_scenes else ():
        arrays.append(pa.array(np.asarray(batch[name]).tolist(), type=typ))
        fields.append(pa.field(name, typ))
    if cfg.extra_columns and "extra" in batch:
        for name, array in _extra_arrays(batch, cfg):
            arrays.append(array)
            fields.append(pa.field(name, array.type))
    if CAPTION in batch:
        arrays.append(pa.array(np.asarray(batch[CAPTION]).tolist(), type=pa.string()))
        fields.append(pa.field(CAPTION, pa.string()))
    for name in output_tensor_columns(cfg, batch):
        tensor = tensor_array(batch[name])
        arrays.append(tensor)
        fields.append(pa.field(name, tensor.type))
    schema = pa.schema(fields, metadata={METADATA_KEY: metadata_json.encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def _by_latent_shape(batch: dict, cfg: Config) -> list[dict]:
    """Split a batch into sub-batches of one latent shape each (one unless --buckets), with the
    tensor columns stacked into [N, T, C, h, w] arrays."""
    keyed = [batch[name] for name in (tensor_columns(cfg.latent_mode)[0], AUDIO_LATENTS) if name in batch]
    if all(column.dtype != object for column in keyed):
        return [batch]
    tensors = output_tensor_columns(cfg, batch)
    groups: dict[tuple, list[int]] = {}
    for i in range(len(batch["clip_id"])):  # audio latents' length follows each video's frame rate
        groups.setdefault(tuple(np.asarray(column[i]).shape for column in keyed), []).append(i)
    parts = []
    for idx in groups.values():
        part = {}
        for name, values in batch.items():
            values = np.asarray(values)
            part[name] = np.stack([values[i] for i in idx]) if name in tensors else values[idx]
        parts.append(part)
    return parts


def write_latents(batch: dict, cfg: Config, metadata_json: str) -> dict:
    """Ray Data map_batches step (batches of --rows-per-file): write the batch as Parquet, one
    file per latent shape (one file unless --buckets), named from the ids inside, so a retried
    write rewrites the same file; return what was written."""
    paths, counts = [], []
    for part in _by_latent_shape(batch, cfg) if len(batch["clip_id"]) else []:
        meta = json.loads(metadata_json)
        if "latent_shape" in meta:  # per file: with --buckets, files differ
            meta["latent_shape"] = list(part[tensor_columns(cfg.latent_mode)[0]].shape[1:])
        if "audio_latents" in meta and AUDIO_LATENTS in part:
            meta["audio_latents"]["latent_shape"] = list(part[AUDIO_LATENTS].shape[1:])
        table = latents_table(part, cfg, json.dumps(meta, sort_keys=True))
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        hooks.reach("write")
        paths.append(_write_table(cfg, layout.LATENTS_DIR, layout.file_name("part", part["clip_id"]), table,
                                  row_group_rows=max(1, ROW_GROUP_BYTES // row_bytes)))
        hooks.reach("written")
        counts.append(len(part["clip_id"]))
    return {"path": np.array(paths, dtype=object), "num_rows": np.array(counts, dtype=np.int64)}


def error_row(source_uri: str, stage: str, error_type: str, message: str, clip_id: str | None = None,
              error_class: str = INPUT, retryable: bool = False, clip_ids: list[str] | None = None,
              part: int | None = None, parts: int | None = None) -> dict:
    assert stage in STAGES, stage
    return {"source_uri": source_uri, "part": part, "parts": parts, "stage": stage, "error_type": error_type,
            "message": message.strip().splitlines()[0][:2000] if message.strip() else error_type,
            "clip_id": clip_id, "error_class": error_class, "retryable": retryable,
            "clip_ids": list(clip_ids or [])}


def write_error(cfg: Config, row: dict) -> str:
    """Write one error row to its own file, named from its input (and clip): a retry or a
    rerun overwrites it, so an input never has more than one outcome."""
    table = pa.Table.from_pylist([row], schema=ERROR_SCHEMA)
    return _write_table(cfg, layout.ERRORS_DIR, layout.error_file(row["source_uri"], row["clip_id"], row["part"]),
                        table)


def write_marker(cfg: Config, source_uri: str, clip_ids: list[str], part: int | None = None,
                 parts: int | None = None, shot_frames: list[int] | None = None) -> str:
    """Record that every clip of an input (or of one part of it) was cut: once all are written,
    a rerun skips it. ``shot_frames``: with --split-scenes, the lengths of the shots found."""
    table = pa.Table.from_pylist([{"source_uri": source_uri, "part": part, "parts": parts, "clip_ids": clip_ids,
                                   "shot_frames": shot_frames}], schema=MARKER_SCHEMA)
    return _write_table(cfg, layout.MARKERS_DIR, layout.marker_file(source_uri, part), table)
