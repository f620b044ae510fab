"""One run at a time into an OUTPUT: a lease, ``OUTPUT/_lease.json``.

An encode takes it before it changes anything in OUTPUT (before ``--overwrite`` clears it, before
``_job.json``), refreshes its heartbeat from a thread in the driver, and gives it back (deletes it,
only if it is still its own) when it ends, whatever the outcome. A second encode meanwhile exits 2
naming the running one. A lease whose heartbeat is older than its stale bound belongs to a run
that is dead (its driver's node lost, the process killed): the next run takes it over and says
so. So does a lease whose holder ran on the same machine (kernel boot id and PID namespace) and
whose process is gone: a driver killed here is rerun here at once, without waiting. Before writing ``_SUCCESS`` a run checks that the lease and ``_job.json`` are still its own.

Every change is a compare-and-swap, so that of two runs racing for OUTPUT one wins:
- S3: a PUT with ``If-None-Match: *`` creates it; a PUT or DELETE with ``If-Match`` on the ETag
  the run holds refreshes, takes over or gives it back (AWS and moto honour both; a store that
  ignores them loses the guarantee, not the run).
- a local (or shared) folder: the lease appears whole and exclusively with a hard link of a
  written temp file (``link`` fails when the name exists, as ``O_CREAT|O_EXCL`` does, and no
  reader ever sees it half-written); a takeover first claims the stale lease with an exclusive
  link of its own name, so that of two runs taking over the same dead one, one wins. The holder's
  refresh and give-back read, compare and replace: they could only lose a race to a takeover of
  a lease already stale, that is, if the holder had stopped for STALE_AFTER_S.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

from pipeline import hooks, storage
from pipeline.config import ConfigError
from pipeline.failures import RunFailed

NAME = "_lease.json"  # a leading underscore: Parquet dataset readers of OUTPUT skip it
# Seconds between heartbeats (VIDEO_LATENTS_LEASE_HEARTBEAT_S sets another); a lease is stale (its
# run taken for dead) after four missed, by the bound its holder wrote in it.
HEARTBEAT_S = float(os.environ.get("VIDEO_LATENTS_LEASE_HEARTBEAT_S") or 30.0)
STALE_AFTER_S = 4 * HEARTBEAT_S
# Create-or-take-over attempts while other runs change the lease under us.
ATTEMPTS = 5


class LeaseHeld(ConfigError):
    """Another live run holds OUTPUT's lease: a usage error (exit 2), nothing touched."""


class LeaseLost(RunFailed):
    """This run no longer holds OUTPUT's lease, or OUTPUT's job record is no longer its own."""


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(body: dict) -> str:
    """'run R on HOST (pid P, since T)' for messages."""
    return (f"run {body.get('run_id', '?')} on {body.get('host', '?')} (pid {body.get('pid', '?')}, "
            f"since {_when(body['taken_at']) if body.get('taken_at') else '?'})")


def age(body: dict, now: float | None = None) -> float:
    """Seconds since the lease's last heartbeat (0 for one from a clock ahead of ours)."""
    return max(0.0, (now or time.time()) - float(body.get("heartbeat_at") or 0))


def stale_after(body: dict) -> float:
    """The holder's own stale bound (it beats at its own pace), else ours."""
    try:
        return float(body.get("stale_after_s") or STALE_AFTER_S)
    except (TypeError, ValueError):
        return STALE_AFTER_S


def is_stale(body: dict, now: float | None = None) -> bool:
    return age(body, now) > stale_after(body)


