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

from pipeline import failures, hooks, layout, scenes, sink, storage, text
from pipeline.config import Config
from pipeline.failures import InputError
from pipeline.schema import AUDIO, AUDIO_RATE, CAPTION, INPUT, TRANSIENT

# swscale's bicubic widens its kernel when shrinking, so downscaling does not alias.
INTERPOLATION = "BICUBIC"
# An input whose reads keep failing for the store's or the network's reasons (after the S3
# client's own retries) is tried this many more times, from where it stopped, before it gets a
# retryable error row.
TRANSIENT_RETRIES = 2
TRANSIENT_BACKOFF_S = 2.0  # doubled at each retry


AUDIO_START = "audio_start"  # a clip's first frame's time, read by _input_clips for its audio


class InputRejected(InputError):
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


class Truncated(InputRejected):
    """The stream ends before its header says it should."""


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


# When scaling a frame to cover the target would make it more than this many times the target's
# area (a very wide or very tall source), the crop is cut in source coordinates first, so that
# memory and work follow the target's size, not the source's aspect ratio.
CROP_FIRST_AREA = 2.0


class Resizer:
    """Turns decoded frames into uint8 [H, W, 3] at the target size, upright. One per video: it
    keeps its swscale contexts between frames, where ``frame.reformat`` builds a new one each
    time (3x slower, measured in bench/)."""

    def __init__(self):
        from av.video.reformatter import VideoReformatter

        self.scale, self.rescale = VideoReformatter(), VideoReformatter()

    def __call__(self, frame, cfg: Config) -> np.ndarray:
        turns = quarter_turns(frame)
        shown_w, shown_h = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
        w, h, x, y = resize_plan(shown_w, shown_h, cfg)
        if w * h > CROP_FIRST_AREA * cfg.width * cfg.height:
            return self._crop_then_scale(frame, turns, shown_w, shown_h, cfg)
        coded_w, coded_h = (h, w) if turns % 2 else (w, h)
        rgb = self.scale.reformat(frame, width=coded_w, height=coded_h, format="rgb24",
                                  interpolation=INTERPOLATION).to_ndarray()
        if turns:
            rgb = np.rot90(rgb, turns)
        # A copy of the crop: a view would keep the whole scaled frame alive while the clip fills.
        return np.ascontiguousarray(rgb[y:y + cfg.height, x:x + cfg.width])

    def _crop_then_scale(self, frame, turns: int, shown_w: int, shown_h: int, cfg: Config) -> np.ndarray:
        import av

        scale = max(cfg.width / shown_w, cfg.height / shown_h)
        crop_w, crop_h = min(shown_w, max(1, round(cfg.width / scale))), min(shown_h, max(1, round(cfg.height / scale)))
        x, y = (shown_w - crop_w) // 2, (shown_h - crop_h) // 2
        rgb = self.scale.reformat(frame, format="rgb24").to_ndarray()  # source size: under --max-pixels
        if turns:
            rgb = np.rot90(rgb, turns)
        crop = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[y:y + crop_h, x:x + crop_w]), format="rgb24")
        return self.rescale.reformat(crop, width=cfg.width, height=cfg.height, format="rgb24",
                                     interpolation=INTERPOLATION).to_ndarray()


def frame_to_rgb(frame, cfg: Config, resizer: Resizer | None = None) -> np.ndarray:
    """One decoded frame as uint8 [H, W, 3] at the target size, upright (pass one Resizer per
    video)."""
    return (resizer or Resizer())(frame, cfg)


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


class UnsupportedCodec(InputRejected):
    """FFmpeg has no decoder for the video stream's codec (the node's FFmpeg is whole)."""


# Decoders that every FFmpeg build we run on has (PyAV's wheels, distributions' FFmpeg): a node
# whose FFmpeg lacks one has a broken image, and the inputs it cannot decode are not at fault.
MAINSTREAM_DECODERS = ("h264", "hevc", "vp8", "vp9", "mpeg4", "mjpeg")


def missing_decoders(names=MAINSTREAM_DECODERS) -> list[str]:
    """The mainstream decoders this node's FFmpeg lacks."""
    import av

    missing = []
    for name in names:
        try:
            av.Codec(name, "r")
        except Exception:  # noqa: BLE001 - PyAV's UnknownCodecError, whatever its module
            missing.append(name)
    return missing


