"""The dataflow in one function, and the entry for ``ray submit cluster.yaml pipeline/run.py``.

list videos -> decode + cut clips (CPU tasks) -> VAE actor pool (GPU) -> write Parquet (CPU tasks)
"""
from __future__ import annotations

import os
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a script: make the absolute imports below resolvable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import decode, report, resume, sink, sources  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.model import ModelInfo  # noqa: E402

# Listing rows per decode block at most; more blocks than this only adds scheduling overhead.
MAX_LIST_BLOCKS = 10_000


def encode_videos(cfg: Config, info: ModelInfo, videos: list[dict]) -> "Progress":
    """The whole dataflow; returns its progress record (clips written, timeline)."""
    import ray

    from actors.encoder import VAEEncoder

    clips = ray.data.from_items(videos, override_num_blocks=min(len(videos), MAX_LIST_BLOCKS)) \
        .flat_map(decode.decode_clips, fn_kwargs={"cfg": cfg})
    min_actors, max_actors = cfg.num_actors
    with warnings.catch_warnings():
        # Ray 2.60 (pinned) deprecates passing max_task_retries this way, with no named
        # replacement yet; revisit when upgrading Ray.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        latents = clips.map_batches(
            VAEEncoder, fn_constructor_kwargs={"cfg": cfg, "info": info},
            batch_size=cfg.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            **VAEEncoder.ray_options(cfg))
    written = latents.map_batches(
        sink.write_latents, fn_kwargs={"cfg": cfg, "metadata_json": sink.dataset_metadata(cfg, info)},
        batch_size=None, batch_format="numpy")
    progress = Progress(len(videos))
    for row in written.iter_rows():
        progress.update(int(row["num_rows"]), row["sources"].split("\n"))
    return progress


# Seconds between one-line progress summaries on stderr.
PROGRESS_EVERY_S = 30.0


class Progress:
    """A one-line summary every PROGRESS_EVERY_S: clips, clips/s, videos, elapsed, ETA.

    The ETA extrapolates from the share of videos that have clips written; an estimate, since
    videos differ in length."""

    def __init__(self, total_videos: int):
        self.total, self.clips, self.videos = total_videos, 0, set()
        self.started = self.last = time.perf_counter()
        self.timeline: list[tuple[float, int]] = [(0.0, 0)]  # (seconds, clips written), for the report

    def update(self, clips: int, sources: list[str]) -> None:
        self.clips += clips
        self.videos.update(sources)
        now = time.perf_counter()
        self.timeline.append((round(now - self.started, 3), self.clips))
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        done = len(self.videos)
        eta = f"{_clock(elapsed * (self.total - done) / done)}" if done else "?"
        return (f"video-latents: {self.clips} clips ({self.clips / elapsed:.2f}/s), videos with clips "
                f"{done}/{self.total}, elapsed {_clock(elapsed)}, ETA ~{eta}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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


def resolve_resources(cfg: Config) -> Config:
    """Fill in what depends on the cluster: device, compute dtype and the actor pool's size."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device == "cuda" else "float32")
    num_actors = cfg.num_actors
    if num_actors is None:
        most = max(1, int(gpus // cfg.gpus_per_actor)) if device == "cuda" else 1
        num_actors = (1, most)
    if device == "cpu" and num_actors[1] > max(1, int(cpus) - 1):
        # Each CPU actor holds a CPU for good: leave one for decoding, or the run deadlocks.
        most = max(1, int(cpus) - 1)
        print(f"video-latents: {int(cpus)} CPUs: using at most {most} CPU encoder actor(s) so "
              "that decoding keeps a CPU", file=sys.stderr)
        num_actors = (min(num_actors[0], most), most)
    return cfg.replace(device=device, dtype=dtype, num_actors=num_actors)


def run(cfg: Config, info: ModelInfo) -> dict:
    """Run a validated config end to end; write and return the ``_SUCCESS`` summary."""
    started = time.perf_counter()
    connect_ray()
    cfg = resolve_resources(cfg)
    sink.prepare_output(cfg)
    videos = sources.list_videos(cfg)
    todo = resume.load(cfg).pending(videos)
    if todo:
        sink.remove_success(cfg)
    progress = encode_videos(cfg, info, todo) if todo else None
    clips = progress.clips if progress else 0
    wall = time.perf_counter() - started
    summary = {
        "videos": len(videos),
        "videos_already_done": len(videos) - len(todo),
        "clips": sink.count_rows(cfg, sink.LATENTS_DIR),
        "clips_this_run": clips,
        "errors": sink.count_rows(cfg, sink.ERRORS_DIR),
        "wall_time_s": round(wall, 3),
        "clips_per_s": round(clips / wall, 4) if wall > 0 else None,
    }
    report.write_html(cfg, summary, progress.timeline if progress else [])
    sink.write_success(cfg, summary)
    return summary


if __name__ == "__main__":
    from pipeline.cli import main

    sys.exit(main())
