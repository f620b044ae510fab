"""``video-latents export OUTPUT DEST --format musubi|finetrainers``: OUTPUT's clips written as a
trainer's own latent cache, so that a team can keep its trainer.

  musubi        DEST is a musubi-tuner ``cache_directory``: per clip a latent file and a text-encoder
                file, named and keyed as musubi's cache scripts name them (HunyuanVideo, Wan 2.1 and
                2.2 A14B), and the JSONL that musubi's dataset config names as its video_jsonl_file.
  finetrainers  DEST is a finetrainers ``--precomputation_dir``: ``finetrainers-precomputed-data/``
                with ``latent-{i}.pt`` and ``condition-{i}.pt`` per clip (CogVideoX, Wan), read back
                with ``--enable_precomputation --precomputation_reuse``.

Verified against the trainers' source (cited where each fact is used):
  kohya-ss/musubi-tuner @ 30c658c4f4b0bf05038b3346eff9670259b10fc7
  a-r-r-o-w/finetrainers @ f476c37 (now huggingface/finetrainers), files cited below.

OUTPUT is read file by file, a few rows at a time: memory follows one Parquet row group, never the
size of OUTPUT. Both OUTPUT and DEST may be local folders or ``s3://`` prefixes.

Exit codes: 0 DEST holds what the trainer loads for every clip (for musubi, possibly all but the
text-encoder files, with the captions musubi's own text-caching script needs to add them);
1 the latents were written but the trainer cannot train on DEST as it is (stderr says what is
missing); 2 refused before anything was written: the format cannot express this OUTPUT (stderr says
why and what to change), or DEST holds something other than this export.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.schema import CAPTION, METADATA_KEY, PROMPT_EMBEDS, image_columns

FORMATS = ("musubi", "finetrainers")
EXIT_OK, EXIT_UNUSABLE, EXIT_USAGE = 0, 1, 2
MARKER = "_export.json"  # DEST's record of which OUTPUT and format it holds; trainers' globs skip it
MUSUBI_JSONL = "musubi-dataset.jsonl"
ROWS_PER_READ = 8  # rows decoded at once: memory stays one row group's, per-batch overhead stays small


def _log(message: str) -> None:
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


def iter_rows(source: Source, names: list[str]) -> Iterator[dict]:
    """OUTPUT's rows in order, each a dict: tensors as numpy arrays, the rest as Python values."""
    identity = ("vae_class", "latent_mode")
    for path in source.files:
        with source.fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            meta = json.loads(parquet.schema_arrow.metadata[METADATA_KEY])
            if any(meta.get(k) != source.meta.get(k) for k in identity):
                raise ExportError(f"{path} was written by another model or latent mode than {source.files[0]}")
            for batch in parquet.iter_batches(batch_size=ROWS_PER_READ, columns=names):
                yield from batch_rows(batch)


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

def _channel_stat(meta: dict, key: str, default: float) -> np.ndarray:
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
    return y * _channel_stat(meta, "latents_std", 1.0) / scale + _channel_stat(meta, "latents_mean", 0.0) + shift


def _family(meta: dict, fmt: str, supported: dict, other_fmt: str, other: dict):
    """What ``fmt`` does for OUTPUT's VAE family, from its table ``supported``."""
    vae_class = meta.get("vae_class")
    if vae_class not in supported:
        hint = f"; use --format {other_fmt}" if vae_class in other else ""
        raise ExportError(f"--format {fmt} takes {', '.join(sorted(supported))} latents, not {vae_class}{hint}")
    return supported[vae_class]


def _text_length(meta: dict) -> int | None:
    return (meta.get("text_encoder") or {}).get("max_sequence_length")


def _torch():
    import torch

    return torch


def _dtype_name(tensor) -> str:
    """torch's own name for a dtype, as musubi writes it into keys (utils/model_utils.dtype_to_str)."""
    return str(tensor.dtype).split(".")[-1]


def _tensor(values: np.ndarray):
    """A torch tensor of its own: Arrow's buffers are read-only, and torch wants to own what it saves."""
    return _torch().from_numpy(np.array(values, order="C"))


