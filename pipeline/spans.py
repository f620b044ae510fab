"""Long inputs cut into parts: a video with more than --clips-per-task clips becomes one row per
run of that many clips, each decoded by its own task that seeks to its part's first frame, so a
long video is decoded in parallel and a lost task redoes only its part.

A part keeps its input's URI, so its clips have the same ids (and the same latents) as when the
video is decoded whole. Only videos whose header shows a constant frame rate are split, since
a part finds its first frame by time; the others, and a manifest's time spans, stay whole.
The parts are counted from the header's frame count (MP4, MOV, AVI) or its duration x rate
(MKV, WebM); the last part (``part_clips`` null) runs to the end of the stream, so an estimate
a few frames off changes no clip.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pyarrow as pa

from pipeline import layout, probe, storage
from pipeline.config import Config


# Header reads in flight at once per page: probing is I/O (a few small GETs per input on S3).
PROBE_THREADS = 16
PART_FIELDS = [("part", pa.int32()), ("parts", pa.int32()), ("part_first_clip", pa.int64()),
               ("part_clips", pa.int64()), ("part_t0", pa.float64())]


def split_page(page: pa.Table, cfg: Config) -> pa.Table:
    """Ray Data map_batches step on a page of pending inputs: each input, or its parts, in order.

    A page, not a row per task: per-row tasks of their own were all scheduled before any decode
    task on a small node (Ray Data runs the upstream operator's queue first), which held back
    the first clip by seconds per 60 inputs; here the probes run on threads and a page goes
    on as soon as its headers are read."""
    rows = page.to_pylist()
    with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, max(1, len(rows)))) as pool:
        out = [unit for units in pool.map(lambda r: list(split(r, cfg)), rows) for unit in units]
    schema = page.schema
    for name, kind in PART_FIELDS:
        schema = schema.append(pa.field(name, kind))
    return pa.Table.from_pylist(out, schema=schema)


def split(row: dict, cfg: Config) -> Iterator[dict]:
    """An input row in, itself or its parts out (those not done).

    First deletes the input's stale error files (retryable ones, or all with --retry-errors):
    here, once per input, before any of its parts can write a new one."""
    for name in filter(None, (row.get("stale_errors") or "").split(",")):
        layout.delete_if_present(storage.join(cfg.output, layout.ERRORS_DIR, name), cfg.s3)
    whole = {**row, "part": None, "parts": None, "part_first_clip": None, "part_clips": None, "part_t0": None}
    if not cfg.clips_per_task or cfg.fps or row.get("start_sec") is not None or row.get("end_sec") is not None:
        yield whole
        return
    try:
        p = probe.probe(row, cfg)
    except Exception:  # noqa: BLE001 - decoding the input whole meets the same problem and reports it
        yield whole
        return
    clips = probe.clip_count(p.frames, cfg)
    if not p.constant_rate or clips <= cfg.clips_per_task:
        yield whole
        return
    parts = math.ceil(clips / cfg.clips_per_task)
    done = set(filter(None, (row.get("done_parts") or "").split(",")))
    for k in range(parts):
        if f"{k}/{parts}" in done:
            continue
        first = k * cfg.clips_per_task
        yield {**whole, "part": k, "parts": parts, "part_first_clip": first,
               "part_clips": cfg.clips_per_task if k < parts - 1 else None, "part_t0": p.start_time}
