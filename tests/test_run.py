"""Resolving what depends on the cluster, before the dataflow starts."""
from pipeline.config import Config
from pipeline import cluster


def resolve_resources(cfg):
    return cluster.resolve(cfg, "AutoencoderKLCogVideoX")[0]


def test_auto_device_dtype_and_pool_on_a_cpu_cluster(ray_local, capsys):
    cfg = resolve_resources(Config(input="i", output="o", model="m"))
    assert (cfg.device, cfg.dtype, cfg.num_actors) == ("cpu", "float32", (1, 1))
    assert capsys.readouterr().err == ""
    assert "batch auto (2), as many torch threads as the node has CPUs;" in cluster.plan_line(cfg, "", 1)
    pinned = cluster.plan_line(cfg.replace(cpu_threads=3), "", 1)
    assert "batch auto (2), 3 torch threads;" in pinned


def test_cpu_actors_leave_a_cpu_for_decoding(ray_local, capsys):
    """2 CPUs: two CPU actors would hold both and starve the decode tasks (a deadlock)."""
    cfg = resolve_resources(Config(input="i", output="o", model="m", device="cpu", num_actors=(2, 4)))
    assert cfg.num_actors == (1, 1)
    assert "decoding keeps a CPU" in capsys.readouterr().err


def test_cuda_keeps_the_requested_pool(ray_local):
    cfg = resolve_resources(Config(input="i", output="o", model="m", device="cuda", num_actors=(2, 4)))
    assert (cfg.device, cfg.dtype, cfg.num_actors) == ("cuda", "bfloat16", (2, 4))


def test_progress_line():
    from pipeline import run

    timeline = run.Timeline()
    timeline.update(3)
    timeline.update(2)
    state = {"clips_ok": 7, "inputs_listed": 10, "inputs_already_done": 2, "inputs_ok": 3, "inputs_failed": 1}
    line = timeline.line(state, timeline.started + 8.0)
    assert line.startswith("video-latents: 7 clips encoded (0.88/s), 5 written; ")
    assert "finished 4 of 8 listed so far" in line and "elapsed 0:00:08, ETA ~0:00:08" in line


def test_binned_rate_smooths_bursts():
    from pipeline.report import binned_rate

    timeline = [(0.0, 0), (5.0, 10), (5.001, 20), (10.0, 30)]
    rates = binned_rate(timeline, bins=2)
    assert rates == [(5.0, 2.0), (10.0, 4.0)]  # 10 clips by 5 s; the burst at 5.001 s is in the second bin
    assert binned_rate([(0.0, 0)]) == []


def test_the_pool_grows_to_what_the_autoscaler_config_allows(ray_local, tmp_path, capsys):
    """No GPU in the cluster yet: the pool's maximum comes from cluster.yaml (8 GPU nodes of one
    GPU each), and --device auto already means cuda, since the autoscaler can add GPUs."""
    import os

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster.yaml")
    assert cluster.gpu_limit(config) == (8.0, f"the cluster config {config}", False)
    cfg, why = cluster.resolve(Config(input="i", output="o", model="m", cluster_config=config), "AutoencoderKLCogVideoX")
    assert (cfg.device, cfg.dtype, cfg.num_actors) == ("cuda", "bfloat16", (1, 8)) and "up to 8 GPUs" in why
    halves, _ = cluster.resolve(Config(input="i", output="o", model="m", cluster_config=config,
                                       gpus_per_actor=0.5), "AutoencoderKLCogVideoX")
    assert halves.num_actors == (1, 16)  # two actors share each GPU
    line = cluster.plan_line(cfg, why, 113)
    assert "encoder pool 1..8 actor(s) on cuda, 1 GPU each" in line and "compute bfloat16, storage float16" in line


