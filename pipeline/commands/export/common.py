"""What every export format shares: reading OUTPUT a few rows at a time, undoing the pipeline's
normalisation, and small torch helpers (torch is imported lazily: ``--help`` stays fast)."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.schema import METADATA_KEY, image_columns

ROWS_PER_READ = 8  # rows decoded at once: memory stays one row group's, per-batch overhead stays small


def log(message: str) -> None:
    print(f"video-latents export: {message}", file=sys.stderr)


class ExportError(ValueError):
    """This OUTPUT cannot be written in that format, or DEST is not ours to write (exit 2)."""


# --- reading OUTPUT ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    fs: pafs.FileSystem
    files: tuple[str, ...]  # sorted: the same OUTPUT always exports in the same order
    meta: dict  # the first file's ``video_latents`` metadata (one job: the same in every file)
    columns: frozenset[str]

    @property
    def has_image_latents(self) -> bool:
        return any(c in self.columns for c in image_columns(self.meta["latent_mode"]))


def open_output(output: str, s3) -> Source:
    fs, path = storage.resolve(storage.join(output, layout.LATENTS_DIR), s3)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    # A leading dot is a temp file a crash left behind; an underscore, bookkeeping.
    files = tuple(sorted(i.path for i in infos if i.type == pafs.FileType.File
                         and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))))
    if not files:
        raise ExportError(f"OUTPUT {output} holds no latents (no {layout.LATENTS_DIR}/*.parquet)")
    with fs.open_input_file(files[0]) as f:
        schema = pq.read_schema(f)
    if METADATA_KEY not in (schema.metadata or {}):
        raise ExportError(f"{files[0]} has no {METADATA_KEY.decode()} metadata: not written by video-latents")
    return Source(fs, files, json.loads(schema.metadata[METADATA_KEY]), frozenset(schema.names))


def iter_rows(source: Source, names: list[str], with_meta: bool = False) -> Iterator:
    """OUTPUT's rows in order, each a dict: tensors as numpy arrays, the rest as Python values;
    with ``with_meta``, (the row's file's metadata, row) pairs (with --buckets, each file has its
    own ``latent_shape``)."""
    identity = ("vae_class", "latent_mode")
    for path in source.files:
        with source.fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            meta = json.loads(parquet.schema_arrow.metadata[METADATA_KEY])
            if any(meta.get(k) != source.meta.get(k) for k in identity):
                raise ExportError(f"{path} was written by another model or latent mode than {source.files[0]}")
            for batch in parquet.iter_batches(batch_size=ROWS_PER_READ, columns=names):
                for row in batch_rows(batch):
                    yield (meta, row) if with_meta else row


def batch_rows(batch) -> Iterator[dict]:
    """A record batch's rows; a fixed_shape_tensor column as [N, *shape] (pyarrow applies the
    type's permutation, if another writer than our sink set one)."""
    columns = {}
    for name in batch.schema.names:
        column = batch.column(name)
        is_tensor = getattr(column.type, "extension_name", "") == "arrow.fixed_shape_tensor"
        columns[name] = column.to_numpy_ndarray() if is_tensor else column.to_pylist()
    for i in range(batch.num_rows):
        yield {name: values[i] for name, values in columns.items()}


# --- latents: from what OUTPUT stores to the VAE's raw latent --------------------------------------

def channel_stat(meta: dict, key: str, default: float) -> np.ndarray:
    """Per-channel ``latents_mean``/``latents_std`` from the metadata, shaped to broadcast over
    [C, h, w]; ``default`` where the family has none."""
    value = meta.get(key)
    if value is None:
        return np.float32(default)
    if isinstance(value, str):  # e.g. LTX-Video: the statistics live in the weights, not the metadata
        raise ExportError(f"OUTPUT's {key} is not in its metadata ({value!r}): cannot undo its normalisation")
    return np.asarray(value, dtype=np.float32).reshape(-1, 1, 1)


