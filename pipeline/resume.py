"""Resume: what an earlier run into OUTPUT already finished, so a rerun does only the rest.

Why this is exactly-once (see the README's reliability section):
- every file is written whole under a name derived from the ids it holds, so a file either
  exists complete or not at all, and a retried task rewrites the same file;
- a clip is done when a committed latents file holds its id (or an error row names it);
- a video is done when an error row names it, or when its marker (written once every clip was
  cut) lists only done clips. Done videos are not even opened again; the clips of the others
  are skipped by id before their pixels are converted, so no clip is encoded twice.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from pipeline import sink
from pipeline.config import Config


@dataclass
class Progress:
    done_clips: set[str] = field(default_factory=set)
    written_by_video: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    done_videos: set[str] = field(default_factory=set)

    def pending(self, videos: list[dict]) -> list[dict]:
        """The videos still to do, each with the ids of its clips to skip (comma-joined)."""
        return [{**v, "skip_clips": ",".join(sorted(self.written_by_video.get(v["source_uri"], ())))}
                for v in videos if v["source_uri"] not in self.done_videos]


def load(cfg: Config) -> Progress:
    """Read the ids in OUTPUT's committed files (nothing when OUTPUT is new)."""
    progress = Progress()
    latents = sink.read_columns(cfg, sink.LATENTS_DIR, ["clip_id", "source_uri"])
    if latents is not None:
        for cid, uri in zip(latents.column("clip_id").to_pylist(), latents.column("source_uri").to_pylist()):
            progress.done_clips.add(cid)
            progress.written_by_video[uri].add(cid)
    errors = sink.read_columns(cfg, sink.ERRORS_DIR, ["source_uri", "clip_id"])
    if errors is not None:
        for uri, cid in zip(errors.column("source_uri").to_pylist(), errors.column("clip_id").to_pylist()):
            if cid is None:
                progress.done_videos.add(uri)  # the whole input failed: its outcome is recorded
            else:
                progress.done_clips.add(cid)
                progress.written_by_video[uri].add(cid)
    markers = sink.read_columns(cfg, sink.MARKERS_DIR, ["source_uri", "clip_ids"])
    if markers is not None:
        for uri, ids in zip(markers.column("source_uri").to_pylist(), markers.column("clip_ids").to_pylist()):
            if progress.done_clips.issuperset(ids):
                progress.done_videos.add(uri)
    return progress
