"""What a long cluster run meets and a laptop never shows: consumers that do not pull, decoders
that kill their worker, bookkeeping left by a replaced job, and failures whose class is the
environment's, not the input's. Each fault is reached through the real code path."""
import os
import time

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from pipeline import decode, layout, samples, sink
from pipeline.cli import main
from pipeline.config import Config
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH, upload_folder
from tests.faultproxy import FaultProxy
from tests.hookctl import Hooks
from tests.test_reliability import Driver

SHAPE = ["--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]


@pytest.fixture(scope="module")
def three_videos(tmp_path_factory):
    """v0, v1, v2: three clips each."""
    d = tmp_path_factory.mktemp("in")
    for i in range(3):
        samples.write_video(str(d / f"v{i}.mp4"), samples.synthetic_frames(3 * NUM_FRAMES, HEIGHT, WIDTH, i))
    return str(d)


def latents_by_video(out: str, filesystem=None) -> dict:
    path = f"{out}/latents"
    table = pads.dataset(path, filesystem=filesystem, format="parquet").to_table(columns=["source_uri", "clip_id"])
    ids = table.column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)), "a clip was written twice"
    out_ = {}
    for uri in table.column("source_uri").to_pylist():
        name = uri.rsplit("/", 1)[1]
        out_[name] = out_.get(name, 0) + 1
    return out_


def error_rows(out: str, filesystem=None) -> list[dict]:
    fs, path = (filesystem, f"{out}/errors") if filesystem else (pafs.LocalFileSystem(), os.path.join(out, "errors"))
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


# 1. Waiting is not decoding.

def test_a_consumer_that_does_not_pull_never_times_out_an_input(three_videos, tmp_path):
    """The decode step's generator is paused between two clips for longer than --decode-timeout
    (as Ray Data pauses it while the encoders are the bottleneck): the pause is not decoding."""
    cfg = Config(input=three_videos, output=str(tmp_path / "out"), model="m", num_frames=NUM_FRAMES,
                 height=HEIGHT, width=WIDTH, decode_timeout=1.0)
    clips = decode.decode_clips({"source_uri": os.path.join(three_videos, "v0.mp4"), "size": 100}, cfg)
    first = next(clips)
    time.sleep(2.0)  # the consumer does not pull: the fault under test is this pause's length
    rest = list(clips)
    assert [first["clip_index"], *(c["clip_index"] for c in rest)] == [0, 1, 2]
    assert not os.path.exists(os.path.join(cfg.output, "errors"))


def test_backpressure_on_the_decode_task_in_a_run_fails_no_input(ray_local, three_videos, tiny_vae, tmp_path, hooks):
    """Through Ray: the decode task is held between two yields for twice --decode-timeout."""
    hooks.arm("decode-resumed", "hold", first=1, last=1, seconds=2.0)
    out = str(tmp_path / "out")
    assert main(["encode", three_videos, out, "--model", tiny_vae, *SHAPE, "--decode-timeout", "1"]) == 0
    assert hooks.arrivals("decode-resumed") >= 1  # the hold really happened
    assert latents_by_video(out) == {"v0.mp4": 3, "v1.mp4": 3, "v2.mp4": 3}
    assert error_rows(out) == []


# 2. A crashing decoder must not hang the run.

@pytest.mark.timeout(300)  # without the bound, Ray Data retries the dead task for ever
def test_a_decoder_that_kills_its_worker_gets_one_row_and_the_run_goes_on(
        ray_local, three_videos, tiny_vae, tmp_path, hooks):
    """Every attempt at v1 kills its own process (SIGKILL, as a segfaulting FFmpeg or the OOM
    killer would): after WORKER_CRASHES_TO_FAIL deaths it gets one final WorkerCrashed row, and
    every other clip is written, exit 0."""
    hooks.arm("decode", "kill", match="v1.mp4")
    out = str(tmp_path / "out")
    assert main(["encode", three_videos, out, "--model", tiny_vae, *SHAPE]) == 0
    assert hooks.arrivals("decode") == decode.WORKER_CRASHES_TO_FAIL  # only v1's arrivals count
    assert latents_by_video(out) == {"v0.mp4": 3, "v2.mp4": 3}
    (row,) = error_rows(out)
    assert row["source_uri"].endswith("v1.mp4") and row["error_type"] == "WorkerCrashed"
    assert (row["error_class"], row["retryable"]) == ("input", False)
    assert f"died {decode.WORKER_CRASHES_TO_FAIL} times" in row["message"]


