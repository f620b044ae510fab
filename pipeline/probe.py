"""What an input's container says about its video stream, read from the header (and one decoded
frame), for ``plan`` and for splitting long videos into spans. No clip is cut here."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from pipeline import storage
from pipeline.config import Config


@dataclass(frozen=True)
class Probe:
    frames: int  # frames the stream declares (MP4/MOV/AVI count them), else duration x rate, rounded
    exact: bool  # frames is the header's count (or an MKV's NUMBER_OF_FRAMES tag), not an estimate
    fps: float  # the stream's average rate
    start_time: float  # seconds: the first frame's presentation time
    width: int  # as displayed (rotation applied)
    height: int
    constant_rate: bool  # every frame i is at start_time + i / fps: safe to seek by frame index
    audio_rate: int | None = None  # the first audio stream's sample rate as its header says (None: no audio)


def probe(row: dict, cfg: Config) -> Probe:
    """Open one listed input (as ``decode`` does, with the same limits) and read its header.

    Raises what decoding would raise for the header's problems (empty, over a limit, no video
    stream, not a container)."""
    import av

    from pipeline import decode

    path = row.get("path") or row["source_uri"]
    size = row.get("size")
    if size is None or size < 0:
        size = storage.size(path, cfg.s3)
    if size == 0:
        raise decode.EmptyFile("the file is empty (0 bytes)")
    if size > cfg.max_bytes:
        raise decode.FileTooLarge(f"{size} bytes exceed --max-bytes {cfg.max_bytes}")
    source = storage.open_for_decode(path, cfg.s3)
    with contextlib.closing(source) if hasattr(source, "close") else contextlib.nullcontext():
        try:
            container = av.open(source, mode="r")
        except Exception as e:  # noqa: BLE001 - as decode reports it
            raise storage.read_failure(source) or decode._unreadable(e) from e
        with container:
            decode._check_container(container, cfg)
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                return Probe(0, True, 0.0, 0.0, 0, 0, False)
            turns = decode.quarter_turns(first)
            width, height = (first.height, first.width) if turns % 2 else (first.width, first.height)
            return _from_stream(stream, first, width, height, container)


def _from_stream(stream, first, width: int, height: int, container) -> Probe:
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    start = float(first.time or 0.0)
    duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    declared = int(stream.frames or 0)
    matroska = not declared and duration is None and "matroska" in (container.format.name or "")
    counted = declared
    if matroska:
        duration = _matroska_length(stream, container, start)
        counted = _whole_number(stream.metadata.get("NUMBER_OF_FRAMES"))  # mkvmerge's statistics tag
    frames = counted or (round(duration * fps) if duration and fps else 0)
    base = stream.base_rate or stream.guessed_rate
    # A count (MP4/MOV/AVI, mkvmerge's MKV) must agree with the duration at the rate. An MKV/WebM
    # without one is split on its estimate: a part that meets a frame off the rate says so
    # (decode.NotConstantRate), and the last part runs to the end of the stream, so an estimate
    # some frames off changes no clip.
    constant = bool(rate and base and rate == base and duration
                    and (abs(counted - duration * fps) <= 1 if counted else matroska))
    audio = container.streams.audio
    audio_rate = (int(audio[0].sample_rate or 0) or None) if audio else None  # no decoding: the header's
    return Probe(frames, bool(counted), fps, start, width, height, constant, audio_rate)


def _matroska_length(stream, container, start: float) -> float | None:
    """Seconds of video in an MKV/WebM: its track's DURATION tag (FFmpeg and mkvmerge write one)
    or else the segment's duration (which also covers a longer audio track), both counted
    from time 0, less the first frame's time."""
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    try:
        h, m, s = tag.split(":")
        end = int(h) * 3600 + int(m) * 60 + float(s)
    except (AttributeError, ValueError):
        end = container.duration / 1e6 if container.duration else None
    return end - start if end and end > start else None


def _whole_number(text) -> int:
    try:
        return max(0, int(text))
    except (TypeError, ValueError):
        return 0


def frames_after_resampling(p: Probe, cfg: Config) -> int:
    """Frames the clip cutter sees: the stream's, or with --fps the resampled count (a target
    every 1/fps seconds from the first frame to the last)."""
    if not cfg.fps or not p.fps or p.frames == 0:
        return p.frames
    last = (p.frames - 1) / p.fps
    return math.floor(last * cfg.fps + 1e-9) + 1


def clip_count(frames: int, cfg: Config) -> int:
    """Clips cut from ``frames`` frames: back to back, or every --clip-stride, up to --max-clips."""
    if frames < cfg.num_frames:
        return 0
    n = (frames - cfg.num_frames) // cfg.stride + 1
    return min(n, cfg.max_clips) if cfg.max_clips is not None else n