def _process_here() -> dict:
    """What tells this process apart on this machine (Linux): the kernel's boot id, the PID
    namespace (containers on one kernel have their own), and the process's start time (a PID
    is reused); {} where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return {"boot_id": boot, "pid_ns": os.readlink("/proc/self/ns/pid"), "pid_start": _start_time(os.getpid())}
    except OSError:
        return {}


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22: starttime, in clock ticks since boot
    except (OSError, IndexError):
        return None


def is_dead_here(body: dict) -> bool:
    """Whether the lease's holder ran on this machine, in this PID namespace, and its process is
    gone (a driver killed or crashed here): then its run is dead now, whatever its last heartbeat
    says. Anything unknown counts as alive: only the stale bound decides then."""
    here = _process_here()
    if not here or not body.get("pid_start") or any(body.get(k) != here[k] for k in ("boot_id", "pid_ns")):
        return False
    try:
        pid = int(body["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return _start_time(pid) != body["pid_start"]


class _S3:
    """The lease as an S3 object; the token is its ETag."""

    def __init__(self, uri: str, s3):
        import boto3
        from botocore.config import Config as BotoConfig

        opts = s3 if isinstance(s3, storage.S3Options) else storage.S3Options(endpoint=s3)
        self.bucket, _, self.key = uri[len("s3://"):].partition("/")
        self.client = boto3.client("s3", endpoint_url=opts.endpoint, config=BotoConfig(
            retries={"max_attempts": opts.max_attempts, "mode": "standard"}))

    @staticmethod
    def _code(e) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    def read(self) -> tuple[dict, str] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return _parse(got["Body"].read(), got["LastModified"].timestamp()), got["ETag"]

    def _put(self, body: dict, **condition) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=_dump(body),
                                          ContentType="application/json", **condition)["ETag"]
        except ClientError as e:
            # 412: the condition failed; 409: a concurrent conditional write; 404: If-Match on a
            # lease that was deleted meanwhile. The caller reads the lease again.
            if self._code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "409"):
                return None
            raise

    def create(self, body: dict) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def replace(self, body: dict, token: str, takeover: bool = False) -> str | None:
        return self._put(body, IfMatch=token)

    def delete(self, token: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
        except ClientError as e:
            if self._code(e) in ("PreconditionFailed", "NoSuchKey", "404"):
                return False
            raise
        return True


class _Local:
    """The lease as a file; the token is its bytes."""

    def __init__(self, path: str, run_id: str):
        self.path, self.run_id = path, run_id
        self.claims: list[str] = []

    def read(self) -> tuple[dict, bytes] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        return _parse(data, mtime), data

    def _link_new(self, data: bytes, name: str) -> bool:
        """``name`` created holding ``data``, whole and exclusively; False when it exists."""
        folder = os.path.dirname(name)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(name)}.{self.run_id}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, name)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def create(self, body: dict) -> bytes | None:
        data = _dump(body)
        return data if self._link_new(data, self.path) else None

    def replace(self, body: dict, token: bytes, takeover: bool = False) -> bytes | None:
        if takeover:  # of two runs taking over the same dead one, the one whose claim lands wins
            claim = f"{self.path}.taken-{_parse(token, 0).get('run_id', 'unknown')}"
            if not self._link_new(token, claim):
                return None
            self.claims.append(claim)
        current = self.read()
        if current is None or current[1] != token:
            return None
        data = _dump(body)
        tmp = os.path.join(os.path.dirname(self.path), f".{NAME}.{self.run_id}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)
        return data

    def delete(self, token: bytes) -> bool:
        current = self.read()
        ours = current is not None and current[1] == token
        if ours:
            os.unlink(self.path)
        for claim in self.claims:  # kept until now: a late second taker of the same dead run loses
            try:
                os.unlink(claim)
            except FileNotFoundError:
                pass
        return ours


def _dump(body: dict) -> bytes:
    return json.dumps(body, indent=2, sort_keys=True).encode()


def _parse(data: bytes, mtime: float) -> dict:
    """The lease's fields; one that does not parse (not ours, or written by hand) is taken for a
    lease of an unknown run whose heartbeat is the object's modification time."""
    try:
        body = json.loads(data)
        if isinstance(body, dict) and "heartbeat_at" in body:
            return body
    except ValueError:
        pass
    return {"run_id": "unknown", "heartbeat_at": mtime}


