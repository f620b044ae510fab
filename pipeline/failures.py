"""Failures by class, decided in one place.

- ``input``: the input's own fault (corrupt, truncated, too short, over a limit, no video
  stream, unsupported codec, non-finite latents from that clip). One error row, final: a rerun
  skips it (unless ``--retry-errors``).
- ``transient``: the store or the network (S3 5xx and throttling, timeouts, connection resets,
  access refused, a node lost during a read). Retried with backoff inside the run; if it still
  fails, the error row says ``retryable`` and a rerun tries the input again.
- ``resource``: a clip that alone, with tiling, still does not fit in GPU memory. A retryable
  error row (another GPU may fit it).
- ``systemic``: the model or the device, not the input (wrong channels, load failures,
  CUDA/cuDNN errors, device lost), and failures to write OUTPUT. Never recorded as an input's
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


# What the S3 client (pyarrow's AWS SDK) and sockets say when the fault is the service's or the
# network's: retried, never held against the input.
_TRANSIENT_MARKERS = (
    "http status 5", "slow_down", "slowdown", "throttl", "network_connection", "curlcode",
    "requesttimeout", "timed out", "timeout", "internal_failure", "service_unavailable",
    "connection reset", "connection refused", "broken pipe", "temporarily unavailable",
    "access_denied", "accessdenied", "http status 403", "expiredtoken", "reduce your request rate",
)


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
    """The class of a failure met while reading, decoding or cutting one input."""
    if isinstance(e, InputError):
        return INPUT
    if isinstance(e, (ImportError, NameError, SyntaxError, SystemicFailure)):
        return SYSTEMIC  # our code or environment is broken, not the input
    if isinstance(e, MemoryError):
        return TRANSIENT  # the node was short of memory; another try (or node) may fit
    if _is_ray_system_error(e):
        return TRANSIENT
    text = str(e).lower()
    if isinstance(e, (ConnectionError, TimeoutError)) and not _is_ffmpeg(e):
        return TRANSIENT
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and not _is_ffmpeg(e) \
            and any(marker in text for marker in _TRANSIENT_MARKERS):
        return TRANSIENT
    return INPUT


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
