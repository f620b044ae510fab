import os

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import decode, samples
from pipeline.config import Config
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH, decode_all_rgb


def cfg_for(tmp_path, **kw) -> Config:
    base = dict(input=str(tmp_path), output=str(tmp_path / "out"), model="unused",
                num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH)
    return Config(**{**base, **kw})


def clips_of(path: str, cfg: Config, skip=frozenset()) -> list[dict]:
    with av.open(path) as c:
        return [row for _cid, row in decode.iter_clips(c, path, cfg, skip) if row is not None]


@pytest.fixture(scope="module")
def video_20(tmp_path_factory) -> str:
    """20 frames at the target size."""
    path = str(tmp_path_factory.mktemp("v") / "v.mp4")
    return samples.write_video(path, samples.synthetic_frames(20, HEIGHT, WIDTH))


def test_clips_are_uint8_channels_first_and_match_the_decoded_frames(video_20, tmp_path):
    clips = clips_of(video_20, cfg_for(tmp_path))
    assert [c["start_frame"] for c in clips] == [0, 9]  # 20 frames: two whole clips, rest dropped
    assert [c["clip_index"] for c in clips] == [0, 1]
    frames = decode_all_rgb(video_20)
    for c in clips:
        assert c["frames"].dtype == np.uint8 and c["frames"].flags.c_contiguous
        assert c["frames"].shape == (3, NUM_FRAMES, HEIGHT, WIDTH)
        expected = frames[c["start_frame"]:c["start_frame"] + NUM_FRAMES].transpose(3, 0, 1, 2)
        np.testing.assert_array_equal(c["frames"], expected)
        assert c["fps"] == 24.0


def test_stride_overlap_and_max_clips(video_20, tmp_path):
    overlapping = clips_of(video_20, cfg_for(tmp_path, clip_stride=4))
    assert [c["start_frame"] for c in overlapping] == [0, 4, 8]
    sparse = clips_of(video_20, cfg_for(tmp_path, clip_stride=11))
    assert [c["start_frame"] for c in sparse] == [0, 11]
    capped = clips_of(video_20, cfg_for(tmp_path, clip_stride=2, max_clips=2))
    assert [c["start_frame"] for c in capped] == [0, 2]
    frames = decode_all_rgb(video_20)
    np.testing.assert_array_equal(overlapping[1]["frames"], frames[4:13].transpose(3, 0, 1, 2))


def test_clip_ids_are_deterministic_and_depend_on_what_defines_the_clip(video_20, tmp_path):
    cfg = cfg_for(tmp_path)
    ids = [c["clip_id"] for c in clips_of(video_20, cfg)]
    assert ids == [c["clip_id"] for c in clips_of(video_20, cfg)]
    assert len(set(ids)) == 2
    assert decode.clip_id("a", 0, cfg) != decode.clip_id("b", 0, cfg)
    assert decode.clip_id("a", 0, cfg) != decode.clip_id("a", 0, cfg.replace(resize="stretch"))
    assert decode.clip_id("a", 0, cfg) != decode.clip_id("a", 0, cfg.replace(height=32))


@pytest.mark.parametrize("resize", ["crop", "stretch"])
def test_resize_reaches_the_target_shape(tmp_path, resize):
    path = samples.write_video(str(tmp_path / "wide.mp4"), samples.synthetic_frames(9, 48, 128))
    (clip,) = clips_of(path, cfg_for(tmp_path, resize=resize))
    assert clip["frames"].shape == (3, NUM_FRAMES, HEIGHT, WIDTH)


def test_crop_keeps_the_centre_and_the_aspect_ratio(tmp_path):
    # Left third red, middle green, right third blue: a centre crop of a 3:1 frame to 1:1
    # keeps only green; a stretch keeps all three.
    frames = np.zeros((9, 32, 96, 3), np.uint8)
    frames[:, :, :32, 0] = frames[:, :, 32:64, 1] = frames[:, :, 64:, 2] = 255
    path = samples.write_video(str(tmp_path / "bands.mp4"), frames, pix_fmt="yuv444p")
    crop = clips_of(path, cfg_for(tmp_path, resize="crop"))[0]["frames"].astype(int)
    stretch = clips_of(path, cfg_for(tmp_path, resize="stretch"))[0]["frames"].astype(int)
    centre_col = WIDTH // 2
    assert crop[1, 0, :, 4:-4].mean() > 200 and crop[0].mean() < 40 and crop[2].mean() < 40
    assert stretch[0, 0, :, :10].mean() > 200 and stretch[2, 0, :, -10:].mean() > 200
    assert stretch[1, 0, :, centre_col].mean() > 200


def test_resize_plan_covers_the_target():
    cfg = Config(input="i", output="o", model="m", height=480, width=720)
    for src in [(1920, 1080), (1080, 1920), (720, 480), (100, 100), (721, 479)]:
        w, h, x, y = decode.resize_plan(*src, cfg)
        assert w >= 720 and h >= 480 and 0 <= x <= w - 720 and 0 <= y <= h - 480
        assert abs(w / h - src[0] / src[1]) < 0.02 * (w / h)


