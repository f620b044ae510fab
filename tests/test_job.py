"""The job's identity: a rerun into an OUTPUT with other settings is refused before Ray starts,
and OUTPUT is left untouched; settings that cannot change the output are free to change."""
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline import samples
from pipeline.cli import main
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]


def files_of(folder: str) -> dict:
    out = {}
    for root, _dirs, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def encode_in_a_fresh_process(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "pipeline", "encode", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory):
    """Two videos (one too short, for an error row), encoded once with model A."""
    root = tmp_path_factory.mktemp("job")
    videos = root / "in"
    samples.write_video(str(videos / "a.mp4"), samples.synthetic_frames(2 * NUM_FRAMES, HEIGHT, WIDTH, 1))
    samples.write_video(str(videos / "short.mp4"), samples.synthetic_frames(3, HEIGHT, WIDTH, 2))
    model_a = samples.make_tiny_vae(str(root / "model-a"))
    out = str(root / "out")
    assert main(["encode", str(videos), out, "--model", model_a, "--dtype", "float32", *SHAPE]) == 0
    return str(videos), out, model_a, root


@pytest.mark.parametrize("change, expected", [
    ("model", "--model: {a} -> {b}"),
    ("weights", "model weights: "),
    (["--latent-mode", "dist"], "--latent-mode: mode -> dist"),
    (["--height", "32"], f"--height: {HEIGHT} -> 32"),
    (["--dtype", "bfloat16"], "--dtype: float32 -> bfloat16"),
    (["--clip-stride", "4"], f"--clip-stride: {NUM_FRAMES} -> 4"),
])
def test_a_rerun_with_other_settings_exits_2_before_ray_and_leaves_output_untouched(
        first_run, change, expected):
    videos, out, model_a, root = first_run
    model, extra = model_a, []
    if change == "model":
        model = samples.make_tiny_vae(str(root / "model-b"), scaling_factor=2.0)
    elif change == "weights":  # other weights of the same shape (in place: the next test)
        model = samples.make_tiny_vae(str(root / "model-a-retrained"), seed=1)
    else:
        extra = change
    before = files_of(out)
    proc = encode_in_a_fresh_process([videos, out, "--model", model, "--dtype", "float32", *SHAPE, *extra])
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert expected.format(a=model_a, b=model) in err, err
    assert "--overwrite" in err and "another OUTPUT" in err
    assert "Ray" not in err, err  # refused before Ray started
    assert files_of(out) == before


def test_weights_changed_in_place_are_noticed(ray_local, tmp_path):
    videos = tmp_path / "in"
    samples.write_video(str(videos / "a.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH, 1))
    model = samples.make_tiny_vae(str(tmp_path / "model"))
    out = str(tmp_path / "out")
    assert main(["encode", str(videos), out, "--model", model, *SHAPE]) == 0
    samples.make_tiny_vae(model, seed=7)  # retrained, saved over the same folder: same sizes, same header
    assert main(["encode", str(videos), out, "--model", model, *SHAPE]) == 2


def test_settings_that_cannot_change_the_output_are_free_and_overwrite_starts_afresh(first_run, capsys):
    videos, out, model_a, root = first_run
    job = json.load(open(os.path.join(out, "_job.json")))
    assert main(["encode", videos, out, "--model", model_a, "--dtype", "float32", *SHAPE, "--batch-size", "3",
                 "--num-actors", "1", "--max-error-rate", "1", "--s3-max-attempts", "2",
                 "--decode-timeout", "60"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["clips_this_run"] == 0 and summary["videos_already_done"] == 2
    assert json.load(open(os.path.join(out, "_job.json"))) == job

    # Every file carries the job's fingerprint.
    for folder in ("latents", "errors", "_markers"):
        for name in os.listdir(os.path.join(out, folder)):
            meta = json.loads(pq.read_schema(os.path.join(out, folder, name)).metadata[b"video_latents"])
            assert meta["job_fingerprint"] == job["fingerprint"], (folder, name)

    model_b = samples.make_tiny_vae(str(root / "model-c"), scaling_factor=3.0)
    assert main(["encode", videos, out, "--model", model_b, "--dtype", "float32", *SHAPE, "--overwrite"]) == 0
    new_job = json.load(open(os.path.join(out, "_job.json")))
    assert new_job["fingerprint"] != job["fingerprint"] and new_job["identity"]["--model"] == model_b
    latents = pq.read_table(os.path.join(out, "latents"))
    meta = json.loads(latents.schema.metadata[b"video_latents"])
    assert meta["model"] == model_b and meta["scaling_factor"] == 3.0


def test_results_without_a_job_record_are_not_taken_over(ray_local, tiny_vae, tmp_path, capsys):
    videos = tmp_path / "in"
    samples.write_video(str(videos / "a.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH, 1))
    out = str(tmp_path / "out")
    assert main(["encode", str(videos), out, "--model", tiny_vae, *SHAPE]) == 0
    os.remove(os.path.join(out, "_job.json"))  # as an older version left it
    capsys.readouterr()
    assert main(["encode", str(videos), out, "--model", tiny_vae, *SHAPE]) == 2
    assert "holds results but no _job.json" in capsys.readouterr().err
