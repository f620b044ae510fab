"""Failures by class, decided in one place.

- ``input``: the input's own fault (corrupt, truncated, too short, over a limit, no video
  stream, unsupported codec, non-finite latents from that clip). One error row, final: a rerun
  skips it (unless ``--retry-errors``).
- ``transient``: the store or the network (any read error from storage: S3 errors of any
  status, throttling, timeouts, connection resets, access refused, a flaky NFS or FUSE read;
  a node lost during a read, a node short of memory). Retried with backoff inside the run; if it still
  fails, the error row says ``retryable`` and a rerun tries the input again.
- ``resource``: a clip that alone, with tiling, still does not fit in GPU memory. A retryable
  error row (another GPU may fit it).
- ``systemic``: the model or the device, not the input (wrong channels, load failures,
  CUDA/cuDNN errors, device lost), failures to write OUTPUT, and any exception from our own
  code that is not an error of the input's bytes (a TypeError, a KeyError: a bug every input
  would meet). Never recorded as an input's
  outcome: the run stops with exit 1 and nothing marks those clips done.
"""
from __future__ import annotations

from pipeline.schema import INPUT, RESOURCE, TRANSIENT

SYSTEMIC = "systemic"


def first_line(e: BaseException) -> str:
    """An exception's message on one line, for a one-line message (its type name when empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def systemic_cause(doing: str, e: BaseException) -> str:
    """A systemic failure as the run's ledger keeps it and the driver names it (and as the ledger
    compares two of them): what was being done, the exception's type and first line."""
    return f"{doing}: {type(e).__name__}: {first_line(e)[:500]}"


class InputError(Exception):
    """Base of the errors that are the input's own fault; ``stage`` says where it was found."""

    stage = "decode"


class NonFinite(InputError):
    """The VAE produced NaN or infinite latents for this clip."""

    stage = "encode"


class SystemicFailure(RuntimeError):
    """The model, the device or OUTPUT failed: the run must stop, marking nothing done.
    ``stops_run``: no restart or retry can mend it, so the run stops at the first meeting, with
    this message as its one line."""

    stops_run = False


class GuardTripped(RuntimeError):
    """Raised in a task when the run's ledger says the run must stop: it fails the dataset."""


class RunFailed(RuntimeError):
    """The run stopped for a known cause; the message is the one line the user sees (exit 1)."""


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, SystemicFailure):
        return False
    name = type(e).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(e).lower()


def classify(e: BaseException) -> str:
    """The class of a failure met while reading, decoding or cutting one input, decided by where
    it came from: the input's bytes (our checks, FFmpeg and PyAV), the store or the network
    (every other OSError: a flaky NFS or FUSE read, an S3 error of any status, a dropped
    connection), the node (memory, a lost Ray object, a decoder its FFmpeg lacks), or our own
    code (any other exception: a TypeError or KeyError is a bug that every input would meet,
    not one input's fault)."""
    if isinstance(e, InputError):
        return INPUT
    if isinstance(e, (ImportError, NameError, SyntaxError, SystemicFailure)):
        return SYSTEMIC  # our code or environment is broken, not the input
    if isinstance(e, MemoryError):
        return TRANSIENT  # the node was short of memory; another try (or node) may fit
    if _is_ray_system_error(e):
        return TRANSIENT
    if _is_ffmpeg(e):
        return INPUT  # FFmpeg's own errors are about the stream's bytes
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return INPUT  # the input is gone, or never was a file
    if isinstance(e, OSError):  # ConnectionError and TimeoutError too
        return TRANSIENT
    if _raised_in(e, "av"):
        return INPUT  # PyAV refused what the stream holds (a value it cannot convert, say)
    return SYSTEMIC


def _raised_in(e: BaseException, package: str) -> bool:
    """Whether the innermost frame of the exception's traceback is in ``package``'s code (its
    Cython modules name their frames ``av/...pyx`` or ``av/....py``, relative to the package)."""
    import importlib
    import os

    tb, where = e.__traceback__, None
    while tb is not None:
        where, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    if where is None:
        return False
    try:
        home = os.path.dirname(importlib.import_module(package).__file__)
    except ImportError:
        return False
    return where.startswith(package + "/") or where.startswith(home + os.sep)


def is_retryable(error_class: str) -> bool:
    return error_class in (TRANSIENT, RESOURCE)


def _is_ffmpeg(e: BaseException) -> bool:
    """FFmpeg's own errors (PyAV subclasses OSError for some) are about the stream's bytes."""
    return type(e).__module__.startswith("av.")


def _is_ray_system_error(e: BaseException) -> bool:
    module = type(e).__module__
    return module.startswith("ray.") and type(e).__name__ in (
        "ObjectLostError", "OwnerDiedError", "NodeDiedError", "ObjectFetchTimedOutError",
        "RaySystemError", "WorkerCrashedError", "ObjectReconstructionFailedError")
