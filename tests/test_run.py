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
    assert cluster.gpu_limit(config) == (8.0, f"the cluster config {config}")
    cfg, why = cluster.resolve(Config(input="i", output="o", model="m", cluster_config=config), "AutoencoderKLCogVideoX")
    assert (cfg.device, cfg.dtype, cfg.num_actors) == ("cuda", "bfloat16", (1, 8)) and "up to 8 GPUs" in why
    halves, _ = cluster.resolve(Config(input="i", output="o", model="m", cluster_config=config,
                                       gpus_per_actor=0.5), "AutoencoderKLCogVideoX")
    assert halves.num_actors == (1, 16)  # two actors share each GPU
    line = cluster.plan_line(cfg, why, 113)
    assert "encoder pool 1..8 actor(s) on cuda, 1 GPU each" in line and "compute bfloat16, storage float16" in line


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