# --- musubi-tuner ----------------------------------------------------------------------------------
# kohya-ss/musubi-tuner @ 30c658c4f4b0bf05038b3346eff9670259b10fc7, under src/musubi_tuner/:
#   dataset/architectures.py          short names (file names) and full names (header metadata)
#   dataset/cache_io.py               save_latent_cache{,_wan}, save_latent_cache_common (keys,
#                                     [C, F, H, W], header: architecture, width, height,
#                                     format_version 1.0.1, frame_count),
#                                     save_text_encoder_output_cache_wan, ..._common
#   dataset/image_video_dataset.py    get_latent_cache_path ({name}_{w:04d}x{h:04d}_{arch}),
#                                     VideoDataset item key {body}_{crop_pos:05d}-{frames:03d},
#                                     VideoDataset.__init__ (its datasource: video_directory or
#                                     video_jsonl_file, also when training from the cache),
#                                     VideoDataset.prepare_for_training (the loader: glob, name
#                                     tokens, bucket from the name's W×H, the required _te file)
#   dataset/bucket.py                 BucketSelector; BucketBatchManager.__getitem__ (key
#                                     suffixes stripped, varlen_ keys not stacked)
MUSUBI_FORMAT_VERSION = "1.0.1"  # cache_io.save_latent_cache_common / save_text_encoder_output_cache_common
WAN_TEXT_LEN = 512  # wan/configs/shared_config.py text_len: WanModel pads each context to it


def _hunyuan_cache(z: np.ndarray, meta: dict) -> np.ndarray:
    # cache_latents.encode_and_save_batch stores latent_dist.sample() unscaled;
    # hv_train_network.scale_shift_latents multiplies by the VAE's scaling factor at train time.
    return z


def _wan_cache(z: np.ndarray, meta: dict) -> np.ndarray:
    # wan/modules/vae.py WanVAE.encode: (mu - mean) * (1 / std) with Wan 2.1's statistics, which
    # are the diffusers config's latents_mean/latents_std that OUTPUT's metadata records.
    return (z - _channel_stat(meta, "latents_mean", 0.0)) * (1.0 / _channel_stat(meta, "latents_std", 1.0))


def _wan_text(row: dict) -> dict:
    """cache_io.save_text_encoder_output_cache_wan: varlen_t5_{dtype}, [real tokens, D]
    (wan/modules/t5.py T5EncoderModel.__call__ trims each prompt to its mask's length). OUTPUT has
    no mask for Wan: WanPipeline zeroes the states after the real tokens, so they end at the last
    non-zero row (and musubi's WanModel pads the context back with zeros: wan/modules/model.py)."""
    embeds = row[PROMPT_EMBEDS]
    nonzero = np.flatnonzero(np.abs(embeds).sum(axis=1))
    length = int(nonzero[-1]) + 1 if len(nonzero) else 0
    trimmed = _tensor(embeds[:length])
    return {f"varlen_t5_{_dtype_name(trimmed)}": trimmed}


@dataclass(frozen=True)
class MusubiArch:
    short: str  # in file names (architectures.py ARCHITECTURE_*)
    full: str  # in the header's "architecture" (architectures.py ARCHITECTURE_*_FULL)
    latent_channels: int  # what musubi's own VAE for it produces
    cache_latents: Callable[[np.ndarray, dict], np.ndarray]  # raw z -> what its latent cache holds
    text: Callable[[dict], dict] | None  # row -> its text-encoder file; None: OUTPUT cannot hold that
    no_text: str  # why OUTPUT has no text-encoder file for it
    text_script: str  # musubi's script that caches this architecture's text
    image_note: str  # why OUTPUT's image latents cannot be its image conditioning
    max_text_tokens: int | None = None  # more make its model fail


