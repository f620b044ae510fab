"""End to end through the CLI, on a real local Ray, a real S3 server and generated videos."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from pipeline import samples
from pipeline.cli import main
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH, decode_all_rgb, reference_latents, upload_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE_ARGS = ["--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> str:
    """Several sizes, lengths and codecs; one corrupt file and one too short; one non-video."""
    d = tmp_path_factory.mktemp("videos")
    samples.write_video(str(d / "a_target.mp4"), samples.synthetic_frames(20, HEIGHT, WIDTH, 1))
    samples.write_video(str(d / "nested/b_target.WEBM"), samples.synthetic_frames(12, HEIGHT, WIDTH, 2),
                        codec="libvpx-vp9")
    samples.write_video(str(d / "nested/deeper/c_wide.mp4"), samples.synthetic_frames(10, 48, 112, 3))
    samples.write_video(str(d / "d_tall.webm"), samples.synthetic_frames(9, 96, 40, 4), codec="libvpx-vp9")
    samples.write_video(str(d / "e_short.mp4"), samples.synthetic_frames(4, HEIGHT, WIDTH, 5))
    (d / "f_corrupt.mp4").write_bytes(os.urandom(3000))
    (d / "notes.txt").write_text("not a video")
    return str(d)


EXPECTED_CLIPS = {"a_target.mp4": 2, "nested/b_target.WEBM": 1, "nested/deeper/c_wide.mp4": 1,
                  "d_tall.webm": 1}


def read_output(output: str, filesystem=None):
    def table(name):
        return pads.dataset(f"{output}/{name}", filesystem=filesystem, format="parquet").to_table()
    fs = filesystem or pafs.LocalFileSystem()
    with fs.open_input_stream(f"{output}/_SUCCESS") as f:
        success = json.loads(f.read())
    return table("latents"), table("errors"), success


def check_output(latents: pa.Table, errors: pa.Table, success: dict, video_dir: str, prefix: str,
                 tiny_vae: str, latent_dtype=np.float16):
    rel = {r: r[len(prefix):].lstrip("/") for r in latents.column("source_uri").to_pylist()}
    counts = {}
    for r in latents.column("source_uri").to_pylist():
        counts[rel[r]] = counts.get(rel[r], 0) + 1
    assert counts == EXPECTED_CLIPS
    assert latents.num_rows == len(set(latents.column("clip_id").to_pylist())) == 5

    # Schema and metadata contract.
    assert latents.schema.field("clip_index").type == pa.int32()
    assert latents.schema.field("fps").type == pa.float64()
    tensor_type = latents.schema.field("latents").type
    assert tensor_type.extension_name == "arrow.fixed_shape_tensor"
    assert tensor_type.shape == [3, 4, HEIGHT // 8, WIDTH // 8] and tensor_type.permutation is None
    meta = json.loads(latents.schema.metadata[b"video_latents"])
    assert meta["vae_class"] == "AutoencoderKLCogVideoX" and meta["layout"] == "TCHW"
    assert meta["scaling_factor"] == pytest.approx(1.15258426) and meta["latent_mode"] == "mode"
    assert meta["versions"]["diffusers"] and meta["versions"]["ray"]

    # Error rows: the corrupt file and the short one, nothing else.
    errs = {e["source_uri"][len(prefix):].lstrip("/"): e for e in errors.to_pylist()}
    assert set(errs) == {"e_short.mp4", "f_corrupt.mp4"}
    assert (errs["e_short.mp4"]["stage"], errs["e_short.mp4"]["error_type"]) == ("sample", "TooShort")
    assert errs["f_corrupt.mp4"]["stage"] == "decode" and errs["f_corrupt.mp4"]["message"]
    assert success["videos"] == 6 and success["clips"] == 5 and success["errors"] == 2
    # _SUCCESS says what it means: complete, with the failed inputs counted by class.
    assert success["complete"] and success["errors_by_class"] == {"input": 2}
    assert (success["errors_final"], success["errors_retryable"], success["inputs_failed"]) == (2, 0, 2)
    assert meta["job_fingerprint"] == success["job_fingerprint"] and meta["job"]["--num-frames"] == NUM_FRAMES

    # Numbers: clips of videos already at the target size equal diffusers' own computation.
    rows = latents.to_pylist()
    values = latents.column("latents").combine_chunks().to_numpy_ndarray()
    assert values.dtype == latent_dtype
    checked = 0
    for name in ["a_target.mp4", "nested/b_target.WEBM"]:
        frames = decode_all_rgb(os.path.join(video_dir, name))
        for i, row in enumerate(rows):
            if rel[row["source_uri"]] == name:
                s = row["start_frame"]
                expected = reference_latents(tiny_vae, frames[s:s + NUM_FRAMES])
                tol = 1e-5 if latent_dtype == np.float32 else 2e-3
                np.testing.assert_allclose(values[i].astype(np.float32), expected, rtol=tol, atol=tol)
                checked += 1
    assert checked == 3


def test_s3_to_s3_with_endpoint_from_env(ray_local, s3_server, s3_bucket, video_dir, tiny_vae,
                                         monkeypatch, tmp_path):
    client, bucket = s3_bucket
    upload_folder(client, bucket, video_dir, "in")
    upload_folder(client, bucket, tiny_vae, "models/tiny")  # the model is read from S3 too
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("VIDEO_LATENTS_CACHE", str(tmp_path / "cache"))  # set before Ray starts
    code = main(["encode", f"s3://{bucket}/in/", f"s3://{bucket}/out/",
                 "--model", f"s3://{bucket}/models/tiny", "--batch-size", "2", *SHAPE_ARGS])
    assert code == 0
    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http")
    latents, errors, success = read_output(f"{bucket}/out", fs)
    check_output(latents, errors, success, video_dir, f"s3://{bucket}/in", tiny_vae)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]]
    assert "out/_SUCCESS" in keys
    assert all(k.endswith(".parquet") or k in ("out/_SUCCESS", "out/report.html", "out/_job.json")
               for k in keys), keys


def test_local_to_local_float32_and_reruns_are_identical(ray_local, video_dir, tiny_vae, tmp_path):
    args = ["encode", video_dir, str(tmp_path / "out"), "--model", tiny_vae, *SHAPE_ARGS,
            "--latent-dtype", "float32", "--batch-size", "1"]
    assert main(args) == 0
    latents, errors, success = read_output(str(tmp_path / "out"))
    check_output(latents, errors, success, video_dir, video_dir, tiny_vae, np.float32)
    assert success["config"]["latent_dtype"] == "float32" and success["clips_per_s"] > 0
    assert success["clips_this_run"] == 5 and success["videos_already_done"] == 0
    report = open(tmp_path / "out" / "report.html").read()
    assert report.count("<svg") == 4 and "sample/TooShort" in report and "decode/" in report
    assert "2 clips</text>" in report and "1 clip</text>" in report  # a_target gave 2, the rest 1

    # Read back with Ray, as the README shows.
    ds = ray_local.data.read_parquet(str(tmp_path / "out" / "latents"))
    batches = list(ds.select_columns(["latents"]).iter_torch_batches(batch_size=2))
    assert sum(len(b["latents"]) for b in batches) == 5
    assert tuple(batches[0]["latents"].shape[1:]) == (3, 4, HEIGHT // 8, WIDTH // 8)

    assert main(args) == 0  # a rerun of a finished job finds nothing to do
    _, _, resumed = read_output(str(tmp_path / "out"))
    assert (resumed["clips"], resumed["clips_this_run"], resumed["videos_already_done"]) == (5, 0, 6)
    assert main([*args, "--overwrite"]) == 0
    again, _, _ = read_output(str(tmp_path / "out"))
    key = lambda t: t.sort_by("clip_id")  # noqa: E731
    assert key(again).column("clip_id").equals(key(latents).column("clip_id"))
    np.testing.assert_array_equal(key(again).column("latents").combine_chunks().to_numpy_ndarray(),
                                  key(latents).column("latents").combine_chunks().to_numpy_ndarray())


def test_run_py_as_a_script_from_another_directory_and_no_secret_leaks(s3_server, s3_bucket, tiny_vae,
                                                                       tmp_path):
    """As ``ray submit cluster.yaml pipeline/run.py encode ...`` runs it: a fresh process, its own
    local Ray, S3 endpoint given as an option. A known fake secret must appear in no log, no
    error row, no metadata and no _SUCCESS."""
    secret = "FAKE-SECRET-Zq9x7Lm2Vb4Nc8Rt"
    client, bucket = s3_bucket
    vids = tmp_path / "v"
    samples.write_video(str(vids / "x.mp4"), samples.synthetic_frames(9, HEIGHT, WIDTH))
    (vids / "broken.mp4").write_bytes(b"garbage" * 100)
    upload_folder(client, bucket, str(vids), "in")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="vl", dir="/tmp")  # to search Ray's own logs afterwards
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": "", "RAY_TMPDIR": ray_tmp,
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": secret + "-token"}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "pipeline", "run.py"), "encode", f"s3://{bucket}/in",
         f"s3://{bucket}/out", "--model", tiny_vae, "--s3-endpoint", s3_server, *SHAPE_ARGS],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["videos"] == 2 and summary["clips"] == 1 and summary["errors"] == 1
    body = client.get_object(Bucket=bucket, Key="out/_SUCCESS")["Body"].read()
    assert json.loads(body)["clips"] == 1

    everything = [proc.stdout, proc.stderr]
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]:
        everything.append(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("latin-1"))
    for root, _dirs, files in os.walk(ray_tmp):
        for f in files:
            path = os.path.join(root, f)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    everything.append(fh.read().decode("latin-1"))
    assert len(everything) > 10  # the Ray logs were really searched
    assert not [t for t in everything if secret in t]
