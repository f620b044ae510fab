"""Listing the videos to encode: under INPUT (an S3 prefix, a local folder, or one file), or
the rows of a --manifest (CSV, JSONL or Parquet, local or S3)."""
from __future__ import annotations

import json
import os
import posixpath
from typing import Iterator

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
    """The manifest's own columns and the Arrow type each keeps in the output; a --caption-column
    it does not have is refused (the default `caption` may be absent: the .txt files serve)."""
    columns = read_manifest(cfg).schema
    if cfg.text_embeddings and cfg.caption_column and cfg.caption_column not in columns.names:
        raise ValueError(f"no column {cfg.caption_column!r} for --caption-column "
                         f"(it has {', '.join(columns.names)})")
    # With --text-embeddings the output has its own `caption` column: the caption each clip used.
    own = {schema.CAPTION} if cfg.text_embeddings else set()
    taken = {*schema.CLIP_COLUMNS, *schema.SCENE_COLUMNS, *schema.ENCODER_COLUMNS, *schema.ALL_TENSOR_COLUMNS, "extra"}
    clash = [f.name for f in columns if f.name in taken]
    if clash:
        raise ValueError(f"column(s) {', '.join(clash)} would overwrite the output's own; rename them")
    return tuple((f.name, str(f.type) if str(f.type) in PLAIN_TYPES else "string")
                 for f in columns if f.name not in MANIFEST_COLUMNS and f.name not in own)


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
        caption = record.get(cfg.caption_field) if cfg.text_embeddings else None  # empty: text.caption_for
        row = {"source_uri": source, "path": path, "size": -1, "start_sec": begin, "end_sec": end,
               "extra": json.dumps(record, default=str) if cfg.extra_columns else None,
               "caption": None if caption is None else str(caption)}
        rows.append(row)
    return rows


# Rows per listing page: one Arrow block each, streamed to the next stage as it is listed.
PAGE_ROWS = 1000
LISTING_SCHEMA = pa.schema([("source_uri", pa.string()), ("path", pa.string()), ("size", pa.int64()),
                            ("start_sec", pa.float64()), ("end_sec", pa.float64()), ("extra", pa.string()),
                            ("caption", pa.string())])


def iter_pages(cfg: Config, page_rows: int = PAGE_ROWS) -> Iterator[list[dict]]:
    """The inputs, a page at a time, in a reproducible order (keys in S3's order; folders walked
    in sorted order): memory stays flat however many there are.

    A single file is taken as given, whatever its extension; folders are searched recursively.
    """
    if cfg.manifest:
        rows = _manifest_rows(cfg)
        for i in range(0, len(rows), page_rows):
            yield rows[i:i + page_rows]
        return
    fs, path = storage.resolve(cfg.input, cfg.s3)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        yield [_row(storage.to_uri(fs, info.path), int(info.size or 0))]
        return
    found = _s3_keys(cfg, path) if isinstance(fs, pafs.S3FileSystem) else _local_files(path)
    page = []
    for uri, size in found:
        if _has_extension(uri, cfg.extensions):
            page.append(_row(uri, size))
            if len(page) == page_rows:
                yield page
                page = []
    if page:
        yield page


def _row(uri: str, size: int) -> dict:
    return {"source_uri": uri, "path": uri, "size": size, "start_sec": None, "end_sec": None, "extra": None,
            "caption": None}


def _local_files(folder: str) -> Iterator[tuple[str, int]]:
    """Files under a folder, recursively, in the order of their full paths (as S3 lists keys)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name + ("/" if e.is_dir() else ""))
    except OSError:
        return  # gone since it was listed
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            yield from _local_files(entry.path)
        elif entry.is_file():
            try:
                yield entry.path, entry.stat().st_size
            except OSError:
                continue


def _s3_keys(cfg: Config, path: str) -> Iterator[tuple[str, int]]:
    """Keys under s3://path/, 1000 per request (boto3's paginator: pyarrow lists a whole prefix
    into memory at once)."""
    import boto3
    from botocore.config import Config as BotoConfig

    bucket, _, prefix = path.partition("/")
    client = boto3.client("s3", endpoint_url=cfg.s3_endpoint,
                          config=BotoConfig(retries={"max_attempts": cfg.s3_max_attempts, "mode": "standard"}))
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                yield f"s3://{bucket}/{item['Key']}", int(item["Size"])


def list_videos(cfg: Config) -> list[dict]:
    """All the inputs at once (``plan``'s and the tests' convenience; the run streams pages)."""
    return [row for page in iter_pages(cfg) for row in page]


class Listing:
    """A Ray Data datasource of the inputs: one read task that yields a block per page, so the
    listing streams into the dataflow instead of being held by the driver."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def datasource(self):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import Datasource, ReadTask

        cfg = self.cfg

        class _Listing(Datasource):
            def estimate_inmemory_data_size(self):
                return None

            def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
                def read():
                    for page in iter_pages(cfg):
                        yield pa.Table.from_pylist(page, schema=LISTING_SCHEMA)

                meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
                return [ReadTask(read, meta, schema=LISTING_SCHEMA)]

        return _Listing()