# 3. Stale bookkeeping from a replaced job.

def test_a_replaced_job_record_takes_its_markers_with_it(ray_local, tiny_vae, tmp_path):
    """Job A (--max-clips 1) cuts the input's one clip and marks it, then dies before writing
    anything; job B (other settings) replaces A's record, writes the input's first clip and dies
    before the others. A's marker lists just that clip: taken for B's outcome, the input would be
    done with one clip of three. B's rerun must give every clip."""
    videos = tmp_path / "in"
    samples.write_video(str(videos / "v0.mp4"), samples.synthetic_frames(3 * NUM_FRAMES, HEIGHT, WIDTH, 0))
    out = str(tmp_path / "out")
    args = ["encode", str(videos), out, "--model", tiny_vae, *SHAPE]
    hooks = Hooks()
    hooks.arm("write", "block")  # A writes no latents
    hooks.arm("marker", "signal")
    job_a = Driver([*args, "--max-clips", "1"], hooks)
    hooks.wait("write", "marker", proc=job_a.proc, log=job_a.log)
    job_a.kill()
    hooks.close()
    fingerprint_a = layout.read_json(out, layout.JOB)["fingerprint"]

    # B cuts the input in parts of one clip: part 0 is written; parts 1 and 2 never begin. A's
    # marker (the whole input, its one clip) would now read as B's input done.
    hooks = Hooks()
    hooks.arm("decode", "block", match=["part=1", "part=2"])
    hooks.arm("written", "signal")
    # A quarter CPU for each decode task: the two blocked ones leave the encoder and the writer theirs.
    args_b = [*args, "--clips-per-task", "1", "--batch-size", "1", "--rows-per-file", "1", "--decode-cpus", "0.25"]
    job_b = Driver(args_b, hooks)
    hooks.wait(proc=job_b.proc, log=job_b.log, counts={"written": 1, "decode": 2})
    job_b.kill()
    hooks.close()
    assert layout.read_json(out, layout.JOB)["fingerprint"] != fingerprint_a
    assert latents_by_video(out) == {"v0.mp4": 1}
    markers = os.path.join(out, "_markers")
    left = [layout.file_fingerprint(f.physical_schema)
            for f in pads.dataset(markers, format="parquet").get_fragments()] if os.path.isdir(markers) else []
    assert fingerprint_a not in left, "the replaced job's markers survived its record"

    assert main(args_b) == 0  # B's rerun, in this process's Ray
    assert latents_by_video(out) == {"v0.mp4": 3}


def test_resume_takes_no_marker_or_error_row_of_another_job_for_an_outcome(three_videos, tmp_path):
    """Whatever left them there (a straggling task of the old job), markers and error rows with
    another job's fingerprint are never outcomes; files of this job, or of a version that
    recorded no fingerprint, are."""
    from pipeline import resume

    out = str(tmp_path / "out")
    uri = os.path.join(three_videos, "v0.mp4")
    ours = Config(input=three_videos, output=out, model="m", job_fingerprint="ours")
    theirs = ours.replace(job_fingerprint="theirs")
    sink.write_marker(theirs, uri, [])  # all of its (no) clips done: an outcome, were it ours
    sink.write_error(theirs, sink.error_row(os.path.join(three_videos, "v1.mp4"), "decode", "TooShort", "short"))
    done = resume.load(ours)
    assert done.inputs == set()
    sink.write_marker(ours, uri, [])
    sink.write_error(ours, sink.error_row(os.path.join(three_videos, "v1.mp4"), "decode", "TooShort", "short"))
    assert resume.load(ours).inputs == {uri, os.path.join(three_videos, "v1.mp4")}


# 5. Failures whose class is the environment, not the input.

