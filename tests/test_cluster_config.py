"""cluster.yaml is checked against Ray's own autoscaler schema (the one `ray up` applies), and
kuberay.yaml is read as KubeRay's autoscaler reads a RayCluster."""
import json
import os

import jsonschema
import ray
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_yaml_matches_rays_schema_and_has_the_three_node_types():
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"cpu_decode", "gpu_encode"} <= set(types)
    assert any("pip install" in c and "video-latents" in c for c in config["setup_commands"])


def test_kuberay_yaml_is_a_raycluster_with_a_cpu_head_and_gpu_and_cpu_worker_groups():
    from pipeline.cluster import read_cluster_config

    kind, config = read_cluster_config(os.path.join(REPO, "kuberay.yaml"))  # Ray's derivation, schema-checked
    assert kind == "RayCluster manifest"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    assert (types["gpu-encode"]["resources"]["GPU"], types["gpu-encode"]["max_workers"]) == (1, 8)
    assert "GPU" not in types["cpu-decode"]["resources"] and types["cpu-decode"]["max_workers"] == 8
