"""Hostile and unusual inputs, each generated here: every one is either encoded or gets exactly one
error row with a clear message, and the run exits 0."""
import os
import shutil
import tracemalloc

import av
import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline import decode, samples
from pipeline.cli import main
from pipeline.config import Config
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH

MAX_PIXELS = 128 * 128  # lowered so that a "huge" video is cheap to make


def _frames(n=NUM_FRAMES, h=HEIGHT, w=WIDTH, seed=0):
    return samples.synthetic_frames(n, h, w, seed)


def _vfr(path):
    """Frames at irregular timestamps (alternately 70 ms and 20 ms apart)."""
    times = [sum(70 if k % 2 == 0 else 20 for k in range(i)) for i in range(12)]
    samples.write_video(path, _frames(12), timestamps_ms=times)


def _rotated(path):
    samples.write_video(path, _frames(h=48, w=96), rotation=90)


def _audio_only(path):
    with av.open(path, "w") as c:
        st = c.add_stream("aac", rate=16000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode():
            c.mux(p)


def _truncated(path, keep: float, faststart: bool):
    tmp = samples.write_video(path + ".full.mp4", _frames(30),
                              container_options={"movflags": "faststart"} if faststart else None)
    data = open(tmp, "rb").read()
    os.remove(tmp)
    open(path, "wb").write(data[:int(len(data) * keep)])


def _png(path):
    samples.write_video(path, _frames(1), codec="png", pix_fmt="rgb24", format="image2")


def _video(codec, pix_fmt, n=NUM_FRAMES, h=HEIGHT, w=WIDTH, options=None):
    return lambda path: samples.write_video(path, _frames(n, h, w), codec=codec, pix_fmt=pix_fmt, options=options)


# name -> (how to make it, expected: "ok" | "partial" | (stage, error_type) | "error")
CASES = {
    "empty.mp4": (lambda p: open(p, "wb").close(), ("read", "EmptyFile")),
    "cut_mid_stream.mp4": (lambda p: _truncated(p, 0.6, faststart=True), "partial"),
    "no_moov.mp4": (lambda p: _truncated(p, 0.9, faststart=False), "error"),
    "random_bytes.mp4": (lambda p: open(p, "wb").write(os.urandom(5000)), "error"),
    "image_renamed.mp4": (_png, ("sample", "TooShort")),
    "audio_only.mp4": (_audio_only, ("decode", "NoVideoStream")),
    "one_pixel.mkv": (_video("ffv1", "yuv444p", h=1, w=1), "ok"),
    "odd_63x37.mp4": (_video("libx264", "yuv444p", h=37, w=63), "ok"),
    "one_frame.mp4": (_video("libx264", "yuv420p", n=1), ("sample", "TooShort")),
    "variable_rate.mp4": (_vfr, "ok"),
    "rotated.mp4": (_rotated, "ok"),
    "ten_bit.mp4": (_video("libx264", "yuv420p10le"), "ok"),
    "yuv444.mp4": (_video("libx264", "yuv444p"), "ok"),
    "gray.mkv": (_video("ffv1", "gray"), "ok"),
    "yuvj.avi": (_video("mjpeg", "yuvj420p"), "ok"),
    "hevc.mp4": (_video("libx265", "yuv420p", options={"x265-params": "log-level=error"}), "ok"),
    "hevc_10bit.mkv": (_video("libx265", "yuv420p10le", options={"x265-params": "log-level=error"}), "ok"),
    "vp9.webm": (_video("libvpx-vp9", "yuv420p"), "ok"),
    "av1.mkv": (_video("libsvtav1", "yuv420p", options={"svtav1-params": "log-level=0"}), "ok"),
    "interlaced.mp4": (_video("libx264", "yuv420p", options={"flags": "+ilme+ildct",
                                                              "x264-params": "interlaced=1"}), "ok"),
    "long.mp4": (_video("libx264", "yuv420p", n=10 * NUM_FRAMES), "ok"),
    "huge.mp4": (_video("libx264", "yuv420p", h=160, w=160), ("decode", "TooLarge")),
    "name with spaces.mp4": (_video("libx264", "yuv420p"), "ok"),
    "ünïcødé ☃ 名前.mp4": (_video("libx264", "yuv420p"), "ok"),
    "nested/deeper/UPPER.MP4": (_video("libx264", "yuv420p"), "ok"),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("zoo")
    for name, (make, _) in CASES.items():
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make(str(path))
    return str(d)


def outcomes(output: str, prefix: str) -> tuple[dict, dict]:
    latents = pads.dataset(f"{output}/latents", format="parquet").to_table(columns=["source_uri"])
    errors = pads.dataset(f"{output}/errors", format="parquet").to_table()
    clips, errs = {}, {}
    for uri in latents.column("source_uri").to_pylist():
        name = uri[len(prefix):].lstrip("/")
        clips[name] = clips.get(name, 0) + 1
    for row in errors.to_pylist():
        errs.setdefault(row["source_uri"][len(prefix):].lstrip("/"), []).append(row)
    return clips, errs


def test_every_hostile_input_is_encoded_or_gets_exactly_one_error_row(ray_local, zoo, tiny_vae, tmp_path):
    out = str(tmp_path / "out")
    code = main(["encode", zoo, out, "--model", tiny_vae, "--num-frames", str(NUM_FRAMES),
                 "--height", str(HEIGHT), "--width", str(WIDTH), "--max-pixels", str(MAX_PIXELS),
                 "--batch-size", "4"])
    assert code == 0
    clips, errs = outcomes(out, zoo)
    for name, (_, expected) in CASES.items():
        got_clips, got_errors = clips.get(name, 0), errs.get(name, [])
        assert len(got_errors) <= 1, (name, got_errors)
        for e in got_errors:
            assert e["message"] and e["error_type"] and e["stage"], (name, e)
        if expected == "ok":
            assert got_clips >= 1 and not got_errors, (name, got_clips, got_errors)
        elif expected == "partial":  # what was readable is kept, and an error row says so
            assert got_clips >= 1 or got_errors, name
        elif expected == "error":
            assert got_clips == 0 and len(got_errors) == 1, (name, got_clips)
            assert "not a readable video container" in got_errors[0]["message"], got_errors
        else:
            assert got_clips == 0 and len(got_errors) == 1, (name, got_clips)
            assert (got_errors[0]["stage"], got_errors[0]["error_type"]) == expected, (name, got_errors)
    assert clips["long.mp4"] == 10
    assert set(clips) | set(errs) == set(CASES)  # nothing silently dropped


def test_names_that_look_like_paths_on_s3(ray_local, s3_server, s3_bucket, tiny_vae, tmp_path, monkeypatch):
    """Keys with `..`, spaces and unicode: output names come from ids, so nothing escapes OUTPUT."""
    client, bucket = s3_bucket
    body = open(samples.write_video(str(tmp_path / "v.mp4"), _frames()), "rb").read()
    keys = ["in/../escape.mp4", "in/a/../../b.mp4", "in/sp ace/ünï ☃.mp4", "in/ok.mp4"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=body)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert main(["encode", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--model", tiny_vae,
                 "--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]) == 0
    written = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    outside = [k for k in written if not k.startswith(("in/", "out/"))]
    assert outside == [], outside
    assert all(os.path.basename(k).split("-")[0] in ("part", "err", "vid", "_SUCCESS", "report.html", "_job.json")
               for k in written if k.startswith("out/")), written
    success = client.get_object(Bucket=bucket, Key="out/_SUCCESS")["Body"].read()
    import json
    summary = json.loads(success)
    assert summary["videos"] == len(keys)
    assert summary["clips"] + summary["errors"] >= len(keys)  # each one encoded or reported


def test_decoding_a_long_video_streams_in_bounded_memory(tmp_path):
    """Peak memory of decoding is set by the clip size, not by the video's length."""
    size = 192

    def peak(num_frames: int) -> int:
        path = samples.write_video(str(tmp_path / f"v{num_frames}.mp4"),
                                   samples.synthetic_frames(num_frames, size, size))
        cfg = Config(input=path, output=str(tmp_path / "out"), model="m", num_frames=NUM_FRAMES,
                     height=size, width=size)
        tracemalloc.start()
        n = sum(1 for _ in decode.decode_clips({"source_uri": path, "size": 1}, cfg))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        shutil.rmtree(cfg.output)
        assert n == num_frames // NUM_FRAMES
        return top

    clip_bytes = 3 * NUM_FRAMES * size * size
    short, long = peak(2 * NUM_FRAMES), peak(20 * NUM_FRAMES)
    assert long < 1.3 * short + clip_bytes // 2, (short, long)
    assert long < 4 * clip_bytes, (long, clip_bytes)
