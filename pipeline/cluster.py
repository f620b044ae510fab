"""What depends on the cluster: joining it, what it has and can grow to, and so the device, the
compute dtype and the encoder pool's size."""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

from pipeline.config import Config, data_batch_size

# With --device cuda and neither a GPU in sight nor autoscaler limits to read, the pool may grow
# to this many actors: an autoscaler adds GPU nodes for the actors Ray Data asks for; on a
# fixed cluster the extra actors simply stay pending.
DEFAULT_MAX_GPUS = 8
# A node type's count with no maximum: KubeRay's default maxReplicas (the largest int32), or -1.
UNBOUNDED_REPLICAS = 2**31 - 1
# The most GPUs the pool plans for when the autoscaler may add GPU nodes without bound (a
# RayCluster worker group that leaves maxReplicas unset): Ray Data asks for at most this many
# actors; --num-actors 1,N goes further.
UNBOUNDED_GPUS = 64
# Where `ray up` leaves the cluster's config on the head node (the driver runs there under
# `ray submit` and `ray job submit`).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Families whose VAE runs in float32 by default on CUDA too. Mochi's first layer multiplies pixels
# by up to ~800 before sin/cos, which a bfloat16 input cannot resolve (0.68 relative L2 against
# float32 on the first GPU run, bench/results/gpu-h200-2026-12-04.json); an explicit --dtype
# bfloat16 now keeps that input float32 (actors.encoder.keep_input_precision), but that path has
# not run on a GPU yet. diffusers' own Wan examples load that VAE in float32 (its bfloat16 was
# 0.015 from float32 on the GPU run, as close as the other families').
FLOAT32_FAMILIES = ("AutoencoderKLMochi", "AutoencoderKLWan")


def connect_ray() -> None:
    """Join the running cluster if there is one (``ray submit``, ``ray job submit``, ``ray start``),
    else start a local Ray. Ships our packages to workers when they are not installed."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = None
    try:
        from importlib.metadata import distribution

        distribution("video-latents")
    except Exception:  # noqa: BLE001 - running from a source tree that was not pip-installed
        import actors
        import pipeline

        runtime_env = {"py_modules": [pipeline, actors]}
    ray.init(runtime_env=runtime_env, log_to_driver=True)


class Limit(NamedTuple):
    """What the cluster can grow to: ``gpus`` (None: nothing says), where that was read, and
    whether a node type there has no maximum (then ``gpus`` is UNBOUNDED_GPUS)."""

    gpus: float | None
    source: str
    unbounded: bool = False


def gpu_limit(cluster_config: str | None = None) -> Limit:
    """How many GPUs the cluster can grow to, as its autoscaler sees it: ``--cluster-config`` (a
    Ray autoscaler YAML or a KubeRay RayCluster manifest), else the autoscaler's limits in Ray's
    GCS, else the RayCluster this head belongs to (KubeRay, read from the Kubernetes API as the
    autoscaler reads it), else the config ``ray up`` leaves on the head node."""
    if cluster_config:
        if not os.path.exists(cluster_config):
            return Limit(None, f"no cluster config at {cluster_config}")
        kind, config = read_cluster_config(cluster_config)
        return _limit_of(config, f"the {kind} {cluster_config}")
    try:
        import ray._private.state as state

        limits = state.state.get_max_resources_from_cluster_config() or {}
        if limits.get("GPU"):
            gpus = float(limits["GPU"])
            return Limit(min(gpus, UNBOUNDED_GPUS), "the autoscaler's limits", gpus >= UNBOUNDED_REPLICAS)
    except Exception:  # noqa: BLE001 - a private API: its absence only means "not known here"
        pass
    kuberay, source = _kuberay_cluster()
    if kuberay is not None:
        return _limit_of(_autoscaler_view(kuberay), source)
    path = os.path.expanduser(BOOTSTRAP_CONFIG)
    if os.path.exists(path):
        return _limit_of(read_cluster_config(path)[1], f"the cluster config {path}")
    return Limit(None, source or "no autoscaler limits found")


def read_cluster_config(path: str) -> tuple[str, dict]:
    """("cluster config", the config) for a Ray autoscaler YAML; ("RayCluster manifest", the
    autoscaler's view of it) for a KubeRay RayCluster (or a RayJob's rayClusterSpec), found
    among the file's YAML documents. ValueError saying what is wrong when it is neither."""
    import yaml

    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(str(e).splitlines()[0]) from None
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") in ("RayCluster", "RayJob"):
            return "RayCluster manifest", _autoscaler_view(doc)
    if len(docs) == 1 and isinstance(docs[0], dict) and "available_node_types" in docs[0]:
        return "cluster config", docs[0]
    raise ValueError("neither a Ray autoscaler config (available_node_types) nor a KubeRay "
                     "manifest (kind: RayCluster)")