MUSUBI = {
    "AutoencoderKLHunyuanVideo": MusubiArch(
        "hv", "hunyuan_video", 16,  # hunyuan_model/vae.py: the VAE config's latent_channels
        _hunyuan_cache, None,
        # cache_io.save_text_encoder_output_cache: llm_{dtype} + llm_mask and clipL_{dtype}
        "musubi's HunyuanVideo text cache is Llama states with their mask plus the CLIP pooled output, "
        "which video-latents does not compute",
        "cache_text_encoder_outputs.py",
        "musubi's HunyuanVideo cache takes no image latents (cache_io.save_latent_cache)"),
    "AutoencoderKLWan": MusubiArch(
        "wan", "wan", 16,  # wan/modules/vae.py: WanVAE(z_dim=16), the Wan 2.1 VAE (also Wan 2.2 A14B's)
        _wan_cache, _wan_text, f"no {PROMPT_EMBEDS} in OUTPUT (encode with --text-embeddings)",
        "wan_cache_text_encoder_outputs.py",
        # wan_cache_latents.encode_and_save_batch, i2v: a 4-channel first-frame mask concatenated with
        # the VAE encoding of the first frame followed by F-1 black frames, over all F latent frames.
        "musubi's Wan I2V cache (latents_image) is a mask plus the encoding of the first frame followed by "
        "black frames, not the first frame alone: for I2V, cache with musubi's wan_cache_latents.py --i2v",
        WAN_TEXT_LEN),
}


def _musubi_names(row: dict, arch: MusubiArch) -> tuple[str, str]:
    """(latent file, text-encoder file). The clip id is the item's body, so each clip has its own
    text file: musubi's loader takes the text file's name from everything before the
    ``{start:05d}-{frames:03d}`` token, and one video's clips may carry different captions. The
    W×H token is the encoded size, from which the loader picks the clip's bucket (musubi writes
    the source's size there, and resizes to the bucket before encoding)."""
    body = row["clip_id"]
    latent = (f"{body}_{int(row['start_frame']):05d}-{int(row['num_frames']):03d}_"
              f"{int(row['width']):04d}x{int(row['height']):04d}_{arch.short}.safetensors")
    return latent, f"{body}_{arch.short}_te.safetensors"


class MusubiWriter:
    def __init__(self, source: Source, dest: str, s3):
        meta = source.meta
        self.arch = _family(meta, "musubi", MUSUBI, "finetrainers", FINETRAINERS)
        self.meta, self.dest, self.s3 = meta, dest, s3
        channels = (meta.get("latent_shape") or [None, None])[1]
        if channels is not None and channels != self.arch.latent_channels:
            raise ExportError(
                f"musubi-tuner's '{self.arch.short}' architecture takes {self.arch.latent_channels}-channel "
                f"latents; OUTPUT's have {channels} (e.g. the Wan 2.2 TI2V VAE, which musubi does not train)")
        self.latent_column = "latents_mean" if meta["latent_mode"] == "dist" else "latents"
        self.has_text = self.arch.text is not None and PROMPT_EMBEDS in source.columns
        self.has_captions = CAPTION in source.columns
        self.columns = ["clip_id", "start_frame", "num_frames", "height", "width", self.latent_column,
                        *([PROMPT_EMBEDS] if self.has_text else []), *([CAPTION] if self.has_captions else [])]
        self.jsonl = None
        self.sizes: set[tuple[int, int]] = set()
        self.notes = self._notes(source)

    def _notes(self, source: Source) -> list[str]:
        """What the trainer will lack, or take differently from its own cache, one line each."""
        notes = []
        if not self.has_text:
            then = (f"DEST/{MUSUBI_JSONL} holds each clip's caption: run musubi's {self.arch.text_script} "
                    f"with a dataset config whose video_jsonl_file is it and cache_directory is DEST"
                    if self.has_captions else "and OUTPUT has no caption column to compute them from")
            notes.append(f"{self.arch.no_text}: wrote no *_{self.arch.short}_te.safetensors, which musubi-tuner "
                         f"requires per item (it skips an item without one); {then}")
        if source.has_image_latents:
            notes.append(f"image latents not exported: {self.arch.image_note}")
        length = _text_length(self.meta)
        most = self.arch.max_text_tokens
        if self.has_text and length and most and length > most:
            notes.append(f"prompts of up to {length} tokens: musubi's model takes at most {most}; a longer "
                         f"prompt fails at train time")
        return notes

    @property
    def usable(self) -> bool:
        return self.has_text or self.has_captions

    def write(self, index: int, row: dict) -> None:
        from safetensors.torch import save

        latent_name, te_name = _musubi_names(row, self.arch)
        stored = row[self.latent_column]
        cached = self.arch.cache_latents(raw_latents(row, self.meta), self.meta).astype(stored.dtype)
        # [T, C, h, w] -> [C, F, H, W] (cache_io.save_latent_cache: `_, F, H, W = latent.shape`)
        cached = _tensor(cached.transpose(1, 0, 2, 3))
        _, f, h, w = cached.shape
        width, height = int(row["width"]), int(row["height"])
        self.sizes.add((width, height))
        header = {"architecture": self.arch.full, "width": str(width), "height": str(height),
                  "format_version": MUSUBI_FORMAT_VERSION, "frame_count": str(int(row["num_frames"]))}
        self._put(latent_name, save({f"latents_{f}x{h}x{w}_{_dtype_name(cached)}": cached}, metadata=header))
        caption = str(row.get(CAPTION) or "")
        if self.has_text:
            header = {"architecture": self.arch.full, "caption1": caption, "format_version": MUSUBI_FORMAT_VERSION}
            self._put(te_name, save(self.arch.text(row), metadata=header))
        self._jsonl_line(row["clip_id"], caption)

    def _jsonl_line(self, clip_id: str, caption: str) -> None:
        # A VideoJsonlDatasource line (dataset/datasources.py). musubi's video dataset needs one even
        # to train from the cache; its text caching reads only video_path and caption, and names
        # the text file after video_path's stem: the clip id, as our latent files.
        if self.jsonl is None:
            self.jsonl = _open_stream(storage.join(self.dest, MUSUBI_JSONL), self.s3)
        line = {"video_path": f"{clip_id}.mp4", "caption": caption}
        self.jsonl.write((json.dumps(line, ensure_ascii=False) + "\n").encode())

    def _put(self, name: str, data: bytes) -> None:
        storage.write_bytes_atomic(storage.join(self.dest, name), data, self.s3)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()

    def summary(self) -> dict:
        # The loader buckets each clip by the name's W×H through BucketSelector: one bucket at
        # `resolution`, or, with bucket_no_upscale, each size up to its area as it is.
        width, height = max(self.sizes, key=lambda s: s[0] * s[1], default=(0, 0))
        buckets = "enable_bucket = true, bucket_no_upscale = true, " if len(self.sizes) > 1 else ""
        return {"architecture": self.arch.short, "text_encoder_files": self.has_text,
                "use": f"a musubi-tuner dataset config with video_jsonl_file = DEST/{MUSUBI_JSONL}, "
                       f"cache_directory = DEST, {buckets}resolution = [{width}, {height}]"}


