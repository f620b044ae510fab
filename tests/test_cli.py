"""Every bad option fails before Ray starts, with one line and exit code 2."""
import os
import subprocess
import sys

import pytest

from pipeline.cli import build_parser, config_from_args, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def good_args(tmp_path, tiny_vae):
    (tmp_path / "in").mkdir()
    return ["encode", str(tmp_path / "in"), str(tmp_path / "out"), "--model", tiny_vae,
            "--num-frames", "9", "--height", "64", "--width", "64"]


@pytest.mark.parametrize("extra, message", [
    (["--num-frames", "10"], "k*4+1"),
    (["--num-frames", "0"], "--num-frames must be at least 1"),
    (["--height", "60"], "multiples of 8"),
    (["--width", "100"], "multiples of 8"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-actors", "3,1"], "--num-actors"),
    (["--num-actors", "x"], "MIN[,MAX]"),
    (["--gpus-per-actor", "0"], "--gpus-per-actor"),
    (["--gpus-per-actor", "1.5"], "whole number"),
    (["--clip-stride", "0"], "--clip-stride"),
    (["--max-clips", "0"], "--max-clips"),
    (["--device", "cpu", "--dtype", "float16"], "float16"),
    (["--resize", "pad"], "invalid choice"),
    (["--latent-mode", "mean"], "invalid choice"),
    (["--extensions", ","], "--extensions"),
    (["--max-pixels", "0"], "--max-pixels"),
    (["--decode-timeout", "0"], "--decode-timeout"),
    (["--split-scenes", "--scene-threshold", "0"], "--scene-threshold"),
    (["--split-scenes", "--min-shot-frames", "0"], "--min-shot-frames"),
])
def test_bad_options_exit_2_with_one_line(good_args, capsys, extra, message):
    assert exit_code(good_args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def exit_code(argv) -> int:
    """main()'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_missing_input_model_and_existing_output(good_args, tmp_path, capsys):
    missing_in = list(good_args)
    missing_in[1] = str(tmp_path / "nope")
    assert main(missing_in) == 2 and "does not exist" in capsys.readouterr().err
    bad_model = [*good_args, "--model", str(tmp_path)]
    assert main(bad_model) == 2 and "no config.json" in capsys.readouterr().err
    inside = list(good_args)
    inside[2] = os.path.join(good_args[1], "latents-out")
    assert main(inside) == 2 and "--force" in capsys.readouterr().err
    same = list(good_args)
    same[2] = same[1]
    assert main(same) == 2 and "differ" in capsys.readouterr().err


def test_unsupported_model_class(good_args, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    assert main([*good_args, "--model", str(tmp_path / "m")]) == 2
    assert "not a supported video VAE" in capsys.readouterr().err


def test_defaults_and_endpoint_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    args = build_parser().parse_args(["encode", "s3://b/in", "s3://b/out", "--model", "m"])
    cfg = config_from_args(args)
    assert (cfg.num_frames, cfg.height, cfg.width, cfg.resize) == (49, 480, 720, "crop")
    assert (cfg.latent_mode, cfg.latent_dtype, cfg.device, cfg.gpus_per_actor) == ("mode", "float16", "auto", 1.0)
    assert cfg.stride == 49 and cfg.s3_endpoint == "http://127.0.0.1:9"
    args = build_parser().parse_args(["encode", "i", "o", "--model", "m", "--s3-endpoint", "http://x:1",
                                      "--num-actors", "2,8", "--no-tiling", "--slicing",
                                      "--extensions", ".MP4,mov"])
    cfg = config_from_args(args)
    assert cfg.s3_endpoint == "http://x:1" and cfg.num_actors == (2, 8)
    assert cfg.slicing and not cfg.tiling and cfg.extensions == ("mp4", "mov")


def test_help_and_validation_run_without_starting_ray(tmp_path):
    """`--help` and usage errors come back fast from a fresh process, with no Ray started."""
    env = {**os.environ, "PYTHONPATH": REPO}
    help_ = subprocess.run([sys.executable, "-m", "pipeline", "encode", "--help"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--latent-mode" in help_.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline", "encode", str(tmp_path), str(tmp_path / "o"),
                          "--model", str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Ray" not in bad.stderr, bad.stderr


def test_job_file_mirrors_the_options_and_the_cli_overrides_it(tmp_path, tiny_vae, monkeypatch):
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {tmp_path}\noutput: {tmp_path / 'out'}\nmodel: {tiny_vae}\n"
                   "num-frames: 9\nheight: 64\nwidth: 64\nnum_actors: 1,2\nextensions: [MP4, webm]\n"
                   "tiling: true\nlatent_mode: sample\n")
    argv = ["encode", "--config", str(job), "--height", "32"]
    from pipeline.cli import job_file_defaults

    cfg = config_from_args(build_parser(job_file_defaults(argv)).parse_args(argv))
    assert (cfg.input, cfg.model, cfg.num_frames, cfg.width) == (str(tmp_path), tiny_vae, 9, 64)
    assert cfg.height == 32  # the command line wins
    assert cfg.num_actors == (1, 2) and cfg.extensions == ("mp4", "webm") and cfg.tiling
    assert cfg.latent_mode == "sample"


@pytest.mark.parametrize("content, message", [
    ("num_frame: 9\n", "unknown option 'num_frame'"),
    ("- a list\n", "expected a mapping"),
    ("output: o\nmodel: m\n", "missing INPUT"),
    ("num_frames: many\n", "bad value for num_frames"),
])
def test_bad_job_files_exit_2(tmp_path, capsys, content, message):
    job = tmp_path / "job.yaml"
    job.write_text(content)
    assert exit_code(["encode", "--config", str(job)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_inspect_summarises_an_output(tmp_path, capsys):
    import json as _json

    from pipeline import layout, sink
    from pipeline.config import Config
    from tests.test_readers import write_output

    write_output(str(tmp_path), files=2, per_file=3)
    cfg = Config(input="i", output=str(tmp_path), model="m")
    sink.write_error(cfg, sink.error_row("a.mp4", "sample", "TooShort", "short"))
    sink.write_error(cfg, sink.error_row("b.mp4", "decode", "InvalidDataError", "bad"))
    sink.write_error(cfg, sink.error_row("c.mp4", "read", "OSError", "503", error_class="transient",
                                         retryable=True))
    layout.write_json(str(tmp_path), layout.SUCCESS, {"videos": 4, "clips": 6, "wall_time_s": 2.0,
                                                      "clips_per_s": 3.0})
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    summary = _json.loads(capsys.readouterr().out)
    assert summary["clips"] == 6 and summary["files"] == 2 and summary["complete"]
    assert {k: summary["tensors"]["latents"][k] for k in ("shape", "dtype")} == {"shape": [3, 4, 8, 8], "dtype": "halffloat"}
    assert summary["bytes_per_clip"] == 3 * 4 * 8 * 8 * 2
    assert summary["errors_by_type"] == {"sample/TooShort": 1, "decode/InvalidDataError": 1, "read/OSError": 1}
    assert summary["errors_by_class"]["input"]["rows"] == 2
    assert summary["errors_by_class"]["transient"] == {"rows": 1, "retryable": True, "by_type": {"read/OSError": 1}}
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "clips      6 in 2 files, from 2 of 4 videos" in text and "sample/TooShort" in text
    assert "2  input (final)" in text and "1  transient (retryable: a rerun tries them again)" in text
