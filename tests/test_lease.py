"""One run at a time into an OUTPUT: a second encode (or --overwrite) while a run writes into it
exits 2 before Ray starts, naming the running one, and changes nothing; a dead run's stale lease
is taken over with one line saying so; a run whose lease (or job record) was taken from it
mid-run never writes _SUCCESS. On a local folder and on a real S3 API server (moto): the two
create the lease differently (an exclusive link; a PUT with If-None-Match)."""
import json
import os
import socket
import time

import pytest

from pipeline import lease, samples
from pipeline.cli import main
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH
from tests.hookctl import Hooks
from tests.test_job import encode_in_a_fresh_process, files_of
from tests.test_reliability import Driver

SHAPE = ["--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]


@pytest.fixture(scope="module")
def one_video(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    samples.write_video(str(d / "a.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH, 1))
    return str(d)


class Output:
    """OUTPUT on a local folder or in a bucket on the moto server, read and written from the test."""

    def __init__(self, backend: str, tmp_path, request):
        self.s3 = backend == "s3"
        if self.s3:
            self.endpoint = request.getfixturevalue("s3_server")
            self.client, self.bucket = request.getfixturevalue("s3_bucket")
            self.uri, self.args = f"s3://{self.bucket}/out", ["--s3-endpoint", self.endpoint]
        else:
            self.uri, self.args = str(tmp_path / "out"), []

    def state(self) -> dict:
        """Every object in OUTPUT but the lease (its holder's heartbeat rewrites it when it will):
        {name: bytes} locally, {key: ETag} on S3."""
        if not self.s3:
            return {k: v for k, v in files_of(self.uri).items() if k != lease.NAME}
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix="out/").get("Contents", [])
        return {o["Key"]: o["ETag"] for o in listed if o["Key"] != f"out/{lease.NAME}"}

    def read(self, name: str) -> dict | None:
        try:
            if self.s3:
                return json.loads(self.client.get_object(Bucket=self.bucket, Key=f"out/{name}")["Body"].read())
            with open(os.path.join(self.uri, name)) as f:
                return json.load(f)
        except (FileNotFoundError, self.client.exceptions.NoSuchKey if self.s3 else FileNotFoundError):
            return None

    def write_lease(self, body: dict) -> None:
        """As another run (or a person) would: a plain write over whatever is there."""
        data = json.dumps(body).encode()
        if self.s3:
            self.client.put_object(Bucket=self.bucket, Key=f"out/{lease.NAME}", Body=data)
        else:
            os.makedirs(self.uri, exist_ok=True)
            tmp = os.path.join(self.uri, ".test-lease.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(self.uri, lease.NAME))


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    return Output(request.param, tmp_path, request)


def _other_run() -> dict:
    """A live lease of another run, as that run (or a person) writes it."""
    now = time.time()
    return {"run_id": "other-run", "host": "elsewhere", "pid": 4242, "taken_at": now, "heartbeat_at": now}


def _blocked_first_run(one_video, tiny_vae, output, args=(), env=None, also=()) -> tuple[Driver, Hooks]:
    """The first run in its own process, blocked in its first encoder call until the test lets
    go (``hooks.release("go")``), its input's marker committed: OUTPUT holds still."""
    hooks = Hooks()
    hooks.arm("marker", "signal")
    hooks.arm("encode", "barrier", first=1, last=1, on="go", count=1)
    for point in also:
        hooks.arm(point, "signal")
    driver = Driver(["encode", one_video, output.uri, "--model", tiny_vae, *SHAPE, *output.args, *args], hooks,
                    env=env)
    hooks.wait("encode", "marker", proc=driver.proc, log=driver.log)
    return driver, hooks


def _failed_line(text: str) -> str:
    said = [line for line in text.splitlines() if line.startswith("video-latents: run failed:")]
    assert len(said) == 1, text[-3000:]
    return said[0]


def test_a_second_run_into_a_running_output_exits_2_naming_it_and_changes_nothing(
        one_video, tiny_vae, output):
    first, hooks = _blocked_first_run(one_video, tiny_vae, output)
    try:
        held = output.read(lease.NAME)
        assert held is not None, "the running first run holds no lease on OUTPUT"
        assert held["pid"] == first.proc.pid and held["host"] == socket.gethostname(), held
        before = output.state()
        for extra in ([], ["--overwrite"]):  # a plain rerun, and one that would clear OUTPUT first
            second = encode_in_a_fresh_process([one_video, output.uri, "--model", tiny_vae, *SHAPE,
                                                *output.args, *extra])
            assert second.returncode == 2, second.stderr
            (line,) = second.stderr.strip().splitlines()
            assert line.startswith(f"video-latents: error: OUTPUT {output.uri} is being written by another "
                                   f"run: run {held['run_id']} on {held['host']} (pid {held['pid']}, since "), line
            assert "last heartbeat" in line and f"delete {output.uri}/{lease.NAME}" in line, line
            assert output.state() == before  # refused before Ray started, OUTPUT untouched
            assert output.read(lease.NAME)["run_id"] == held["run_id"]
        hooks.release("go")
        assert first.wait() == 0, first.output()[-3000:]
    finally:
        if first.proc.poll() is None:
            first.kill()
        hooks.close()
    assert output.read("_SUCCESS")["complete"] is True
    assert output.read(lease.NAME) is None  # given back


# Local only: the S3 lease's conditional replace is the same code as in the two-takers test below,
# which runs on both stores; this end-to-end run costs a Ray start.
@pytest.mark.parametrize("output", ["local"], indirect=True)
def test_a_run_whose_lease_was_taken_over_does_not_mark_output_complete_and_a_stale_lease_is_taken_over(
        ray_local, one_video, tiny_vae, output, capsys):
    first, hooks = _blocked_first_run(one_video, tiny_vae, output)
    try:
        ours = output.read(lease.NAME)
        other = _other_run()
        output.write_lease(other)  # another run took OUTPUT while the first was encoding
        hooks.release("go")
        assert first.wait() == 1, first.output()[-3000:]
    finally:
        if first.proc.poll() is None:
            first.kill()
        hooks.close()
    line = _failed_line(first.output())
    assert "was taken over by run other-run on elsewhere (pid 4242, since " in line, line
    assert f"while this run (run {ours['run_id']}) was writing" in line, line
    assert output.read("_SUCCESS") is None
    assert output.read(lease.NAME) == other  # not ours to give back

    # That other run died: its heartbeat is older than the stale bound. A rerun takes over.
    output.write_lease({**other, "heartbeat_at": time.time() - lease.STALE_AFTER_S - 60})
    capsys.readouterr()
    assert main(["encode", one_video, output.uri, "--model", tiny_vae, *SHAPE, *output.args]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "lease" in line]
    assert len(said) == 1 and said[0].startswith(
        "video-latents: taking over OUTPUT's lease from run other-run on elsewhere (pid 4242, since "), said
    assert f"stale after {lease.STALE_AFTER_S:.0f} s" in said[0], said[0]
    assert output.read("_SUCCESS")["complete"] is True
    assert output.read(lease.NAME) is None


def test_success_needs_the_job_record_to_be_still_this_runs(output):
    """The last check before _SUCCESS, on its own (no Ray): the lease is ours, but the job record
    names another job."""
    with lease.hold(output.uri, getattr(output, "endpoint", None)) as held:
        held.check("fp-a", lambda: {"fingerprint": "fp-a"})
        with pytest.raises(lease.LeaseLost, match=r"job record was replaced .* \(fingerprint fp-a -> fp-b\)"):
            held.check("fp-a", lambda: {"fingerprint": "fp-b"})
    assert output.read(lease.NAME) is None


def test_of_two_runs_taking_over_one_dead_run_one_wins(output):
    """Both read the same stale lease; the first takeover lands, the second's compare-and-swap
    fails, and it then finds a live lease."""
    endpoint = getattr(output, "endpoint", None)
    output.write_lease({"run_id": "dead", "heartbeat_at": time.time() - lease.STALE_AFTER_S - 60})
    late = lease.hold(output.uri, endpoint)
    _, stale_token = late.store.read()
    with lease.hold(output.uri, endpoint) as winner:
        assert late.store.replace(late.body, stale_token, takeover=True) is None
        with pytest.raises(lease.LeaseHeld, match=f"run {winner.run_id} on "):
            late.take()
        assert output.read(lease.NAME)["run_id"] == winner.run_id
    assert output.read(lease.NAME) is None


def test_a_run_whose_lease_is_taken_mid_run_stops_at_its_next_report(tiny_vae, tmp_path):
    """The driver's heartbeat finds the lease taken while the encoder is held in its first call;
    the ledger is told, so the first batch that reports after the release stops the run: nothing
    more is encoded or written for a job that is no longer this run's (before, the run encoded
    every clip and found out only before _SUCCESS)."""
    videos = tmp_path / "in"
    samples.write_video(str(videos / "a.mp4"), samples.synthetic_frames(3 * NUM_FRAMES, HEIGHT, WIDTH, 1))
    output = Output("local", tmp_path, None)
    out = output.uri
    first, hooks = _blocked_first_run(str(videos), tiny_vae, output, args=["--batch-size", "1"], also=["lease-lost"],
                                      env={"VIDEO_LATENTS_LEASE_HEARTBEAT_S": "0.2"})  # its pace, not a decision point
    try:
        output.write_lease(_other_run())
        hooks.wait("lease-lost", proc=first.proc, log=first.log)
        hooks.release("go")
        assert first.wait() == 1, first.output()[-3000:]
    finally:
        if first.proc.poll() is None:
            first.kill()
        hooks.close()
    line = _failed_line(first.output())
    assert "was taken over by run other-run on elsewhere (pid 4242, since " in line, line
    assert "so this run stopped" in line, line
    assert not os.path.exists(os.path.join(out, "latents")), "the run went on encoding after it lost OUTPUT"
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))


@pytest.mark.skipif(not os.path.exists("/proc/sys/kernel/random/boot_id"), reason="Linux /proc only")
def test_a_lease_whose_process_is_gone_from_this_machine_is_dead_now(tmp_path, capsys):
    """A driver killed here (SIGKILL, a crash) is rerun here at once: its lease names this
    machine's kernel, this PID namespace and a process start time no live process has. A live
    process, another PID namespace (a container beside us) or another machine is never judged so."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        body = {**lease.Lease(str(tmp_path)).body, "pid": gone.pid, "pid_start": lease._start_time(gone.pid)}
    finally:
        gone.kill()
        gone.wait()
    assert lease.is_dead_here(body)
    assert not lease.is_dead_here(lease.Lease(str(tmp_path)).body)  # this very process: alive
    assert not lease.is_dead_here({**body, "pid_ns": "pid:[1]"})
    assert not lease.is_dead_here({**body, "boot_id": "another-machine"})
    assert not lease.is_dead_here({k: v for k, v in body.items() if k != "pid_start"})  # an older lease

    # Through the real take-over: the dead holder's lease is taken at once, well inside its stale bound.
    now = time.time()
    Output("local", tmp_path, None).write_lease({**body, "taken_at": now, "heartbeat_at": now})
    with lease.hold(str(tmp_path / "out")):
        (said,) = capsys.readouterr().err.strip().splitlines()
    assert said.startswith(f"video-latents: taking over OUTPUT's lease from run {body['run_id']} on "), said
    assert "its process is gone from this machine" in said, said
    assert not os.path.exists(tmp_path / "out" / lease.NAME)  # given back
