"""Listing the videos under INPUT: an S3 prefix, a local folder, or one file."""
from __future__ import annotations

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.config import Config


def _has_extension(path: str, extensions: tuple[str, ...]) -> bool:
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return suffix in {e.lower().lstrip(".") for e in extensions}


def list_videos(cfg: Config) -> list[dict]:
    """One row per video, ``{"source_uri", "size"}``, sorted by URI so runs are reproducible.

    A single file is taken as given, whatever its extension; folders are searched recursively.
    """
    fs, path = storage.resolve(cfg.input, cfg.s3_endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                 if i.type == pafs.FileType.File and _has_extension(i.path, cfg.extensions)]
    rows = [{"source_uri": storage.to_uri(fs, i.path), "size": int(i.size or 0)} for i in infos]
    return sorted(rows, key=lambda r: r["source_uri"])
