"""Where things live in OUTPUT, and reading them back.

  _lease.json                   the running encode's lease, while it runs (see pipeline.lease)
  _job.json                     the job's identity, written first (see pipeline.job)
  latents/part-<hash>.parquet   one row per clip; the hash is of the clip ids inside
  errors/err-<hash>.parquet     one row per input (or clip) that could not be encoded
  _markers/vid-<hash>.parquet   per input: the ids of all its clips, once they are all cut
  report.html                   throughput over time, errors by type, clips per video
  _SUCCESS                      JSON written last, only when the run is complete

Names derive from ids, never from input names, so a retried task rewrites the same file.
"""
from __future__ import annotations

import hashlib
import json

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.schema import METADATA_KEY

LATENTS_DIR = "latents"
ERRORS_DIR = "errors"
MARKERS_DIR = "_markers"  # a leading underscore: Parquet dataset readers of OUTPUT skip it
JOB = "_job.json"
SUCCESS = "_SUCCESS"
REPORT = "report.html"


def file_name(prefix: str, keys) -> str:
    digest = hashlib.blake2b("\n".join(sorted(keys)).encode(), digest_size=12).hexdigest()
    return f"{prefix}-{digest}.parquet"


def unit_key(source_uri: str, part: int | None = None) -> str:
    """A unit of work: a whole input, or one part of a long one."""
    return source_uri if part is None else f"{source_uri}\0part={part}"


def error_file(source_uri: str, clip_id: str | None, part: int | None = None) -> str:
    """One error file per unit (or per clip): a retry overwrites it, a success deletes it."""
    return file_name("err", [f"{unit_key(source_uri, part)}\0{clip_id or ''}"])


def marker_file(source_uri: str, part: int | None = None) -> str:
    return file_name("vid", [unit_key(source_uri, part)])


def read_columns(output: str, folder: str, columns: list[str], s3=None, fingerprint: str | None = None):
    """Some columns of every Parquet file under OUTPUT/folder (None when there is none); with
    ``fingerprint``, only of the files written by that job (or by a version that recorded none)."""
    fs, path = storage.resolve(storage.join(output, folder), s3)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    if fingerprint is not None and dataset.files:
        # Each footer is read once: the fragment keeps it for the scan below.
        kept = [f for f in dataset.get_fragments() if file_fingerprint(f.physical_schema) in (None, fingerprint)]
        dataset = pads.FileSystemDataset(kept, dataset.schema, dataset.format, fs)
    return dataset.to_table(columns=columns) if dataset.files else None


def file_fingerprint(schema) -> str | None:
    """The job fingerprint a file's schema metadata records (None when it records none)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    try:
        return json.loads(raw).get("job_fingerprint") if raw else None
    except ValueError:
        return None


def count_rows(output: str, folder: str, s3=None) -> int:
    fs, path = storage.resolve(storage.join(output, folder), s3)
    try:
        return pads.dataset(path, filesystem=fs, format="parquet").count_rows()
    except (FileNotFoundError, OSError):
        return 0


def has_results(output: str, s3=None) -> bool:
    """Whether OUTPUT holds any latents or error file (markers alone record no outcome)."""
    for folder in (LATENTS_DIR, ERRORS_DIR):
        fs, path = storage.resolve(storage.join(output, folder), s3)
        if fs.get_file_info(path).type == pafs.FileType.Directory and \
                any(i.base_name.endswith(".parquet") for i in fs.get_file_info(pafs.FileSelector(path))):
            return True
    return False


def delete(output: str, names: list[str], s3=None) -> None:
    for name in names:
        fs, path = storage.resolve(storage.join(output, name), s3)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)


def delete_if_present(uri: str, s3=None) -> None:
    fs, path = storage.resolve(uri, s3)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def clear(output: str, s3=None) -> None:
    """--overwrite: remove a previous run's output, ``_SUCCESS`` first, so that no reader
    mistakes a half-deleted folder for a finished one."""
    delete(output, [SUCCESS, REPORT, LATENTS_DIR, ERRORS_DIR, MARKERS_DIR, JOB], s3)


def read_json(output: str, name: str, s3=None) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(output, name), s3))
    except FileNotFoundError:
        return None


def write_json(output: str, name: str, body: dict, s3=None) -> None:
    text = json.dumps(body, indent=2, sort_keys=True, default=str)
    storage.write_bytes_atomic(storage.join(output, name), text.encode(), s3)
