"""The test side of pipeline/hooks.py: arm named points, and wait for the pipeline's signal that
it reached one. Waiting is on a FIFO the pipeline writes to; the only clock is a deadline after
which the test fails (the point was never reached), never one that decides when a fault lands."""
from __future__ import annotations

import glob
import json
import os
import select
import tempfile
import time

from pipeline.hooks import ENV, SIGNALS

NEVER_REACHED_S = 300


class Hooks:
    def __init__(self, folder: str | None = None):
        self.folder = folder or tempfile.mkdtemp(prefix="vl-hooks-", dir="/tmp")
        fifo = os.path.join(self.folder, SIGNALS)
        if not os.path.exists(fifo):
            os.mkfifo(fifo)
        # Read-write: opening never blocks, a writer never meets "no reader", and EOF never comes.
        self.fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        self.pending = b""
        self.seen: list[str] = []

    @property
    def env(self) -> dict:
        return {ENV: self.folder}

    def arm(self, point: str, action: str, first: int = 1, last: int | None = None, count: int = 2,
            on: str | None = None, match: str | None = None, seconds: float = 0,
            fault: dict | None = None) -> None:
        """From arrival ``first`` to ``last`` (inclusive; None: all later), signal and then
        ``action``: "signal" (go on), "block" (until killed), "crash" (end the process) or
        "barrier" (wait until point ``on``, this one by default, has had ``count`` arrivals;
        arrivals are counted only at an armed point, so arm ``on`` too, with "signal"), "kill"
        (SIGKILL to itself), "hold" (``seconds``) or "raise" (``fault``: {"type": "OSError",
        "errno": 5}). With ``match``, only arrivals whose detail contains it count and act."""
        tmp = os.path.join(self.folder, f".{point}.arm.tmp")
        with open(tmp, "w") as f:
            json.dump({"action": action, "from": first, "until": last, "count": count, "on": on,
                       "match": match, "seconds": seconds, "raise": fault}, f)
        os.replace(tmp, os.path.join(self.folder, f"{point}.arm"))

    def release(self, name: str) -> None:
        """Let go of arrivals waiting at a point armed ``"barrier"`` with ``on=name, count=1``: the
        test itself is the arrival they wait for."""
        os.close(os.open(os.path.join(self.folder, f"{name}.1"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))

    def arrivals(self, point: str) -> int:
        return len(glob.glob(os.path.join(self.folder, f"{point}.[0-9]*")))

    def wait(self, *points: str, proc=None, log: str | None = None, counts: dict | None = None) -> dict:
        """Block until each point has signalled once (or ``counts[point]`` times); returns
        {point: its first signal's fields}."""
        wanted = {p: 1 for p in points} | (counts or {})

        def missing():
            got = [line.split()[0] for line in self.seen]
            return {p: n - got.count(p) for p, n in wanted.items() if got.count(p) < n}

        deadline = time.monotonic() + NEVER_REACHED_S
        while missing():
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the run ended (code {proc.returncode}) before reaching "
                                     f"{missing()}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{missing()} never reached:\n{_tail(log)}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if not ready:
                continue
            self.pending += os.read(self.fd, 65536)
            *lines, self.pending = self.pending.split(b"\n")
            self.seen += [raw.decode() for raw in lines]
        return {p: next(line.split() for line in self.seen if line.split()[0] == p) for p in wanted}

    def disarm(self) -> None:
        for path in glob.glob(os.path.join(self.folder, "*.arm")) + \
                glob.glob(os.path.join(self.folder, "*.[0-9]*")):
            os.remove(path)

    def close(self) -> None:
        self.disarm()
        os.close(self.fd)
        self.seen.clear()


def _tail(log: str | None) -> str:
    if not log or not os.path.exists(log):
        return ""
    with open(log) as f:
        return f.read()[-3000:]
