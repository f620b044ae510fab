"""The offline GPU benchmark's parts, for real, on the CPU:

- the Python 3.12 wheel bundle (built by bench.bundle with pip from the package index): its size
  and its repacked wheels;
- bench/gpu_run.sh on a fresh Python 3.12 venv that holds only what the GPU image provides (less
  torch: PyPI's Linux torch for 3.12 is a CUDA build of several GB, and the local wheels are for
  this Python only): the offline install into an empty folder (bench.bundle_install), the image's
  packages left unshadowed, and bench.gpu's report; then Ray Data and PyAV from that folder;
- bench.gpu's CPU fallback, every section, on this interpreter (whose environment has what the
  bundle carries, and torch).

One bundle, for the GPU image's Python: a second one for this Python would double the slow part.
It is built once per session into its temp folder, while the venv is made; the repacked wheels
(the slow part: LZMA) and the venv are kept in .gpu-bundle-cache/, keyed by what made them.
Without a package index the bundle tests fail, saying so: they never skip.
"""
from __future__ import annotations

import base64
import csv
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest

from bench import bundle

pytestmark = pytest.mark.bundle

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".gpu-bundle-cache"
DEVICE_PYTHON = "3.12"  # the GPU image's
SECTIONS = ["environment", "family_correctness", "encoder_path", "isolated", "pipeline", "naive", "levers", "sweep"]
NEEDS_INDEX = "it needs the package index (PyPI) to download wheels"


def _run(cmd, what: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}",
                    pytrace=False)
    return proc


def _build(version: str, out: Path) -> Path:
    _run([sys.executable, "-m", "bench.bundle", "--python-version", version, "--out", out,
          "--cache", CACHE / "repacked"], f"building the Python {version} bundle ({NEEDS_INDEX})",
         timeout=1200, cwd=REPO)
    return out


