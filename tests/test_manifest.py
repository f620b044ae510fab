"""--manifest (CSV, JSONL, Parquet; local or S3) with time spans and extra columns, and --fps."""
import json
import os

import av
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import decode, samples, sources
from pipeline.cli import main
from pipeline.config import Config
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH, decode_all_rgb, reference_latents

SHAPE = ["--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH),
         "--latent-dtype", "float32"]


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    samples.write_video(str(d / "videos" / "a.mp4"), samples.synthetic_frames(30, HEIGHT, WIDTH, 1))
    samples.write_video(str(d / "videos" / "b.mp4"), samples.synthetic_frames(20, HEIGHT, WIDTH, 2))
    return d


def test_csv_manifest_with_spans_and_extra_columns(ray_local, clips_dir, tiny_vae, tmp_path):
    manifest = clips_dir / "train.csv"
    manifest.write_text(
        "uri,start_sec,end_sec,caption,id,license\n"
        "videos/a.mp4,0.5,,a cat on a mat,1,cc-by\n"   # one clip from 0.5 s: frames 12..20
        "videos/a.mp4,,,the whole video,2,cc-by\n"     # no span: clips cut as usual (3)
        "videos/b.mp4,0,0.2,too short a span,3,\n"     # 0.2 s holds 5 frames: TooShort
        "videos/missing.mp4,,,gone,4,cc0\n")
    out = str(tmp_path / "out")
    assert main(["encode", out, "--manifest", str(manifest), "--model", tiny_vae, *SHAPE]) == 0

    table = pads.dataset(os.path.join(out, "latents"), format="parquet").to_table()
    assert table.schema.field("caption").type == pa.string() and table.schema.field("id").type == pa.int64()
    rows = sorted(table.drop_columns(["latents"]).to_pylist(), key=lambda r: (r["id"], r["start_frame"]))
    a = str(clips_dir / "videos" / "a.mp4")
    assert [(r["source_uri"], r["start_frame"], r["caption"], r["id"]) for r in rows] == [
        (f"{a}#t=0.5,", 12, "a cat on a mat", 1),
        (a, 0, "the whole video", 2), (a, 9, "the whole video", 2), (a, 18, "the whole video", 2)]
    assert rows[0]["license"] == "cc-by"

    span_clip = table.filter(pa.compute.equal(table.column("id"), 1)).column("latents")
    got = span_clip.combine_chunks().to_numpy_ndarray()[0]
    expected = reference_latents(tiny_vae, decode_all_rgb(a)[12:12 + NUM_FRAMES])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    errors = {e["source_uri"].rsplit("/", 1)[1]: e for e in pq.read_table(os.path.join(out, "errors")).to_pylist()}
    assert set(errors) == {"b.mp4#t=0,0.2", "missing.mp4"}
    assert errors["b.mp4#t=0,0.2"]["error_type"] == "TooShort" and "between 0 s and 0.2 s" in errors["b.mp4#t=0,0.2"]["message"]
    assert errors["missing.mp4"]["stage"] == "read"


def test_jsonl_manifest_on_s3(ray_local, s3_server, s3_bucket, clips_dir, tiny_vae, monkeypatch):
    client, bucket = s3_bucket
    client.upload_file(str(clips_dir / "videos" / "b.mp4"), bucket, "data/clips/b.mp4")
    lines = [{"uri": "clips/b.mp4", "caption": "relative to the manifest", "score": 0.5},
             {"uri": f"s3://{bucket}/data/clips/b.mp4", "start_sec": 0.25, "caption": "absolute", "score": 1.5}]
    client.put_object(Bucket=bucket, Key="data/manifest.jsonl", Body="\n".join(map(json.dumps, lines)).encode())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert main(["encode", f"s3://{bucket}/out", "--manifest", f"s3://{bucket}/data/manifest.jsonl",
                 "--model", tiny_vae, *SHAPE]) == 0
    body = client.get_object(Bucket=bucket, Key="out/_SUCCESS")["Body"].read()
    summary = json.loads(body)
    assert summary["videos"] == 2 and summary["clips"] == 3 and summary["errors"] == 0  # 2 whole + 1 span


def test_manifest_validation(tmp_path, tiny_vae, capsys):
    (tmp_path / "bad.csv").write_text("path,caption\nx.mp4,a\n")
    (tmp_path / "clash.csv").write_text("uri,fps\nx.mp4,3\n")
    (tmp_path / "m.txt").write_text("uri\nx.mp4\n")
    for name, message in [("bad.csv", "no `uri` column"), ("clash.csv", "fps"), ("m.txt", ".csv, .jsonl"),
                          ("missing.csv", "--manifest")]:
        assert main(["encode", str(tmp_path / "o"), "--manifest", str(tmp_path / name), "--model", tiny_vae,
                     *SHAPE]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["encode", str(tmp_path), str(tmp_path / "o"), "--manifest", str(tmp_path / "bad.csv"),
                 "--model", tiny_vae]) == 2
    assert "not both" in capsys.readouterr().err


def test_parquet_manifest_keeps_types(tmp_path):
    pq.write_table(pa.table({"uri": ["a.mp4"], "n": pa.array([3], pa.int32()), "tags": [["x", "y"]]}),
                   tmp_path / "m.parquet")
    cfg = Config(input=None, output="o", model="m", manifest=str(tmp_path / "m.parquet"))
    assert sources.manifest_extra_columns(cfg) == (("n", "int32"), ("tags", "string"))
    (row,) = sources.list_videos(cfg.replace(extra_columns=sources.manifest_extra_columns(cfg)))
    assert row["path"] == str(tmp_path / "a.mp4") and json.loads(row["extra"]) == {"n": 3, "tags": ["x", "y"]}


@pytest.mark.parametrize("fps, expected_indices", [
    (12.0, list(range(0, 18, 2))),                          # half the rate: every other frame
    (48.0, [i // 2 for i in range(NUM_FRAMES)]),            # double: each frame twice
])
def test_fps_resamples_before_cutting(tmp_path, fps, expected_indices):
    path = samples.write_video(str(tmp_path / "v.mp4"), samples.synthetic_frames(24, HEIGHT, WIDTH))
    cfg = Config(input=path, output=str(tmp_path / "o"), model="m", num_frames=NUM_FRAMES, height=HEIGHT,
                 width=WIDTH, fps=fps, max_clips=1)
    with av.open(path) as c:
        (cid, clip), = list(decode.iter_clips(c, path, cfg))
    frames = decode_all_rgb(path)
    np.testing.assert_array_equal(clip["frames"], frames[expected_indices].transpose(3, 0, 1, 2))
    assert clip["fps"] == fps
    assert cid != decode.clip_id(path, 0, cfg.replace(fps=None))
