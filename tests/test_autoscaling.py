"""cluster.yaml's node types on Ray's fake multi-node autoscaler: the encoder pool's size comes
from what the cluster can grow to, its GPU demand makes the GPU worker type scale up from zero to
two nodes, and the job completes.

Marked `autoscaler`: it starts and stops a Ray head with `ray start`/`ray stop --force`, which
ends every Ray on the machine, so `make test` runs it on its own after the rest of the suite."""
import json
import os
import subprocess
import sys

import pytest

from pipeline import samples
from tests.conftest import NUM_FRAMES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.autoscaler
def test_gpu_worker_type_scales_up_for_the_actor_pool(tiny_vae, tmp_path):
    videos, clips, size = tmp_path / "in", 4, 256  # enough encoder work for Ray Data to scale the pool for
    for i in range(8):
        samples.write_video(str(videos / f"v{i}.mp4"), samples.synthetic_frames(clips * NUM_FRAMES, size, size, i))
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "tests.autoscale_driver", str(videos), str(tmp_path / "out"),
                           tiny_vae, str(NUM_FRAMES), str(size), str(clips)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"exit_code"')][-1])
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"videos"')][-1])
    assert result["exit_code"] == 0 and summary["clips"] == 32 and summary["errors"] == 0
    assert "gpu_encode" in result["launched"], result["launched"]
    assert len(result["encoder_gpu_nodes"]) >= 2, result  # at least 2 actors, on at least 2 GPU nodes
    # The plan, printed before the run: the pool's bounds from the autoscaler's config.
    assert "plan: encoder pool 1..2 actor(s) on cuda, 1 GPU each (up to 2 GPUs (the cluster config" in proc.stderr
