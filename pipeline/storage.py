"""One way to reach local folders and S3-compatible stores: pyarrow filesystems.

The S3 endpoint and retry budget come from the job config (``--s3-endpoint`` or
``AWS_ENDPOINT_URL``, resolved once on the driver, and ``--s3-max-attempts``); credentials and
region come from the standard AWS chain on each worker, so no secret travels inside the config.

Functions here take ``s3``: an :class:`S3Options`, or just an endpoint URL, or None (AWS).
"""
from __future__ import annotations

import functools
import io
import os
import posixpath
from typing import NamedTuple
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline import hooks


def default_endpoint(explicit: str | None = None) -> str | None:
    """The S3 endpoint: the one given, else the standard AWS_ENDPOINT_URL, else AWS itself."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL") or None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


# Throttling (503 SlowDown), 5xx and dropped connections are retried with exponential backoff
# by the AWS SDK, this many attempts per request (about 90 s when every attempt fails).
S3_MAX_ATTEMPTS = 10


class S3Options(NamedTuple):
    endpoint: str | None = None
    max_attempts: int = S3_MAX_ATTEMPTS


def _options(s3) -> S3Options:
    return s3 if isinstance(s3, S3Options) else S3Options(endpoint=s3)


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None, max_attempts: int) -> pafs.S3FileSystem:
    kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
              "connect_timeout": 10, "request_timeout": 60, "allow_delayed_open": True}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(region=region, **kwargs) if region else pafs.S3FileSystem(**kwargs)


def _region(bucket: str, endpoint: str | None) -> str | None:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or endpoint:
        return region or "us-east-1"
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None


def resolve(uri: str, s3=None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for an ``s3://`` URI or a local path."""
    if is_s3(uri):
        opts = _options(s3)
        rest = uri[len("s3://"):]
        bucket = rest.split("/", 1)[0]
        return _s3(opts.endpoint, _region(bucket, opts.endpoint), opts.max_attempts), rest.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or a local path, keeping its scheme."""
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://"):].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The inverse of :func:`resolve` for a path listed on ``fs``."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def exists(uri: str, s3=None) -> bool:
    fs, path = resolve(uri, s3)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(uri: str, s3=None) -> int:
    """Bytes in a file; FileNotFoundError when there is none."""
    fs, path = resolve(uri, s3)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {uri}")
    return int(info.size)


def read_bytes(uri: str, s3=None) -> bytes:
    fs, path = resolve(uri, s3)
    with fs.open_input_stream(path) as f:
        return f.read()


class ObjectChanged(Exception):
    """The object under a key is no longer the one its ETag named (replaced or deleted)."""

    def __init__(self, uri: str, expected: str, now: str | None):
        super().__init__(f"{uri}: ETag {expected} expected, {now or 'no object'} now")
        self.uri, self.expected, self.now = uri, expected, now


@functools.lru_cache(maxsize=16)
def _boto_s3(endpoint: str | None, region: str | None, max_attempts: int):
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=endpoint, region_name=region,
                        config=BotoConfig(retries={"max_attempts": max_attempts, "mode": "standard"},
                                          connect_timeout=10, read_timeout=60))


# Bytes per ranged GET of download(): each range is its own request, retried apart.
DOWNLOAD_RANGE = 64 << 20


def download(uri: str, dest: str, s3=None, etag: str | None = None) -> None:
    """Copy a file to the local path ``dest``. On S3, with ``etag``, only that version of the
    object: each ranged GET carries If-Match, so the store refuses other bytes (ObjectChanged)
    and a copy is never part old object, part new. A range whose transfer breaks is asked again."""
    if not is_s3(uri):
        import shutil

        shutil.copyfile(os.path.expanduser(uri), dest)
        return
    from botocore.exceptions import ClientError

    opts = _options(s3)
    bucket, _, key = uri[len("s3://"):].partition("/")
    client = _boto_s3(opts.endpoint, _region(bucket, opts.endpoint), opts.max_attempts)
    condition = {"IfMatch": f'"{etag}"'} if etag else {}
    with open(dest, "wb") as out:
        start, size = 0, None
        while size is None or start < size:
            end = start + DOWNLOAD_RANGE - 1
            for attempt in range(opts.max_attempts):
                try:
                    reply = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}", **condition)
                    data = reply["Body"].read()
                    break
                except ClientError as e:
                    code = e.response.get("Error", {}).get("Code", "")
                    if etag and code in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                        raise ObjectChanged(uri, etag, _etag_now(client, bucket, key)) from None
                    if code == "InvalidRange" and start == 0:  # an empty object
                        return
                    raise
                except _stream_errors() as e:
                    if attempt + 1 == opts.max_attempts:
                        raise OSError(f"reading {uri}: {e}") from e
            out.write(data)
            size = int(reply["ContentRange"].rsplit("/", 1)[1]) if reply.get("ContentRange") else len(data)
            start += len(data)
            if not data:
                break


def _etag_now(client, bucket: str, key: str) -> str | None:
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    except ClientError:
        return None


def _stream_errors() -> tuple:
    """What botocore raises when a response's body breaks off (the request itself it retries)."""
    from botocore import exceptions as be

    return (be.ResponseStreamingError, be.ReadTimeoutError, be.IncompleteReadError, ConnectionError)