def _autoscaler_view(manifest: dict) -> dict:
    """The autoscaler config KubeRay's autoscaler derives from a RayCluster (Ray's own
    derivation), after the defaults the API server would fill in: maxReplicas 2**31-1 (no
    maximum), minReplicas and replicas 0. Without enableInTreeAutoscaling no worker group
    grows: each keeps its replicas."""
    import copy

    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = copy.deepcopy(manifest)
    if cr.get("kind") == "RayJob":
        cr["spec"] = cr.get("spec", {}).get("rayClusterSpec") or {}
    spec = cr.setdefault("spec", {})
    cr.setdefault("metadata", {}).setdefault("namespace", "default")
    cr["metadata"].setdefault("name", "raycluster")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for group in spec.setdefault("workerGroupSpecs", []) or []:
        group.setdefault("minReplicas", 0)
        group.setdefault("maxReplicas", UNBOUNDED_REPLICAS)
        if group.get("maxReplicas", 0) < 0:
            group["maxReplicas"] = UNBOUNDED_REPLICAS
        if group.get("suspend"):
            group["maxReplicas"] = 0
        elif not autoscaling:
            group["maxReplicas"] = min(group.get("replicas", 0), group["maxReplicas"])
    try:
        return _derive_autoscaling_config_from_ray_cr(cr)
    except Exception as e:  # noqa: BLE001 - KeyError, ValueError, schema errors: all say "fix the manifest"
        raise ValueError(f"not a RayCluster KubeRay's autoscaler can read: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


# Seconds to wait for the Kubernetes API's answer about this head's RayCluster.
KUBERNETES_TIMEOUT_S = 5


def _kuberay_cluster() -> tuple[dict | None, str]:
    """(the RayCluster this head belongs to, where it was read) on KubeRay, which sets
    RAY_CLUSTER_NAME and RAY_CLUSTER_NAMESPACE on every Ray container; read with the head pod's
    service account, which KubeRay allows to get its RayCluster when the autoscaler is on.
    (None, why) when it cannot be read; (None, "") off KubeRay."""
    name, namespace = os.environ.get("RAY_CLUSTER_NAME"), os.environ.get("RAY_CLUSTER_NAMESPACE")
    if not name or not namespace:
        return None, ""
    try:
        import requests
        from ray.autoscaler._private.kuberay import node_provider

        headers, verify, cert = node_provider.load_k8s_secrets()
        reply = requests.get(node_provider.url_from_resource(namespace, f"rayclusters/{name}"),
                             headers=headers, verify=verify, cert=cert, timeout=KUBERNETES_TIMEOUT_S)
        reply.raise_for_status()
        return reply.json(), f"the RayCluster {namespace}/{name}"
    except Exception as e:  # noqa: BLE001 - no token, no permission, no answer: not known here
        return None, (f"the RayCluster {namespace}/{name} could not be read from Kubernetes "
                      f"({type(e).__name__})")


def _limit_of(config: dict, source: str) -> Limit:
    gpus, unbounded = _gpus_in_config(config)
    return Limit(gpus, source, unbounded)


def _gpus_in_config(config: dict) -> tuple[float, bool]:
    """Sum over the config's worker node types of GPUs per node x max_workers, capped by the
    cluster's max_workers (taking the node types with the most GPUs first); a node type with
    GPUs and no maximum (-1, or 2**31-1 and up) counts as UNBOUNDED_GPUS, and says so."""
    head = config.get("head_node_type")
    nodes_left = _bounded(config.get("max_workers", -1))
    per_type = sorted(((float((spec.get("resources") or {}).get("GPU", 0)), _bounded(spec.get("max_workers", 0)))
                       for name, spec in (config.get("available_node_types") or {}).items() if name != head),
                      reverse=True)
    total = 0.0
    for gpus, count in per_type:
        take = min(count, nodes_left)
        total += gpus * take
        nodes_left -= take
    if total == float("inf"):
        return float(UNBOUNDED_GPUS), True
    return total, False


def _bounded(count) -> float:
    count = float(count)
    return float("inf") if count < 0 or count >= UNBOUNDED_REPLICAS else count


def resolve(cfg: Config, class_name: str) -> tuple[Config, str]:
    """Fill in the device, compute dtype and the actor pool's size; returns the config and one
    line saying where the pool's bounds came from."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    limit = gpu_limit(cfg.cluster_config)
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus or limit.gpus else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device == "cuda" and class_name not in FLOAT32_FAMILIES else "float32")
    num_actors, why = cfg.num_actors, "as asked (--num-actors)"
    if num_actors is None and device == "cuda":
        most_gpus, why = pool_gpus(gpus, limit)
        num_actors = (1, max(1, int(most_gpus // cfg.gpus_per_actor)))
    elif num_actors is None:
        num_actors, why = (1, 1), "one CPU actor"
    if device == "cpu" and num_actors[1] > max(1, int(cpus) - 1):
        # Each CPU actor holds a CPU for good: leave one for decoding, or the run deadlocks.
        most = max(1, int(cpus) - 1)
        print(f"video-latents: {int(cpus)} CPUs: using at most {most} CPU encoder actor(s) so "
              "that decoding keeps a CPU", file=sys.stderr)
        num_actors, why = (min(num_actors[0], most), most), f"{int(cpus)} CPUs, one kept for decoding"
    return cfg.replace(device=device, dtype=dtype, num_actors=num_actors), why


# What a user does when nothing says how far the cluster can grow.
RAISE_THE_MAXIMUM = ("if the cluster can add GPU nodes, say how many: --num-actors 1,16, or --cluster-config "
                     "with its autoscaler YAML or RayCluster manifest")


def pool_gpus(gpus: float, limit: Limit) -> tuple[float, str]:
    """The GPUs the pool may grow to, from those present now and the autoscaler's limit, and
    the words for the plan line (what the maximum rests on, and how to change it)."""
    if limit.unbounded:
        most = max(gpus, limit.gpus)
        return most, (f"up to {most:g} GPUs: {limit.source} sets no maximum for its GPU nodes, so the "
                      f"pool stops at {UNBOUNDED_GPUS}; --num-actors 1,N for more")
    if limit.gpus:
        most = max(gpus, limit.gpus)
        return most, f"up to {most:g} GPUs ({limit.source})"
    if gpus:
        return gpus, (f"only the {gpus:g} GPU(s) present now: {limit.source}; {RAISE_THE_MAXIMUM}")
    return DEFAULT_MAX_GPUS, (f"no GPU yet and {limit.source}: the default {DEFAULT_MAX_GPUS}; "
                              f"{RAISE_THE_MAXIMUM}")


def plan_line(cfg: Config, why: str, rows_per_file: int) -> str:
    each = f", {cfg.gpus_per_actor:g} GPU each" if cfg.device == "cuda" else ""
    batch = (f"batch {cfg.batch_size}" if cfg.batch_size else
             f"batch auto (the largest of up to {data_batch_size(cfg)} that fits)" if cfg.device == "cuda" else
             f"batch auto ({data_batch_size(cfg)})")
    if cfg.device == "cpu":
        batch += (f", {cfg.cpu_threads} torch threads" if cfg.cpu_threads else
                  ", as many torch threads as the node has CPUs")
    source = cfg.input if cfg.manifest is None else f"--manifest {cfg.manifest}"
    if cfg.text_embeddings:  # a text encoder actor beside each VAE actor, sharing its GPU slot
        each = (f", {cfg.gpus_per_actor * (1 - cfg.text_share):g} GPU each; text encoder pool 1..{cfg.num_actors[1]}, "
                f"{cfg.gpus_per_actor * cfg.text_share:g} GPU each" if cfg.device == "cuda" else
                f"; text encoder pool 1..{cfg.num_actors[1]}")
    return (f"video-latents: plan: encoder pool {cfg.num_actors[0]}..{cfg.num_actors[1]} actor(s) on "
            f"{cfg.device}{each} ({why}), {batch}; compute {cfg.dtype}, storage {cfg.latent_dtype}; "
            f"{rows_per_file} rows per file; inputs from {source}")