def raw_latents(row: dict, meta: dict) -> np.ndarray:
    """The VAE's raw latent z, float32 [T, C, h, w]: the posterior mean in dist mode; else the mode
    (or sample) OUTPUT stores, with the normalisation the run applied undone. The run stored
    ``(z - shift - mean) * scaling_factor / std`` (``ModelInfo.normalization``), so
    ``z = y * std / scaling_factor + mean + shift``."""
    if meta["latent_mode"] == "dist":
        return row["latents_mean"].astype(np.float32)
    y = row["latents"].astype(np.float32)
    if not meta.get("normalization_applied", True):
        return y
    scale = np.float32(meta.get("scaling_factor") or 1.0)
    shift = np.float32(meta.get("shift_factor") or 0.0)
    return y * channel_stat(meta, "latents_std", 1.0) / scale + channel_stat(meta, "latents_mean", 0.0) + shift


def text_length(meta: dict) -> int | None:
    return (meta.get("text_encoder") or {}).get("max_sequence_length")


# The transformers the trainers train for each family patchify latents 2x2 in space: a latent
# side that is odd is floored by the patch embedding and comes back one row or column short
# from the unpatchify, so the loss fails on a shape mismatch at the first step.
#   diffusers 0.42.1 models/transformers/cogvideox_transformer_3d.py:238 (patch_size: int = 2),
#   transformer_wan.py:574 (patch_size (1, 2, 2)), transformer_hunyuan_video.py:914 (patch_size 2),
#   transformer_mochi.py:345 (patch_size 2); LTX-Video's is 1 (transformer_ltx.py:435).
#   musubi-tuner @ 30c658c: wan/modules/model.py:641 (Conv3d, stride patch_size (1, 2, 2)) and
#   :929-934 (unpatchify), hunyuan_model/models.py:511 (patch_size [1, 2, 2]); its own bucketing
#   rounds frame sides to 16 (dataset/bucket.py:41-42), so its own cache never holds odd latents.
PATCHIFIED = {"AutoencoderKLCogVideoX": "CogVideoX", "AutoencoderKLWan": "Wan",
              "AutoencoderKLHunyuanVideo": "HunyuanVideo", "AutoencoderKLMochi": "Mochi"}
PATCH = 2


def unpatchifiable(vae_class: str, latent_hw: tuple[int, int], ratio: int) -> str | None:
    """Why a latent of ``latent_hw`` cannot be trained by ``vae_class``'s transformer; None if it can."""
    family = PATCHIFIED.get(vae_class)
    lh, lw = latent_hw
    if family is None or (lh % PATCH == 0 and lw % PATCH == 0):
        return None
    step = PATCH * ratio
    sides = sorted({(s * ratio // step) * step for s in (lh, lw)} | {-(-s * ratio // step) * step for s in (lh, lw)})
    return (f"{lw * ratio}x{lh * ratio} frames give {lw}x{lh} latents, and {family}'s transformer patchifies "
            f"latents {PATCH}x{PATCH}: a latent side must be even, so frame sides must be multiples of {step} "
            f"(near these: {', '.join(map(str, sides))})")


# --- torch and DEST --------------------------------------------------------------------------------

def torch_module():
    import torch

    return torch


def dtype_name(tensor) -> str:
    """torch's own name for a dtype, as musubi writes it into keys (utils/model_utils.dtype_to_str)."""
    return str(tensor.dtype).split(".")[-1]


def as_tensor(values: np.ndarray):
    """A torch tensor of its own: Arrow's buffers are read-only, and torch wants to own what it saves."""
    return torch_module().from_numpy(np.array(values, order="C"))


def open_stream(uri: str, s3):
    """A file written as it goes (S3: a multipart upload), for a sidecar too big to hold whole."""
    fs, path = storage.resolve(uri, s3)
    if not storage.is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open_output_stream(path)