def test_a_flaky_local_read_is_the_stores_fault_retried_never_final(ray_local, three_videos, tiny_vae, tmp_path, hooks):
    """Every read of v2 from the local disk fails with EIO (a flaky NFS or FUSE mount): the
    input is retried, then gets a retryable row, exit 1; a rerun with the mount healthy again
    encodes it."""
    hooks.arm("read", "raise", match="v2.mp4", fault={"type": "OSError", "errno": 5})
    out = str(tmp_path / "out")
    args = ["encode", three_videos, out, "--model", tiny_vae, *SHAPE]
    assert main(args) == 1
    assert hooks.arrivals("read") >= 1 + decode.TRANSIENT_RETRIES  # every try read, and failed
    (row,) = error_rows(out)
    assert row["source_uri"].endswith("v2.mp4") and "Input/output error" in row["message"]
    assert (row["error_class"], row["retryable"]) == ("transient", True)
    hooks.disarm()
    assert main(args) == 0
    assert latents_by_video(out) == {"v0.mp4": 3, "v1.mp4": 3, "v2.mp4": 3} and error_rows(out) == []


def test_an_s3_redirect_to_another_region_is_never_the_inputs_fault(
        ray_local, three_videos, tiny_vae, s3_server, s3_bucket):
    """The store answers 301 PermanentRedirect for one input (its bucket is addressed through the
    wrong region's endpoint): a retryable row and exit 1, not a final row that reruns skip."""
    client, bucket = s3_bucket
    upload_folder(client, bucket, three_videos, "in")

    def redirect_v1(n, method, path):
        return "301" if "/in/v1.mp4" in path else None

    with FaultProxy(s3_server, schedule=redirect_v1) as proxy:
        code = main(["encode", f"s3://{bucket}/in", f"s3://{bucket}/out", "--model", tiny_vae,
                     "--s3-endpoint", proxy.endpoint, *SHAPE])
    assert code == 1 and proxy.faults["301"] >= 1 + decode.TRANSIENT_RETRIES
    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http")
    (row,) = error_rows(f"{bucket}/out", fs)
    assert row["source_uri"].endswith("v1.mp4") and "301" in row["message"]
    assert (row["error_class"], row["retryable"]) == ("transient", True)


def test_a_bug_in_our_code_stops_the_run_and_is_never_an_inputs_outcome(
        ray_local, three_videos, tiny_vae, tmp_path, hooks, capsys):
    """A TypeError raised in the decode step (our bug, met on v1) stops the run with exit 1 and
    one line naming it; it is not filed as v1's final error, which a rerun would skip."""
    hooks.arm("decoding", "raise", match="v1.mp4", fault={"type": "TypeError"})
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert main(["encode", three_videos, out, "--model", tiny_vae, *SHAPE]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "decoding: TypeError: injected at decoding" in last, last
    assert not [r for r in error_rows(out) if r["source_uri"].endswith("v1.mp4")]
    assert not os.path.exists(os.path.join(out, layout.SUCCESS))


def _no_decoder_video(path: str) -> None:
    """An AVI whose video stream's codec FFmpeg does not know (its FourCC rewritten)."""
    import av
    import numpy as np

    tmp = path + ".tmp.avi"
    with av.open(tmp, "w") as c:
        s = c.add_stream("mjpeg", rate=10)
        s.width, s.height, s.pix_fmt = WIDTH, HEIGHT, "yuvj420p"
        for i in range(NUM_FRAMES):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((HEIGHT, WIDTH, 3), i * 20, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with open(tmp, "rb") as f:
        data = f.read()
    os.remove(tmp)
    assert data.count(b"MJPG") >= 1
    with open(path, "wb") as f:
        f.write(data.replace(b"MJPG", b"QQQQ"))


def test_a_codec_with_no_decoder_is_the_inputs_on_a_whole_node_and_the_nodes_on_a_broken_one(tmp_path):
    path = str(tmp_path / "unknown.avi")
    _no_decoder_video(path)
    cfg = Config(input=str(tmp_path), output=str(tmp_path / "out"), model="m", num_frames=NUM_FRAMES,
                 height=HEIGHT, width=WIDTH)
    assert list(decode.decode_clips({"source_uri": path, "size": os.path.getsize(path)}, cfg)) == []
    (row,) = error_rows(cfg.output)
    assert (row["error_type"], row["error_class"]) == ("UnsupportedCodec", "input")
    # This node's FFmpeg has every mainstream decoder; a node without one is told apart.
    assert decode.missing_decoders() == []
    assert decode.missing_decoders(("h264", "no-such-decoder")) == ["no-such-decoder"]
