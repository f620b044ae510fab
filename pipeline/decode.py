"""Decoding with PyAV, cutting clips and resizing them: uint8 clips in the encoder's layout.

Frames are streamed: a task holds at most one clip's frames (plus the one being built), so its
memory depends on the clip size, never on the video's length.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections import deque
from typing import Iterator

import numpy as np

from pipeline import sink, storage
from pipeline.config import Config

# swscale's bicubic widens its kernel when shrinking, so downscaling does not alias.
INTERPOLATION = "BICUBIC"


class InputRejected(Exception):
    """An input we will not encode; ``stage`` says where that was found."""

    stage = "decode"


class TooShort(InputRejected):
    """The video has fewer frames than one clip needs."""

    stage = "sample"


class EmptyFile(InputRejected):
    stage = "read"


class FileTooLarge(InputRejected):
    """Over --max-bytes."""

    stage = "read"


class TooLarge(InputRejected):
    """Frames over --max-pixels."""


class TooLong(InputRejected):
    """Over --max-duration."""


class NoVideoStream(InputRejected):
    pass


class DecodeTimeout(InputRejected):
    pass


def clip_id(source_uri: str, start_frame: int, cfg: Config) -> str:
    """A stable id from the source and every parameter that defines the clip's pixels."""
    key = json.dumps([source_uri, start_frame, cfg.num_frames, cfg.height, cfg.width, cfg.resize])
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def resize_plan(src_w: int, src_h: int, cfg: Config) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, crop x, crop y) to reach cfg's size from a displayed frame.

    crop: scale to cover the target keeping the aspect ratio, then take the centre.
    stretch: scale straight to the target.
    """
    if cfg.resize == "stretch":
        return cfg.width, cfg.height, 0, 0
    scale = max(cfg.width / src_w, cfg.height / src_h)
    w = max(cfg.width, math.ceil(src_w * scale - 1e-6))
    h = max(cfg.height, math.ceil(src_h * scale - 1e-6))
    return w, h, (w - cfg.width) // 2, (h - cfg.height) // 2


def quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that show the frame as its display matrix asks."""
    return round((frame.rotation or 0) / 90) % 4


def frame_to_rgb(frame, cfg: Config, reformatter=None) -> np.ndarray:
    """One decoded frame as uint8 [H, W, 3] at the target size, upright.

    Pass one ``VideoReformatter`` per video: it keeps its swscale context between frames, where
    ``frame.reformat`` builds a new one each time (3x slower, measured in bench/).
    """
    from av.video.reformatter import VideoReformatter

    turns = quarter_turns(frame)
    shown_w, shown_h = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
    w, h, x, y = resize_plan(shown_w, shown_h, cfg)
    coded_w, coded_h = (h, w) if turns % 2 else (w, h)
    rgb = (reformatter or VideoReformatter()).reformat(
        frame, width=coded_w, height=coded_h, format="rgb24", interpolation=INTERPOLATION).to_ndarray()
    if turns:
        rgb = np.rot90(rgb, turns)
    return rgb[y:y + cfg.height, x:x + cfg.width]


def to_clip_layout(frames) -> np.ndarray:
    """F frames [H, W, 3] -> one C-contiguous uint8 [3, F, H, W] array, the encoder's layout."""
    first = frames[0]
    out = np.empty((3, len(frames), *first.shape[:2]), dtype=np.uint8)
    for t, rgb in enumerate(frames):
        out[:, t] = rgb.transpose(2, 0, 1)
    return out


