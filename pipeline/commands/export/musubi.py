"""``--format musubi``: DEST is a musubi-tuner ``cache_directory``: per clip a latent file and a
text-encoder file, named and keyed as musubi's cache scripts name them (HunyuanVideo, Wan 2.1 and
2.2 A14B), and the JSONL that musubi's dataset config names as its video_jsonl_file."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline import storage
from pipeline.commands.export.common import (ExportError, Source, as_tensor, channel_stat, dtype_name, open_stream,
                                             raw_latents, text_length)
from pipeline.schema import CAPTION, PROMPT_EMBEDS

MUSUBI_JSONL = "musubi-dataset.jsonl"
MUSUBI_TOML = "musubi-dataset.toml"  # the dataset config every musubi script takes (--dataset_config)

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
    return (z - channel_stat(meta, "latents_mean", 0.0)) * (1.0 / channel_stat(meta, "latents_std", 1.0))


def _wan_text(row: dict) -> dict:
    """cache_io.save_text_encoder_output_cache_wan: varlen_t5_{dtype}, [real tokens, D]
    (wan/modules/t5.py T5EncoderModel.__call__ trims each prompt to its mask's length). OUTPUT has
    no mask for Wan: WanPipeline zeroes the states after the real tokens, so they end at the last
    non-zero row (and musubi's WanModel pads the context back with zeros: wan/modules/model.py)."""
    embeds = row[PROMPT_EMBEDS]
    nonzero = np.flatnonzero(np.abs(embeds).sum(axis=1))
    length = int(nonzero[-1]) + 1 if len(nonzero) else 0
    trimmed = as_tensor(embeds[:length])
    return {f"varlen_t5_{dtype_name(trimmed)}": trimmed}


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
    text_args: str  # the text-caching script's model arguments (its docs' example)
    train_script: str  # musubi's training script for it
    latent_kind: str  # what its own latent cache holds: "sample" or "mean"
    max_text_tokens: int | None = None  # more make its model fail
    t2v_note: str | None = None  # what an image-to-video checkpoint would need beyond this cache


MUSUBI = {
    "AutoencoderKLHunyuanVideo": MusubiArch(
        "hv", "hunyuan_video", 16,  # hunyuan_model/vae.py: the VAE config's latent_channels
        _hunyuan_cache, None,
        # cache_io.save_text_encoder_output_cache: llm_{dtype} + llm_mask and clipL_{dtype}
        "musubi's HunyuanVideo text cache is Llama states with their mask plus the CLIP pooled output, "
        "which video-latents does not compute",
        "cache_text_encoder_outputs.py",
        "musubi's HunyuanVideo cache takes no image latents (cache_io.save_latent_cache)",
        # docs/hunyuan_video.md:154
        "--text_encoder1 path/to/ckpts/text_encoder --text_encoder2 path/to/ckpts/text_encoder_2",
        "hv_train_network.py",
        "sample"),  # cache_latents.encode_and_save_batch: latent_dist.sample()
    "AutoencoderKLWan": MusubiArch(
        "wan", "wan", 16,  # wan/modules/vae.py: WanVAE(z_dim=16), the Wan 2.1 VAE (also Wan 2.2 A14B's)
        _wan_cache, _wan_text, f"no {PROMPT_EMBEDS} in OUTPUT (encode with --text-embeddings)",
        "wan_cache_text_encoder_outputs.py",
        # wan_cache_latents.encode_and_save_batch, i2v: a 4-channel first-frame mask concatenated with
        # the VAE encoding of the first frame followed by F-1 black frames, over all F latent frames.
        "musubi's Wan I2V cache (latents_image) is a mask plus the encoding of the first frame followed by "
        "black frames, not the first frame alone: for I2V, cache with musubi's wan_cache_latents.py --i2v",
        "--t5 path/to/models_t5_umt5-xxl-enc-bf16.pth",  # docs/wan.md:145
        "wan_train_network.py",
        "mean",  # wan/modules/vae.py WanVAE.encode: the posterior's mu
        WAN_TEXT_LEN,
        # wan_cache_latents.py --i2v writes latents_image and clip_{dtype} (cache_io.save_latent_cache_wan)
        "only text-to-video checkpoints (--task t2v-*) can train on this cache: a Wan I2V checkpoint needs CLIP "
        "image features (clip_*) and latents_image in each latent file, which the export does not write"),
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


def _parse_like_musubi(name: str, arch: str) -> tuple[str, int, int, int, int]:
    """(item key, start frame, frame count, width, height) as VideoDataset.prepare_for_training
    reads a latent file's name (dataset/image_video_dataset.py:866-876 @ 30c658c)."""
    tokens = name[: -len(f"_{arch}.safetensors")].split("_") + [arch]
    width, height = map(int, tokens[-2].split("x"))
    frame_pos, frame_count = tokens[-3].split("-")[:2]
    return "_".join(tokens[:-3]), int(frame_pos), int(frame_count), width, height


class MusubiWriter:
    trainer = "musubi-tuner"
    scan_columns = ["clip_id", "start_frame", "num_frames", "height", "width"]

    def __init__(self, source: Source, dest: str, s3):
        meta = source.meta
        self.arch = MUSUBI[meta["vae_class"]]
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
        self.frames: set[int] = set()
        self.sidecars = [MUSUBI_TOML, MUSUBI_JSONL]  # deleted first; the TOML written last
        self.notes = self._notes(source)

    def names(self, index: int, row: dict) -> list[str]:
        """The files this row becomes, refused (before anything is written) if musubi's loader
        would not read its name back as this clip."""
        latent, te = _musubi_names(row, self.arch)
        want = (row["clip_id"], int(row["start_frame"]), int(row["num_frames"]), int(row["width"]),
                int(row["height"]))
        try:
            parsed = _parse_like_musubi(latent, self.arch.short)
        except ValueError:
            parsed = None
        if parsed != want:
            raise ExportError(f"clip {row['clip_id']} (start frame {row['start_frame']}) would be named {latent}, "
                              f"which musubi-tuner's loader cannot parse back (it fails for the whole dataset): "
                              f"re-encode OUTPUT with this version, which starts clips at frame 0 or later")
        self.sizes.add((int(row["width"]), int(row["height"])))
        self.frames.add(int(row["num_frames"]))
        return [latent, te] if self.has_text else [latent]

    def _path(self, name: str) -> str:
        """``name`` as musubi, run on the machine that trains, finds it: DEST's absolute path for a
        local DEST; for S3, relative to a local copy of DEST that the scripts are run from."""
        if storage.is_s3(self.dest):
            return name
        return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(self.dest)), name))

    def _notes(self, source: Source) -> list[str]:
        """What the trainer will lack, or take differently from its own cache, one line each."""
        notes = []
        if not self.has_text:
            then = (f"DEST/{MUSUBI_JSONL} holds each clip's caption; create them with: {self.text_command()}"
                    if self.has_captions else "and OUTPUT has no caption column to compute them from")
            notes.append(f"{self.arch.no_text}: wrote no *_{self.arch.short}_te.safetensors, which musubi-tuner "
                         f"requires per item (it skips every item without one, so it would train on nothing); "
                         f"{then}")
        mode = self.meta["latent_mode"]
        ours = "a posterior sample" if mode == "sample" else "the posterior mean"
        if (self.arch.latent_kind == "sample") != (mode == "sample"):
            theirs = "a posterior sample" if self.arch.latent_kind == "sample" else "the posterior mean"
            notes.append(f"latents are {ours} (a --latent-mode {mode} OUTPUT), where musubi's own "
                         f"'{self.arch.short}' cache holds {theirs}")
        if self.arch.t2v_note:
            notes.append(self.arch.t2v_note)
        notes.append("file names carry each clip's encoded size (W×H), where musubi's own cache names the source's "
                     "size; musubi buckets by it, and the latents are at that size")
        if source.has_image_latents:
            notes.append(f"image latents not exported: {self.arch.image_note}")
        length = text_length(self.meta)
        most = self.arch.max_text_tokens
        if self.has_text and length and most and length > most:
            notes.append(f"prompts of up to {length} tokens: musubi's model takes at most {most}; a longer "
                         f"prompt fails at train time")
        return notes

    def text_command(self) -> str:
        return (f"python src/musubi_tuner/{self.arch.text_script} --dataset_config {self._path(MUSUBI_TOML)} "
                f"{self.arch.text_args} --batch_size 16")

    @property
    def usable(self) -> bool:
        return self.has_text

    def write(self, index: int, row: dict) -> None:
        from safetensors.torch import save

        latent_name, te_name = _musubi_names(row, self.arch)
        stored = row[self.latent_column]
        cached = self.arch.cache_latents(raw_latents(row, self.meta), self.meta).astype(stored.dtype)
        # [T, C, h, w] -> [C, F, H, W] (cache_io.save_latent_cache: `_, F, H, W = latent.shape`)
        cached = as_tensor(cached.transpose(1, 0, 2, 3))
        _, f, h, w = cached.shape
        width, height = int(row["width"]), int(row["height"])
        self.sizes.add((width, height))
        header = {"architecture": self.arch.full, "width": str(width), "height": str(height),
                  "format_version": MUSUBI_FORMAT_VERSION, "frame_count": str(int(row["num_frames"]))}
        self._put(latent_name, save({f"latents_{f}x{h}x{w}_{dtype_name(cached)}": cached}, metadata=header))
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
            self.jsonl = open_stream(storage.join(self.dest, MUSUBI_JSONL), self.s3)
        line = {"video_path": f"{clip_id}.mp4", "caption": caption}
        self.jsonl.write((json.dumps(line, ensure_ascii=False) + "\n").encode())

    def _put(self, name: str, data: bytes) -> None:
        storage.write_bytes_atomic(storage.join(self.dest, name), data, self.s3)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()

    def final_files(self, items: int) -> dict[str, bytes]:
        """The dataset config (dataset/config_utils.py's schema): the loader buckets each clip by
        its name's W×H through BucketSelector: one bucket at ``resolution``, or, with
        bucket_no_upscale, each size up to that area as it is (dataset/bucket.py)."""
        width, height = max(self.sizes, key=lambda s: s[0] * s[1], default=(0, 0))
        buckets = len(self.sizes) > 1
        toml = (f"# written by video-latents export: train from the cache in cache_directory\n"
                f"[general]\nresolution = [{width}, {height}]\nbatch_size = 1\n"
                f"enable_bucket = {str(buckets).lower()}\nbucket_no_upscale = {str(buckets).lower()}\n\n"
                f"[[datasets]]\nvideo_jsonl_file = {json.dumps(self._path(MUSUBI_JSONL))}\n"
                f"cache_directory = {json.dumps(self._path('.'))}\n"
                f"target_frames = [{', '.join(map(str, sorted(self.frames)))}]\nframe_extraction = \"head\"\n")
        return {MUSUBI_TOML: toml.encode()}

    def summary(self) -> dict:
        cd = "" if not storage.is_s3(self.dest) else "copy DEST to a local folder and run from it: "
        train = (f"{cd}accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 "
                 f"src/musubi_tuner/{self.arch.train_script} --dataset_config {self._path(MUSUBI_TOML)} ...")
        return {"architecture": self.arch.short, "text_encoder_files": self.has_text,
                "dataset_config": self._path(MUSUBI_TOML),
                "use": train if self.has_text else f"{cd}{self.text_command()}; then {train}"}