# --- finetrainers ----------------------------------------------------------------------------------
# a-r-r-o-w/finetrainers @ f476c37, under finetrainers/:
#   data/precomputation.py            PRECOMPUTED_DATA_DIR, _save_item / _load_item
#                                     ({data_type}-{index}.pt, torch.save, torch.load(weights_only=True)),
#                                     PrecomputedOnceDataIterable (--precomputation_reuse: counts
#                                     {data_type}-*.pt, index = rank * (count // world_size) + i)
#   models/cogvideox/base_specification.py, models/wan/base_specification.py
#                                     the latent processors with compute_posterior=False (what
#                                     --enable_precomputation uses), prepare_conditions, forward
#   processors/t5.py                  T5Processor: padded to max_sequence_length, pad positions kept
FINETRAINERS_DIR = "finetrainers-precomputed-data"


def _moments(row: dict) -> np.ndarray:
    """The posterior's moments, [T, 2C, h, w]: mean then logvar along the channels, as the VAE's
    ``_encode`` returns them (diffusers' DiagonalGaussianDistribution chunks them in that order)."""
    return np.concatenate([row["latents_mean"], row["latents_logvar"]], axis=1)


def _cogvideox_latents(row: dict):
    # CogVideoXLatentEncodeProcessor: vae._encode's moments permuted to [B, F, 2C, H, W];
    # forward() samples a DiagonalGaussianDistribution along dim 2, then scales.
    return _tensor(_moments(row)[None])


def _wan_latents(row: dict):
    # WanLatentEncodeProcessor: vae._encode's raw moments [B, 2C, F, H, W]; forward() normalises
    # them with the statistics beside them, then samples.
    return _tensor(_moments(row).transpose(1, 0, 2, 3)[None])


