"""Nothing lost, nothing duplicated: kills, actor deaths and transient S3 faults, injected."""
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import samples
from pipeline.cli import main
from tests.conftest import CRASH_FILE, HEIGHT, NUM_FRAMES, WIDTH, upload_folder
from tests.faultproxy import FaultProxy

SHAPE = ["--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """5 videos of 3 clips each, one corrupt and one too short: 15 clips and 2 error rows."""
    d = tmp_path_factory.mktemp("in")
    for i in range(5):
        samples.write_video(str(d / f"v{i}.mp4"), samples.synthetic_frames(3 * NUM_FRAMES, HEIGHT, WIDTH, i))
    samples.write_video(str(d / "short.mp4"), samples.synthetic_frames(3, HEIGHT, WIDTH))
    (d / "corrupt.mp4").write_bytes(os.urandom(2048))
    return str(d)


def snapshot(output: str, filesystem=None) -> tuple[dict, set]:
    """{(file name, start frame): latent bytes} (asserting no clip appears twice) and the set of
    inputs with an error row. Keyed by name, so runs over S3 and local copies compare."""
    latents = pads.dataset(f"{output}/latents", filesystem=filesystem, format="parquet").to_table()
    assert latents.num_rows == len(set(latents.column("clip_id").to_pylist())), "a clip was written twice"
    ids = [(u.rsplit("/", 1)[1], s) for u, s in zip(latents.column("source_uri").to_pylist(),
                                                   latents.column("start_frame").to_pylist())]
    assert len(ids) == len(set(ids))
    values = latents.column("latents").combine_chunks().to_numpy_ndarray()
    errors = pads.dataset(f"{output}/errors", filesystem=filesystem, format="parquet").to_table()
    uris = errors.column("source_uri").to_pylist()
    assert len(uris) == len(set(uris)), "an input has two error rows"
    return {i: v.tobytes() for i, v in zip(ids, values)}, {u.rsplit("/", 1)[1] for u in uris}


def every_parquet_file_is_whole(output: str) -> int:
    """A reader never sees a partial file: everything a dataset reader lists opens whole."""
    n = 0
    for sub in ("latents", "errors", "_markers"):
        if os.path.isdir(os.path.join(output, sub)):
            for f in pads.dataset(os.path.join(output, sub), format="parquet").files:
                pq.read_table(f)
                n += 1
    return n


@pytest.fixture(scope="module")
def clean_run(ray_local, inputs, tiny_vae, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clean") / "out")
    assert main(["encode", inputs, out, "--model", tiny_vae, *SHAPE]) == 0
    clips, errors = snapshot(out)
    assert len(clips) == 15 and errors == {"short.mp4", "corrupt.mp4"}
    return clips, errors


def _ray_session_alive(tmpdir: str) -> list[int]:
    """Live processes of the local Ray that a killed driver started (found by its RAY_TMPDIR)."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RAY_TMPDIR={tmpdir}".encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(int(pid))
        except OSError:
            continue
    return alive


def run_driver(args: list[str], kill_when=None, timeout=240) -> int | None:
    """Run the CLI in its own process with its own local Ray; SIGKILL it when kill_when() holds.
    Returns the exit code, or None when it was killed (after its Ray workers are gone)."""
    tmpdir = tempfile.mkdtemp(prefix="vl", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_TMPDIR": tmpdir, "RAY_ADDRESS": ""}
    log = open(os.path.join(tmpdir, "driver.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if kill_when is not None and kill_when():
            # The driver's node is lost: the driver, and with it the local Ray it started.
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            while pids := _ray_session_alive(tmpdir):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
            return None
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        raise AssertionError("the run did not finish in time")
    if proc.returncode != 0 and kill_when is not None:
        with open(log.name) as f:
            raise AssertionError(f"the run ended (code {proc.returncode}) before the kill:\n{f.read()[-3000:]}")
    return proc.returncode


def _count(folder: str) -> int:
    return len([f for f in os.listdir(folder) if f.endswith(".parquet")]) if os.path.isdir(folder) else 0


@pytest.mark.parametrize("point", ["reading", "encoding", "writing"])
def test_killed_driver_then_rerun_gives_exactly_the_clean_result(point, clean_run, inputs, tiny_vae,
                                                                   tmp_path):
    out = str(tmp_path / "out")
    latents_dir = os.path.join(out, "latents")
    started = time.monotonic()
    kill_when = {
        # Ray is up and decoding, nothing encoded yet.
        "reading": lambda: os.path.isdir(os.path.join(out, "errors")) or time.monotonic() - started > 6,
        "encoding": lambda: _count(latents_dir) >= 1,
        "writing": lambda: _count(latents_dir) >= 3,  # of 5 files in a clean run
    }[point]
    args = ["encode", inputs, out, "--model", tiny_vae, *SHAPE]
    assert run_driver(args, kill_when) is None
    partial = _count(latents_dir)
    assert partial < 15 and not os.path.exists(os.path.join(out, "_SUCCESS"))
    every_parquet_file_is_whole(out)

    assert run_driver(args) == 0
    clips, errors = snapshot(out)
    assert (clips, errors) == clean_run  # same ids, same latent bytes, same errors
    every_parquet_file_is_whole(out)


def test_an_encoder_actor_dying_mid_batch_is_restarted_and_its_batch_retried(
        ray_local, clean_run, inputs, tiny_vae, tmp_path):
    open(CRASH_FILE, "w").close()  # arm: the next actor call kills its process
    out = str(tmp_path / "out")
    assert main(["encode", inputs, out, "--model", tiny_vae, *SHAPE]) == 0
    assert not os.path.exists(CRASH_FILE), "the crash hook never fired"
    assert snapshot(out) == clean_run


def test_transient_s3_faults_are_retried_and_nothing_is_lost(
        ray_local, clean_run, s3_server, s3_bucket, inputs, tiny_vae, monkeypatch):
    client, bucket = s3_bucket
    upload_folder(client, bucket, inputs, "in")
    upload_folder(client, bucket, tiny_vae, "model")
    with FaultProxy(s3_server) as proxy:
        code = main(["encode", f"s3://{bucket}/in", f"s3://{bucket}/out", "--model", f"s3://{bucket}/model",
                     "--s3-endpoint", proxy.endpoint, *SHAPE])
    assert code == 0
    assert min(proxy.faults.values()) >= 3, proxy.faults  # every kind of fault was really injected
    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http")
    assert snapshot(f"{bucket}/out", fs) == clean_run