def write_bytes_atomic(uri: str, data: bytes, s3=None) -> None:
    """Write a whole object so that a reader sees the old state or the new one, never a part.

    An S3 PUT is atomic by itself; on a local disk we write a sibling temp file and rename it.
    """
    fs, path = resolve(uri, s3)
    if isinstance(fs, pafs.S3FileSystem):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A leading dot: Parquet dataset readers skip it if a crash leaves it behind.
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


class _RawNativeFile(io.RawIOBase):
    """Adapts a pyarrow RandomAccessFile to io.RawIOBase so io.BufferedReader can wrap it.

    Remembers the first read failure: FFmpeg can turn an exception raised inside its read
    callback into an early end of stream, and a network fault must never look like a short video.
    """

    def __init__(self, native, uri: str = ""):
        self._f = native
        self.uri = uri
        self.failure: BaseException | None = None

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, b):
        try:
            hooks.reach("read", self.uri)
            data = self._f.read(len(b))
        except Exception as e:
            self.failure = self.failure or e
            raise
        b[: len(data)] = data
        return len(data)

    def seek(self, offset, whence=io.SEEK_SET):
        try:
            return self._f.seek(offset, whence)
        except Exception as e:
            self.failure = self.failure or e
            raise

    def tell(self):
        return self._f.tell()

    def close(self):
        self._f.close()
        super().close()


# Demuxers read in small pieces; on S3 each unbuffered read would be one ranged GET.
S3_READ_BUFFER = 8 << 20
LOCAL_READ_BUFFER = 1 << 20


def open_for_decode(uri: str, s3=None):
    """A buffered, seekable file object that PyAV can open, local or on S3.

    Reads are streamed: a video is never loaded whole into memory. Local files are read through
    it too (not handed to FFmpeg by path), so that a read error from the disk (a flaky NFS or
    FUSE mount) is known for what it is, the store's, and not taken for the stream's end or
    for damaged bytes.
    """
    fs, path = resolve(uri, s3)
    if isinstance(fs, pafs.S3FileSystem):
        return io.BufferedReader(_RawNativeFile(fs.open_input_file(path), uri), buffer_size=S3_READ_BUFFER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {uri}")
    return io.BufferedReader(_RawNativeFile(fs.open_input_file(path), uri), buffer_size=LOCAL_READ_BUFFER)


def read_failure(source) -> BaseException | None:
    """The first read failure of a file object from :func:`open_for_decode` (None for a path)."""
    return getattr(getattr(source, "raw", None), "failure", None)