def _no_constants(meta: dict) -> dict:
    return {}


def _wan_statistics(meta: dict) -> dict:
    # WanLatentEncodeProcessor: latents_mean = tensor(config.latents_mean), latents_std =
    # 1 / tensor(config.latents_std), float32 [C], in every latent file.
    torch = _torch()
    mean, std = meta.get("latents_mean"), meta.get("latents_std")
    if not isinstance(mean, list) or not isinstance(std, list):
        raise ExportError("finetrainers' Wan latent files carry latents_mean/latents_std; OUTPUT's "
                          "metadata has no per-channel statistics")
    return {"latents_mean": torch.tensor(mean), "latents_std": 1.0 / torch.tensor(std)}


@dataclass(frozen=True)
class FinetrainersModel:
    name: str  # --model_name
    latents: Callable[[dict], object]  # row -> the "latents" tensor of latent-{i}.pt
    constants: Callable[[dict], dict]  # metadata -> what every latent-{i}.pt carries beside it
    text_length: int  # prepare_conditions' max_sequence_length default
    image_note: str  # why OUTPUT's image latents cannot be its image conditioning
    text_note: str | None = None  # how its own conditions differ from the diffusers pipeline's


FINETRAINERS = {
    "AutoencoderKLCogVideoX": FinetrainersModel(
        "cogvideox", _cogvideox_latents, _no_constants, 226,
        "finetrainers' CogVideoX specification trains text-to-video and takes none"),
    "AutoencoderKLWan": FinetrainersModel(
        "wan", _wan_latents, _wan_statistics, 512,
        # WanImageConditioningLatentEncodeProcessor and WanImageEncodeProcessor
        "finetrainers' Wan I2V conditioning is the posterior of the first frame followed by black frames, "
        "a frame mask and CLIP image embeddings, not the first frame alone",
        # T5Processor(["encoder_hidden_states", "__drop__"]) runs UMT5 without the mask
        "condition files hold WanPipeline's prompt embeddings (zero after the prompt's tokens, as Wan "
        "is run at inference); finetrainers' own Wan precomputation keeps the padding tokens' states"),
}


class FinetrainersWriter:
    def __init__(self, source: Source, dest: str, s3):
        meta = source.meta
        self.model = _family(meta, "finetrainers", FINETRAINERS, "musubi", MUSUBI)
        if meta["latent_mode"] != "dist":
            raise ExportError(
                f"finetrainers' precomputed latents are the VAE posterior's mean and logvar, sampled afresh at "
                f"every step; OUTPUT holds --latent-mode {meta['latent_mode']} latents, from which they cannot be "
                f"recovered: encode with --latent-mode dist for finetrainers")
        self.s3 = s3
        self.constants = self.model.constants(meta)  # the same tensors in every latent file
        self.folder = storage.join(dest, FINETRAINERS_DIR)
        self.has_text = PROMPT_EMBEDS in source.columns
        self.columns = ["latents_mean", "latents_logvar", *([PROMPT_EMBEDS] if self.has_text else [])]
        self.notes = self._notes(source)

    def _notes(self, source: Source) -> list[str]:
        """What the trainer will lack, or take differently from its own precomputation, one line each."""
        notes = []
        if not self.has_text:
            notes.append(f"no {PROMPT_EMBEDS} in OUTPUT: wrote no condition-{{i}}.pt files, and finetrainers "
                         f"needs one beside each latent-{{i}}.pt (--precomputation_reuse fails on an empty "
                         f"condition set); encode with --text-embeddings")
        length = _text_length(source.meta)
        if self.has_text and length and length != self.model.text_length:
            notes.append(f"prompts padded to {length} tokens; finetrainers' own {self.model.name} conditions "
                         f"have {self.model.text_length}")
        if self.has_text and self.model.text_note:
            notes.append(self.model.text_note)
        if source.has_image_latents:
            notes.append(f"image latents not exported: {self.model.image_note}")
        return notes

    @property
    def usable(self) -> bool:
        return self.has_text

    def write(self, index: int, row: dict) -> None:
        self._save(f"latent-{index}.pt", {"latents": self.model.latents(row), **self.constants})
        if self.has_text:
            # The condition is the padded states alone: CogVideoX's prepare_conditions pops the
            # mask, Wan's T5Processor drops it.
            self._save(f"condition-{index}.pt", {"encoder_hidden_states": _tensor(row[PROMPT_EMBEDS][None])})

    def _save(self, name: str, item: dict) -> None:
        buffer = io.BytesIO()
        _torch().save(item, buffer)
        storage.write_bytes_atomic(storage.join(self.folder, name), buffer.getvalue(), self.s3)

    def close(self) -> None:
        pass

    def summary(self) -> dict:
        return {"model_name": self.model.name, "condition_files": self.has_text,
                "use": f"finetrainers --model_name {self.model.name} --enable_precomputation "
                       f"--precomputation_reuse --precomputation_dir DEST"}


