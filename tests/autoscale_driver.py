"""Runs one job on Ray's fake multi-node autoscaler, with cluster.yaml's node types (a test
helper, not a test): ``python -m tests.autoscale_driver INPUT OUTPUT MODEL NUM_FRAMES SIZE``.

The GPU worker type gets a simulated GPU (a resource on a CPU process) and no CPU; the encoder
actors ask for one GPU each and compute on the CPU. Prints a JSON line: the run's summary and the node types
the autoscaler launched. Stops every Ray on the machine when done (``ray stop --force``).
"""
import json
import os
import subprocess
import sys
import tempfile

import ray
import yaml

from actors.encoder import VAEEncoder
from pipeline.config import Config, validate
from pipeline.run import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_cluster_config() -> dict:
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        real = yaml.safe_load(f)
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, spec in real["available_node_types"].items():
        if name == real["head_node_type"]:
            continue
        # The GPU type offers only a (simulated) GPU, so only GPU demand can make it launch.
        resources = {"GPU": 1} if "gpu" in name else {"CPU": 1}
        types[name] = {"resources": {**resources, name: 1}, "node_config": {},
                       "min_workers": spec.get("min_workers", 0), "max_workers": 1}
    return {"cluster_name": "fake-video-latents", "max_workers": 4, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5, "docker": {}, "auth": {"ssh_user": "ubuntu"},
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": types, "head_node_type": "ray.head.default",
            **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
            "file_mounts": {}, "file_mounts_sync_continuously": False}


def main(input_, output, model, num_frames, size):
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    path = os.path.join(tempfile.mkdtemp(), "fake-cluster.json")
    with open(path, "w") as f:
        json.dump(fake_cluster_config(), f)
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    subprocess.check_call([ray_cli, "stop", "--force"], stdout=subprocess.DEVNULL)
    subprocess.check_call([ray_cli, "start", "--head", "--num-cpus=0", f"--autoscaling-config={path}"],
                          env=env, stdout=subprocess.DEVNULL)
    try:
        ray.init("auto")
        real_options = VAEEncoder.ray_options
        # Simulated GPUs: reserve one per actor (what makes the autoscaler add GPU nodes), compute on CPU.
        VAEEncoder.ray_options = staticmethod(lambda cfg: {**real_options(cfg), "num_gpus": 1, "num_cpus": 0})
        cfg, info = validate(Config(input=input_, output=output, model=model, num_frames=int(num_frames),
                                    height=int(size), width=int(size), device="cpu", num_actors=(1, 1)))
        summary = run(cfg, info)
        launched = sorted({key for node in ray.nodes() if node["Alive"] for key in node["Resources"]
                           if key in fake_cluster_config()["available_node_types"]})
        print(json.dumps({**summary, "launched": launched}), flush=True)
    finally:
        ray.shutdown()
        subprocess.call([ray_cli, "stop", "--force"], stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main(*sys.argv[1:])
