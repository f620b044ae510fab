"""Decoding with PyAV, cutting clips and resizing them: uint8 clips in the encoder's layout.

Frames are streamed: a task holds at most one clip's frames (plus the one being built), so its
memory depends on the clip size, never on the video's length.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
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
    key = [source_uri, start_frame, cfg.num_frames, cfg.height, cfg.width, cfg.resize]
    if cfg.fps:  # ids made before --fps existed stay the same
        key.append(cfg.fps)
    key = json.dumps(key)
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


def choose_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is nearest the frame's (in log ratio)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(aspect - math.log(b[1] / b[0])), b))


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


def _decoded(container, stream, cfg: Config, span) -> Iterator:
    """Decoded frames in order, each checked against the limits, kept to the time span
    [start_sec, end_sec) when one is given (seeking to its start, not decoding up to it)."""
    begin, end = span
    deadline = time.monotonic() + cfg.decode_timeout
    if begin:
        container.seek(int(begin / stream.time_base), stream=stream, backward=True, any_frame=False)
    for frame in container.decode(stream):
        _check_frame(frame, deadline, cfg)
        t = frame.time
        if t is not None and begin is not None and t < begin - 1e-6:
            continue
        if t is not None and end is not None and t >= end - 1e-6:
            return
        yield frame


def resample(frames, fps: float) -> Iterator:
    """Frames at ``fps``: for each target time, the decoded frame nearest to it, the earlier on a
    tie (frames repeat when upsampling and are dropped when downsampling). Starts at the first
    frame's time."""
    step, target, prev = 1.0 / fps, None, None
    for frame in frames:
        if frame.time is None:
            raise NoVideoStream("--fps needs frame timestamps, and this stream has none")
        if prev is None:
            target = frame.time
        else:
            midpoint = (prev.time + frame.time) / 2
            while target <= midpoint + 1e-9:  # a tie goes to the earlier frame
                yield prev
                target += step
        prev = frame
    while prev is not None and target <= prev.time + 1e-9:
        yield prev
        target += step


def iter_clips(container, source_uri: str, cfg: Config, skip: frozenset = frozenset(),
               span: tuple[float | None, float | None] = (None, None)) -> Iterator[tuple[str, dict | None]]:
    """Yield ``(clip_id, row)`` per clip; row is None for a clip in ``skip`` (already written).

    A row holds the clip's metadata and ``frames``, uint8 [3, F, H, W], C-contiguous. With a
    time span (a manifest's start_sec/end_sec), the one clip starts at the span's first frame.
    Frame indices count the frames after ``--fps`` resampling, from the start of the video.
    """
    from av.video.reformatter import VideoReformatter

    _check_container(container, cfg)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    fps = cfg.fps or (float(rate) if rate else 0.0)
    if span != (None, None):
        cfg = cfg.replace(max_clips=1)
    frames = _decoded(container, stream, cfg, span)
    if cfg.fps:
        frames = resample(frames, cfg.fps)
    if cfg.buckets:  # the shape is chosen per video, from its first frame as displayed
        first = next(frames, None)
        if first is not None:
            turns = quarter_turns(first)
            shown = (first.height, first.width) if turns % 2 else (first.width, first.height)
            height, width = choose_bucket(*shown, cfg.buckets)
            cfg = cfg.replace(height=height, width=width)
            frames = itertools.chain([first], frames)
    recent: deque[np.ndarray] = deque(maxlen=cfg.num_frames)
    reformatter = VideoReformatter()
    clip_index, seen, offset = 0, 0, None
    for i, frame in enumerate(frames):
        seen = i + 1
        if offset is None:  # the first frame's index in the video, at the output frame rate
            offset = round(frame.time * fps) if frame.time and fps else 0
        owners = clips_containing(i, cfg)
        if not owners:
            continue
        # A frame only in clips already written needs no pixels; None keeps the window's count.
        wanted = not skip or any(clip_id(source_uri, offset + k * cfg.stride, cfg) not in skip
                                 for k in owners)
        recent.append(frame_to_rgb(frame, cfg, reformatter) if wanted else None)
        start = clip_index * cfg.stride
        if i == start + cfg.num_frames - 1:
            cid = clip_id(source_uri, offset + start, cfg)
            row = None if cid in skip else {
                "clip_id": cid,
                "source_uri": source_uri,
                "clip_index": clip_index,
                "start_frame": offset + start,
                "num_frames": cfg.num_frames,
                "fps": fps,
                "height": cfg.height,
                "width": cfg.width,
                "frames": to_clip_layout(recent),
            }
            yield cid, row
            clip_index += 1
            if cfg.max_clips is not None and clip_index >= cfg.max_clips:
                return
    if clip_index == 0:
        where = "" if span == (None, None) else f" between {span[0] or 0:g} s and {span[1] or 'the end'} s"
        raise TooShort(f"the video has {seen} frames{where}"
                       f"{f' at {cfg.fps:g} fps' if cfg.fps else ''}; one clip needs {cfg.num_frames} "
                       "(--num-frames)")


def decode_clips(row: dict, cfg: Config) -> Iterator[dict]:
    """Ray Data flat_map step: a listed video in, its clips out.

    A video that cannot be read or decoded, is over a limit, or is too short yields no clip and
    gets one error row in OUTPUT/errors instead; nothing escapes to fail the run. When all its
    clips are cut, a marker records their ids so a rerun can skip the whole video.
    """
    import av

    uri = row["source_uri"]  # for a manifest row with a time span: path#t=start,end
    path = row.get("path") or uri
    span = (row.get("start_sec"), row.get("end_sec"))
    skip = frozenset(filter(None, row.get("skip_clips", "").split(",")))
    stage, ids, opened = "read", [], False
    try:
        size = row.get("size")
        if size is None or size < 0:  # a manifest gives no size: ask the store
            size = storage.size(path, cfg.s3_endpoint)
        if size == 0:
            raise EmptyFile("the file is empty (0 bytes)")
        if size > cfg.max_bytes:
            raise FileTooLarge(f"{size} bytes exceed --max-bytes {cfg.max_bytes}")
        source = storage.open_for_decode(path, cfg.s3_endpoint)
        stage = "decode"
        with contextlib.closing(source) if hasattr(source, "close") else contextlib.nullcontext(), \
                av.open(source, mode="r") as container:
            opened = True
            for cid, clip in iter_clips(container, uri, cfg, skip, span):
                ids.append(cid)
                if clip is not None:
                    if "extra" in row:  # a manifest's own columns, carried to the output row
                        clip["extra"] = row["extra"]
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
