"""What depends on the cluster: joining it, what it has and can grow to, and so the device, the
compute dtype and the encoder pool's size."""
from __future__ import annotations

import os
import sys

from pipeline.config import Config, data_batch_size

# With --device cuda and neither a GPU in sight nor autoscaler limits to read, the pool may grow
# to this many actors: an autoscaler adds GPU nodes for the actors Ray Data asks for; on a
# fixed cluster the extra actors simply stay pending.
DEFAULT_MAX_GPUS = 8
# Where `ray up` leaves the cluster's config on the head node (the driver runs there under
# `ray submit` and `ray job submit`).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Families whose latents lose too much in bfloat16 (relative L2 error against float32 measured
# in bench/gpu.py): float32 stays their default on CUDA too. Mochi's first layer multiplies pixels
# by up to ~800 before sin/cos, which bfloat16 cannot resolve; diffusers' own Wan examples load
# that VAE in float32.
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


def gpu_limit(cluster_config: str | None = None) -> tuple[float | None, str]:
    """How many GPUs the cluster can grow to, and where that was read: the autoscaler's state in
    Ray's GCS (autoscaler v2, KubeRay), else its config file (``--cluster-config``, or the one
    ``ray up`` leaves on the head node). (None, why) when neither says."""
    try:
        import ray._private.state as state

        limits = state.state.get_max_resources_from_cluster_config() or {}
        if limits.get("GPU"):
            return float(limits["GPU"]), "the autoscaler's limits"
    except Exception:  # noqa: BLE001 - a private API: its absence only means "not known here"
        pass
    path = cluster_config or os.path.expanduser(BOOTSTRAP_CONFIG)
    if not os.path.exists(path):
        return None, "no autoscaler limits found"
    return _gpus_in_config(path), f"the cluster config {path}"


def _gpus_in_config(path: str) -> float:
    """Sum over the config's worker node types of GPUs per node x max_workers, capped by the
    cluster's max_workers (taking the node types with the most GPUs first)."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    head = config.get("head_node_type")
    nodes_left = config.get("max_workers", float("inf"))
    per_type = sorted(((float((spec.get("resources") or {}).get("GPU", 0)), spec.get("max_workers", 0))
                       for name, spec in (config.get("available_node_types") or {}).items() if name != head),
                      reverse=True)
    total = 0.0
    for gpus, count in per_type:
        take = min(count, nodes_left)
        total += gpus * take
        nodes_left -= take
    return total


def resolve(cfg: Config, class_name: str) -> tuple[Config, str]:
    """Fill in the device, compute dtype and the actor pool's size; returns the config and one
    line saying where the pool's bounds came from."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    limit, source = gpu_limit(cfg.cluster_config)
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus or limit else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device == "cuda" and class_name not in FLOAT32_FAMILIES else "float32")
    num_actors, why = cfg.num_actors, "as asked (--num-actors)"
    if num_actors is None and device == "cuda":
        if limit:
            most_gpus, why = max(gpus, limit), f"up to {max(gpus, limit):g} GPUs ({source})"
        elif gpus:
            most_gpus, why = gpus, f"the {gpus:g} GPUs in the cluster ({source})"
        else:
            most_gpus, why = DEFAULT_MAX_GPUS, f"no GPU yet and {source}: the default {DEFAULT_MAX_GPUS}"
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
        each = (f", {cfg.gpus_per_actor * (1 - cfg.text_gpus):g} GPU each; text encoder pool 1..{cfg.num_actors[1]}, "
                f"{cfg.gpus_per_actor * cfg.text_gpus:g} GPU each" if cfg.device == "cuda" else
                f"; text encoder pool 1..{cfg.num_actors[1]}")
    return (f"video-latents: plan: encoder pool {cfg.num_actors[0]}..{cfg.num_actors[1]} actor(s) on "
            f"{cfg.device}{each} ({why}), {batch}; compute {cfg.dtype}, storage {cfg.latent_dtype}; "
            f"{rows_per_file} rows per file; inputs from {source}")