def test_the_pool_grows_to_what_a_raycluster_manifest_allows(ray_local, capsys):
    """KubeRay: kuberay.yaml's GPU worker group (maxReplicas 8, one nvidia.com/gpu each) sets the
    pool's maximum, as cluster.yaml does on `ray up`; no GPU yet, and --device auto means cuda."""
    import os

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kuberay.yaml")
    assert cluster.gpu_limit(config) == (8.0, f"the RayCluster manifest {config}", False)
    cfg, why = cluster.resolve(Config(input="i", output="o", model="m", cluster_config=config), "AutoencoderKLCogVideoX")
    assert (cfg.device, cfg.num_actors) == ("cuda", (1, 8))
    assert f"encoder pool 1..8 actor(s) on cuda, 1 GPU each (up to 8 GPUs (the RayCluster manifest {config}))" \
        in cluster.plan_line(cfg, why, 113)


def _manifest(tmp_path, **gpu_group) -> str:
    """kuberay.yaml with its GPU worker group changed (a value None: the field left out)."""
    import os

    import yaml

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kuberay.yaml")) as f:
        manifest = yaml.safe_load(f)
    group = next(g for g in manifest["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-encode")
    autoscaling = gpu_group.pop("enableInTreeAutoscaling", True)
    manifest["spec"]["enableInTreeAutoscaling"] = autoscaling
    for key, value in gpu_group.items():
        group.pop(key) if value is None else group.__setitem__(key, value)
    path = tmp_path / "rc.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return str(path)


def test_a_raycluster_gpu_group_without_a_maximum_is_capped_and_the_plan_says_so(tmp_path):
    """maxReplicas left out (KubeRay's default 2**31-1), -1 or 2**31-1: no maximum; the pool
    plans for UNBOUNDED_GPUS and the plan line says how to go beyond. Without the in-tree
    autoscaler a group stays at its replicas; numOfHosts multiplies."""
    for max_replicas in (None, -1, 2**31 - 1):
        limit = cluster.gpu_limit(_manifest(tmp_path, maxReplicas=max_replicas))
        assert (limit.gpus, limit.unbounded) == (cluster.UNBOUNDED_GPUS, True), max_replicas
        most, why = cluster.pool_gpus(0, limit)
        assert most == cluster.UNBOUNDED_GPUS
        assert why == (f"up to {cluster.UNBOUNDED_GPUS} GPUs: the RayCluster manifest {tmp_path / 'rc.yaml'} sets no "
                       f"maximum for its GPU nodes, so the pool stops at {cluster.UNBOUNDED_GPUS}; "
                       "--num-actors 1,N for more")
    fixed = cluster.gpu_limit(_manifest(tmp_path, enableInTreeAutoscaling=False, replicas=3, maxReplicas=None))
    assert (fixed.gpus, fixed.unbounded) == (3.0, False)
    hosts = cluster.gpu_limit(_manifest(tmp_path, numOfHosts=2, maxReplicas=5))
    assert (hosts.gpus, hosts.unbounded) == (10.0, False)


def test_when_nothing_tells_the_maximum_the_plan_says_it_is_only_the_gpus_present(ray_local, monkeypatch):
    """On KubeRay without a readable RayCluster (here: no service account token) and no config to
    read, the pool's maximum is the GPUs present now, and the plan line says how to raise it."""
    monkeypatch.setenv("RAY_CLUSTER_NAME", "video-latents")
    monkeypatch.setenv("RAY_CLUSTER_NAMESPACE", "batch")
    limit = cluster.gpu_limit()
    assert limit.gpus is None and limit.source.startswith(
        "the RayCluster batch/video-latents could not be read from Kubernetes ("), limit
    most, why = cluster.pool_gpus(1, limit)
    assert most == 1 and why.startswith(f"only the 1 GPU(s) present now: {limit.source}; ")
    assert why.endswith("if the cluster can add GPU nodes, say how many: --num-actors 1,16, or "
                        "--cluster-config with its autoscaler YAML or RayCluster manifest")
    cfg = resolve_resources(Config(input="i", output="o", model="m"))
    assert cfg.device == "cpu"  # no GPU present and none the autoscaler is known to add


KUBERNETES_READ = """
import json, sys
from pipeline import cluster
limit = cluster.gpu_limit()
print(json.dumps([limit.gpus, limit.source, cluster.pool_gpus(0, limit)[1]]))
"""


def test_on_a_kuberay_head_the_raycluster_is_read_from_the_kubernetes_api(tmp_path):
    """A KubeRay head (RAY_CLUSTER_NAME/NAMESPACE set) reads its RayCluster from the Kubernetes
    API as KubeRay's autoscaler does (Ray's client: HTTPS, the API path, its credentials), here
    from a local HTTPS server that answers with kuberay.yaml as the API server would."""
    import http.server
    import json
    import os
    import ssl
    import subprocess
    import sys
    import threading

    import yaml

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    with open(os.path.join(repo, "kuberay.yaml")) as f:
        body = json.dumps({**yaml.safe_load(f), "metadata": {"name": "video-latents", "namespace": "batch"}}).encode()
    paths = []

    class API(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            paths.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), API)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # No service account token outside a pod: Ray's client then takes a client certificate.
    env = {**os.environ, "PYTHONPATH": repo, "RAY_CLUSTER_NAME": "video-latents", "RAY_CLUSTER_NAMESPACE": "batch",
           "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT_HTTPS": str(server.server_address[1]),
           "RAY_KUBERAY_CLIENT_CERT_PATH": cert, "RAY_KUBERAY_CLIENT_KEY_PATH": key, "RAY_KUBERAY_CA_CERT_PATH": cert}
    try:
        out = subprocess.run([sys.executable, "-c", KUBERNETES_READ], env=env, capture_output=True, text=True,
                             timeout=120)
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr[-3000:]
    gpus, source, why = json.loads(out.stdout.splitlines()[-1])
    assert (gpus, source) == (8.0, "the RayCluster batch/video-latents") and why == f"up to 8 GPUs ({source})"
    assert paths == ["/apis/ray.io/v1/namespaces/batch/rayclusters/video-latents"]