def _provided_pins() -> list[str]:
    """What the GPU image provides, less torch, at this environment's versions where it has them."""
    pins = []
    for dist in bundle.PROVIDED:
        if dist == "torch":
            continue
        try:
            pins.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def _provided_venv(python: str, version: str) -> Path:
    """A venv without system site-packages holding only the provided distributions (and their own
    dependencies), cached by interpreter and pins; made in a temp folder, then renamed in place."""
    pins = _provided_pins()
    key = hashlib.sha256(json.dumps([python, pins]).encode()).hexdigest()[:12]
    venv = CACHE / f"venv-{version}-{key}"
    if not (venv / ".complete").exists():
        tmp = CACHE / f"{venv.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        _run([python, "-m", "venv", tmp], f"creating a Python {version} venv", timeout=300)
        _run([tmp / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-compile", *pins],
             f"installing {' '.join(pins)} into a Python {version} venv ({NEEDS_INDEX})", timeout=900)
        (tmp / ".complete").touch()
        shutil.rmtree(venv, ignore_errors=True)
        os.replace(tmp, venv)
    python = venv / "bin" / "python"
    listed = _run([python, "-m", "pip", "list", "--format", "json"], "pip list", timeout=120).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert not names & {"diffusers", "av", "ray"}, f"{venv} is not a provided-only venv: {sorted(names)}"
    return python


def _python312() -> str:
    pyenv = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser()
    candidates = sorted(glob.glob(str(pyenv / "versions" / f"{DEVICE_PYTHON}*" / "bin" / f"python{DEVICE_PYTHON}")))
    candidates += [p for p in [shutil.which(f"python{DEVICE_PYTHON}")] if p]
    for candidate in candidates:
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    pytest.fail(f"no working python{DEVICE_PYTHON} (pyenv or PATH): the GPU image's Python is needed to "
                "check its bundle", pytrace=False)


@pytest.fixture(scope="session")
def device(tmp_path_factory) -> tuple[Path, Path]:
    """(the 3.12 bundle, a 3.12 venv's python), made side by side: the build is mostly LZMA on
    the CPUs, the venv mostly downloading and unpacking."""
    python = _python312()
    with ThreadPoolExecutor(2) as pool:
        venv = pool.submit(_provided_venv, python, DEVICE_PYTHON)
        built = pool.submit(_build, DEVICE_PYTHON, tmp_path_factory.mktemp("bundle") / DEVICE_PYTHON)
        return built.result(), venv.result()


@pytest.fixture(scope="session")
def device_bundle(device) -> Path:
    return device[0]


@pytest.fixture(scope="session")
def device_venv(device) -> Path:
    # No torch: nothing in the bundle needs it to install or to import, and bench.gpu writes its
    # report without it when --device cpu skips every section.
    return device[1]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _check_wheel(path: Path, dropped: tuple[str, ...]) -> None:
    """Every member is LZMA-compressed and listed in RECORD with its hash and size (stripped files
    re-hashed), and RECORD lists nothing that was dropped: what pip trusts when it installs and
    uninstalls. (Upstream RECORDs may list paths their wheel never had: ray's does.)"""
    with zipfile.ZipFile(path) as z:
        record_name = "-".join(path.name.split("-")[:2]) + ".dist-info/RECORD"  # the wheel's own
        record = {row[0]: row[1:] for row in csv.reader(io.StringIO(z.read(record_name).decode())) if row}
        members = [i for i in z.infolist() if not i.is_dir()]
        assert {i.compress_type for i in members} == {zipfile.ZIP_LZMA}, path.name
        assert record_name in record and not [p for p in record if dropped and p.startswith(dropped)]
        for info in members:
            if info.filename != record_name:
                assert record[info.filename] == [_record_hash(z.read(info)), str(info.file_size)], info.filename


def test_device_bundle_fits_and_its_wheels_match_their_records(device_bundle):
    files = {p.name: p for p in device_bundle.iterdir()}
    total = sum(p.stat().st_size for p in files.values())
    assert total <= bundle.MAX_MIB * 2**20, f"{total / 2**20:.2f} MiB"
    manifest = json.loads(files[bundle.MANIFEST].read_text())
    assert manifest["python_version"] == DEVICE_PYTHON
    wheels = {w["file"]: w for w in manifest["wheels"]}
    assert set(files) == set(wheels) | {bundle.MANIFEST, bundle.REQUIREMENTS}
    names = {w["name"] for w in wheels.values()}
    assert set(bundle.CARRIED) <= names and not names & set(bundle.PROVIDED)
    assert files[bundle.REQUIREMENTS].read_text().split("\n")[:-1] == manifest["requirements"]
    for name, w in wheels.items():
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == w["sha256"], name
        _check_wheel(files[name], tuple(bundle.DROP.get(w["name"], ())))
    (ray,) = [p for n, p in files.items() if n.startswith("ray-")]
    with zipfile.ZipFile(ray) as z:
        assert not [n for n in z.namelist() if n.startswith(tuple(bundle.DROP["ray"]))]
        binaries = [i for i in z.infolist() if i.filename.endswith(("/gcs_server", "/raylet"))]
        assert len(binaries) == 2 and all(i.external_attr >> 16 & 0o111 for i in binaries)  # executable


SMOKE = r"""
import json, os, sys, tempfile
import av, diffusers, ray
from pipeline import samples

path = samples.write_video(os.path.join(tempfile.mkdtemp(), "v.mp4"), samples.synthetic_frames(9, 64, 64))
with av.open(path) as c:
    frames = sum(1 for _ in c.decode(video=0))
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

class Double:
    def __call__(self, batch):
        return {"x": batch["id"] * 2}

rows = ray.data.range(8).map_batches(Double, batch_size=4, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
ray.shutdown()
import numpy, pandas, pyarrow
print(json.dumps({"frames": frames, "total": int(sum(r["x"] for r in rows)),
                  "files": {m.__name__: m.__file__ for m in (av, diffusers, ray)},
                  "provided": {m.__name__: m.__file__ for m in (numpy, pandas, pyarrow)}}))
"""


def test_gpu_run_sh_installs_the_bundle_offline_into_an_empty_folder_then_runs_ray_and_av(
        device_bundle, device_venv, tmp_path):
    """bench/gpu_run.sh as on the GPU machine, on a provided-only 3.12 venv: pip resolves the bundle
    with no index against the venv's own packages, installs what is missing into an emptied folder
    (never numpy, pandas or pyarrow, which the venv has), and bench.gpu writes its report. Then the
    stripped binaries from that folder run: Ray's raylet and GCS under Ray Data, and PyAV."""
    site, out = tmp_path / "site", tmp_path / "out"
    site.mkdir()
    (site / "left-over").write_text("from an earlier install")
    env = dict(os.environ, PYTHON=str(device_venv), VL_SITE=str(site), VL_ALLOW_MISSING="torch")
    env.pop("PYTHONPATH", None)
    _run(["bash", REPO / "bench" / "gpu_run.sh", device_bundle, out, "--device", "cpu", "--budget-s", "0"],
         "bench/gpu_run.sh on the 3.12 venv", timeout=600, env=env, cwd=tmp_path)
    log = (out / "gpu-run.log").read_text()
    assert "--no-index" in log and "wheels to install" in log and f"installed into {site}" in log, log
    assert not (site / "left-over").exists()
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"ray", "diffusers", "av", "safetensors"} <= installed, installed
    assert not installed & {"numpy", "pandas", "pyarrow", "pillow", "hf_xet", "torch"}, installed
    report = json.loads((out / "gpu-bench.json").read_text())
    assert report["finished"] is True and report["device_name"] == "cpu" and report["mfu"] is None
    assert {s["status"] for s in report["sections"].values()} == {"skipped"} and list(report["sections"]) == SECTIONS

    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    out = _run([device_venv, "-c", SMOKE], "Ray Data + PyAV from the 3.12 bundle", timeout=300, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["frames"] == 9 and result["total"] == 2 * sum(range(8))
    assert all(f.startswith(str(site)) for f in result["files"].values()), result["files"]
    for module, where in result["provided"].items():  # the venv's own, not shadowed by the bundle
        assert not where.startswith(str(site)), (module, where)


def test_cpu_fallback_runs_every_section(tmp_path):
    """bench.gpu as gpu_run.sh starts it, on a machine without CUDA: every section on the CPU with
    tiny shapes, and the figures the GPU run is for, named as there."""
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    _run([sys.executable, "-m", "bench.gpu", "--out", tmp_path, "--quick", "--budget-s", "400"],
         "bench.gpu (CPU fallback)", timeout=600, env=env, cwd=REPO)
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["device_name"] == "cpu" and report["cpu_fallback"] is True and report["finished"] is True
    sections = report["sections"]
    assert list(sections) == SECTIONS
    assert {name: s["status"] for name, s in sections.items()} == {name: "ok" for name in SECTIONS}, sections
    assert all(isinstance(s["seconds"], float) for s in sections.values())
    families = sections["family_correctness"]["result"]["families"]
    assert set(families) == {"CogVideoX", "HunyuanVideo", "Wan2.1", "Wan2.2", "LTX-Video", "Mochi", "HunyuanVideo1.5",
                             "LTX-2"}
    for family in families.values():
        assert set(family["rel_l2"]) == {"float32", "bfloat16"} and family["rel_l2"]["float32"] < 1e-6
    assert set(sections["encoder_path"]["result"]["rel_l2"]) == {"float32", "bfloat16"}
    # FLOPs are counted on the CPU too; there is no peak to hold them against.
    assert report["tflops_per_clip"] > 0 and report["achieved_tflops"] > 0
    assert report["mfu"] is None and report["peak_bf16_tflops"] is None
    for key in ("isolated_clips_per_s", "pipeline_clips_per_s", "pipeline_steady_clips_per_s", "naive_clips_per_s",
                "pipeline_vs_isolated", "pipeline_vs_isolated_steady", "pipeline_vs_naive"):
        assert report[key] > 0, key
    points = sections["sweep"]["result"]["points"]
    assert [(p["batch_size"], p["actors"]) for p in points] == [(1, 1), (2, 1)]
    assert all(p["clips_per_s"] > 0 for p in points)
    # The memory format flipped from the CPU's default: measured, and its latents compared with the
    # default's (oneDNN's channels-last and contiguous kernels agree to float32 rounding, then float16).
    batch = sections["levers"]["result"]["batch_size"]
    assert [p["batch_size"] for p in batch["points"]] == [1, 2] and batch["encoder_picks"] is None
    assert all(p["clips_per_s"] > 0 and len(p["runs"]) == 2 for p in batch["points"])
    assert batch["best"] in (1, 2)
    lever = sections["levers"]["result"]["memory_format"]
    assert (lever["default"], lever["tried"], lever["runs_each"]) == ("channels_last_3d", "contiguous", 2)
    assert lever["default_clips_per_s"] > 0 and lever["tried_clips_per_s"] > 0 and lever["vs_default"] > 0
    assert 0 < lever["rel_l2_vs_default"] < 1e-2 and lever["rel_l2_default_rerun"] < 1e-2, lever


def test_the_peak_table_names_each_card_by_its_own_dense_bf16_peak():
    from bench import gpu

    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA GH200 480GB": 989.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA L40S": 362.0, "Tesla T4": None}
    assert {name: gpu.peak_bf16_tflops(name) for name in names} == names


def test_a_spent_budget_skips_every_section_and_still_writes_the_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", tmp_path, "--device", "cpu", "--budget-s", "0"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["finished"] is True and report["device_name"] == "cpu" and report["mfu"] is None
    assert {s["status"] for s in report["sections"].values()} == {"skipped"}
    assert list(report["sections"]) == SECTIONS