WRITERS = {"musubi": MusubiWriter, "finetrainers": FinetrainersWriter}


# --- DEST ------------------------------------------------------------------------------------------

def _open_stream(uri: str, s3):
    """A file written as it goes (S3: a multipart upload), for a sidecar too big to hold whole."""
    fs, path = storage.resolve(uri, s3)
    if not storage.is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open_output_stream(path)


def _claim(dest: str, output: str, fmt: str, s3) -> None:
    """DEST must be empty, or hold this same export (a rerun rewrites the same files): a trainer
    globs its cache folder, so anything else there would be trained on too."""
    fs, path = storage.resolve(dest, s3)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    marker = layout.read_json(dest, MARKER, s3) if entries else None
    if entries and not (marker and (marker.get("output"), marker.get("format")) == (output, fmt)):
        raise ExportError(f"DEST {dest} is not empty: give a new or empty folder (rerunning the same export "
                          f"into it is fine)")


def export(output: str, dest: str, fmt: str, s3=None) -> tuple[dict, bool]:
    """Write OUTPUT's clips into DEST in ``fmt``; returns (summary, whether the trainer can use DEST).
    Raises ExportError, before writing anything, when the format cannot express OUTPUT."""
    source = open_output(output, s3)
    writer = WRITERS[fmt](source, dest, s3)
    _claim(dest, output, fmt, s3)
    for line in writer.notes:
        _log(line)
    if not layout.read_json(output, layout.SUCCESS, s3):
        _log("OUTPUT has no _SUCCESS (its run is not complete): exporting the clips written so far")
    layout.write_json(dest, MARKER, {"output": output, "format": fmt, "complete": False}, s3)
    items = 0
    try:
        for items, row in enumerate(iter_rows(source, writer.columns), start=1):
            writer.write(items - 1, row)
    finally:
        writer.close()
    summary = {"format": fmt, "output": output, "dest": dest, "items": items, "vae_class": source.meta["vae_class"],
               "latent_mode": source.meta["latent_mode"], **writer.summary(), "notes": writer.notes,
               "usable": writer.usable}
    layout.write_json(dest, MARKER, {**summary, "complete": True}, s3)
    return summary, writer.usable


def export_command(output: str, dest: str, fmt: str, s3_endpoint: str | None) -> int:
    s3 = storage.default_endpoint(s3_endpoint)
    try:
        summary, usable = export(output, dest, fmt, s3)
    except ExportError as e:
        _log(f"error: {e}")
        return EXIT_USAGE
    print(json.dumps(summary))
    if not usable:
        _log(f"wrote {summary['items']} clips' latents, but the trainer cannot train on DEST as it is (see above)")
        return EXIT_UNUSABLE
    return EXIT_OK


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``export`` subcommand, on the CLI's subparsers."""
    p = sub.add_parser("export", help="write OUTPUT's latents as a trainer's cache (musubi-tuner, finetrainers)")
    p.add_argument("output", metavar="OUTPUT", help="an encode's OUTPUT (s3://bucket/prefix/ or a local folder)")
    p.add_argument("dest", metavar="DEST",
                   help="a new or empty folder or s3:// prefix: musubi's cache_directory, or finetrainers' "
                        "--precomputation_dir")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="musubi: HunyuanVideo and Wan (mode, sample or dist OUTPUTs); finetrainers: CogVideoX "
                        "and Wan (dist OUTPUTs: --latent-mode dist); both want --text-embeddings (Wan, CogVideoX)")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    return p