def test_a_cluster_config_that_is_neither_kind_is_a_usage_error(tmp_path):
    from pipeline.config import ConfigError, validate

    import pytest

    bad, broken = tmp_path / "pod.yaml", tmp_path / "rc.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    broken.write_text("kind: RayCluster\nspec: {headGroupSpec: {}}\n")
    (tmp_path / "in").mkdir()
    for path, message in ((bad, "neither a Ray autoscaler config"), (broken, "not a RayCluster KubeRay's autoscaler")):
        with pytest.raises(ConfigError, match=f"--cluster-config {path}: {message}"):
            validate(Config(input=str(tmp_path / "in"), output=str(tmp_path / "o"), model="m", cluster_config=str(path)))


def test_without_limits_to_read_a_gpu_pool_may_grow_to_the_documented_default(ray_local, tmp_path):
    missing = str(tmp_path / "no-such-cluster.yaml")
    cfg, why = cluster.resolve(Config(input="i", output="o", model="m", device="cuda", cluster_config=missing),
                               "AutoencoderKLCogVideoX")
    assert cfg.num_actors == (1, cluster.DEFAULT_MAX_GPUS) and "default" in why
    mochi, _ = cluster.resolve(Config(input="i", output="o", model="m", device="cuda", cluster_config=missing),
                               "AutoencoderKLMochi")
    assert mochi.dtype == "float32"  # bfloat16 loses Mochi's Fourier features (see BENCHMARKS.md)


def test_the_listing_cuts_its_own_one_row_blocks_without_holding_a_cpu(ray_local):
    """The split into one-row blocks runs inside the listing task (fused, 0 CPUs), not as a
    separate 1-CPU task that would keep decoding waiting while the encoder actor loads."""
    import ray

    from pipeline.run import LISTING_CPUS, one_row_blocks

    ds = one_row_blocks(ray.data.range(6, override_num_blocks=1).map_batches(
        lambda b: b, batch_size=None, num_cpus=LISTING_CPUS)).materialize()
    assert ds.num_blocks() == 6 and ds.count() == 6
    stats = ds.stats()
    assert "MapBatches(<lambda>)->StreamingRepartition" in stats, stats
