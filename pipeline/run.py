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

from pipeline import decode, failures, job, layout, report, resume, sink, sources  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.model import ModelInfo  # noqa: E402

# Listing rows per decode block at most; more blocks than this only adds scheduling overhead.
MAX_LIST_BLOCKS = 10_000


def encode_videos(cfg: Config, info: ModelInfo, videos: list[dict], ledger=None, job_record=None) -> "Timeline":
    """The whole dataflow; returns its timeline (clips written, when)."""
    import ray

    from actors.encoder import VAEEncoder

    clips = ray.data.from_items(videos, override_num_blocks=min(len(videos), MAX_LIST_BLOCKS)) \
        .flat_map(decode.decode_clips, fn_kwargs={"cfg": cfg, "ledger": ledger})
    min_actors, max_actors = cfg.num_actors
    with warnings.catch_warnings():
        # Ray 2.60 (pinned) deprecates passing max_task_retries this way, with no named
        # replacement yet; revisit when upgrading Ray.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        latents = clips.map_batches(
            VAEEncoder, fn_constructor_kwargs={"cfg": cfg, "info": info, "ledger": ledger},
            batch_size=cfg.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            **VAEEncoder.ray_options(cfg))
    written = latents.map_batches(
        sink.write_latents, fn_kwargs={"cfg": cfg, "metadata_json": sink.dataset_metadata(cfg, info, job_record)},
        batch_size=None, batch_format="numpy")
    timeline = Timeline(len(videos))
    for row in written.iter_rows():
        timeline.update(int(row["num_rows"]), row["sources"].split("\n"))
    return timeline


# Seconds between one-line progress summaries on stderr.
PROGRESS_EVERY_S = 30.0


class Timeline:
    """The run's clips over time, and a one-line summary every PROGRESS_EVERY_S: clips, clips/s, videos, elapsed, ETA.

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
    """Run a validated config end to end; return the summary, also written to ``_SUCCESS``
    when the run is complete.

    Raises ``job.JobMismatch`` (a usage error) when OUTPUT belongs to a job with other settings,
    and ``failures.RunFailed`` with a one-line cause when the run did not complete: a systemic
    failure, the error-rate guard, or inputs whose retries were spent (a rerun retries them).
    """
    started = time.perf_counter()
    connect_ray()
    cfg = resolve_resources(cfg)
    job.check(cfg, info)  # again, now that the compute dtype is known
    if cfg.overwrite:
        layout.clear(cfg.output, cfg.s3)
    record = job.write(cfg, info)
    cfg = cfg.replace(job_fingerprint=record["fingerprint"])
    videos = sources.list_videos(cfg)
    todo = resume.load(cfg).pending(videos)
    timeline = None
    if todo:
        layout.delete(cfg.output, [layout.SUCCESS], cfg.s3)  # no reader may take OUTPUT for finished
        timeline = _encode_or_fail(cfg, info, todo, record)
    wall = time.perf_counter() - started
    clips = timeline.clips if timeline else 0
    summary = {
        "videos": len(videos),
        "videos_already_done": len(videos) - len(todo),
        "clips_this_run": clips,
        "wall_time_s": round(wall, 3),
        "clips_per_s": round(clips / wall, 4) if wall > 0 else None,
        **outcomes(cfg),
        "job_fingerprint": record["fingerprint"],
    }
    report.write_html(cfg, summary, timeline.timeline if timeline else [])
    if summary["errors_retryable"]:
        raise failures.RunFailed(
            f"{summary['errors_retryable']} input(s) or clip(s) failed for reasons that may pass "
            f"({', '.join(f'{k} {v}' for k, v in summary['errors_by_class'].items() if k != 'input')}: "
            "the store, the network or GPU memory) after their retries; rerun the same command to "
            "retry them (OUTPUT has no _SUCCESS until then)")
    layout.write_json(cfg.output, layout.SUCCESS, {**summary, "complete": True, "config": cfg.to_dict()}, cfg.s3)
    return summary


def _encode_or_fail(cfg: Config, info: ModelInfo, todo: list[dict], record: dict) -> "Timeline":
    """The dataflow with the run's ledger; a failure comes back as RunFailed naming its cause."""
    import ray

    from actors import ledger as ledger_mod
    from actors.encoder import MAX_TASK_RETRIES

    ledger = ledger_mod.start(cfg.max_error_rate)
    try:
        timeline = encode_videos(cfg, info, todo, ledger, record)
        state = ray.get(ledger.state.remote())
    except Exception as e:
        state = _ledger_state(ledger)
        if state.get("stop"):
            raise failures.RunFailed(state["stop"]) from e
        if state.get("cause"):
            raise failures.RunFailed(f"the model or the device failed, not the inputs, so no input or clip "
                                     f"was marked done; fix the cause and rerun: {state['cause']}") from e
        if _is_actor_death(e):
            raise failures.RunFailed(f"an encoder actor died {MAX_TASK_RETRIES + 1} times on the same "
                                     "batch without saying why (a lost device, a process killed for "
                                     "memory: see the Ray logs); nothing was marked done") from e
        raise
    finally:
        ledger_mod.end(ledger)
    if state.get("stop"):
        raise failures.RunFailed(state["stop"])
    return timeline


def _ledger_state(ledger) -> dict:
    import ray

    try:
        return ray.get(ledger.state.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the ledger is a witness; without it, report the error as is
        return {}


def _is_actor_death(e: BaseException) -> bool:
    while e is not None:
        if type(e).__name__ in ("ActorDiedError", "RayActorError", "ActorUnavailableError"):
            return True
        e = e.__cause__ or e.__context__
    return False


def outcomes(cfg: Config) -> dict:
    """What OUTPUT holds, by outcome: clips written, and error rows by class."""
    from collections import Counter

    errors = layout.read_columns(cfg.output, layout.ERRORS_DIR, ["error_class", "retryable", "clip_id"], cfg.s3)
    rows = errors.to_pylist() if errors is not None else []
    return {
        "clips": layout.count_rows(cfg.output, layout.LATENTS_DIR, cfg.s3),
        "errors": len(rows),
        "errors_by_class": dict(Counter(r["error_class"] for r in rows)),
        "errors_final": sum(not r["retryable"] for r in rows),
        "errors_retryable": sum(bool(r["retryable"]) for r in rows),
        "inputs_failed": sum(r["clip_id"] is None for r in rows),
        "clips_failed": sum(r["clip_id"] is not None for r in rows),
    }


if __name__ == "__main__":
    from pipeline.cli import main

    sys.exit(main())
