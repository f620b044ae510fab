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

from pipeline import decode, layout, samples
from pipeline.cli import main
from pipeline.config import CPU_BATCH
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH, upload_folder
from tests.faultproxy import FaultProxy
from tests.hookctl import Hooks

# Three clips per output file: a run writes several files, so a kill can land between two writes.
SHAPE = ["--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH), "--rows-per-file", "3"]


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


class Driver:
    """The CLI in its own process with its own local Ray (as `ray submit` runs it on a head node),
    with the pipeline's fault hooks in a folder of its own."""

    def __init__(self, args: list[str], hooks: Hooks | None = None, env: dict | None = None):
        self.tmpdir = tempfile.mkdtemp(prefix="vl", dir="/tmp")  # short: Ray's socket paths have a limit
        self.log = os.path.join(self.tmpdir, "driver.log")
        env = {**os.environ, "RAY_TMPDIR": self.tmpdir, "RAY_ADDRESS": "", **(hooks.env if hooks else {}),
               **(env or {})}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env,
                                         stdout=log, stderr=log)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not finish in time:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        """The driver's node is lost: the driver, and with it the local Ray it started."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        while pids := _ray_session_alive(self.tmpdir):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)  # until the kernel has reaped them; not a decision point

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()


def _count(folder: str) -> int:
    return len([f for f in os.listdir(folder) if f.endswith(".parquet")]) if os.path.isdir(folder) else 0


# Where to kill the driver: each point blocks every arrival from the given one on, so the run
# cannot finish before the kill, and the kill cannot come before the point is reached.
KILL_POINTS = {
    "reading": ("decode", 1),  # Ray is up, an input is about to be opened, nothing encoded
    "encoding": ("encode", 1),  # clips decoded, the first encoder call under way
    "writing": ("write", 3),  # two latents files written (of 15 in a clean run), the third blocked
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_driver_then_rerun_gives_exactly_the_clean_result(point, clean_run, inputs, tiny_vae,
                                                                   tmp_path):
    out = str(tmp_path / "out")
    args = ["encode", inputs, out, "--model", tiny_vae, *SHAPE]
    hooks = Hooks()
    hook, first = KILL_POINTS[point]
    hooks.arm(hook, "block", first=first)
    driver = Driver(args, hooks)
    hooks.wait(hook, proc=driver.proc, log=driver.log)
    driver.kill()
    hooks.close()
    written = _count(os.path.join(out, "latents"))
    assert written == {"reading": 0, "encoding": 0, "writing": 2}[point] or \
        (point == "writing" and 2 <= written < 15), written
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))
    every_parquet_file_is_whole(out)

    rerun = Driver(args)
    assert rerun.wait() == 0, rerun.output()[-3000:]
    clips, errors = snapshot(out)
    assert (clips, errors) == clean_run  # same ids, same latent bytes, same errors
    every_parquet_file_is_whole(out)


def _ray_process(tmpdir: str, title: str) -> int:
    """The pid of the live process of a driver's local Ray whose title is ``title``."""
    for pid in _ray_session_alive(tmpdir):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read().split(b"\0")[0].decode().startswith(title):
                return pid
    raise AssertionError(f"no live {title} process")


def test_a_lost_ledger_stops_the_run_and_says_so(inputs, tiny_vae, tmp_path):
    """The run's ledger dies while an encoder call is under way; the encoder then dies too, and
    its restart finds no ledger: the run stops with exit 1 and a line naming the ledger (not "an
    encoder actor died 6 times"), no _SUCCESS, and every file in OUTPUT whole."""
    out = str(tmp_path / "out")
    hooks = Hooks()
    hooks.arm("encode", "block", first=1, last=1)
    driver = Driver(["encode", inputs, out, "--model", tiny_vae, *SHAPE], hooks)
    encoder_pid = int(hooks.wait("encode", proc=driver.proc, log=driver.log)["encode"][2])
    os.kill(_ray_process(driver.tmpdir, "ray::RunLedger"), signal.SIGKILL)
    os.kill(encoder_pid, signal.SIGKILL)
    code = driver.wait()
    hooks.close()
    # Ray's own log lines, forwarded to the driver, may come after the run's one line.
    said = [line for line in driver.output().splitlines() if line.startswith("video-latents: run failed:")]
    assert code == 1 and len(said) == 1, driver.output()[-3000:]
    assert said[0].startswith("video-latents: run failed: the run's ledger"), said[0]
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))
    every_parquet_file_is_whole(out)


