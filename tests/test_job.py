"""The job's identity: a rerun into an OUTPUT with other settings is refused before Ray starts,
and OUTPUT is left untouched; settings that cannot change the output are free to change."""
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pyarrow.parquet as pq
import pytest

from pipeline import job, samples
from pipeline.cli import build_parser, config_from_args, main
from pipeline.config import validate
from pipeline.text import HEAD_BYTES
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


def encode_in_a_fresh_process(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_ADDRESS": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", "encode", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def record_job(args: list[str]) -> dict:
    """What a run with ``args`` (and --device cpu) records in its OUTPUT, by the run's own code."""
    cfg, info = validate(config_from_args(build_parser().parse_args(["encode", *args, "--device", "cpu"])))
    return job.write(cfg, info)


def copy_of(root, folder) -> str:
    """The first run's OUTPUT (results and record) as it left it, copied into ``folder``: for a
    test that edits the record (a later test here overwrites the first run's OUTPUT)."""
    return shutil.copytree(str(root / "first-out"), str(folder / "out"))


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
    shutil.copytree(out, str(root / "first-out"))  # as the first run left it, for copy_of
    return str(videos), out, model_a, root


@pytest.mark.parametrize("change, expected", [
    ("model", "--model: {a} -> {b}"),
    ("weights", "model weights: "),
    (["--latent-mode", "dist"], "--latent-mode: mode -> dist"),
    (["--height", "32"], f"--height: {HEIGHT} -> 32"),
    (["--dtype", "bfloat16"], "--dtype: float32 -> bfloat16"),
    (["--clip-stride", "4"], f"--clip-stride: {NUM_FRAMES} -> 4"),
    (["--slicing"], "--slicing: (none) -> True"),  # clip by clip: other kernels, other last bits
    (["--memory-format", "contiguous", "--device", "cpu"], "--memory-format: (none) -> contiguous"),
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
                 "--decode-timeout", "60", "--device", "cpu", "--memory-format", "channels_last_3d"]) == 0
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


def test_memory_format_other_than_autos_pick_is_refused_once_the_device_is_known(first_run, tmp_path, capsys):
    """Before Ray, with --device auto, the layout auto would pick is not known yet: the run's
    second check refuses it, still before anything is written."""
    videos, out, model_a, root = first_run
    out = copy_of(root, tmp_path)
    before = files_of(out)
    capsys.readouterr()
    assert main(["encode", videos, out, "--model", model_a, "--dtype", "float32", *SHAPE,
                 "--memory-format", "contiguous"]) == 2
    assert "--memory-format: (none) -> contiguous" in capsys.readouterr().err
    assert files_of(out) == before


def _other(version: str, part: int) -> str:
    """``version`` with its minor (part 1) or patch (part 2) number changed."""
    parts = version.split("+")[0].split(".")
    parts[part] = str(int(parts[part]) + 1)
    return ".".join(parts)


def test_a_torch_or_diffusers_major_minor_change_is_refused_unless_allowed(first_run, tmp_path, capsys):
    videos, out, model_a, root = first_run
    out = copy_of(root, tmp_path)
    path = os.path.join(out, "_job.json")
    now = {"diffusers": metadata.version("diffusers"), "torch": metadata.version("torch")}
    recorded = json.load(open(path))
    assert recorded["versions"] == now and "accepted version changes" not in recorded

    def edit(recorded_versions) -> None:
        if recorded_versions is None:
            recorded.pop("versions", None)
        else:
            recorded["versions"] = recorded_versions
        with open(path, "w") as f:
            json.dump(recorded, f)

    def rerun(recorded_versions, *extra) -> int:
        edit(recorded_versions)
        capsys.readouterr()
        return main(["encode", videos, out, "--model", model_a, "--dtype", "float32", *SHAPE, *extra])

    older_torch = {**now, "torch": _other(now["torch"], 1)}
    edit(older_torch)
    before = files_of(out)
    assert rerun(older_torch) == 2
    err = capsys.readouterr().err
    assert f"torch {older_torch['torch']} -> {now['torch']} (another major.minor: pass --allow-version-change" in err
    assert "diffusers " not in err and files_of(out) == before

    assert rerun({**now, "diffusers": _other(now["diffusers"], 2)}) == 0  # a patch release is free
    assert json.load(open(path))["versions"] == now

    assert rerun(older_torch, "--allow-version-change") == 0
    accepted = json.load(open(path))
    assert accepted["versions"] == now
    assert accepted["accepted version changes"] == [{"from": older_torch, "to": now, "why": "--allow-version-change"}]
    assert accepted["identity"] == recorded["identity"]

    # A job recorded before versions were: taken as it is, and said so in the record.
    recorded = accepted
    assert rerun(None) == 0
    changes = json.load(open(path))["accepted version changes"]
    assert changes[0]["why"] == "--allow-version-change" and changes[1]["from"] is None and changes[1]["to"] == now


HUB_ID = "org/tiny-vae"
RECORD_AND_LOAD = """
import sys
import torch
from diffusers import AutoencoderKLCogVideoX
from actors.encoder import load_vae
from pipeline import job
from pipeline.cli import build_parser, config_from_args
from pipeline.config import validate

refs, moved_to, pinned_folder = sys.argv[1:4]
cfg, info = validate(config_from_args(build_parser().parse_args(sys.argv[4:])))
print(job.write(cfg, info)["identity"]["--model revision"])
open(refs, "w").write(moved_to)  # the branch moves on after the driver resolved it
vae = load_vae(cfg, info, "cpu")  # as each actor loads it
pinned = AutoencoderKLCogVideoX.from_pretrained(pinned_folder, subfolder="vae")
assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), pinned.state_dict().values()))
"""


def test_a_hub_model_at_another_revision_is_refused(first_run, tmp_path):
    """A hub cache laid out as huggingface_hub lays it out, used offline: two snapshots of the
    repository, and refs/main moved from one to the other."""
    videos, out, _, root = first_run
    out = copy_of(root, tmp_path)
    repo = tmp_path / "hf" / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    a, b = "a" * 40, "b" * 40
    samples.make_tiny_vae(str(repo / "snapshots" / a))
    samples.make_tiny_vae(str(repo / "snapshots" / b), seed=1)  # retrained: the same config
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(a)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}
    args = [videos, out, "--model", HUB_ID, "--dtype", "float32", *SHAPE]

    # What the run records, and the commit its actors load once the branch has moved on.
    proc = subprocess.run([sys.executable, "-c", RECORD_AND_LOAD, str(repo / "refs" / "main"), b,
                           str(repo / "snapshots" / a), "encode", *args, "--device", "cpu"],
                          env={**os.environ, "PYTHONPATH": REPO, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [a]

    before = files_of(out)
    proc = encode_in_a_fresh_process(args, env)
    assert proc.returncode == 2, proc.stderr
    assert f"--model revision: {a} -> {b}" in proc.stderr, proc.stderr
    assert "model config" not in proc.stderr and "Ray" not in proc.stderr
    assert files_of(out) == before


def test_local_text_encoders_that_differ_after_their_first_mib_are_told_apart(first_run, tmp_path, capsys):
    videos, out, model_a, root = first_run
    out = copy_of(root, tmp_path)
    from safetensors.torch import load_file, save_file
    import torch

    text_a, text_b = tmp_path / "text-a", tmp_path / "text-b"
    samples.make_tiny_text_encoder(str(text_a))
    weights = text_a / "text_encoder" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["zz.padding"] = torch.zeros(1 << 19)  # 2 MiB, stored last: the file outgrows HEAD_BYTES
    save_file(tensors, str(weights))
    shutil.copytree(text_a, text_b)
    data = bytearray((text_b / "text_encoder" / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one weight's last byte, past the first MiB
    (text_b / "text_encoder" / "model.safetensors").write_bytes(bytes(data))
    assert len(data) > 2 * HEAD_BYTES and data[:HEAD_BYTES] == weights.read_bytes()[:HEAD_BYTES]

    args = [videos, out, "--model", model_a, "--dtype", "float32", *SHAPE, "--text-embeddings"]
    recorded = record_job([*args, "--text-encoder", str(text_a)])["identity"]
    before = files_of(out)
    capsys.readouterr()
    assert main(["encode", *args, "--text-encoder", str(text_b)]) == 2
    err = capsys.readouterr().err
    assert f"text encoder weights: {recorded['text encoder weights']} -> " in err, err
    assert "--text-embeddings:" not in err  # the first MiB of each file (the old identity) is the same
    assert files_of(out) == before
