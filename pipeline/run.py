"""The dataflow in one function, and the entry for ``ray submit cluster.yaml pipeline/run.py``.

list videos -> decode + cut clips (CPU tasks) -> VAE actor pool (GPU) -> write Parquet (CPU tasks)
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings

if __package__ in (None, ""):  # run as a script: make the absolute imports below resolvable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.ledger import ANSWER_TIMEOUT_S  # noqa: E402
from pipeline import cluster, decode, failures, job, layout, lease, report, resume, sink, sources, spans, stats  # noqa: E402
from pipeline.config import Config, data_batch_size, rows_per_file  # noqa: E402
from pipeline.model import ModelInfo  # noqa: E402

# CPUs asked for by a writer task: mostly waiting on storage. Asking a whole CPU left no CPU
# budget for decoding on a small node, and held clips back by seconds (BENCHMARKS.md).
WRITER_CPUS = 0.25
# The listing task (list a page, drop what OUTPUT holds, probe headers, cut into one-row blocks)
# asks none: it streams for as long as the listing lasts, and any CPU it held was one that
# decoding lacked on a 2-CPU node beside the 1-CPU encoder actor, so that no clip was decoded
# until the actor had loaded its model (~5 s; BENCHMARKS.md).
LISTING_CPUS = 0


def encode_videos(cfg: Config, info: ModelInfo, done, ledger=None, job_record=None,
                  run_started: float | None = None) -> "Timeline":
    """The whole dataflow; returns its timeline (clips written, when).

    list (pages, streamed) -> drop what OUTPUT holds -> split long inputs into parts -> decode and
    cut clips (a task per input or part) -> VAE actor pool -> write Parquet files of N rows
    """
    import ray

    from actors.encoder import VAEEncoder

    # A listing page stays one block (not split for parallelism): its filter and header probes
    # run as one task per page, with the probes on threads.
    units = one_row_blocks(
        ray.data.read_datasource(sources.Listing(cfg).datasource(), override_num_blocks=1, num_cpus=LISTING_CPUS)
        .map_batches(resume.pending_batch, fn_kwargs={"done_ref": (ray.put(done),), "ledger": ledger},
                     batch_size=None, batch_format="pyarrow", num_cpus=LISTING_CPUS)
        .map_batches(spans.split_page, fn_kwargs={"cfg": cfg}, batch_size=None, batch_format="pyarrow",
                     num_cpus=LISTING_CPUS))  # one decode task per input or part, in parallel
    clips = units.flat_map(decode.decode_clips, fn_kwargs={"cfg": cfg, "ledger": ledger}, num_cpus=cfg.decode_cpus)
    min_actors, max_actors = cfg.num_actors
    with warnings.catch_warnings():
        # Ray 2.60 (pinned) deprecates passing max_task_retries this way, with no named
        # replacement yet; revisit when upgrading Ray.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        latents = clips.map_batches(
            VAEEncoder, fn_constructor_kwargs={"cfg": cfg, "info": info, "ledger": ledger},
            batch_size=data_batch_size(cfg), batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            **VAEEncoder.ray_options(cfg))
    if cfg.text_embeddings:  # its own pool, after the VAE's: text and video encode overlap
        from actors.text import TEXT_BATCH, TextEncoder

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            latents = latents.map_batches(
                TextEncoder, fn_constructor_kwargs={"cfg": cfg, "text": info.text}, batch_size=TEXT_BATCH,
                batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
                **TextEncoder.ray_options(cfg))
    written = latents.map_batches(
        sink.write_latents, fn_kwargs={"cfg": cfg, "metadata_json": sink.dataset_metadata(cfg, info, job_record)},
        batch_size=rows_per_file(cfg, info), batch_format="numpy", num_cpus=WRITER_CPUS)
    timeline = Timeline(ledger, run_started)
    try:
        for row in written.iter_rows():
            timeline.update(int(row["num_rows"]))
    finally:
        timeline.close()
    return timeline


def one_row_blocks(ds, num_cpus: float = LISTING_CPUS):
    """``ds.repartition(target_num_rows_per_block=1)`` whose task asks ``num_cpus``, so that Ray
    Data fuses it into the map before it (same resources): the listing task itself cuts its
    output into one-row blocks. The public call takes no resources and runs as a separate
    1-CPU task, held for as long as the listing streams. Built from Ray Data's own logical
    operator, as ``Dataset.repartition`` builds it; Ray is pinned (pyproject.toml), and a test
    checks the fused plan."""
    import ray
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.map_operator import StreamingRepartition

    op = StreamingRepartition(target_num_rows_per_block=1, input_dependencies=[ds._logical_plan.dag],
                              ray_remote_args={"num_cpus": num_cpus})
    return ray.data.Dataset._from_parent(ds, LogicalPlan(op, ds.context))


# Seconds between one-line progress summaries on stderr.
PROGRESS_EVERY_S = 30.0


class Timeline:
    """The run's progress: clips written (from the writer's results) and encoded (from the
    ledger, batch by batch), and a one-line summary on stderr every PROGRESS_EVERY_S, written
    by a thread so that it comes even while a large output file fills."""

    def __init__(self, ledger=None, run_started: float | None = None):
        self.ledger = ledger
        self.clips = 0
        self.listed = self.already_done = 0
        self.latent_check: dict = {"checked": False, "why": "the run's ledger did not answer"}
        self.started = time.perf_counter()
        self.run_started = run_started or time.time()  # wall clock, as the ledger's timeline
        self.timeline: list[tuple[float, int]] = [(0.0, 0)]  # (seconds, clips encoded), for the report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report_every, daemon=True)
        if ledger is not None:
            self._thread.start()

    def update(self, clips: int) -> None:
        self.clips += clips

    def close(self) -> None:
        """Stop the summaries; take the ledger's encoded-clips timeline for the report."""
        self._stop.set()
        if self.ledger is not None:
            import ray

            try:
                encoded = ray.get(self.ledger.timeline.remote(), timeout=ANSWER_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the report's plot is a courtesy; keep the run's own error
                return
            self.timeline = [(0.0, 0)] + [(round(t - self.run_started, 3), n) for t, n in encoded]

    def startup_and_steady(self) -> dict:
        """Seconds from the run's start to the first encoded clip (imports excluded: they come
        before), and clips/s from then to the last one: the steady state, start-up excluded."""
        points = self.timeline[1:]
        if not points:
            return {"first_clip_s": None, "steady_clips_per_s": None}
        (t0, n0), (t1, n1) = points[0], points[-1]
        return {"first_clip_s": t0, "steady_clips_per_s": round((n1 - n0) / (t1 - t0), 4) if t1 > t0 else None}

    def _report_every(self) -> None:
        import ray

        while not self._stop.wait(PROGRESS_EVERY_S):
            try:
                state = ray.get(self.ledger.state.remote(), timeout=ANSWER_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a summary line is a courtesy; the run goes on
                continue
            print(self.line(state, time.perf_counter()), file=sys.stderr, flush=True)

    def line(self, state: dict, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        encoded = state["clips_ok"]
        todo = state["inputs_listed"] - state["inputs_already_done"]
        finished = state["inputs_ok"] + state["inputs_failed"]
        eta = _clock(elapsed * (todo - finished) / finished) if finished and todo > finished else "?"
        return (f"video-latents: {encoded} clips encoded ({encoded / elapsed:.2f}/s), {self.clips} written; "
                f"inputs (or parts) finished {finished} of {todo} listed so far; elapsed {_clock(elapsed)}, "
                f"ETA ~{eta}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run(cfg: Config, info: ModelInfo) -> dict:
    """Run a validated config end to end; return the summary, also written to ``_SUCCESS``
    when the run is complete.

    Raises ``job.JobMismatch`` (a usage error) when OUTPUT belongs to a job with other settings,
    and ``failures.RunFailed`` with a one-line cause when the run did not complete: a systemic
    failure, the error-rate guard, or inputs whose retries were spent (a rerun retries them).
    Raises ``lease.LeaseHeld`` (a usage error) when another live run is writing into OUTPUT.
    """
    with lease.hold(cfg.output, cfg.s3) as held:  # before anything in OUTPUT changes, and before Ray
        job.check(cfg, info)  # a rerun with other settings is refused before Ray starts
        return _run(cfg, info, held)


def _run(cfg: Config, info: ModelInfo, held: lease.Lease) -> dict:
    started, run_started = time.perf_counter(), time.time()
    cluster.connect_ray()
    cfg, why = cluster.resolve(cfg, info.class_name)
    previous = job.check(cfg, info)  # again, now that the compute dtype is known
    print(cluster.plan_line(cfg, why, rows_per_file(cfg, info)), file=sys.stderr, flush=True)
    if cfg.overwrite:
        layout.clear(cfg.output, cfg.s3)
    record = job.write(cfg, info, previous)
    cfg = cfg.replace(job_fingerprint=record["fingerprint"])
    done = resume.load(cfg)
    counts = _nothing_to_do(cfg, done)
    timeline = None
    if counts is None:
        layout.delete(cfg.output, [layout.SUCCESS], cfg.s3)  # no reader may take OUTPUT for finished
        timeline = _encode_or_fail(cfg, info, done, record, run_started, held)
        counts = timeline.listed, timeline.already_done
    wall = time.perf_counter() - started
    clips = timeline.clips if timeline else 0
    summary = {
        "videos": counts[0],
        "videos_already_done": counts[1],
        "clips_this_run": clips,
        "wall_time_s": round(wall, 3),
        "clips_per_s": round(clips / wall, 4) if wall > 0 else None,
        **(timeline.startup_and_steady() if timeline else {"first_clip_s": None, "steady_clips_per_s": None}),
        **outcomes(cfg),
        "job_fingerprint": record["fingerprint"],
        "latent_check": timeline.latent_check if timeline else {"checked": False, "why": "nothing to encode"},
    }
    # Only the run that holds OUTPUT, for the job OUTPUT records, may report on it or mark it done.
    held.check(record["fingerprint"], lambda: layout.read_json(cfg.output, layout.JOB, cfg.s3))
    for warning in summary["latent_check"].get("warnings", []):
        print(f"video-latents: warning: stored latents: {warning}", file=sys.stderr)
    report.write_html(cfg, summary, timeline.timeline if timeline else [])
    if summary["errors_retryable"]:
        raise failures.RunFailed(
            f"{summary['errors_retryable']} input(s) or clip(s) failed for reasons that may pass "
            f"({', '.join(f'{k} {v}' for k, v in summary['errors_by_class'].items() if k != 'input')}: "
            "the store, the network or GPU memory) after their retries; rerun the same command to "
            "retry them (OUTPUT has no _SUCCESS until then)")
    layout.write_json(cfg.output, layout.SUCCESS, {**summary, "complete": True, "config": cfg.to_dict()}, cfg.s3)
    return summary


def _nothing_to_do(cfg: Config, done) -> tuple[int, int] | None:
    """(inputs, all done) when every listed input is done (a rerun of a finished job: no encoder
    is started, no GPU asked for); None as soon as one is not (the listing is not held)."""
    listed = 0
    for page in sources.iter_pages(cfg):
        if any(done.pending_row(row) is not None for row in page):
            return None
        listed += len(page)
    return listed, listed


def _encode_or_fail(cfg: Config, info: ModelInfo, done, record: dict, run_started: float,
                    held: lease.Lease | None = None) -> "Timeline":
    """The dataflow with the run's ledger; a failure comes back as RunFailed naming its cause.
    A lease lost mid-run stops it through the ledger."""
    import ray

    from actors import ledger as ledger_mod
    from actors.encoder import MAX_TASK_RETRIES

    ledger = ledger_mod.start(cfg.max_error_rate)
    if held is not None:
        held.on_lost = lambda why: ledger.halt.remote(why)
    try:
        timeline = encode_videos(cfg, info, done, ledger, record, run_started)
        state = ray.get(ledger.state.remote())
        timeline.listed, timeline.already_done = state["inputs_listed"], state["inputs_already_done"]
        timeline.latent_check = stats.check(state["latent_moments"], info.has_statistics, cfg.latent_mode,
                                            state["clips_nonfinite"])
    except Exception as e:
        state = _ledger_state(ledger)
        if state is None:  # before the actor-death check: the ledger's own death is one too
            raise failures.RunFailed(
                "the run's ledger (its bookkeeping actor, on the head node) is gone, so the run "
                "stopped; the files in OUTPUT are whole and kept: rerun the same command to go on") from e
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
        if held is not None:
            held.on_lost = None
        ledger_mod.end(ledger)
    if state.get("stop"):
        raise failures.RunFailed(state["stop"])
    return timeline


def _ledger_state(ledger) -> dict | None:
    """The ledger's state, {} when it does not answer in time, None when its actor is gone."""
    import ray

    try:
        return ray.get(ledger.state.remote(), timeout=ANSWER_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - the ledger is a witness; without it, report the error as is
        return None if _is_actor_death(e) else {}


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
