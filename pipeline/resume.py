"""Resume: what an earlier run into OUTPUT already finished, so a rerun does only the rest.

Why this is exactly-once (see the README's reliability section):
- every file is written whole under a name derived from the ids it holds, so a file either
  exists complete or not at all, and a retried task rewrites the same file;
- a clip is done when a committed latents file holds its id, or a final error row names it;
- a unit of work (an input, or one part of a long input) is done when its outcome is recorded
  and every clip that outcome depends on is done: a marker (written once every clip was cut)
  or a final error row (which lists the clips cut before the failure); an input is done when
  it is done whole or every one of its parts is. Done inputs are not even opened again, done
  parts are not decoded, and the clips of the others are skipped by id before their pixels are
  converted, so no clip is encoded twice.
- retryable error rows (and, with ``--retry-errors``, final ones) record no outcome: their
  inputs, parts and clips are tried again, and their stale error files deleted first.

Only ids are read (a column scan), on the driver; the filter itself runs in the dataflow, on
each page of the listing as it streams by.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline import layout
from pipeline.config import Config


@dataclass
class Done:
    """What OUTPUT already holds."""

    clips: set[str] = field(default_factory=set)
    clips_by_input: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    inputs: set[str] = field(default_factory=set)
    parts: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # input -> {"k/K"}
    # input -> error files to delete before it is tried again
    stale_errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def pending_row(self, row: dict) -> dict | None:
        """None for a done input; else the row with the ids of its clips to skip, its error files
        to delete and its done parts (each comma-joined)."""
        uri = row["source_uri"]
        if uri in self.inputs:
            return None
        return {**row, "skip_clips": ",".join(sorted(self.clips_by_input.get(uri, ()))),
                "stale_errors": ",".join(sorted(self.stale_errors.get(uri, ()))),
                "done_parts": ",".join(sorted(self.parts.get(uri, ())))}

    def pending(self, videos: list[dict]) -> list[dict]:
        return [r for r in map(self.pending_row, videos) if r is not None]

    def _add_clip(self, source_uri: str, clip_id: str) -> None:
        self.clips.add(clip_id)
        self.clips_by_input[source_uri].add(clip_id)


def load(cfg: Config) -> Done:
    """Read the ids in OUTPUT's committed files (nothing when OUTPUT is new)."""
    done = Done()
    latents = layout.read_columns(cfg.output, layout.LATENTS_DIR, ["clip_id", "source_uri"], cfg.s3)
    if latents is not None:
        for cid, uri in zip(latents.column("clip_id").to_pylist(), latents.column("source_uri").to_pylist()):
            done._add_clip(uri, cid)
    outcomes: list[dict] = []  # each unit's outcome, and the clips it depends on
    # Markers and error rows are outcomes only of this job: a record replaced (nothing written
    # under it) can leave another job's behind, whose clip lists are not this job's.
    errors = layout.read_columns(cfg.output, layout.ERRORS_DIR,
                                 ["source_uri", "part", "parts", "clip_id", "retryable", "clip_ids"], cfg.s3,
                                 fingerprint=cfg.job_fingerprint)
    for row in errors.to_pylist() if errors is not None else []:
        uri, cid = row["source_uri"], row["clip_id"]
        if row["retryable"] or cfg.retry_errors:
            done.stale_errors[uri].append(layout.error_file(uri, cid, row["part"]))
        elif cid is not None:
            done._add_clip(uri, cid)
        else:
            outcomes.append(row)
    markers = layout.read_columns(cfg.output, layout.MARKERS_DIR, ["source_uri", "part", "parts", "clip_ids"],
                                  cfg.s3, fingerprint=cfg.job_fingerprint)
    outcomes += markers.to_pylist() if markers is not None else []
    for row in outcomes:
        if not done.clips.issuperset(row["clip_ids"] or ()):
            continue
        if row["part"] is None:
            done.inputs.add(row["source_uri"])
        else:
            done.parts[row["source_uri"]].add(f"{row['part']}/{row['parts']}")
    for uri, parts in done.parts.items():
        counts = {int(p.split("/")[1]) for p in parts}
        if any(all(f"{k}/{n}" in parts for k in range(n)) for n in counts):
            done.inputs.add(uri)
    return done


_DONE_CACHE: dict[str, Done] = {}


def pending_batch(batch: pa.Table, done_ref: tuple, ledger=None) -> pa.Table:
    """Ray Data map_batches step on a page of the listing: drop done inputs, annotate the rest.
    ``done_ref`` holds the ObjectRef of the run's Done (in a tuple, so Ray passes the ref)."""
    import ray

    (ref,) = done_ref
    done = _DONE_CACHE.get(ref.hex())
    if done is None:
        done = _DONE_CACHE[ref.hex()] = ray.get(ref)
    rows = batch.to_pylist()
    kept = [r for r in map(done.pending_row, rows) if r is not None]
    if ledger is not None:
        ledger.listed.remote(len(rows), len(rows) - len(kept))
    schema = batch.schema
    for name in ("skip_clips", "stale_errors", "done_parts"):
        schema = schema.append(pa.field(name, pa.string()))
    return pa.Table.from_pylist(kept, schema=schema)