def test_decode_records_errors_instead_of_raising(tmp_path):
    short = samples.write_video(str(tmp_path / "short.mp4"), samples.synthetic_frames(5, HEIGHT, WIDTH))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all" * 100)
    cfg = cfg_for(tmp_path)
    for uri in [short, str(corrupt), str(tmp_path / "missing.mp4")]:
        assert list(decode.decode_clips({"source_uri": uri}, cfg)) == []
    rows = pq.read_table(os.path.join(cfg.output, "errors")).to_pylist()
    by_uri = {r["source_uri"]: r for r in rows}
    assert len(rows) == 3
    assert by_uri[short]["stage"] == "sample" and by_uri[short]["error_type"] == "TooShort"
    assert "5 frames" in by_uri[short]["message"]
    assert by_uri[str(corrupt)]["stage"] == "decode" and by_uri[str(corrupt)]["message"]
    assert by_uri[str(tmp_path / "missing.mp4")]["stage"] == "read"


def test_resume_skips_written_clips_but_keeps_frames_shared_with_others(video_20, tmp_path):
    cfg = cfg_for(tmp_path, clip_stride=4)  # clips at 0, 4, 8 overlap
    full = clips_of(video_20, cfg)
    skip = frozenset({full[0]["clip_id"], full[2]["clip_id"]})
    with av.open(video_20) as c:
        ids = [cid for cid, _ in decode.iter_clips(c, video_20, cfg, skip)]
    assert ids == [c["clip_id"] for c in full]  # every id is still reported, for the marker
    (only,) = clips_of(video_20, cfg, skip)
    assert only["clip_id"] == full[1]["clip_id"]
    np.testing.assert_array_equal(only["frames"], full[1]["frames"])


def test_a_finished_video_gets_a_marker_listing_all_its_clips(video_20, tmp_path):
    cfg = cfg_for(tmp_path)
    clips = list(decode.decode_clips({"source_uri": video_20, "size": 1}, cfg))
    (marker,) = pq.read_table(os.path.join(cfg.output, "_markers")).to_pylist()
    assert marker == {"source_uri": video_20, "part": None, "parts": None, "clip_ids": [c["clip_id"] for c in clips],
                      "shot_frames": None}  # shot lengths only with --split-scenes


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_rotation_flag_is_applied(tmp_path, degrees):
    # Coded 64 wide x 32 high, red on the left; the display matrix turns it upright.
    frames = np.zeros((9, 32, 64, 3), np.uint8)
    frames[:, :, :16, 0] = 255
    path = samples.write_video(str(tmp_path / "rot.mp4"), frames, pix_fmt="yuv444p", rotation=degrees)
    # Counter-clockwise turns (np.rot90's sense), as the display matrix defines them.
    expected = np.rot90(frames[0, :, :, 0], {90: 1, -90: 3, 180: 2}[degrees])
    h, w = expected.shape
    (clip,) = clips_of(path, cfg_for(tmp_path, height=h, width=w, resize="stretch"))
    red = clip["frames"][0, 0].astype(int)  # [H, W] of the first frame, upright
    assert np.abs(red - expected.astype(int)).mean() < 20


@pytest.mark.parametrize("limit, stage, error_type, flag", [
    ({"max_pixels": HEIGHT * WIDTH - 1}, "decode", "TooLarge", "--max-pixels"),
    ({"max_bytes": 99}, "read", "FileTooLarge", "--max-bytes"),
    ({"max_duration": 0.5}, "decode", "TooLong", "--max-duration"),  # the video runs 0.83 s
    ({"decode_timeout": 1e-9}, "decode", "DecodeTimeout", "--decode-timeout"),
])
def test_limits_give_one_error_row(video_20, tmp_path, limit, stage, error_type, flag):
    cfg = cfg_for(tmp_path, **limit)
    assert list(decode.decode_clips({"source_uri": video_20, "size": 100}, cfg)) == []
    (row,) = pq.read_table(os.path.join(cfg.output, "errors")).to_pylist()
    assert (row["stage"], row["error_type"]) == (stage, error_type) and flag in row["message"]
    assert list(decode.decode_clips({"source_uri": video_20, "size": 100}, cfg_for(tmp_path))) != []


def _negative_start_video(path: str, frames: int, shift: int) -> None:
    """A Matroska video whose first ``shift`` frames have negative times (as an edit list or a
    B-frame delay leaves them): packets muxed ``shift`` frames early with FFmpeg's
    avoid_negative_ts off, so the stream keeps them."""
    from fractions import Fraction

    with av.open(path, "w", format="matroska", options={"avoid_negative_ts": "disabled"}) as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        s.codec_context.time_base = Fraction(1, 10)
        packets = []
        for i, rgb in enumerate(samples.synthetic_frames(frames, HEIGHT, WIDTH, 3)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            packets += s.encode(frame)
        packets += s.encode()
        for p in packets:
            p.pts, p.dts = p.pts - shift, p.dts - shift
            c.mux(p)


def test_a_stream_whose_first_frame_has_a_negative_time_starts_at_frame_0(tmp_path):
    """Clip numbering starts at the first frame, never below 0 (a negative start_frame made
    musubi's name parser fail for the whole dataset: `_-0001-009_`)."""
    path = str(tmp_path / "neg.mkv")
    _negative_start_video(path, 2 * NUM_FRAMES, shift=3)
    with av.open(path) as c:
        assert next(c.decode(video=0)).time == pytest.approx(-0.3)  # the stream really starts below 0
    with av.open(path) as c:
        clips = [row for _cid, row in decode.iter_clips(c, path, cfg_for(tmp_path))]
    assert [r["start_frame"] for r in clips] == [0, NUM_FRAMES]
    assert clips[0]["clip_id"] == decode.clip_id(path, 0, cfg_for(tmp_path))
