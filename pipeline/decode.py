"""Decoding with PyAV, cutting clips and resizing them: uint8 clips in the encoder's layout.

Frames are streamed: a task holds at most one clip's frames (plus the one being built), so its
memory depends on the clip size, never on the video's length.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections import deque
from typing import Iterator

import numpy as np

from pipeline import sink, storage
from pipeline.config import Config

# swscale's bicubic widens its kernel when shrinking, so downscaling does not alias.
INTERPOLATION = "BICUBIC"


class TooShort(Exception):
    """The video has fewer frames than one clip needs."""


class NoVideoStream(Exception):
    """The container holds no video stream."""


def clip_id(source_uri: str, start_frame: int, cfg: Config) -> str:
    """A stable id from the source and every parameter that defines the clip's pixels."""
    key = json.dumps([source_uri, start_frame, cfg.num_frames, cfg.height, cfg.width, cfg.resize])
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def resize_plan(src_w: int, src_h: int, cfg: Config) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, crop x, crop y) to reach cfg's size.

    crop: scale to cover the target keeping the aspect ratio, then take the centre.
    stretch: scale straight to the target.
    """
    if cfg.resize == "stretch":
        return cfg.width, cfg.height, 0, 0
    scale = max(cfg.width / src_w, cfg.height / src_h)
    w = max(cfg.width, math.ceil(src_w * scale - 1e-6))
    h = max(cfg.height, math.ceil(src_h * scale - 1e-6))
    return w, h, (w - cfg.width) // 2, (h - cfg.height) // 2


def frame_to_rgb(frame, plan: tuple[int, int, int, int], cfg: Config) -> np.ndarray:
    """One decoded frame as uint8 [H, W, 3] at the target size (a view into the scaled frame)."""
    w, h, x, y = plan
    rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation=INTERPOLATION).to_ndarray()
    return rgb[y:y + cfg.height, x:x + cfg.width]


def to_clip_layout(frames) -> np.ndarray:
    """F frames [H, W, 3] -> one C-contiguous uint8 [3, F, H, W] array, the encoder's layout."""
    first = frames[0]
    out = np.empty((3, len(frames), *first.shape[:2]), dtype=np.uint8)
    for t, rgb in enumerate(frames):
        out[:, t] = rgb.transpose(2, 0, 1)
    return out


def _needed(i: int, cfg: Config) -> bool:
    """Whether source frame i falls inside some clip we will emit."""
    last_start = i // cfg.stride  # the latest clip starting at or before frame i
    if cfg.max_clips is not None:
        last_start = min(last_start, cfg.max_clips - 1)
    return i < last_start * cfg.stride + cfg.num_frames


def iter_clips(container, source_uri: str, cfg: Config) -> Iterator[dict]:
    """Yield one row per clip: metadata plus ``frames``, uint8 [3, F, H, W], C-contiguous."""
    if not container.streams.video:
        raise NoVideoStream("the file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    window: deque[np.ndarray] = deque(maxlen=cfg.num_frames)
    plan, clip_index, seen = None, 0, 0
    for i, frame in enumerate(container.decode(stream)):
        seen = i + 1
        if not _needed(i, cfg):
            continue
        plan = plan or resize_plan(frame.width, frame.height, cfg)
        window.append(frame_to_rgb(frame, plan, cfg))
        start = i - cfg.num_frames + 1
        if start == clip_index * cfg.stride:
            yield {
                "clip_id": clip_id(source_uri, start, cfg),
                "source_uri": source_uri,
                "clip_index": clip_index,
                "start_frame": start,
                "num_frames": cfg.num_frames,
                "fps": fps,
                "height": cfg.height,
                "width": cfg.width,
                "frames": to_clip_layout(window),
            }
            clip_index += 1
            if cfg.max_clips is not None and clip_index >= cfg.max_clips:
                return
    if clip_index == 0:
        raise TooShort(f"the video has {seen} frames; one clip needs {cfg.num_frames} (--num-frames)")


def decode_clips(row: dict, cfg: Config) -> Iterator[dict]:
    """Ray Data flat_map step: a listed video in, its clips out.

    A video that cannot be read or decoded, or is too short, yields no clip and gets an error
    row in OUTPUT/errors instead; nothing escapes to fail the run.
    """
    import av

    uri = row["source_uri"]
    stage, emitted = "read", 0
    try:
        source = storage.open_for_decode(uri, cfg.s3_endpoint)
        stage = "decode"
        with contextlib.closing(source) if hasattr(source, "close") else contextlib.nullcontext(), \
                av.open(source, mode="r") as container:
            for clip in iter_clips(container, uri, cfg):
                emitted += 1
                yield clip
    except TooShort as e:
        sink.write_errors(cfg, [sink.error_row(uri, "sample", "TooShort", str(e))])
    except Exception as e:  # noqa: BLE001 - any failure of one input is data, not a crash
        message = str(e) or type(e).__name__
        if emitted:
            message = f"stopped after {emitted} clip(s): {message}"
        sink.write_errors(cfg, [sink.error_row(uri, stage, type(e).__name__, message)])
