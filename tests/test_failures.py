"""Failures by class: the input's fault (final), transient (retried), systemic (the run stops and
marks nothing done), the error-rate guard, re-driving errors, and no lost clips."""
import json
import os
import shutil

import av
import pyarrow.dataset as pads
import pytest

from actors import ledger
from pipeline import decode, failures, layout, samples
from pipeline.cli import main
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH
from tests.hookctl import Hooks
from tests.test_hostile_inputs import _truncated
from tests.test_reliability import Driver

SHAPE = ["--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]


@pytest.mark.parametrize("error, expected", [
    (OSError("When reading information for key 'x.mp4' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) "
             "during HeadObject operation: No response body."), "transient"),
    (OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."), "transient"),
    (OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 52, Server returned nothing"),
     "transient"),
    (OSError("AWS Error ACCESS_DENIED during HeadObject operation"), "transient"),
    (ConnectionResetError(104, "Connection reset by peer"), "transient"),
    (TimeoutError("timed out"), "transient"),
    (MemoryError(), "transient"),
    (FileNotFoundError("no such file: s3://b/gone.mp4"), "input"),
    (av.error.InvalidDataError(1094995529, "Invalid data found when processing input"), "input"),
    (decode.TooShort("the video has 3 frames"), "input"),
    (decode.Truncated("the stream ends after 14 of the 30 frames"), "input"),
    (failures.NonFinite("nan"), "input"),
    # Any read error from storage is the store's: a flaky NFS/FUSE read, an S3 301 or 400 (the
    # bucket is in another region), not the input's.
    (OSError(5, "Input/output error"), "transient"),
    (OSError(116, "Stale file handle"), "transient"),
    (OSError("When reading information for key 'x.mp4' in bucket 'b': AWS Error UNKNOWN (HTTP status 301) "
             "during HeadObject operation: No response body."), "transient"),
    (OSError("AWS Error UNKNOWN (HTTP status 400) during GetObject operation"), "transient"),
    # Our own code's exceptions are bugs every input would meet: the run stops and names them.
    (ValueError("odd pixel format"), "systemic"),
    (TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'"), "systemic"),
    (KeyError("part_t0"), "systemic"),
    (AttributeError("'NoneType' object has no attribute 'time_base'"), "systemic"),
    (ImportError("No module named 'av'"), "systemic"),
    (failures.SystemicFailure("cuDNN error"), "systemic"),
])
def test_one_function_classifies_every_failure(error, expected):
    assert failures.classify(error) == expected


def test_an_error_raised_inside_pyav_is_the_inputs_even_when_its_type_is_a_builtin(tmp_path):
    """PyAV raises builtin types too (ValueError, TypeError) for what a stream holds: where the
    exception was raised decides, not its type."""
    with pytest.raises(ValueError) as raised, av.open(str(tmp_path / "x.mkv"), "w") as out:
        out.add_stream("ljpeg", rate=10)  # raised in av/container/output.py: no such codec in Matroska
    assert failures.classify(raised.value) == "input"
    with pytest.raises(ValueError) as ours:
        int("not a number")  # the same type raised in our code: a bug
    assert failures.classify(ours.value) == "systemic"


def test_out_of_memory_is_recognised_by_type_or_message():
    import torch

    assert failures.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert failures.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not failures.is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))


@pytest.fixture(scope="module")
def good_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    for i in range(3):
        samples.write_video(str(d / f"v{i}.mp4"), samples.synthetic_frames(2 * NUM_FRAMES, HEIGHT, WIDTH, i))
    return str(d)


def test_a_model_that_fails_on_every_clip_stops_the_run_and_marks_nothing_done(
        ray_local, good_videos, tmp_path, capsys, hooks):
    """The actor is restarted once; its fresh process meeting the same error stops the run at once
    instead of spending the rest of the retries (each a process start and a model load)."""
    broken = samples.make_tiny_vae(str(tmp_path / "four-channels"), in_channels=4)
    out = str(tmp_path / "out")
    hooks.arm("encoder-start", "signal")
    assert main(["encode", good_videos, out, "--model", broken, *SHAPE, "--device", "cpu"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("video-latents: run failed: the model or the device failed, not the inputs"), last
    assert "channels" in last and "encoding: RuntimeError" in last
    assert hooks.arrivals("encoder-start") == ledger.SYSTEMIC_REPEATS_TO_STOP, \
        "one encoder process per try: the first, then one restart that met the same error"
    assert layout.count_rows(out, layout.LATENTS_DIR) == 0 and layout.count_rows(out, layout.ERRORS_DIR) == 0
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    # Fixed in place, the model is another job's; nothing was written under the broken one, so the
    # rerun takes OUTPUT over and encodes every clip.
    shutil.rmtree(broken)
    samples.make_tiny_vae(broken)
    assert main(["encode", good_videos, out, "--model", broken, *SHAPE]) == 0
    assert layout.count_rows(out, layout.LATENTS_DIR) == 6


def test_the_ledger_stops_a_run_only_when_an_actor_meets_the_same_cause_again_in_a_row():
    book = ledger.RunLedger(max_error_rate=1.0)
    x, y = "encoding: RuntimeError: CUDA error: X", "encoding: RuntimeError: CUDA error: Y"
    assert not book.systemic("decoding: ImportError: no av")  # a task, not an actor: only recorded
    assert not book.systemic(x, "actor-a")
    # Another actor meeting it is not actor a's restart failing again; another cause is not the same.
    assert not book.systemic(x, "actor-b") and not book.systemic(y, "actor-a")
    # A batch completed in between ends the streak: a passing fault that its retry got past must
    # not stop the run when it comes back hours later.
    book.clip_outcomes(2, [], None, "actor-a")
    assert not book.systemic(x, "actor-a")
    assert book.state()["cause"] == "decoding: ImportError: no av"
    assert book.systemic(x, "actor-a")
    assert book.state()["cause"] == x  # the one that stopped the run
    assert book.systemic(x, "actor-b")  # b's streak was not ended: it met x before


def test_a_model_that_fails_to_load_stops_the_run(ray_local, good_videos, tmp_path, capsys):
    model = samples.make_tiny_vae(str(tmp_path / "m"))
    weights = os.path.join(model, "vae", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    out = str(tmp_path / "out")
    assert main(["encode", good_videos, out, "--model", model, *SHAPE]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the model or the device failed" in last and "loading the model" in last, last
    assert layout.count_rows(out, layout.LATENTS_DIR) == 0


def test_the_error_rate_guard_stops_a_broken_job(ray_local, tiny_vae, tmp_path, capsys):
    videos = tmp_path / "in"
    for i in range(2):
        samples.write_video(str(videos / f"good{i}.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH, i))
    for i in range(24):
        (videos / f"bad{i:02d}.mp4").write_bytes(os.urandom(1000 + i))
    out = str(tmp_path / "out")
    assert main(["encode", str(videos), out, "--model", tiny_vae, *SHAPE, "--max-error-rate", "0.5"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped: " in last and "inputs failed" in last and "over --max-error-rate 0.5" in last, last
    assert "decode/InvalidDataError" in last
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    # Expected of this data: the guard can be loosened, and the same OUTPUT completes.
    assert main(["encode", str(videos), out, "--model", tiny_vae, *SHAPE, "--max-error-rate", "1"]) == 0
    assert layout.count_rows(out, layout.ERRORS_DIR) == 24 and layout.count_rows(out, layout.LATENTS_DIR) == 2


def test_final_errors_are_skipped_and_retry_errors_tries_them_again(ray_local, tiny_vae, tmp_path, capsys, hooks):
    videos = tmp_path / "in"
    samples.write_video(str(videos / "good.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH, 1))
    samples.write_video(str(videos / "short.mp4"), samples.synthetic_frames(3, HEIGHT, WIDTH, 2))
    out = str(tmp_path / "out")
    args = ["encode", str(videos), out, "--model", tiny_vae, *SHAPE]
    assert main(args) == 0
    hooks.arm("decode", "signal")
    assert main(args) == 0 and hooks.arrivals("decode") == 0  # nothing reopened
    capsys.readouterr()
    assert main([*args, "--retry-errors"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert hooks.arrivals("decode") == 1 and summary["videos_already_done"] == 1  # the short one again
    assert summary["errors"] == 1 and summary["errors_by_class"] == {"input": 1}  # and it failed the same way


def test_a_video_that_fails_part_way_keeps_its_clips_through_a_kill(tiny_vae, tmp_path):
    """The error row of a video truncated mid-stream is written while its two clips are still on
    their way to the writer. Killing the run between the two writes must not lose them."""
    videos = tmp_path / "in"
    videos.mkdir()
    _truncated(str(videos / "cut.mp4"), 0.7, faststart=True)  # 2 clips, then the stream ends early
    out = str(tmp_path / "out")
    args = ["encode", str(videos), out, "--model", tiny_vae, *SHAPE]
    hooks = Hooks()
    hooks.arm("write", "block")  # no latents file is committed
    hooks.arm("decode-error", "signal")
    driver = Driver(args, hooks)
    hooks.wait("write", "decode-error", proc=driver.proc, log=driver.log)
    driver.kill()
    hooks.close()
    (error,) = pads.dataset(os.path.join(out, "errors"), format="parquet").to_table().to_pylist()
    # Truncated (the stream ended early) or FFmpeg's InvalidDataError (a cut packet), by decoder threads.
    assert error["message"].startswith("stopped after 2 clip(s)") and error["error_class"] == "input"
    assert len(error["clip_ids"]) == 2 and not os.path.exists(os.path.join(out, "latents"))

    rerun = Driver(args)
    assert rerun.wait() == 0, rerun.output()[-3000:]
    latents = pads.dataset(os.path.join(out, "latents"), format="parquet").to_table()
    assert sorted(latents.column("clip_id").to_pylist()) == sorted(error["clip_ids"])
    assert layout.count_rows(out, layout.ERRORS_DIR) == 1
