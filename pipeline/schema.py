"""The output's contract: column names and types, the metadata key and the tensor layout.

Imported by the steps that write rows (decode, encoder, sink) and those that read them (resume,
readers, report), so that none of them imports another for a column name.
"""
from __future__ import annotations

import pyarrow as pa

METADATA_KEY = b"video_latents"
LAYOUT = "TCHW"
STAGES = ("list", "read", "decode", "sample", "encode", "write")

# The columns a clip row carries from the decode step to the writer, unchanged.
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
# With --split-scenes: the shot the clip lies in, its number (counted from the start of the
# video's block of --clips-per-task x stride frames: a long video's part) and its first frame.
SCENE_COLUMNS = {"scene_index": pa.int32(), "scene_start_frame": pa.int32()}
# Added by the encoder: whether the clip went through the VAE's tiled path (asked for with
# --tiling, or taken as the last step down when a clip alone ran out of GPU memory).
ENCODER_COLUMNS = {"tiled": pa.bool_()}

# Error classes (see pipeline.failures): an input's own fault is final; the others are retried.
INPUT, TRANSIENT, RESOURCE = "input", "transient", "resource"

# A long input is cut into parts (time spans) that separate tasks decode; a part is the unit of
# work, and of a marker or an error row: (part, parts) say which of how many, null for a whole input.
PART_COLUMNS = [("part", pa.int32()), ("parts", pa.int32())]

ERROR_SCHEMA = pa.schema([
    ("source_uri", pa.string()),
    *PART_COLUMNS,
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
    ("clip_id", pa.string()),  # set for a clip that failed in the encoder; null for a whole input
    ("error_class", pa.string()),  # input | transient | resource
    ("retryable", pa.bool_()),  # a rerun tries it again (transient and resource errors)
    # For an input that failed part-way: the clips cut before the failure. The error row is the
    # input's outcome only once all of them are committed, so a crash cannot hide them.
    ("clip_ids", pa.list_(pa.string())),
])
# shot_frames (--split-scenes): the length in frames of each shot that starts in the unit, for the
# report's histogram (shots with no clip included); null without --split-scenes.
MARKER_SCHEMA = pa.schema([("source_uri", pa.string()), *PART_COLUMNS, ("clip_ids", pa.list_(pa.string())),
                          ("shot_frames", pa.list_(pa.int32()))])


def tensor_columns(latent_mode: str) -> tuple[str, ...]:
    return ("latents_mean", "latents_logvar") if latent_mode == "dist" else ("latents",)


# With --text-embeddings: the caption each clip used and the text encoders' output (pipeline.text);
# a mask only for families whose pipeline uses one (Mochi, LTX-Video, LTX-2, the HunyuanVideos):
# uint8, 1 = a real token. HunyuanVideo adds CLIP-L's pooled output, HunyuanVideo 1.5 ByT5's
# embeddings and mask, LTX-2.3 its audio branch's projection.
CAPTION = "caption"
PROMPT_EMBEDS, PROMPT_MASK = "prompt_embeds", "prompt_attention_mask"
POOLED_EMBEDS = "pooled_prompt_embeds"
PROMPT_EMBEDS_2, PROMPT_MASK_2 = "prompt_embeds_2", "prompt_attention_mask_2"
AUDIO_PROMPT_EMBEDS = "audio_prompt_embeds"
TEXT_COLUMNS = (PROMPT_EMBEDS, PROMPT_MASK, POOLED_EMBEDS, PROMPT_EMBEDS_2, PROMPT_MASK_2, AUDIO_PROMPT_EMBEDS)
AUDIO = "audio"  # --audio-latents: a clip's PCM, float32 [2, n] at the source's rate (decode -> encoder)
AUDIO_RATE = "audio_rate"  # that rate in Hz (int); resampled to the VAE's on the device, never written
AUDIO_LATENTS = "audio_latents"  # [C, L, M] (pipeline.audio)
IMAGE_PREFIX = "image_"  # --image-latents: image_latents (or image_latents_mean/_logvar in dist mode)


def image_columns(latent_mode: str) -> tuple[str, ...]:
    return tuple(IMAGE_PREFIX + name for name in tensor_columns(latent_mode))


ALL_TENSOR_COLUMNS = ("latents", "latents_mean", "latents_logvar", *TEXT_COLUMNS, AUDIO_LATENTS,
                      *(IMAGE_PREFIX + c for c in ("latents", "latents_mean", "latents_logvar")))