def test_an_encoder_actor_dying_mid_batch_is_restarted_and_its_batch_retried(
        ray_local, clean_run, inputs, tiny_vae, tmp_path, hooks):
    hooks.arm("encode", "crash", first=1, last=1)  # the first encoder call kills its process
    out = str(tmp_path / "out")
    assert main(["encode", inputs, out, "--model", tiny_vae, *SHAPE]) == 0
    # At most two clips per call (the CPU batch), so at least this many calls and the crashed one.
    assert hooks.arrivals("encode") >= -(-len(clean_run[0]) // CPU_BATCH) + 1, \
        "the crash hook never fired, or the batch was not retried"
    assert snapshot(out) == clean_run


def test_a_device_that_keeps_failing_stops_the_run_and_marks_nothing_done(
        ray_local, inputs, tiny_vae, tmp_path, hooks, capsys):
    """Every encoder process dies on its first call, as on a lost GPU: the batch is retried on
    restarted actors, then the run stops with exit 1 and one line; no clip is marked done."""
    hooks.arm("encode", "crash")
    out = str(tmp_path / "out")
    assert main(["encode", inputs, out, "--model", tiny_vae, *SHAPE]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("video-latents: run failed: an encoder actor died 6 times"), err
    assert hooks.arrivals("encode") == 6
    assert _count(os.path.join(out, "latents")) == 0 and not os.path.exists(os.path.join(out, "_SUCCESS"))
    errors = layout.read_columns(out, layout.ERRORS_DIR, ["stage"])
    assert errors is None or "encode" not in errors.column("stage").to_pylist()


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


def test_an_input_whose_reads_keep_failing_gets_a_retryable_row_and_a_rerun_retries_it(
        ray_local, clean_run, s3_server, s3_bucket, inputs, tiny_vae, capsys):
    """Every request for one input answers 503 SlowDown: the S3 client retries, then the decode
    step retries the input; it ends with a retryable error row, exit 1 and no _SUCCESS. A rerun
    (the store healthy again) encodes it, and the result is exactly the clean one."""
    client, bucket = s3_bucket
    upload_folder(client, bucket, inputs, "in")
    args = ["encode", f"s3://{bucket}/in", f"s3://{bucket}/out", "--model", tiny_vae, *SHAPE]
    throttled = []

    def slow_down_v3(n, method, path):
        if "/in/v3.mp4" in path:
            throttled.append(method)
            return "503"
        return None

    with FaultProxy(s3_server, schedule=slow_down_v3) as proxy:
        code = main([*args, "--s3-endpoint", proxy.endpoint, "--s3-max-attempts", "2"])
    assert code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 input(s) or clip(s) failed for reasons that may pass (transient 1" in last, last
    assert "rerun the same command" in last
    # The S3 client's 2 attempts, for each of the decode step's 3 tries.
    assert len(throttled) >= 2 * (1 + decode.TRANSIENT_RETRIES), throttled
    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http")
    errors = pads.dataset(f"{bucket}/out/errors", filesystem=fs, format="parquet").to_table().to_pylist()
    (row,) = [e for e in errors if e["source_uri"].endswith("v3.mp4")]
    assert (row["stage"], row["error_class"], row["retryable"]) == ("read", "transient", True)
    assert "503" in row["message"]
    assert "out/_SUCCESS" not in [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]

    assert main([*args, "--s3-endpoint", s3_server]) == 0
    assert snapshot(f"{bucket}/out", fs) == clean_run