def clips_containing(i: int, cfg: Config) -> range:
    """Indices of the clips that source frame i belongs to (empty when it is in none)."""
    first = max(0, -(-(i - cfg.num_frames + 1) // cfg.stride))
    last = i // cfg.stride
    if cfg.max_clips is not None:
        last = min(last, cfg.max_clips - 1)
    return range(first, last + 1)


def _check_container(container, cfg: Config) -> None:
    """Reject what the container's header already shows to be over the limits."""
    if not container.streams.video:
        raise NoVideoStream("the file has no video stream")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > cfg.max_pixels:
        raise TooLarge(f"{w}x{h} frames exceed --max-pixels {cfg.max_pixels}")
    if container.duration is not None and container.duration / 1e6 > cfg.max_duration:
        raise TooLong(f"{container.duration / 1e6:.0f} s exceeds --max-duration {cfg.max_duration:g}")


def _check_frame(frame, deadline: float, cfg: Config) -> None:
    """Limits that only decoding shows: a stream can lie in its header or never end."""
    if frame.width * frame.height > cfg.max_pixels:
        raise TooLarge(f"{frame.width}x{frame.height} frames exceed --max-pixels {cfg.max_pixels}")
    if frame.time is not None and frame.time > cfg.max_duration:
        raise TooLong(f"the video runs past --max-duration {cfg.max_duration:g} s")
    if time.monotonic() > deadline:
        raise DecodeTimeout(f"decoding took longer than --decode-timeout {cfg.decode_timeout:g} s")


def iter_clips(container, source_uri: str, cfg: Config, skip: frozenset = frozenset()
               ) -> Iterator[tuple[str, dict | None]]:
    """Yield ``(clip_id, row)`` per clip; row is None for a clip in ``skip`` (already written).

    A row holds the clip's metadata and ``frames``, uint8 [3, F, H, W], C-contiguous.
    """
    from av.video.reformatter import VideoReformatter

    _check_container(container, cfg)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    deadline = time.monotonic() + cfg.decode_timeout
    window: deque[np.ndarray] = deque(maxlen=cfg.num_frames)
    reformatter = VideoReformatter()
    clip_index, seen = 0, 0
    for i, frame in enumerate(container.decode(stream)):
        seen = i + 1
        _check_frame(frame, deadline, cfg)
        owners = clips_containing(i, cfg)
        if not owners:
            continue
        # A frame only in clips already written needs no pixels; None keeps the window's count.
        wanted = not skip or any(clip_id(source_uri, k * cfg.stride, cfg) not in skip for k in owners)
        window.append(frame_to_rgb(frame, cfg, reformatter) if wanted else None)
        start = clip_index * cfg.stride
        if i == start + cfg.num_frames - 1:
            cid = clip_id(source_uri, start, cfg)
            row = None if cid in skip else {
                "clip_id": cid,
                "source_uri": source_uri,
                "clip_index": clip_index,
                "start_frame": start,
                "num_frames": cfg.num_frames,
                "fps": fps,
                "height": cfg.height,
                "width": cfg.width,
                "frames": to_clip_layout(window),
            }
            yield cid, row
            clip_index += 1
            if cfg.max_clips is not None and clip_index >= cfg.max_clips:
                return
    if clip_index == 0:
        raise TooShort(f"the video has {seen} frames; one clip needs {cfg.num_frames} (--num-frames)")


def decode_clips(row: dict, cfg: Config) -> Iterator[dict]:
    """Ray Data flat_map step: a listed video in, its clips out.

    A video that cannot be read or decoded, is over a limit, or is too short yields no clip and
    gets one error row in OUTPUT/errors instead; nothing escapes to fail the run. When all its
    clips are cut, a marker records their ids so a rerun can skip the whole video.
    """
    import av

    uri = row["source_uri"]
    skip = frozenset(filter(None, row.get("skip_clips", "").split(",")))
    stage, ids, opened = "read", [], False
    try:
        if row.get("size", 1) == 0:
            raise EmptyFile("the file is empty (0 bytes)")
        if row.get("size", 0) > cfg.max_bytes:
            raise FileTooLarge(f"{row['size']} bytes exceed --max-bytes {cfg.max_bytes}")
        source = storage.open_for_decode(uri, cfg.s3_endpoint)
        stage = "decode"
        with contextlib.closing(source) if hasattr(source, "close") else contextlib.nullcontext(), \
                av.open(source, mode="r") as container:
            opened = True
            for cid, clip in iter_clips(container, uri, cfg, skip):
                ids.append(cid)
                if clip is not None:
                    yield clip
    except Exception as e:  # noqa: BLE001 - any failure of one input is data, not a crash
        stage = getattr(e, "stage", stage)
        message = str(e) or type(e).__name__
        if stage == "decode" and not opened:
            message = f"not a readable video container (truncated, missing its index, or not a video): {message}"
        if ids:
            message = f"stopped after {len(ids)} clip(s): {message}"
        sink.write_errors(cfg, [sink.error_row(uri, stage, type(e).__name__, message)])
        return
    sink.write_marker(cfg, uri, ids)
