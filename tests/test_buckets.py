"""--buckets: each video is encoded at the bucket nearest its aspect ratio; files hold one shape."""
import os

import numpy as np
import pyarrow.parquet as pq

import pipeline
from pipeline import samples
from pipeline.cli import main
from pipeline.decode import choose_bucket
from pipeline.report import summarize
from tests.conftest import NUM_FRAMES, decode_all_rgb, reference_latents


def test_nearest_aspect_ratio():
    buckets = ((480, 720), (720, 480), (480, 480))
    assert choose_bucket(1920, 1080, buckets) == (480, 720)
    assert choose_bucket(1080, 1920, buckets) == (720, 480)
    assert choose_bucket(500, 490, buckets) == (480, 480)
    assert choose_bucket(100, 100, ((64, 96), (96, 64))) == (64, 96)  # a tie: the smaller tuple


def test_buckets_end_to_end(ray_local, tiny_vae, tmp_path):
    videos = tmp_path / "in"
    samples.write_video(str(videos / "wide.mp4"), samples.synthetic_frames(NUM_FRAMES, 64, 96, 1))
    samples.write_video(str(videos / "tall.mp4"), samples.synthetic_frames(NUM_FRAMES, 120, 72, 2))
    samples.write_video(str(videos / "wider.mp4"), samples.synthetic_frames(NUM_FRAMES, 40, 100, 3))
    out = str(tmp_path / "out")
    assert main(["encode", str(videos), out, "--model", tiny_vae, "--num-frames", str(NUM_FRAMES),
                 "--buckets", "64x96,96x64", "--batch-size", "3", "--latent-dtype", "float32"]) == 0

    shapes = {}
    for f in sorted(os.listdir(os.path.join(out, "latents"))):
        table = pq.read_table(os.path.join(out, "latents", f))
        shape = tuple(table.schema.field("latents").type.shape)
        assert len({(h, w) for h, w in zip(table.column("height").to_pylist(), table.column("width").to_pylist())}) == 1
        for uri, h, w in zip(table.column("source_uri").to_pylist(), table.column("height").to_pylist(),
                             table.column("width").to_pylist()):
            shapes[os.path.basename(uri)] = ((h, w), shape)
            assert shape == (3, 4, h // 8, w // 8)
    assert {k: v[0] for k, v in shapes.items()} == {"wide.mp4": (64, 96), "wider.mp4": (64, 96), "tall.mp4": (96, 64)}

    data = pipeline.LatentDataset(out)
    assert len(data) == 3
    wide = next(data[i] for i in range(3) if data[i]["source_uri"].endswith("wide.mp4"))
    expected = reference_latents(tiny_vae, decode_all_rgb(str(videos / "wide.mp4")))
    np.testing.assert_allclose(wide["latents"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert summarize(out)["clips"] == 3


def test_bad_buckets_exit_2(tiny_vae, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for value, message in [("64x90", "multiples of 8"), ("64by96", "HxW")]:
        assert _code(["encode", str(tmp_path / "in"), str(tmp_path / "o"), "--model", tiny_vae,
                      "--num-frames", "9", "--buckets", value]) == 2
        assert message in capsys.readouterr().err


def _code(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_a_batch_of_mixed_shapes_is_encoded_by_shape_and_written_one_file_per_shape(tiny_vae, tmp_path):
    from actors.encoder import VAEEncoder
    from pipeline import sink
    from pipeline.config import Config
    from pipeline.model import inspect_model

    cfg = Config(input=str(tmp_path), output=str(tmp_path / "out"), model=tiny_vae, num_frames=NUM_FRAMES,
                 height=64, width=96, buckets=((64, 96), (96, 64)), device="cpu", dtype="float32",
                 latent_dtype="float32", num_actors=(1, 1))
    clips = [samples.synthetic_frames(NUM_FRAMES, h, w, i).transpose(3, 0, 1, 2)
             for i, (h, w) in enumerate([(64, 96), (96, 64), (64, 96)])]
    frames = np.empty(3, dtype=object)
    frames[:] = clips  # as Ray hands a ragged tensor column
    n = 3
    batch = {"frames": frames, "clip_id": np.array(["a", "b", "c"], dtype=object),
             "source_uri": np.array(["u1", "u2", "u3"], dtype=object), "clip_index": np.zeros(n),
             "start_frame": np.zeros(n), "num_frames": np.full(n, NUM_FRAMES), "fps": np.full(n, 24.0),
             "height": np.array([64, 96, 64]), "width": np.array([96, 64, 96])}
    out = VAEEncoder(cfg, inspect_model(tiny_vae))(batch)
    assert out["latents"].dtype == object and [z.shape for z in out["latents"]] == [
        (3, 4, 8, 12), (3, 4, 12, 8), (3, 4, 8, 12)]
    np.testing.assert_allclose(out["latents"][1], reference_latents(tiny_vae, clips[1].transpose(1, 2, 3, 0)),
                               rtol=1e-5, atol=1e-5)
    written = sink.write_latents(out, cfg, sink.dataset_metadata(cfg, inspect_model(tiny_vae)))
    assert sorted(written["num_rows"].tolist()) == [1, 2]
    import json
    for path in written["path"]:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"video_latents"])
        assert meta["latent_shape"] == list(table.schema.field("latents").type.shape)
