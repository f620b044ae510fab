"""Test-only fault hooks: the pipeline signals when it reaches a named point, and can block or
crash there, so a fault test reaches its fault because the code got there, never by a timer.

Inactive unless ``VIDEO_LATENTS_TEST_HOOKS`` names a folder (it must be set before Ray starts so
that workers inherit it). In that folder, a test arms a point by writing ``<point>.arm``:

    {"action": "signal" | "block" | "crash" | "kill" | "barrier" | "hold" | "raise", "from": 1,
     "until": null, "on": "<point>", "count": 2, "match": null, "seconds": 0, "raise": null}

Arrivals at the point are counted across processes (``from``/``until`` pick which ones act,
both 1-based and inclusive); with ``match``, only arrivals whose detail contains it count and
act (a list: any of them). Each acting arrival writes ``<point> <n> <pid> <node id> [detail]`` as one line
to the FIFO ``signals`` in the folder when a test is listening on it; then ``block`` waits until
the process is killed, ``crash`` ends the process at once, as a lost GPU or an OOM kill would,
``kill`` sends the process SIGKILL, as the kernel does to a segfaulting decoder or the OOM
killer to its worker, ``barrier`` waits until point ``on`` (this one by default) has had
``count`` arrivals, ``hold`` keeps the caller for ``seconds`` (a consumer that does not pull),
and ``raise`` raises ``{"type": "OSError", "errno": 5}`` (a builtin exception type, with an
errno for OSError) where the point is, as a fault of that kind would.

Points: ``decode`` (an input or part is about to be opened), ``decoding`` (its decoder is
open), ``decode-resumed`` (the consumer asked for the next clip), ``read`` (a read from
storage), ``decode-error`` (its error row is committed), ``marker`` (its marker is committed), ``encoder-start`` (an encoder actor is
starting), ``encode`` (an encoder call begins), ``write`` (a latents file is about to be
written), ``written`` (it is committed), ``lease-lost`` (the driver's heartbeat found OUTPUT's
lease taken and told the ledger), ``export-item`` (``video-latents export`` is about to write
an item; its index is the detail).
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import signal
import threading
import time

ENV = "VIDEO_LATENTS_TEST_HOOKS"
SIGNALS = "signals"
# Test-only, for Ray's fake autoscaler: actors hold simulated GPUs (a resource on a CPU process)
# and compute on the CPU. Set in the environment the fake cluster is started with.
SIMULATED_GPU_ENV = "VIDEO_LATENTS_TEST_SIMULATED_GPU"


def compute_device(device: str) -> str:
    return "cpu" if device == "cuda" and os.environ.get(SIMULATED_GPU_ENV) else device


def reach(point: str, detail: str = "") -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    try:
        with open(os.path.join(folder, f"{point}.arm")) as f:
            spec = json.load(f)
    except (FileNotFoundError, ValueError):
        return  # not armed (or being armed right now: a test arms before it starts the run)
    match = spec.get("match")
    if match and not any(m in detail for m in ([match] if isinstance(match, str) else match)):
        return
    n = _arrival(folder, point)
    if n < spec.get("from", 1) or (spec.get("until") is not None and n > spec["until"]):
        return
    _signal(folder, f"{point} {n} {os.getpid()} {_node_id()} {detail}".rstrip())
    if spec["action"] == "crash":
        os._exit(1)
    if spec["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec["action"] == "hold":
        time.sleep(spec["seconds"])  # the fault is the length of the pause itself
    if spec["action"] == "raise":
        fault = spec["raise"]
        kind = getattr(builtins, fault["type"])
        if fault.get("errno") is not None:
            raise kind(fault["errno"], f"{os.strerror(fault['errno'])} (injected at {point})")
        raise kind(f"injected at {point}")
    if spec["action"] == "block":
        threading.Event().wait()
    if spec["action"] == "barrier":
        while not os.path.exists(os.path.join(folder, f"{spec.get('on') or point}.{spec['count']}")):
            time.sleep(0.05)  # waiting for another process's arrival, however long it takes


def _arrival(folder: str, point: str) -> int:
    """This arrival's number at the point, counted across processes with exclusive creates."""
    n = 1
    while True:
        try:
            os.close(os.open(os.path.join(folder, f"{point}.{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1


def _signal(folder: str, line: str) -> None:
    try:
        fd = os.open(os.path.join(folder, SIGNALS), os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO):  # no FIFO, or nobody listening
            return
        raise
    try:
        os.write(fd, (line + "\n").encode())  # under PIPE_BUF: one atomic write
    finally:
        os.close(fd)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
    except Exception:  # noqa: BLE001 - the node id is a courtesy for multi-node tests
        return "-"