class Lease:
    """This run's lease on OUTPUT, held from :func:`take` until :meth:`release`."""

    def __init__(self, output: str, s3=None):
        self.output = output
        self.uri = storage.join(output, NAME)
        self.run_id = uuid.uuid4().hex[:12]
        now = time.time()
        self.body = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                     "taken_at": now, "heartbeat_at": now, "heartbeat_s": HEARTBEAT_S,
                     "stale_after_s": STALE_AFTER_S, **_process_here()}
        self.store = (_S3(self.uri, s3) if storage.is_s3(output)
                      else _Local(os.path.join(storage.resolve(output)[1], NAME), self.run_id))
        self.token = None
        self.lost: dict | None = None  # the lease as the heartbeat found it, once not ours
        # Called once, from the heartbeat's thread, with a one-line reason when the lease is lost
        # mid-run: the run stops then, not only at its end.
        self.on_lost = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="video-latents-lease", daemon=True)

    def take(self) -> "Lease":
        """Create the lease, or take over a stale one; raises LeaseHeld naming a live holder."""
        for _ in range(ATTEMPTS):
            self.token = self.store.create(self.body)
            if self.token is not None:
                break
            current = self.store.read()
            if current is None:
                continue  # given back meanwhile
            held, token = current
            if held.get("run_id") == self.run_id:  # our own create, retried after a lost answer
                self.token = token
                break
            dead_here = is_dead_here(held)
            if not dead_here and not is_stale(held):
                raise LeaseHeld(self._held_message(held))
            self.body["heartbeat_at"] = time.time()
            self.token = self.store.replace(self.body, token, takeover=True)
            if self.token is not None:
                why = ("its process is gone from this machine" if dead_here else
                       f"its last heartbeat was {age(held):.0f} s ago (stale after {stale_after(held):.0f} s)")
                print(f"video-latents: taking over OUTPUT's lease from {describe(held)}: {why}, so that run is "
                      "taken for dead", file=sys.stderr, flush=True)
                break
        else:
            raise LeaseHeld(f"OUTPUT {self.output}: its lease ({self.uri}) changed {ATTEMPTS} times while this "
                            "run tried to take it: other runs are starting into the same OUTPUT; run one at a time")
        self._thread.start()
        return self

    def _held_message(self, held: dict) -> str:
        left = max(0.0, stale_after(held) - age(held))
        return (f"OUTPUT {self.output} is being written by another run: {describe(held)}, last heartbeat "
                f"{age(held):.0f} s ago. Wait for it to finish (or stop it); if that run is dead, rerun "
                f"in {left:.0f} s, when its lease goes stale, or delete {self.uri} first")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - the store may pass; the lease goes stale only after several
                print(f"video-latents: warning: could not refresh OUTPUT's lease: {type(e).__name__}: "
                      f"{str(e).strip()[:200]}", file=sys.stderr, flush=True)
            if self.lost is not None:
                if self.on_lost is not None:
                    self.on_lost(self.lost_message())
                hooks.reach("lease-lost")
                return

    def lost_message(self) -> str:
        who = f"taken over by {describe(self.lost)}" if self.lost else "deleted"
        return (f"OUTPUT's lease ({self.uri}) was {who} while this run (run {self.run_id}) was writing, "
                "so this run stopped: the other run now owns OUTPUT; rerun once it has ended")

    def renew(self) -> None:
        """One heartbeat: rewrite the lease if it is still ours, else note who holds it now."""
        self.body["heartbeat_at"] = time.time()
        token = self.store.replace(self.body, self.token)
        if token is None:
            current = self.store.read()
            if current is not None and current[0].get("run_id") == self.run_id:
                token = current[1]  # our own write, retried after a lost answer
            else:
                self.lost = current[0] if current is not None else {}
                return
        self.token = token

    def check(self, fingerprint: str, read_job) -> None:
        """Before ``_SUCCESS``: raise LeaseLost unless the lease is still ours and OUTPUT's job
        record (``read_job()``) still carries this run's fingerprint."""
        current = self.store.read()
        if current is None or current[0].get("run_id") != self.run_id:
            who = f"taken over by {describe(current[0])}" if current is not None else "deleted"
            raise LeaseLost(f"OUTPUT's lease ({self.uri}) was {who} while this run (run {self.run_id}) "
                            "was writing, so it does not mark OUTPUT complete: the other run now owns OUTPUT; "
                            "rerun once it has ended")
        recorded = (read_job() or {}).get("fingerprint")
        if recorded != fingerprint:
            raise LeaseLost(f"OUTPUT's job record was replaced while this run was writing (fingerprint "
                            f"{fingerprint} -> {recorded}), so this run does not mark OUTPUT complete; "
                            "rerun to check what OUTPUT holds")

    def release(self) -> None:
        """Stop the heartbeat; delete the lease if it is still ours."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.token is None:
            return
        try:
            if not self.store.delete(self.token):
                current = self.store.read()  # our token may be stale after a retried write
                if current is not None and current[0].get("run_id") == self.run_id:
                    self.store.delete(current[1])
        except Exception as e:  # noqa: BLE001 - keep the run's own outcome; the lease goes stale by itself
            print(f"video-latents: warning: could not give back OUTPUT's lease {self.uri} (it goes stale in "
                  f"{STALE_AFTER_S:.0f} s): {type(e).__name__}: {str(e).strip()[:200]}", file=sys.stderr)
        self.token = None

    def __enter__(self) -> "Lease":
        return self.take()

    def __exit__(self, *exc) -> None:
        self.release()


def hold(output: str, s3=None) -> Lease:
    """``with lease.hold(cfg.output, cfg.s3) as held:`` the run's lease on OUTPUT."""
    return Lease(output, s3)
