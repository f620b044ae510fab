"""Long videos in parts (pipeline/spans.py): decoded part by part, each part seeking to its first
frame, a video gives the same clips, pixel for pixel, as decoded whole, and fails where the whole
decode fails. Without Ray: the rows ``spans.split`` makes, each decoded as its task decodes it."""
import os

import av
import numpy as np
import pytest

from pipeline import decode, probe, samples, spans
from pipeline.config import Config
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH


def cfg_for(tmp_path, **kw) -> Config:
    base = dict(input=str(tmp_path), output=str(tmp_path / "out"), model="unused",
                num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, clips_per_task=2)
    return Config(**{**base, **kw})


def decode_as_split(path: str, cfg: Config) -> tuple[int, dict, list[str]]:
    """(tasks, {clip id: frames}, the error types) of ``path`` cut into rows as spans.split cuts
    it; --clips-per-task 0 decodes it whole."""
    rows = list(spans.split({"source_uri": path, "size": os.path.getsize(path)}, cfg))
    clips, errors = {}, []
    for row in rows:
        try:
            for cid, clip in decode._input_clips(row, cfg, frozenset()):
                clips[cid] = clip["frames"]
        except decode.InputRejected as e:
            errors.append(type(e).__name__)
    return len(rows), clips, errors


def assert_same_clips(parts: dict, whole: dict) -> None:
    assert list(parts) == list(whole)  # the same ids, in the same order
    for cid, frames in whole.items():
        np.testing.assert_array_equal(parts[cid], frames)


@pytest.mark.parametrize("name, codec", [("v.mp4", "libx264"), ("v.mkv", "libx264"), ("v.webm", "libvpx-vp9")])
def test_parts_cut_the_clips_of_the_whole_video_in_every_container(tmp_path, name, codec):
    """MKV and WebM declare no frame count: they are split on duration x rate, as MP4 on its count."""
    path = samples.write_video(str(tmp_path / name), samples.synthetic_frames(5 * NUM_FRAMES + 4, HEIGHT, WIDTH, 1),
                               codec=codec, options={"g": "12"})  # a keyframe every 12 frames: parts seek
    cfg = cfg_for(tmp_path)
    assert probe.probe({"path": path, "size": 1}, cfg).frames == 5 * NUM_FRAMES + 4
    tasks, parts, errors = decode_as_split(path, cfg)
    _, whole, whole_errors = decode_as_split(path, cfg.replace(clips_per_task=0))
    assert (tasks, len(whole), errors, whole_errors) == (3, 5, [], [])  # parts of 2, 2 and 1 clips
    assert_same_clips(parts, whole)


@pytest.mark.parametrize("tags, tasks, errors", [
    ({"NUMBER_OF_FRAMES": "54"}, 1, []),  # mkvmerge's count disagrees with duration x rate: whole
    ({}, 5, ["NotConstantRate"] * 4),  # no count: split on the header's rate; the parts past frame 20 say so
])
def test_a_variable_rate_mkv_is_split_only_without_a_count(tmp_path, tags, tasks, errors):
    """24 fps for 20 frames, then 12 fps: an MKV's header shows 24 fps and a duration, nothing else."""
    times = [round(i * 1000 / 24) if i < 20 else round(20 * 1000 / 24 + (i - 20) * 1000 / 12) for i in range(54)]
    path = samples.write_video(str(tmp_path / "vfr.mkv"), samples.synthetic_frames(54, HEIGHT, WIDTH, 4),
                               options={"g": "12"}, timestamps_ms=times, metadata=tags)
    cfg = cfg_for(tmp_path)
    assert decode_as_split(path, cfg)[::2] == (tasks, errors)


def test_a_part_that_starts_on_an_open_gops_leading_frames_decodes_them(tmp_path):
    """Open GOP: keyframes every 20 frames, each an I-frame whose 3 leading B-frames (shown
    before it) follow it in the file and reference the GOP before. Part 1 starts at frame 18,
    one of them: seeking by time finds the keyframe shown at 20, from which FFmpeg drops 17-19."""
    frames = samples.synthetic_frames(6 * NUM_FRAMES + 6, HEIGHT, WIDTH, 2)
    path = samples.write_video(str(tmp_path / "open.mp4"), frames,
                               options={"x264-params": "open-gop=1:keyint=20:min-keyint=20:scenecut=0:"
                                                       "bframes=3:b-adapt=0:b-pyramid=none"})
    with av.open(path) as c:
        stream = c.streams.video[0]
        shown = [(p.dts, round(p.pts * stream.time_base * 24), p.is_keyframe) for p in c.demux(stream) if p.size]
    keyframe_dts = {index: dts for dts, index, key in shown if key}
    assert sorted(keyframe_dts) == [0, 20, 40]
    leading = [index for dts, index, _key in shown if dts > keyframe_dts[20] and index < 20]
    assert leading == [17, 18, 19]  # in the file after the keyframe shown at 20, shown before it
    cfg = cfg_for(tmp_path)
    tasks, parts, errors = decode_as_split(path, cfg)
    _, whole, _ = decode_as_split(path, cfg.replace(clips_per_task=0))
    assert (tasks, len(whole), errors) == (3, 6, [])  # parts start at frames 0, 18 and 36
    assert_same_clips(parts, whole)


def _cut(path: str, declared: int, kept: int) -> str:
    """An MP4 (moov first) whose header declares ``declared`` frames and whose data stops where
    frame ``kept`` begins (no B-frames: the file holds the frames in display order)."""
    full = samples.write_video(path + ".full.mp4", samples.synthetic_frames(declared, HEIGHT, WIDTH, 3),
                               container_options={"movflags": "faststart"})
    with av.open(full) as c:
        starts = [p.pos for p in c.demux(video=0) if p.size]
    with open(full, "rb") as f:
        data = f.read(starts[kept])
    with open(path, "wb") as f:
        f.write(data)
    os.remove(full)
    return path


@pytest.mark.parametrize("declared, kept, clips, error", [
    (46, 44, 4, []),  # 2 frames short: within the slack (max(2, 2%)), and the 5th clip is not there
    (46, 43, 4, ["Truncated"]),  # 3 short: over the slack
    (48, 45, 5, ["Truncated"]),  # 3 short, past the last clip's frames: still over the slack
])
def test_the_last_part_allows_the_whole_decodes_slack_and_no_more(tmp_path, declared, kept, clips, error):
    path = _cut(str(tmp_path / "cut.mp4"), declared, kept)
    cfg = cfg_for(tmp_path)
    tasks, parts, errors = decode_as_split(path, cfg)
    _, whole, whole_errors = decode_as_split(path, cfg.replace(clips_per_task=0))
    assert (tasks, len(whole), whole_errors) == (3, clips, error)
    assert errors == error  # the last part's
    assert_same_clips(parts, whole)
