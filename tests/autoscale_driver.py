"""Runs one job on Ray's fake multi-node autoscaler, with cluster.yaml's node types (a test
helper, not a test): ``python -m tests.autoscale_driver INPUT OUTPUT MODEL NUM_FRAMES SIZE CLIPS``
(CLIPS: clips per input).

Nothing of the pool is patched: its size comes from what the autoscaler config says the cluster
can grow to, as on a real cluster (``--cluster-config``), and each actor asks for what it asks
for there (one GPU, one CPU). The GPU worker type offers a simulated GPU (a resource on a CPU
process), and the actors compute on the CPU (pipeline.hooks.SIMULATED_GPU_ENV). From its third call, the encoder waits at a barrier
until a second actor has started, so the pool must grow to two actors on two GPU nodes for the
run to finish: no timing decides it. Prints a JSON line: the run's summary, the node types the
autoscaler launched, and the nodes the encoder actors ran on. Stops every Ray on the machine
when done (``ray stop --force``).
"""
import json
import os
import subprocess
import sys
import tempfile

import ray
import yaml

from pipeline.cli import main as cli_main
from pipeline.hooks import ENV, SIMULATED_GPU_ENV
from tests.hookctl import Hooks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_NODES = 2  # of cluster.yaml's GPU type, kept small for a 2-core machine


def fake_cluster_config() -> dict:
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        real = yaml.safe_load(f)
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, spec in real["available_node_types"].items():
        if name == real["head_node_type"]:
            continue
        gpus = (spec.get("resources") or {}).get("GPU", 0)
        # Few CPUs per node (a 2-core machine runs them all; Ray Data's budgets need some room on a
        # GPU node beside its actor, as cluster.yaml's 16 give); the GPU type keeps its (simulated)
        # GPUs, and an encoder actor asks for one GPU and one CPU, as on the real cluster.
        resources = {"CPU": 4, "GPU": gpus} if gpus else {"CPU": 1}
        types[name] = {"resources": {**resources, name: 1}, "node_config": {},
                       "min_workers": spec.get("min_workers", 0),
                       "max_workers": min(spec.get("max_workers", 1), GPU_NODES if gpus else 1)}
    return {"cluster_name": "fake-video-latents", "max_workers": 4, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5, "docker": {}, "auth": {"ssh_user": "ubuntu"},
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": types, "head_node_type": "ray.head.default",
            **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
            "file_mounts": {}, "file_mounts_sync_continuously": False}


def encoder_nodes() -> list[str]:
    """The nodes the run's encoder actors ran on, live or ended (asked of the GCS)."""
    from ray._private import state

    return sorted({a["Address"]["NodeID"] for a in state.actors().values()
                   if "VAEEncoder" in a.get("ActorClassName", "")})


def main(input_, output, model, num_frames, size, clips_per_input):
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    path = os.path.join(tempfile.mkdtemp(), "fake-cluster.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(fake_cluster_config(), f)
    hooks = Hooks()
    # Once the first encoder task is done (one input's clips, one call each: Ray Data has seen the
    # encoder's throughput), encoder calls wait until a second encoder actor has started: a
    # backlog builds that Ray Data scales the pool for, and the run cannot end unless it grows.
    hooks.arm("encoder-start", "signal")  # counted, so that the barrier can see the second actor
    hooks.arm("encode", "barrier", first=int(clips_per_input) + 1, on="encoder-start", count=2)
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
           SIMULATED_GPU_ENV: "1", ENV: hooks.folder}
    os.environ.update({SIMULATED_GPU_ENV: "1", ENV: hooks.folder})
    subprocess.check_call([ray_cli, "stop", "--force"], stdout=subprocess.DEVNULL)
    subprocess.check_call([ray_cli, "start", "--head", "--num-cpus=0", f"--autoscaling-config={path}"],
                          env=env, stdout=subprocess.DEVNULL)
    try:
        ray.init("auto")
        code = cli_main(["encode", input_, output, "--model", model, "--num-frames", num_frames,
                         "--height", size, "--width", size, "--cluster-config", path,
                         "--batch-size", "1"])  # one clip per call: the barrier counts calls
        launched = sorted({key for node in ray.nodes() if node["Alive"] for key in node["Resources"]
                           if key in fake_cluster_config()["available_node_types"]})
        gpu_nodes = {node["NodeID"] for node in ray.nodes() if node["Resources"].get("gpu_encode")}
        print(json.dumps({"exit_code": code, "launched": launched,
                          "encoder_gpu_nodes": [n for n in encoder_nodes() if n in gpu_nodes]}), flush=True)
    finally:
        ray.shutdown()
        subprocess.call([ray_cli, "stop", "--force"], stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main(*sys.argv[1:])
