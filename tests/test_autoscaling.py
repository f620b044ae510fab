"""cluster.yaml's node types on Ray's fake multi-node autoscaler: the actor pool's GPU demand
makes the GPU worker type scale up from zero, and the job completes.

Marked `autoscaler`: it starts and stops a Ray head with `ray start`/`ray stop --force`, which
ends every Ray on the machine, so `make test` runs it on its own after the rest of the suite."""
import json
import os
import subprocess
import sys

import pytest

from pipeline import samples
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.autoscaler
def test_gpu_worker_type_scales_up_for_the_actor_pool(tiny_vae, tmp_path):
    videos = tmp_path / "in"
    for i in range(3):
        samples.write_video(str(videos / f"v{i}.mp4"), samples.synthetic_frames(2 * NUM_FRAMES, HEIGHT, WIDTH, i))
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "tests.autoscale_driver", str(videos), str(tmp_path / "out"),
                           tiny_vae, str(NUM_FRAMES), str(WIDTH)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["clips"] == 6 and result["errors"] == 0
    assert "gpu_encode" in result["launched"], result["launched"]