def _check_container(container, cfg: Config) -> None:
    """Reject what the container's header already shows to be over the limits."""
    if not container.streams.video:
        raise NoVideoStream("the file has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # FFmpeg found no decoder for the stream's codec
        missing = missing_decoders()
        if missing:
            raise failures.SystemicFailure(
                f"this node's FFmpeg has no {', '.join(missing)} decoder: its image is broken (every "
                "input in those codecs would fail there); install a complete FFmpeg/PyAV on it")
        raise UnsupportedCodec("FFmpeg has no decoder for this video stream's codec")
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > cfg.max_pixels:
        raise TooLarge(f"{w}x{h} frames exceed --max-pixels {cfg.max_pixels}")
    if container.duration is not None and container.duration / 1e6 > cfg.max_duration:
        raise TooLong(f"{container.duration / 1e6:.0f} s exceeds --max-duration {cfg.max_duration:g}")


class DecodeClock:
    """Seconds spent decoding one input (or part), for ``--decode-timeout``: it runs only while
    the decode step works, from the moment its consumer asks for the next clip until it hands
    the clip over. While the generator is paused (Ray Data's backpressure when the encoders are
    the bottleneck, GPU nodes still booting) or sleeping before a retry, it stands still: a slow
    consumer never fails an input."""

    def __init__(self, limit: float):
        self.limit = limit
        self.spent = 0.0
        self.since: float | None = time.monotonic()

    def stop(self) -> None:
        if self.since is not None:
            self.spent += time.monotonic() - self.since
            self.since = None

    def start(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def check(self) -> None:
        spent = self.spent + (time.monotonic() - self.since if self.since is not None else 0.0)
        if spent > self.limit:
            raise DecodeTimeout(f"decoding took longer than --decode-timeout {self.limit:g} s "
                                "(time spent decoding this input, waits for the encoders excluded)")


def _check_frame(frame, clock: DecodeClock, cfg: Config) -> None:
    """Limits that only decoding shows: a stream can lie in its header or never end."""
    if frame.width * frame.height > cfg.max_pixels:
        raise TooLarge(f"{frame.width}x{frame.height} frames exceed --max-pixels {cfg.max_pixels}")
    if frame.time is not None and frame.time > cfg.max_duration:
        raise TooLong(f"the video runs past --max-duration {cfg.max_duration:g} s")
    clock.check()


def _decoded(container, stream, cfg: Config, span, clock: DecodeClock) -> Iterator:
    """Decoded frames in order, each checked against the limits, kept to the time span
    [start_sec, end_sec) when one is given (seeking to its start, not decoding up to it)."""
    begin, end = span
    if begin:
        container.seek(int(begin / stream.time_base), stream=stream, backward=True, any_frame=False)
    decoded, last_time = 0, None
    for frame in container.decode(stream):
        _check_frame(frame, clock, cfg)
        decoded, last_time = decoded + 1, frame.time
        t = frame.time
        if t is not None and begin is not None and t < begin - 1e-6:
            continue
        if t is not None and end is not None and t >= end - 1e-6:
            return
        yield frame
    if span == (None, None):
        _check_complete(stream, decoded, last_time)


def _check_complete(stream, decoded: int, last_time: float | None) -> None:
    """FFmpeg ends a truncated file's stream quietly, as if the video were shorter: compare
    with what the header declares, the video stream's frame count (MP4, MOV) or else its
    duration, so that the missing part is reported, not dropped."""
    declared = stream.frames or 0
    if declared and declared - decoded > max(2, declared // 50):
        raise Truncated(f"the stream ends after {decoded} of the {declared} frames its header "
                        "declares (the file is truncated or damaged)")
    if not declared and stream.duration and stream.time_base and last_time is not None:
        length = float(stream.duration * stream.time_base)
        if length - last_time > max(1.0, 0.05 * length):
            raise Truncated(f"the stream ends at {last_time:.2f} s of the {length:.2f} s its header "
                            "declares (the file is truncated or damaged)")


def _part_frames(container, stream, cfg: Config, first_frame: int, t0: float, fps: float,
                 clock: DecodeClock) -> Iterator:
    """The frames of a split video from index ``first_frame`` on, found by time (the stream's
    rate is constant: frame i is at t0 + i / fps), checked against the limits. Where the
    stream ends, the whole decode's check of its length against the header's holds."""
    packets = _packets_from_keyframe_before(container, stream, first_frame, t0, fps)
    expected, last_index, last_time = first_frame, -1, None
    for frame in (frame for packet in packets for frame in packet.decode()):
        _check_frame(frame, clock, cfg)
        index = round((frame.time - t0) * fps) if frame.time is not None else expected
        last_index, last_time = index, frame.time
        if index < first_frame:
            continue
        if index != expected:
            raise NotConstantRate(f"frame {expected} is missing where the video was split (its header "
                                  "declared a constant frame rate)")
        expected += 1
        yield frame
    _check_complete(stream, last_index + 1, last_time)


# Seeks back past keyframes displayed after a part's first frame (open GOPs): one is the norm.
SEEK_BACK_LIMIT = 8


def _packets_from_keyframe_before(container, stream, first_frame: int, t0: float, fps: float) -> Iterator:
    """The stream's packets from a keyframe displayed at or before frame ``first_frame`` on.

    A seek by time finds a keyframe by its decode time. In an open GOP (x264's open-gop, most
    HEVC) the B-frames just before a keyframe in display order follow it in the file and
    reference the GOP before it: decoded from that keyframe, FFmpeg drops them. So when the
    keyframe found is displayed after the part's first frame, seek again, before it."""
    ts, landed = int((t0 + (first_frame - 0.5) / fps) / stream.time_base), None
    for _ in range(SEEK_BACK_LIMIT):
        container.seek(ts, stream=stream, backward=True, any_frame=False)
        packets = container.demux(stream)
        first = next(packets, None)
        if first is None or first.pts is None or first.dts is None or first.dts == landed \
                or round((float(first.pts * stream.time_base) - t0) * fps) <= first_frame:
            break  # displayed in time, or no earlier keyframe to go to
        packets.close()
        ts, landed = first.dts - 1, first.dts
    return itertools.chain([first] if first is not None else [], packets)


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


def decode_threads() -> int:
    """FFmpeg's threads: the CPUs Ray gave this task (--decode-cpus), so that parallel decode
    tasks do not each start a thread per core of the node; outside Ray, FFmpeg's own choice (0)."""
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001 - not in a Ray task: let FFmpeg decide
        pass
    return 0


class NotConstantRate(InputRejected):
    """A part of a split video found frames off the constant rate its header declared."""


def iter_clips(container, source_uri: str, cfg: Config, skip: frozenset = frozenset(),
               span: tuple[float | None, float | None] = (None, None),
               part: tuple[int, int, float] | None = None,
               clock: DecodeClock | None = None, shots: list | None = None) -> Iterator[tuple[str, dict | None]]:
    """Yield ``(clip_id, row)`` per clip; row is None for a clip in ``skip`` (already written).

    A row holds the clip's metadata and ``frames``, uint8 [3, F, H, W], C-contiguous. With a
    time span (a manifest's start_sec/end_sec), the one clip starts at the span's first frame.
    With a part ``(first clip, clips, first frame's time)`` of a split video, only those clips,
    seeking to the first one's first frame: the same ids and pixels as decoding the video whole.
    The last part (clips None) runs to the end of the stream, as a whole decode does, whatever
    the header's count; a part the stream ends in reports what the whole decode would.
    Frame indices count the frames after ``--fps`` resampling, from the start of the video.
    ``clock`` counts the time against ``--decode-timeout`` (by default, from now on).
    With ``--split-scenes``, clips are cut within shots (``_clips_in_shots``), and the length of
    each shot that starts in the video (or part) is appended to ``shots``.
    """
    clock = clock or DecodeClock(cfg.decode_timeout)
    _check_container(container, cfg)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = decode_threads()
    rate = stream.average_rate or stream.guessed_rate
    fps = cfg.fps or (float(rate) if rate else 0.0)
    if span != (None, None):
        cfg = cfg.replace(max_clips=1)
    first_clip, last_clip = 0, cfg.max_clips
    detector = scenes.ShotDetector(cfg.scene_threshold, cfg.min_shot_frames) if cfg.split_scenes else None
    lookback = 0
    if part is not None:
        first_clip, last_clip = part[0], cfg.max_clips if part[1] is None else part[0] + part[1]
        # The frames before the part that decide whether a shot starts at its first frames.
        lookback = min(detector.lookback, first_clip * cfg.stride) if detector else 0
        frames = _part_frames(container, stream, cfg, first_clip * cfg.stride - lookback, part[2], fps, clock)
    else:
        frames = _decoded(container, stream, cfg, span, clock)
    if cfg.fps:
        frames = resample(frames, cfg.fps)
    frames, cfg = _in_bucket(frames, cfg)
    first_frame = first_clip * cfg.stride
    offset = None
    if part is not None:  # as the whole video's first frame sets it (a negative time counts as 0)
        offset = max(0, round(part[2] * fps)) if part[2] and fps else 0
    if detector is not None:
        end = None if part is None or part[1] is None else (first_clip + part[1]) * cfg.stride
        seen = yield from _clips_in_shots(frames, source_uri, cfg, skip, detector, first_frame - lookback,
                                          first_frame, end, offset, fps, span != (None, None),
                                          shots if shots is not None else [])
        if part is None and seen < cfg.num_frames:
            _too_short(seen, span, cfg)
        return
    recent: deque[np.ndarray] = deque(maxlen=cfg.num_frames)
    times: deque[float | None] = deque(maxlen=cfg.num_frames)  # for --audio-latents: where a clip starts
    resizer = Resizer()
    clip_index, seen = first_clip, 0
    for i, frame in enumerate(frames, start=first_frame):
        seen = i + 1
        if offset is None:  # the first frame's index in the video, at the output frame rate; a stream
            # whose first frame has a negative time (an edit list, B-frame delay) starts at 0
            offset = max(0, round(frame.time * fps)) if frame.time and fps else 0
        owners = clips_containing(i, cfg)
        if not owners:
            continue
        # A frame only in clips already written needs no pixels; None keeps the window's count.
        wanted = not skip or any(clip_id(source_uri, offset + k * cfg.stride, cfg) not in skip
                                 for k in owners)
        recent.append(resizer(frame, cfg) if wanted else None)
        times.append(frame.time)
        start = clip_index * cfg.stride
        if i == start + cfg.num_frames - 1:
            cid = clip_id(source_uri, offset + start, cfg)
            yield cid, None if cid in skip else _clip_row(cid, source_uri, clip_index, offset + start, fps, cfg,
                                                          recent, times[0])
            clip_index += 1
            if last_clip is not None and clip_index >= last_clip:
                return
    if clip_index == 0 and part is None:
        _too_short(seen, span, cfg)


def _in_bucket(frames, cfg: Config):
    """With --buckets, the config at the size chosen for this video, from its first frame as
    displayed; the frames unchanged."""
    if not cfg.buckets:
        return frames, cfg
    first = next(frames, None)
    if first is None:
        return iter(()), cfg
    turns = quarter_turns(first)
    shown = (first.height, first.width) if turns % 2 else (first.width, first.height)
    height, width = choose_bucket(*shown, cfg.buckets)
    return itertools.chain([first], frames), cfg.replace(height=height, width=width)


def _clip_row(cid: str, source_uri: str, clip_index: int, start_frame: int, fps: float, cfg: Config,
              frames, start_time: float | None = None) -> dict:
    """A clip's row; with --audio-latents, the time its audio starts (its first frame's)."""
    row = {"clip_id": cid, "source_uri": source_uri, "clip_index": clip_index, "start_frame": start_frame,
           "num_frames": cfg.num_frames, "fps": fps, "height": cfg.height, "width": cfg.width,
           "frames": to_clip_layout(frames)}
    if cfg.audio_latents:
        row[AUDIO_START] = start_time if start_time is not None else (start_frame / fps if fps else 0.0)
    return row


def _too_short(seen: int, span, cfg: Config):
    where = "" if span == (None, None) else f" between {span[0] or 0:g} s and {span[1] or 'the end'} s"
    raise TooShort(f"the video has {seen} frames{where}"
                   f"{f' at {cfg.fps:g} fps' if cfg.fps else ''}; one clip needs {cfg.num_frames} "
                   "(--num-frames)")


def shot_block(cfg: Config) -> int:
    """Frames between the starts of a long video's parts (0: never split). With --split-scenes a
    shot also starts at each multiple, so that a part is clipped alone exactly as the whole
    video is (a part cannot know where a shot that began before it began)."""
    return cfg.clips_per_task * cfg.stride


def shot_lengths(container, cfg: Config, clock: DecodeClock | None = None) -> list[int]:
    """The shots of a whole video as ``--split-scenes`` cuts them (cuts, and a shot start at each
    multiple of ``shot_block``), in frames: for ``plan``, which cuts no clip."""
    _check_container(container, cfg)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    frames = _decoded(container, stream, cfg, (None, None), clock or DecodeClock(cfg.decode_timeout))
    if cfg.fps:
        frames = resample(frames, cfg.fps)
    frames, cfg = _in_bucket(frames, cfg)
    detector = scenes.ShotDetector(cfg.scene_threshold, cfg.min_shot_frames)
    block, starts, seen = shot_block(cfg), [], 0
    resizer = Resizer()
    for i, _frame, cut in detector.shots(enumerate(frames), picture=lambda frame: resizer(frame, cfg)):
        seen = i + 1
        if cut or i == 0 or (block and i % block == 0):
            starts.append(i)
    return [b - a for a, b in zip(starts, starts[1:] + [seen])]


def _clips_in_shots(frames, source_uri: str, cfg: Config, skip: frozenset, detector, first: int, own: int,
                    end: int | None, offset: int | None, fps: float, one_clip: bool, shots: list):
    """The clips of frames ``first``, ``first + 1``, ... that lie within one shot each and start
    at or after frame ``own`` (before ``end``, when given; frames before ``own``, and the
    detector's lookahead after ``end``, only feed the detector). A shot starts at each cut the
    detector finds and at each multiple of ``shot_block``; its clips start at its first frame,
    every stride, up to --max-clips, and end before the next shot starts. ``clip_index`` counts
    clips within the shot, ``scene_index`` shots within the block. Appends each shot's length
    to ``shots``; returns the frames seen."""
    block = shot_block(cfg)
    resizer = Resizer()
    recent: deque = deque(maxlen=cfg.num_frames)
    times: deque = deque(maxlen=cfg.num_frames)  # for --audio-latents: where a clip starts
    shot_start = scene_index = None
    seen = first
    indexed = enumerate(frames, start=first)
    if end is not None:  # the part's last frames are decided on the frames after them
        indexed = itertools.takewhile(lambda pair: pair[0] < end + detector.lookahead, indexed)
    # Shots are found on the pictures the clips are made of (every frame is resized, even one in
    # no clip or in clips already written: the detector needs it), sampled to about 64 wide.
    resized = ((i, (frame, resizer(frame, cfg))) for i, frame in indexed)
    for i, (frame, rgb), cut in detector.shots(resized, picture=lambda pair: pair[1]):
        if end is not None and i >= end:
            break
        seen = i + 1
        if offset is None:  # a negative first-frame time counts as 0, as in iter_clips
            offset = max(0, round(frame.time * fps)) if frame.time and fps else 0
        if i < own:
            continue
        if shot_start is None or cut or (block and i % block == 0):
            if shot_start is not None:
                shots.append(i - shot_start)
            new_block = shot_start is None or (block and i % block == 0)
            scene_index = 0 if new_block else scene_index + 1
            shot_start = i
            recent.clear()
            times.clear()
        # The starts of the shot's clips that hold frame i: every stride from the shot's first frame.
        latest = shot_start + (i - shot_start) // cfg.stride * cfg.stride
        starts = [s for s in range(latest, max(shot_start, i - cfg.num_frames + 1) - 1, -cfg.stride)
                  if cfg.max_clips is None or (s - shot_start) // cfg.stride < cfg.max_clips]
        recent.append(rgb)
        times.append(frame.time)
        start = i - cfg.num_frames + 1
        if start in starts:
            cid = clip_id(source_uri, offset + start, cfg)
            row = None
            if cid not in skip:
                row = _clip_row(cid, source_uri, (start - shot_start) // cfg.stride, offset + start, fps, cfg, recent,
                                times[0])
                row.update(scene_index=scene_index, scene_start_frame=offset + shot_start)
            yield cid, row
            if one_clip:
                break
    if shot_start is not None:
        shots.append(seen - shot_start)
    return seen


# Ray Data retries a task whose worker process died (FFmpeg segfaulted or aborted, the OOM
# killer took it) without limit. A unit of work whose decoding process died this many times on
# nodes that are still alive gets one final error row instead of another try.
WORKER_CRASHES_TO_FAIL = 3


class WorkerCrashed(InputRejected):
    """The process decoding this input died, again and again, on nodes that stayed up."""


def decode_clips(row: dict, cfg: Config, ledger=None) -> Iterator[dict]:
    """Ray Data flat_map step: a listed input in, its clips out.

    An input that cannot be read or decoded, is over a limit, or is too short yields no more
    clips and gets one error row instead, its class decided by ``pipeline.failures``: the
    store's and the network's faults are first retried here, from where the input stopped.
    When all its clips are cut, a marker records their ids so a rerun can skip the input. A row
    can be one part of a long input (pipeline.spans): then all this holds for the part. An
    input whose decoding process keeps dying gets a ``WorkerCrashed`` row. Systemic failures
    escape and stop the run.
    """
    uri = row["source_uri"]  # for a manifest row with a time span: path#t=start,end
    part, parts = row.get("part"), row.get("parts")
    unit = layout.unit_key(uri, part)
    crashes = _earlier_crashes(ledger, unit)
    if crashes >= WORKER_CRASHES_TO_FAIL:
        _record_error(cfg, ledger, unit, _error_row(row, WorkerCrashed(
            f"the process decoding it died {crashes} times on nodes that stayed up (FFmpeg crashed or "
            "aborted on it, or the worker was killed for memory: see those workers' Ray logs)"), INPUT, []))
        return
    hooks.reach("decode", f"{uri} part={part}")
    skip = frozenset(filter(None, (row.get("skip_clips") or "").split(",")))
    cut: dict[str, None] = {}  # the ids of the clips cut so far, in order, across attempts
    clock = DecodeClock(cfg.decode_timeout)  # across attempts: seconds of decoding per input or part
    for attempt in itertools.count():
        shots: list[int] = []  # --split-scenes: each attempt finds them all again
        try:
            for cid, clip in _input_clips(row, cfg, skip.union(cut), clock, shots):
                cut[cid] = None
                if clip is not None:
                    clock.stop()  # paused here for as long as the consumer does not pull
                    yield clip
                    hooks.reach("decode-resumed", uri)
                    clock.start()
            break
        except Exception as e:  # noqa: BLE001 - classified: data, a retry, or the run's failure
            error_class = failures.classify(e)
            if error_class == failures.SYSTEMIC:
                if ledger is not None:
                    import ray

                    ray.get(ledger.systemic.remote(failures.systemic_cause("decoding", e)))
                raise
            if error_class == TRANSIENT and attempt < TRANSIENT_RETRIES:
                clock.stop()
                time.sleep(TRANSIENT_BACKOFF_S * 2 ** attempt)
                clock.start()
                continue
            _record_error(cfg, ledger, unit, _error_row(row, e, error_class, list(cut)))
            return
    sink.write_marker(cfg, uri, list(cut), part, parts, shots if cfg.split_scenes else None)
    hooks.reach("marker")
    _report(ledger, None, unit)


def _record_error(cfg: Config, ledger, unit: str, error: dict) -> None:
    sink.write_error(cfg, error)
    hooks.reach("decode-error")
    _report(ledger, f"{error['stage']}/{error['error_type']}", unit)


def _earlier_crashes(ledger, unit: str) -> int:
    """How many earlier attempts at this unit, in this run, ended with their process dead on a
    node that is still alive (the ledger counts attempts that began and recorded no outcome)."""
    if ledger is None:
        return 0
    import ray

    earlier = ray.get(ledger.decode_attempt.remote(unit, ray.get_runtime_context().get_node_id()))
    if not earlier:
        return 0
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    return sum(node in alive for node in earlier)


def _input_clips(row: dict, cfg: Config, skip: frozenset, clock: DecodeClock | None = None,
                 shots: list | None = None) -> Iterator[tuple[str, dict | None]]:
    """Open one input (checking its size first) and cut its clips, as ``iter_clips`` does.

    A read failure is raised as itself even when FFmpeg took it for the end of the stream."""
    import av

    uri = row["source_uri"]
    path = row.get("path") or uri
    span = (row.get("start_sec"), row.get("end_sec"))
    part = None if row.get("part") is None else (row["part_first_clip"], row["part_clips"], row["part_t0"])
    try:
        size = row.get("size")
        if size is None or size < 0:  # a manifest gives no size: ask the store
            size = storage.size(path, cfg.s3)
        if size == 0:
            raise EmptyFile("the file is empty (0 bytes)")
        if size > cfg.max_bytes:
            raise FileTooLarge(f"{size} bytes exceed --max-bytes {cfg.max_bytes}")
        caption = text.caption_for(row, cfg) if cfg.text_embeddings else None
        source = storage.open_for_decode(path, cfg.s3)
    except Exception as e:
        if not hasattr(e, "stage"):
            e.stage = "read"  # found before any byte was decoded
        raise
    try:
        with contextlib.closing(source) if hasattr(source, "close") else contextlib.nullcontext():
            try:
                container = av.open(source, mode="r")
            except Exception as e:  # noqa: BLE001 - re-raised with what it means
                raise storage.read_failure(source) or _unreadable(e) from e
            with container, _audio_track(container, path, cfg, span, part) as audio:
                hooks.reach("decoding", uri)
                for cid, clip in iter_clips(container, uri, cfg, skip, span, part, clock, shots):
                    if clip is not None and audio is not None:
                        clip[AUDIO], clip[AUDIO_RATE] = audio.take(clip.pop(AUDIO_START), cfg.num_frames,
                                                                   clip["fps"])
                    if clip is not None and row.get("extra") is not None:  # a manifest's own columns
                        clip["extra"] = row["extra"]
                    if clip is not None and caption is not None:
                        clip[CAPTION] = caption
                    yield cid, clip
    except Exception as e:
        failure = storage.read_failure(source)
        if failure is not None and failure is not e:
            raise failure from e
        raise
    failure = storage.read_failure(source)
    if failure is not None:
        raise failure


@contextlib.contextmanager
def _audio_track(container, path: str, cfg: Config, span, part):
    """With --audio-latents, the input's audio (pipeline.audio.AudioSpans) read through a second
    handle on the source, so that the video's decode keeps its own; checked before any clip is
    cut: a video without audio fails whole."""
    if not cfg.audio_latents:
        yield None
        return
    import av

    from pipeline.audio import AudioSpans, NoAudioStream

    if not container.streams.audio:
        raise NoAudioStream("--audio-latents: the video has no audio stream (the LTX-2 trainer writes no "
                            "audio latents for such a video)")
    source = storage.open_for_decode(path, cfg.s3)
    try:
        with av.open(source, mode="r") as second:
            begin = part[2] if part is not None else span[0]
            yield AudioSpans(second, cfg.audio_sample_rate, begin)
    finally:
        if hasattr(source, "close"):
            source.close()


class Unreadable(InputRejected):
    """FFmpeg could not open the container."""


def _unreadable(e: BaseException) -> BaseException:
    if failures.classify(e) != INPUT:
        return e
    return Unreadable(f"not a readable video container (truncated, missing its index, or not a "
                      f"video): {e}")


def _error_row(row: dict, e: BaseException, error_class: str, cut: list[str]) -> dict:
    """One unit's error row: its class, where it was found, and the clips cut before it."""
    stage = getattr(e, "stage", "read" if error_class == TRANSIENT else "decode")
    message = str(e) or type(e).__name__
    if cut:
        message = f"stopped after {len(cut)} clip(s): {message}"
    error_type = type(e).__name__ if not isinstance(e, Unreadable) else type(e.__cause__ or e).__name__
    return sink.error_row(row["source_uri"], stage, error_type, message, error_class=error_class,
                          retryable=failures.is_retryable(error_class), clip_ids=cut,
                          part=row.get("part"), parts=row.get("parts"))


def _report(ledger, failed_as: str | None, unit: str | None = None) -> None:
    """Tell the run's ledger about this input's outcome; stop the run when its guard trips."""
    if ledger is None:
        return
    import ray

    stop = ray.get(ledger.input_outcome.remote(failed_as, unit))
    if stop:
        raise failures.GuardTripped(stop)
