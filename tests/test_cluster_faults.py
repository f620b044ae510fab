"""Multi-node faults on a real ``ray.cluster_utils.Cluster``, each in its own process."""
import json
import os
import subprocess
import sys
import tempfile

import pyarrow.dataset as pads

from pipeline import samples
from pipeline.hooks import ENV
from tests.conftest import NUM_FRAMES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cluster_job(input_, output, model, size, mode) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": tempfile.mkdtemp(prefix="vl", dir="/tmp"),
           ENV: tempfile.mkdtemp(prefix="vl-hooks-", dir="/tmp")}
    proc = subprocess.run([sys.executable, "-m", "tests.cluster_driver", input_, output, model,
                           str(NUM_FRAMES), str(size), mode],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Ray may log after our summary line: take the last JSON line.
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def clip_rows(output):
    table = pads.dataset(os.path.join(output, "latents"), format="parquet").to_table(columns=["clip_id"])
    ids = table.column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)), "a clip was written twice"
    return set(ids)


def test_a_worker_node_removed_mid_run(tiny_vae, tmp_path):
    videos, size = tmp_path / "in", 128
    for i in range(8):
        samples.write_video(str(videos / f"v{i}.mp4"), samples.synthetic_frames(4 * NUM_FRAMES, size, size, i))
    out = str(tmp_path / "out")
    summary = run_cluster_job(str(videos), out, tiny_vae, size, "remove-node")
    assert summary["removed_node"], "no node was removed during the run"
    assert summary["clips"] == 32 and summary["errors"] == 0
    assert len(clip_rows(out)) == 32


def test_object_store_pressure_spills_and_completes(tiny_vae, tmp_path):
    """80 MiB of object store, about 200 MiB of frames."""
    size = 256
    videos = tmp_path / "in"
    for i in range(6):
        samples.write_video(str(videos / f"v{i}.mp4"), samples.synthetic_frames(8 * NUM_FRAMES, size, size, i))
    out = str(tmp_path / "out")
    summary = run_cluster_job(str(videos), out, tiny_vae, size, "spill")
    assert summary["clips"] == 48 and summary["errors"] == 0
    assert len(clip_rows(out)) == 48
