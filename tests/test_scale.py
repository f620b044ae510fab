"""What changes at dataset scale: output files sized for readers, a lean model fetch from S3,
decode memory set by the target size, long videos split into spans, and the plan."""
import os

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import samples
from pipeline.cli import main
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH
from tests.hookctl import Hooks
from tests.test_reliability import Driver

SHAPE = ["--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]


@pytest.fixture(scope="module")
def sixty_clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("sixty")
    for i in range(20):
        samples.write_video(str(d / f"v{i:02d}.mp4"), samples.synthetic_frames(3 * NUM_FRAMES, HEIGHT, WIDTH, i))
    return str(d)


def file_rows(output: str) -> list[int]:
    folder = os.path.join(output, "latents")
    return [pq.ParquetFile(os.path.join(folder, f)).metadata.num_rows for f in os.listdir(folder)
            if f.endswith(".parquet")]


def clip_ids(output: str) -> list[str]:
    return pads.dataset(os.path.join(output, "latents"), format="parquet").to_table(
        columns=["clip_id"]).column("clip_id").to_pylist()


def test_by_default_small_clips_share_a_few_big_files(ray_local, sixty_clips, tiny_vae, tmp_path):
    out = str(tmp_path / "out")
    assert main(["encode", sixty_clips, out, "--model", tiny_vae, *SHAPE]) == 0
    rows = file_rows(out)
    assert sum(rows) == 60 and len(rows) <= 4, rows


def test_rows_per_file_bounds_every_file_also_after_a_kill_and_rerun(sixty_clips, tiny_vae, tmp_path):
    out = str(tmp_path / "out")
    args = ["encode", sixty_clips, out, "--model", tiny_vae, *SHAPE, "--rows-per-file", "16"]
    hooks = Hooks()
    hooks.arm("write", "block", first=2)  # one file committed, the next write blocked
    driver = Driver(args, hooks)
    hooks.wait("write", proc=driver.proc, log=driver.log)
    driver.kill()
    hooks.close()
    assert 1 <= len(file_rows(out)) < 60 and max(file_rows(out)) <= 16

    rerun = Driver(args)
    assert rerun.wait() == 0, rerun.output()[-3000:]
    rows = file_rows(out)
    assert sum(rows) == 60 and max(rows) <= 16, rows
    ids = clip_ids(out)
    assert len(ids) == len(set(ids)) == 60  # exactly once: no clip in two files


def test_only_the_vae_is_fetched_from_an_s3_model_and_new_weights_are_fetched_again(
        ray_local, s3_server, s3_bucket, sixty_clips, tmp_path):
    """A diffusers repository on S3 with a large transformer/ beside vae/: nothing under
    transformer/ is read; replacing the VAE's weights under the same URI fetches them again."""
    import uuid

    from tests.conftest import upload_folder
    from tests.faultproxy import FaultProxy

    client, bucket = s3_bucket
    prefix = f"models/{uuid.uuid4().hex[:8]}"  # a fresh URI: this node's cache has never seen it
    upload_folder(client, bucket, samples.make_tiny_vae(str(tmp_path / "m1")), prefix)
    client.put_object(Bucket=bucket, Key=f"{prefix}/transformer/diffusion_pytorch_model.safetensors",
                      Body=os.urandom(16 << 20))
    client.put_object(Bucket=bucket, Key=f"{prefix}/model_index.json", Body=b'{"_class_name": "CogVideoXPipeline"}')
    videos = str(tmp_path / "in")
    samples.write_video(os.path.join(videos, "a.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH))
    requests = []
    weights = f"/{bucket}/{prefix}/vae/diffusion_pytorch_model.safetensors"

    def run(*extra):
        with FaultProxy(s3_server, schedule=lambda n, method, path: requests.append((method, path)) and None) as proxy:
            return main(["encode", videos, str(tmp_path / "out"), "--model", f"s3://{bucket}/{prefix}",
                         "--s3-endpoint", proxy.endpoint, *SHAPE, *extra])

    assert run() == 0
    assert not [r for r in requests if "transformer" in r[1]], [r for r in requests if "transformer" in r[1]]
    assert [m for m, p in requests if p == weights].count("GET") == 1
    first = pq.read_table(str(tmp_path / "out" / "latents")).column("latents").to_pylist()

    upload_folder(client, bucket, samples.make_tiny_vae(str(tmp_path / "m2"), seed=1), prefix)  # retrained
    assert run("--overwrite") == 0
    assert [m for m, p in requests if p == weights].count("GET") == 2  # the new weights, not the cached ones
    assert pq.read_table(str(tmp_path / "out" / "latents")).column("latents").to_pylist() != first


def test_a_model_file_replaced_after_the_run_fingerprinted_it_is_refused_not_fetched(s3_server, s3_bucket,
                                                                                      tmp_path, monkeypatch):
    """The node's fetch asks for the ETag the driver saw (If-Match): weights replaced on S3 in
    between are refused with one line naming the file and both ETags, and nothing is cached."""
    import uuid

    from pipeline import model
    from tests.conftest import upload_folder

    client, bucket = s3_bucket
    prefix = f"models/{uuid.uuid4().hex[:8]}"
    upload_folder(client, bucket, samples.make_tiny_vae(str(tmp_path / "m1")), prefix)
    info = model.inspect_model(f"s3://{bucket}/{prefix}", endpoint=s3_server)  # as the driver does
    key = f"{prefix}/vae/diffusion_pytorch_model.safetensors"
    before = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    upload_folder(client, bucket, samples.make_tiny_vae(str(tmp_path / "m2"), seed=1), prefix)  # retrained
    after = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    assert before != after
    monkeypatch.setenv("VIDEO_LATENTS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(model.ModelChanged) as e:
        model.local_model_dir(info, s3_server)
    assert str(e.value) == (
        f"the model at s3://{bucket}/{prefix} changed during the run (vae/diffusion_pytorch_model.safetensors: "
        f"ETag {before} when the run started, {after} now); what this run wrote so far is from the weights "
        "it started with: rerun with --overwrite (or into a new OUTPUT) to encode with the new ones")
    assert not [p for p in (tmp_path / "cache").rglob(".complete")]  # a later run fetches afresh


def test_weights_replaced_during_a_run_stop_it_with_one_line(ray_local, s3_server, s3_bucket, hooks, tmp_path, capsys):
    """Through the CLI: the VAE's weights are replaced on S3 after the driver fingerprinted the
    model and before the encoder actor fetches it (it waits at its start for the test to replace
    them): the run exits 1 with the one line, nothing encoded under the old identity."""
    import threading
    import uuid

    from pipeline import hooks as pipeline_hooks
    from tests.conftest import upload_folder

    client, bucket = s3_bucket
    prefix = f"models/{uuid.uuid4().hex[:8]}"  # a fresh URI: no node cache has it
    upload_folder(client, bucket, samples.make_tiny_vae(str(tmp_path / "m1")), prefix)
    videos = str(tmp_path / "in")
    samples.write_video(os.path.join(videos, "a.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH))
    hooks.arm("encoder-start", "barrier", on="weights-replaced", count=1)
    hooks.arm("weights-replaced", "signal")

    def replace_when_the_encoder_starts():
        hooks.wait("encoder-start")
        upload_folder(client, bucket, samples.make_tiny_vae(str(tmp_path / "m2"), seed=1), prefix)
        pipeline_hooks.reach("weights-replaced")  # lets the encoder actor go on to its fetch

    replacer = threading.Thread(target=replace_when_the_encoder_starts, daemon=True)
    replacer.start()
    code = main(["encode", videos, str(tmp_path / "out"), "--model", f"s3://{bucket}/{prefix}",
                 "--s3-endpoint", s3_server, *SHAPE])
    replacer.join(timeout=60)
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    failed = [line for line in err.splitlines() if line.startswith("video-latents: run failed")]
    assert len(failed) == 1 and failed[0].startswith(
        f"video-latents: run failed: the model at s3://{bucket}/{prefix} changed during the run "
        "(vae/diffusion_pytorch_model.safetensors: ETag "), err[-3000:]
    assert not os.path.exists(os.path.join(tmp_path, "out", "latents")) or not file_rows(str(tmp_path / "out"))


PEAK_RSS = """
import resource, sys
from pipeline import decode
from pipeline.config import Config
cfg = Config(input=sys.argv[1], output=sys.argv[2], model="m", num_frames=49, height=480, width=720)
shapes = [clip["frames"].shape for clip in decode.decode_clips({"source_uri": sys.argv[1], "size": 1}, cfg)]
print(shapes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _decode_peak(path: str, out: str) -> tuple[list, int]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, path, out], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shapes, peak = proc.stdout.strip().rsplit(" ", 1)
    return shapes, int(peak)


def test_decode_memory_follows_the_target_not_the_sources_aspect_ratio(tmp_path):
    """A 2048x16 video cut to 49x480x720 frames: scaled to cover first, each frame would be
    61440x480 (88 MB); cropped in source coordinates first, it costs what an ordinary video does."""
    wide = samples.write_video(str(tmp_path / "wide.mp4"), samples.synthetic_frames(49, 16, 2048))
    ordinary = samples.write_video(str(tmp_path / "ordinary.mp4"), samples.synthetic_frames(49, 720, 1280))
    wide_shapes, wide_peak = _decode_peak(wide, str(tmp_path / "o1"))
    ordinary_shapes, ordinary_peak = _decode_peak(ordinary, str(tmp_path / "o2"))
    assert wide_shapes == ordinary_shapes == "[(3, 49, 480, 720)]"  # encoded, at the target size
    assert wide_peak - ordinary_peak < 500 << 20, (wide_peak >> 20, ordinary_peak >> 20)


def latents_by_id(output: str) -> dict:
    table = pads.dataset(os.path.join(output, "latents"), format="parquet").to_table()
    values = table.column("latents").combine_chunks().to_numpy_ndarray()
    return {cid: v.tobytes() for cid, v in zip(table.column("clip_id").to_pylist(), values)}


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """One video of 10 clips, and its clips encoded whole (not split)."""
    d = tmp_path_factory.mktemp("long")
    samples.write_video(str(d / "in" / "long.mp4"), samples.synthetic_frames(10 * NUM_FRAMES, HEIGHT, WIDTH, 5))
    return str(d / "in")


LONG_ARGS = [*SHAPE, "--latent-dtype", "float32", "--batch-size", "1", "--rows-per-file", "1"]


@pytest.fixture(scope="module")
def unsplit(ray_local, long_video, tiny_vae, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("unsplit") / "out")
    assert main(["encode", long_video, out, "--model", tiny_vae, *LONG_ARGS, "--clips-per-task", "0"]) == 0
    clips = latents_by_id(out)
    assert len(clips) == 10
    return clips


def test_a_long_video_split_into_parts_gives_the_same_clips_and_latents(
        ray_local, long_video, unsplit, tiny_vae, tmp_path, hooks):
    hooks.arm("decode", "signal")
    out = str(tmp_path / "out")
    assert main(["encode", long_video, out, "--model", tiny_vae, *LONG_ARGS, "--clips-per-task", "3"]) == 0
    assert hooks.arrivals("decode") == 4  # parts of 3, 3, 3 and 1 clips, each its own task
    assert latents_by_id(out) == unsplit  # the same ids, the same latent bytes
    markers = pads.dataset(os.path.join(out, "_markers"), format="parquet").to_table().to_pylist()
    assert sorted((m["part"], m["parts"], len(m["clip_ids"])) for m in markers) == \
        [(0, 4, 3), (1, 4, 3), (2, 4, 3), (3, 4, 1)]


def test_an_mkv_is_split_on_its_duration(ray_local, tiny_vae, tmp_path, hooks):
    """MKV declares no frame count: its parts are counted from duration x rate, and together
    they cut the clips that decoding it whole cuts."""
    import av

    from pipeline import decode
    from pipeline.config import Config

    videos = tmp_path / "in"
    path = samples.write_video(str(videos / "long.mkv"), samples.synthetic_frames(7 * NUM_FRAMES, HEIGHT, WIDTH, 6),
                               options={"g": "12"})
    out = str(tmp_path / "out")
    hooks.arm("decode", "signal")
    assert main(["encode", str(videos), out, "--model", tiny_vae, *LONG_ARGS, "--clips-per-task", "3"]) == 0
    assert hooks.arrivals("decode") == 3  # parts of 3, 3 and 1 clips
    (uri,) = set(pq.read_table(os.path.join(out, "latents"), columns=["source_uri"]).column("source_uri").to_pylist())
    cfg = Config(input=str(videos), output=out, model="m", num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH)
    with av.open(path) as c:
        whole = [cid for cid, _clip in decode.iter_clips(c, uri, cfg)]
    assert sorted(latents_by_id(out)) == sorted(whole) and len(whole) == 7


def test_resume_goes_part_by_part(long_video, unsplit, tiny_vae, tmp_path):
    """Two parts are done (their markers and clips committed) when the run is killed; the rerun
    decodes only the other three."""
    out = str(tmp_path / "out")
    args = ["encode", long_video, out, "--model", tiny_vae, *LONG_ARGS, "--clips-per-task", "2"]
    hooks = Hooks()
    hooks.arm("decode", "block", first=3)  # only the first two parts are decoded
    hooks.arm("marker", "signal")
    hooks.arm("written", "signal")
    # Ray's own override: 4 logical CPUs, so that a blocked decode task does not leave the writer
    # without one on a 2-core machine.
    driver = Driver(args, hooks, env={"RAY_OVERRIDE_RESOURCES": '{"CPU": 4}'})
    hooks.wait(counts={"marker": 2, "written": 4}, proc=driver.proc, log=driver.log)
    driver.kill()
    hooks.close()

    again = Hooks()
    again.arm("decode", "signal")
    rerun = Driver(args, again)
    assert rerun.wait() == 0, rerun.output()[-3000:]
    assert again.arrivals("decode") == 3
    again.close()
    assert latents_by_id(out) == unsplit


def test_plan_predicts_the_clips_encode_cuts(ray_local, tiny_vae, tmp_path, capsys, hooks):
    """From headers alone: the same clips per video as encoding, the same failures, the parts."""
    import json

    videos = tmp_path / "in"
    for i, clips in enumerate([1, 2, 3, 7]):
        samples.write_video(str(videos / f"v{i}.mp4"), samples.synthetic_frames(clips * NUM_FRAMES + i, HEIGHT, WIDTH, i))
    samples.write_video(str(videos / "wide.mp4"), samples.synthetic_frames(2 * NUM_FRAMES, 32, 128, 9))
    samples.write_video(str(videos / "short.mp4"), samples.synthetic_frames(4, HEIGHT, WIDTH, 8))
    (videos / "corrupt.mp4").write_bytes(os.urandom(3000))
    options = [*SHAPE, "--clips-per-task", "3", "--buckets", "64x64,32x128"]
    assert main(["plan", str(videos), "--model", tiny_vae, *options, "--json", "--clips-per-s", "2"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    out = str(tmp_path / "out")
    hooks.arm("decode", "signal")
    assert main(["encode", str(videos), out, "--model", tiny_vae, *options]) == 0
    assert hooks.arrivals("decode") == plan["decode_tasks"]
    latents = pads.dataset(os.path.join(out, "latents"), format="parquet").to_table(
        columns=["source_uri", "height", "width"]).to_pylist()
    per_video = {}
    for r in latents:
        per_video[r["source_uri"]] = per_video.get(r["source_uri"], 0) + 1
    assert plan["inputs"] == 7 and plan["clips"] == len(latents) == 15
    assert plan["clips_per_video"] == {str(c): list(per_video.values()).count(c) for c in set(per_video.values())}
    assert plan["buckets"] == {"64x64": {"videos": 4, "clips": 13}, "32x128": {"videos": 1, "clips": 2}}
    assert plan["problems"] == {"sample/TooShort": 1, "decode/InvalidDataError": 1}
    # 6 whole (the 2 failing ones too), and the 7-clip video in parts of 3, 3, 1
    assert plan["decode_tasks"] == 9 and plan["inputs_split"] == 1
    assert plan["gpu_hours"] == round(15 / 2 / 3600, 3)
    assert plan["latent_bytes"] == sum(3 * 4 * (h // 8) * (w // 8) * 2 for h, w in
                                       [(r["height"], r["width"]) for r in latents])


def test_plan_reads_the_gpu_benchmarks_own_report(tmp_path):
    """plan's GPU-hours come from bench.gpu's JSON as it writes it: the H200 run committed in
    bench/results/ (its pipeline steady state, scaled by clip size); a CPU fallback report, even a
    newer one, is no GPU figure. (The reader once looked for keys bench.gpu never wrote, and
    estimated nothing from a real result.)"""
    import json
    import shutil

    from pipeline.commands.plan import _measured_rate
    from pipeline.config import Config

    committed = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "bench", "results", "gpu-h200-2026-12-04.json")
    shutil.copy(committed, tmp_path / "gpu-h200-2026-12-04.json")
    (tmp_path / "gpu-zz-cpu.json").write_text(json.dumps(
        {"device_name": "cpu", "cpu_fallback": True, "pipeline_steady_clips_per_s": 9.0,
         "workload": {"clip_shape": [9, 64, 64]}}))
    with open(committed) as f:
        measured = json.load(f)
    cfg = Config(input="-", output="-", model="-", num_frames=49, height=480, width=720)
    rate, source = _measured_rate(cfg, None, str(tmp_path))
    assert rate == measured["pipeline_steady_clips_per_s"] and "H200" in source and "steady" in source
    half, _ = _measured_rate(cfg.replace(height=240), None, str(tmp_path))
    assert half == pytest.approx(2 * rate)
