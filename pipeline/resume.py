"""Resume: what an earlier run into OUTPUT already finished, so a rerun does only the rest.

Why this is exactly-once (see the README's reliability section):
- every file is written whole under a name derived from the ids it holds, so a file either
  exists complete or not at all, and a retried task rewrites the same file;
- a clip is done when a committed latents file holds its id, or a final error row names it;
- an input is done when its outcome is recorded and every clip that outcome depends on is done:
  a marker (written once every clip was cut) or a final error row (which lists the clips cut
  before the failure). Done inputs are not even opened again; the clips of the others are
  skipped by id before their pixels are converted, so no clip is encoded twice.
- retryable error rows (and, with ``--retry-errors``, final ones) record no outcome: their
  inputs and clips are tried again, and their stale error files deleted first.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from pipeline import layout
from pipeline.config import Config


@dataclass
class Done:
    """What OUTPUT already holds."""

    clips: set[str] = field(default_factory=set)
    clips_by_input: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    inputs: set[str] = field(default_factory=set)
    # input -> error files to delete before it is tried again
    stale_errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def pending(self, videos: list[dict]) -> list[dict]:
        """The inputs still to do, each with the ids of its clips to skip and the error files
        to delete (comma-joined)."""
        return [{**v, "skip_clips": ",".join(sorted(self.clips_by_input.get(v["source_uri"], ()))),
                 "stale_errors": ",".join(sorted(self.stale_errors.get(v["source_uri"], ())))}
                for v in videos if v["source_uri"] not in self.inputs]

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
    outcomes: list[tuple[str, list[str]]] = []  # (input, the clips its outcome depends on)
    errors = layout.read_columns(cfg.output, layout.ERRORS_DIR,
                                 ["source_uri", "clip_id", "retryable", "clip_ids"], cfg.s3)
    for row in errors.to_pylist() if errors is not None else []:
        uri, cid = row["source_uri"], row["clip_id"]
        if row["retryable"] or cfg.retry_errors:
            done.stale_errors[uri].append(layout.error_file(uri, cid))
        elif cid is not None:
            done._add_clip(uri, cid)
        else:
            outcomes.append((uri, row["clip_ids"] or []))
    markers = layout.read_columns(cfg.output, layout.MARKERS_DIR, ["source_uri", "clip_ids"], cfg.s3)
    if markers is not None:
        outcomes += zip(markers.column("source_uri").to_pylist(), markers.column("clip_ids").to_pylist())
    for uri, ids in outcomes:
        if done.clips.issuperset(ids) and uri not in done.stale_errors:
            done.inputs.add(uri)
    return done
