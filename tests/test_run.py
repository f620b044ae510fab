"""Resolving what depends on the cluster, before the dataflow starts."""
from pipeline.config import Config
from pipeline.run import resolve_resources


def test_auto_device_dtype_and_pool_on_a_cpu_cluster(ray_local, capsys):
    cfg = resolve_resources(Config(input="i", output="o", model="m"))
    assert (cfg.device, cfg.dtype, cfg.num_actors) == ("cpu", "float32", (1, 1))
    assert capsys.readouterr().err == ""


def test_cpu_actors_leave_a_cpu_for_decoding(ray_local, capsys):
    """2 CPUs: two CPU actors would hold both and starve the decode tasks (a deadlock)."""
    cfg = resolve_resources(Config(input="i", output="o", model="m", device="cpu", num_actors=(2, 4)))
    assert cfg.num_actors == (1, 1)
    assert "decoding keeps a CPU" in capsys.readouterr().err


def test_cuda_keeps_the_requested_pool(ray_local):
    cfg = resolve_resources(Config(input="i", output="o", model="m", device="cuda", num_actors=(2, 4)))
    assert (cfg.device, cfg.dtype, cfg.num_actors) == ("cuda", "bfloat16", (2, 4))


def test_progress_line(monkeypatch, capsys):
    from pipeline import run

    monkeypatch.setattr(run, "PROGRESS_EVERY_S", 0.0)
    progress = run.Timeline(total_videos=4)
    progress.update(3, ["a", "b"])
    progress.update(2, ["b"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and progress.clips == 5
    assert "5 clips" in lines[1] and "videos with clips 2/4" in lines[1] and "ETA ~0:00:0" in lines[1]


def test_binned_rate_smooths_bursts():
    from pipeline.report import binned_rate

    timeline = [(0.0, 0), (5.0, 10), (5.001, 20), (10.0, 30)]
    rates = binned_rate(timeline, bins=2)
    assert rates == [(5.0, 2.0), (10.0, 4.0)]  # 10 clips by 5 s; the burst at 5.001 s is in the second bin
    assert binned_rate([(0.0, 0)]) == []
