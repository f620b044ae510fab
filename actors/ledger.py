"""The run's ledger: one small actor per run that decode tasks and encoder actors report to.

It holds what no single task sees: the share of inputs (and clips) that failed, for the
``--max-error-rate`` guard, and the cause of a systemic failure, so that the driver can name it
in one line after the actor that met it is gone.
"""
from __future__ import annotations

import time
from collections import Counter

from pipeline import stats

# The guard judges only once this many inputs (or clips) have an outcome: a few early
# failures in a sorted listing say little about the whole dataset.
MIN_OUTCOMES_FOR_GUARD = 20
# An encoder actor that meets the same systemic cause this many times in a row, each time on a
# fresh process (Ray restarts it and retries its batches), meets the model's or the device's
# fault for good: the run stops instead of spending the rest of the retries (each one a process
# start and a model load) on it. A batch the actor completes in between ends the streak.
SYSTEMIC_REPEATS_TO_STOP = 2
# Seconds anyone waits for the ledger's answer before going on without it (it is a CPU-less
# actor on the head node and answers in milliseconds; one that does not is gone or stuck).
ANSWER_TIMEOUT_S = 30


def guard_verdict(kind: str, ok: int, failed: Counter, max_rate: float) -> str | None:
    """A one-line reason to stop, or None: ``kind`` is "inputs" or "clips"."""
    bad = sum(failed.values())
    total = ok + bad
    if max_rate >= 1 or total < MIN_OUTCOMES_FOR_GUARD or bad <= max_rate * total:
        return None
    top = ", ".join(f"{name} {n}" for name, n in failed.most_common(3))
    return (f"stopped: {bad} of {total} {kind} failed ({bad / total:.0%}, over --max-error-rate "
            f"{max_rate:g}); most common: {top}. If this is expected of the data, raise "
            "--max-error-rate (1 turns the guard off)")


class RunLedger:
    """Ray actor (num_cpus=0) created by the driver for one run."""

    def __init__(self, max_error_rate: float):
        self.max_rate = max_error_rate
        self.inputs_ok, self.inputs_failed = 0, Counter()
        self.clips_ok, self.clips_failed = 0, Counter()
        self.stop: str | None = None
        self.cause: str | None = None
        self.causes: Counter = Counter()  # systemic causes met in a row, by (encoder actor, one-line text)
        self.actors: dict = {}  # the run's encoder actors, by id: ended with the run
        self.inputs_listed, self.inputs_already_done = 0, 0
        self.encoded: list[tuple[float, int]] = []  # (wall-clock time, clips encoded so far)
        self.moments: dict | None = None  # of the stored latents, per channel (pipeline.stats)
        # Decode attempts that began and recorded no outcome yet, by unit: the node of each.
        self.attempts: dict[str, list[str]] = {}

    def listed(self, inputs: int, already_done: int) -> None:
        """A page of the listing went by: so many inputs, so many of them done by earlier runs."""
        self.inputs_listed += inputs
        self.inputs_already_done += already_done

    def register(self, actor) -> None:
        """An encoder actor (re)started. Holding its handle keeps it in scope, so the driver can
        end it with the run even while Ray is restarting it (an actor that goes out of scope in
        the middle of a restart comes back as an orphan holding its CPU or GPU)."""
        self.actors[actor._actor_id.hex()] = actor

    def registered(self) -> list:
        return list(self.actors.values())

    def decode_attempt(self, unit: str, node: str) -> list[str]:
        """A decode task begins on ``unit`` (an input or part) on ``node``; returns the nodes of
        the earlier attempts that began and recorded no outcome: their process died."""
        earlier = self.attempts.setdefault(unit, [])
        before = list(earlier)
        earlier.append(node)
        return before

    def input_outcome(self, failed_as: str | None, unit: str | None = None) -> str | None:
        """One input done (``failed_as`` None) or failed (``stage/ErrorType``); returns the
        reason to stop the run when the guard trips."""
        if unit is not None:
            self.attempts.pop(unit, None)
        if failed_as is None:
            self.inputs_ok += 1
        else:
            self.inputs_failed[failed_as] += 1
        self.stop = self.stop or guard_verdict("inputs", self.inputs_ok, self.inputs_failed, self.max_rate)
        return self.stop

    def clip_outcomes(self, ok: int, failed_as: list[str], moments: dict | None = None,
                      actor: str | None = None) -> str | None:
        """Clips encoded and failed in one batch by ``actor``, with the moments of the latents
        stored (pipeline.stats); returns the reason to stop the run when the guard trips."""
        if actor is not None:  # a completed batch ends the actor's streak of systemic failures
            for key in [k for k in self.causes if k[0] == actor]:
                del self.causes[key]
        if moments:
            self.moments = stats.merge(self.moments, moments)
        self.clips_ok += ok
        self.encoded.append((time.time(), self.clips_ok))  # wall clock: the driver, on this node, compares
        self.clips_failed.update(failed_as)
        self.stop = self.stop or guard_verdict("clips", self.clips_ok, self.clips_failed, self.max_rate)
        return self.stop

    def timeline(self) -> list[tuple[float, int]]:
        return list(self.encoded)

    def systemic(self, cause: str, actor: str | None = None, final: str | None = None) -> bool:
        """Record a systemic cause met by encoder ``actor`` (None: a task, not retried here).
        True once that actor has met this cause SYSTEMIC_REPEATS_TO_STOP times in a row: its
        restart did not help, the run stops, and this is the cause it names. Other actors count
        apart, so one GPU's passing fault, retried and recovered, never stops the run for another's.
        ``final``: a cause no restart mends (``SystemicFailure.stops_run``): the run stops now,
        with that one line."""
        if final:
            self.stop = self.stop or final
            return True
        self.cause = self.cause or cause  # the first cause; later ones are usually its echoes
        if actor is None:
            return False
        self.causes[(actor, cause)] += 1
        if self.causes[(actor, cause)] < SYSTEMIC_REPEATS_TO_STOP:
            return False
        self.cause = cause
        return True

    def halt(self, reason: str) -> None:
        """Stop the run (the driver's reason: OUTPUT's lease lost, say): tasks and actors see it
        at their next report."""
        self.stop = self.stop or reason

    def state(self) -> dict:
        return {"stop": self.stop, "cause": self.cause, "inputs_listed": self.inputs_listed,
                "inputs_already_done": self.inputs_already_done, "inputs_ok": self.inputs_ok,
                "inputs_failed": sum(self.inputs_failed.values()), "clips_ok": self.clips_ok,
                "clips_failed": sum(self.clips_failed.values()), "latent_moments": self.moments,
                "clips_nonfinite": self.clips_failed.get("encode/NonFinite", 0)}


def end(ledger) -> None:
    """After a run, succeeded or failed: end its encoder actors for good, then the ledger."""
    import ray

    try:
        actors = ray.get(ledger.registered.remote(), timeout=ANSWER_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a ledger that is gone took its handles with it
        actors = []
    for actor in actors:
        ray.kill(actor, no_restart=True)
    ray.kill(ledger)


def start(max_error_rate: float):
    """A ledger for one run, on the head node (where `ray submit` and `ray job submit` run the
    driver, and which no autoscaler removes); it holds no CPU."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0, resources={"node:__internal_head__": 0.001})(
        RunLedger).remote(max_error_rate)
