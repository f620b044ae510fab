"""Listing the videos to encode: under INPUT (an S3 prefix, a local folder, or one file), or
the rows of a --manifest (CSV, JSONL or Parquet, local or S3)."""
from __future__ import annotations

import json
import os
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import schema, storage
from pipeline.config import Config


def _has_extension(path: str, extensions: tuple[str, ...]) -> bool:
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return suffix in {e.lower().lstrip(".") for e in extensions}


MANIFEST_COLUMNS = ("uri", "start_sec", "end_sec")
# Arrow types kept as they are in output rows; any other manifest column is stored as text.
PLAIN_TYPES = {"string", "large_string", "int64", "int32", "double", "float", "bool"}


def read_manifest(cfg: Config) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, path = storage.resolve(cfg.manifest, cfg.s3)
    kind = path.lower().rsplit(".", 1)[-1]
    readers = {"csv": pacsv.read_csv, "jsonl": pajson.read_json, "ndjson": pajson.read_json,
               "json": pajson.read_json, "parquet": pq.read_table}
    if kind not in readers:
        raise ValueError("name it .csv, .jsonl or .parquet")
    with fs.open_input_file(path) as f:
        table = readers[kind](f)
    if "uri" not in table.column_names:
        raise ValueError(f"no `uri` column (it has {', '.join(table.column_names)})")
    return table


def manifest_extra_columns(cfg: Config) -> tuple[tuple[str, str], ...]:
    """The manifest's own columns and the Arrow type each keeps in the output."""
    columns = read_manifest(cfg).schema
    taken = {*schema.CLIP_COLUMNS, *schema.ENCODER_COLUMNS, *schema.ALL_TENSOR_COLUMNS, "extra"}
    clash = [f.name for f in columns if f.name in taken]
    if clash:
        raise ValueError(f"column(s) {', '.join(clash)} would overwrite the output's own; rename them")
    return tuple((f.name, str(f.type) if str(f.type) in PLAIN_TYPES else "string")
                 for f in columns if f.name not in MANIFEST_COLUMNS)


def _manifest_rows(cfg: Config) -> list[dict]:
    """One row per manifest row; a time span becomes part of the source URI (a media
    fragment, ``path#t=start,end``), so each row has its own ids, marker and error row."""
    if storage.is_s3(cfg.manifest):  # relative URIs are relative to the manifest's folder
        base = "s3://" + posixpath.dirname(cfg.manifest[len("s3://"):])
    else:
        base = os.path.dirname(os.path.abspath(cfg.manifest))
    rows, seen = [], set()
    for record in read_manifest(cfg).to_pylist():
        uri = str(record.pop("uri"))
        path = uri if storage.is_s3(uri) or os.path.isabs(uri) else storage.join(base, uri)
        begin, end = record.pop("start_sec", None), record.pop("end_sec", None)
        begin = None if begin is None else float(begin)
        end = None if end is None else float(end)
        source = path if begin is None and end is None else f"{path}#t={begin or 0:g},{'' if end is None else f'{end:g}'}"
        if source in seen:
            continue
        seen.add(source)
        row = {"source_uri": source, "path": path, "size": -1, "start_sec": begin, "end_sec": end}
        if cfg.extra_columns:
            row["extra"] = json.dumps(record, default=str)
        rows.append(row)
    return rows


def list_videos(cfg: Config) -> list[dict]:
    """One row per video, ``{"source_uri", "size", ...}``, in a reproducible order.

    A single file is taken as given, whatever its extension; folders are searched recursively.
    """
    if cfg.manifest:
        return _manifest_rows(cfg)
    fs, path = storage.resolve(cfg.input, cfg.s3)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                 if i.type == pafs.FileType.File and _has_extension(i.path, cfg.extensions)]
    rows = [{"source_uri": storage.to_uri(fs, i.path), "size": int(i.size or 0)} for i in infos]
    return sorted(rows, key=lambda r: r["source_uri"])
