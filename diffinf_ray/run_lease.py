"""One writer per run root: a lease, `<root>/_lease.json`, taken by the commands that write a
run root (`diffinf run`, `stage`, `experiment`, `sweep` and their jobs/ recipes) before they
start Ray, and released when they end, also on an error.

The lease names its holder: {host, pid, command, started_at, heartbeat_at, token}. A daemon
thread rewrites heartbeat_at every `heartbeat_s` (default: a quarter of the timeout, at most
30 s). A second writer gets `LeaseHeldError` naming the holder and the age of its heartbeat.
A lease is stale, and is taken over with a warning, when its heartbeat is older than
`timeout_s` (default 120 s, `DIFFINF_LEASE_TIMEOUT_S`), or at once when its holder ran on
this host and its process is gone (the `kill -9`-then-rerun case); `break_lease=True`
(`--break-lease`) takes over any lease.

Only the driver takes it: the stages, Ray Train workers and Tune trials that the driver
starts write under the root on its behalf and take no lease.

What it guarantees:
- Creating the lease is atomic, so of any number of processes racing for a free root
  exactly one wins: on local disk the lease is written to a temporary file and `link(2)`ed
  into place, which fails with EEXIST when the file exists (also on NFS) and never shows a
  half-written lease; on S3 a conditional put (`If-None-Match: *`, strong read-after-write
  consistency) succeeds for one writer and answers 412/409 to the others.
- Taking over a stale lease is a compare-and-swap on the lease seen stale: on S3 a put with
  `If-Match: <its ETag>`; on local disk `rename(2)` of the lease aside, kept only if it is
  still the one seen stale (otherwise it is put back), then the atomic create above. Two
  processes taking over the same stale lease: one wins.
- Heartbeats are compare-and-swaps too on S3 (`If-Match` on the holder's last ETag). On local
  disk a heartbeat checks the token and then replaces the file, so a takeover that lands in
  between is overwritten; that needs a heartbeat already `timeout_s` late, i.e. a holder that
  was not alive enough to write for two minutes. A holder whose lease was taken over logs an
  error and stops heartbeating; it does not stop its own run.
- Staleness compares the holder's clock (heartbeat_at) with the reader's: hosts must agree on
  the time to well within `timeout_s` (NTP does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from diffinf_ray.storage import Location, StorageError, display_uri

log = logging.getLogger("diffinf")

LEASE_FILE = "_lease.json"
DEFAULT_TIMEOUT_S = 120.0
TIMEOUT_ENV = "DIFFINF_LEASE_TIMEOUT_S"


class LeaseHeldError(RuntimeError):
    """The run root is leased by another live writer; the message names it."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _command_line() -> str:
    """This process's command line, without URI query strings (endpoints), shortened."""
    text = " ".join(display_uri(a) for a in [os.path.basename(sys.argv[0]), *sys.argv[1:]])
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass(frozen=True)
class Holder:
    """The lease's content: who writes the run root, and when it last said so."""

    host: str
    pid: int
    command: str
    started_at: str  # ISO 8601, UTC
    heartbeat_at: str
    token: str  # tells two leases of one process apart

    @classmethod
    def new(cls, command: str) -> Holder:
        now = _iso(time.time())
        return cls(socket.gethostname(), os.getpid(), command, now, now, uuid.uuid4().hex)

    def beat(self) -> Holder:
        return Holder(**{**asdict(self), "heartbeat_at": _iso(time.time())})

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def loads(cls, data: bytes) -> Holder | None:
        """None for a lease that is not one (empty, foreign or corrupt: treated as stale)."""
        try:
            holder = cls(**json.loads(data.decode()))
            _epoch(holder.heartbeat_at)
            return holder
        except (ValueError, TypeError):
            return None

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat."""
        return (time.time() if now is None else now) - _epoch(self.heartbeat_at)

    def describe(self) -> str:
        return (f"host {self.host}, pid {self.pid}, command {self.command!r}, started "
                f"{self.started_at}, last heartbeat {self.age():.0f} s ago")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


# -- where the lease lives: compare-and-swap on local disk and on S3 ---------------------------
# `read` gives (bytes, version); `create`, `swap`, `refresh` and `delete` succeed only when no
# lease exists (`create`) or the lease is still at `version`; they return the new version, or
# None when they lost. A local lease's version is its token; an S3 lease's its ETag.


class _LocalStore:
    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _token_of(data)

    def _tmp(self, data: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> str | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self._tmp(data)
        try:
            os.link(tmp, self.path)  # atomic; EEXIST when a lease is there
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return _token_of(data)

    def swap(self, data: bytes, version: str) -> str | None:
        aside = f"{self.path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        with open(aside, "rb") as f:
            moved = f.read()
        if _token_of(moved) != version:  # another process took it over first: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            return None
        os.unlink(aside)
        return self.create(data)

    def refresh(self, data: bytes, version: str) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        tmp = self._tmp(data)
        os.replace(tmp, self.path)
        return _token_of(data)

    def delete(self, version: str) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        os.unlink(self.path)
        return True


def _token_of(data: bytes) -> str:
    holder = Holder.loads(data)
    # a corrupt lease's version is its content, so a swap still checks it did not change
    return holder.token if holder else data.hex()


class _S3Store:
    # Conditional writes that lose answer 412 PreconditionFailed, or 409
    # ConditionalRequestConflict while another conditional write to the key is in flight.
    LOST = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"}

    def __init__(self, location: Location):
        self.bucket, _, self.key = location.path.partition("/")
        self.display = location.display
        self.client = _boto3_client(location)

    def _lost(self, err) -> bool:
        return err.response.get("Error", {}).get("Code") in self.LOST

    def _call(self, method: str, **kwargs):
        """The client call; None when its condition failed."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as err:
            if self._lost(err):
                return None
            raise StorageError(f"lease {self.display}: {method} failed: {err}") from err
        except BotoCoreError as err:
            raise StorageError(f"lease {self.display}: cannot reach the store: {err}") from err

    def read(self) -> tuple[bytes, str] | None:
        response = self._call("get_object")
        return None if response is None else (response["Body"].read(), response["ETag"])

    def create(self, data: bytes) -> str | None:
        response = self._call("put_object", Body=data, IfNoneMatch="*")
        return None if response is None else response["ETag"]

    def swap(self, data: bytes, version: str) -> str | None:
        response = self._call("put_object", Body=data, IfMatch=version)
        return None if response is None else response["ETag"]

    refresh = swap

    def delete(self, version: str) -> bool:
        try:
            return self._call("delete_object", IfMatch=version) is not None
        except StorageError:
            # a store without conditional deletes: check, then delete (a takeover landing in
            # between would be deleted; the lease is being released anyway)
            current = self.read()
            if current is None or current[1] != version:
                return False
            self._call("delete_object")
            return True


def _boto3_client(location: Location):
    """A boto3 S3 client for the endpoint and region that storage.py resolved for `location`
    (pyarrow's S3 filesystem has no conditional put). Credentials: the same default chain."""
    import boto3
    from botocore.config import Config as BotoConfig

    options = location.fs.__reduce__()[1][0]  # the S3FileSystem's own arguments
    endpoint = options.get("endpoint_override")
    scheme = options.get("scheme") or "https"
    return boto3.client(
        "s3", region_name=options.get("region") or None,
        endpoint_url=f"{scheme}://{endpoint}" if endpoint else None,
        config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"}))


def _store(root: Location):
    lease = root.child(LEASE_FILE)
    return _LocalStore(lease.path) if root.is_local else _S3Store(lease)


# -- the lease -------------------------------------------------------------------------------


class RunLease:
    """The lease on `root` (a `storage.Location`): `with RunLease(root): ...` holds it for the
    block, heartbeating in the background. Raises `LeaseHeldError` when a live writer holds it."""

    def __init__(self, root: Location, command: str | None = None,
                 timeout_s: float | None = None, heartbeat_s: float | None = None,
                 break_lease: bool = False):
        self.root = root
        self.command = command or _command_line()
        self.timeout_s = float(timeout_s if timeout_s is not None
                               else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(30.0,
                                                                           self.timeout_s / 4)
        self.break_lease = break_lease
        self.holder: Holder | None = None
        self.lost_to: Holder | None = None  # set when another process took the lease over
        self._store = _store(root)
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # heartbeat vs release

    def stale_reason(self, held: Holder | None) -> str | None:
        """Why `held` may be taken over (None: it is live)."""
        if held is None:
            return "the lease file is unreadable"
        if held.age() > self.timeout_s:
            return f"its last heartbeat is {held.age():.0f} s old (timeout {self.timeout_s:.0f} s)"
        if held.host == socket.gethostname() and _process_gone(held.pid):
            return f"its process {held.pid} on this host is gone"
        return None

    def acquire(self) -> RunLease:
        holder = Holder.new(self.command)
        for _ in range(5):  # each turn ends in a win, a live holder, or another's move
            version = self._store.create(holder.dumps())
            if version is not None:
                break
            current = self._store.read()
            if current is None:
                continue  # released meanwhile
            held = Holder.loads(current[0])
            reason = self.stale_reason(held)
            if reason is None and not self.break_lease:
                raise LeaseHeldError(
                    f"run root {self.root.display} is being written by another run "
                    f"({held.describe()}). Wait for it to end; if it is gone, rerun once its "
                    f"heartbeat is {self.timeout_s:.0f} s old, or with --break-lease")
            log.warning("taking over the lease on %s from %s: %s", self.root.display,
                        held.describe() if held else "an unknown holder",
                        reason or "--break-lease")
            version = self._store.swap(holder.dumps(), current[1])
            if version is not None:
                break
        else:
            raise LeaseHeldError(f"run root {self.root.display}: could not take its lease "
                                 "(other processes keep changing it)")
        self.holder, self._version = holder, version
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name=f"lease-heartbeat {self.root.display}")
        self._thread.start()
        return self

    def _beat(self) -> bool:
        """One heartbeat; False once the lease is no longer this process's."""
        with self._lock:
            if self._stop.is_set() or self.holder is None:
                return False
            beat = self.holder.beat()
            version = self._store.refresh(beat.dumps(), self._version)
            if version is not None:
                self.holder, self._version = beat, version
                return True
            current = self._store.read()
            self.lost_to = Holder.loads(current[0]) if current else None
            self.holder = None
        log.error("the lease on %s was %s: this run is no longer its only writer",
                  self.root.display, f"taken over by {self.lost_to.describe()}"
                  if self.lost_to else "deleted")
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._beat():
                    return
            except Exception as err:  # a store hiccup: the next beat tries again
                log.warning("lease heartbeat on %s failed: %s", self.root.display, err)

    def release(self) -> None:
        """Stop heartbeating and delete the lease if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if self.holder is None:
                return
            try:
                self._store.delete(self._version)
            except (OSError, StorageError) as err:
                log.warning("could not release the lease on %s (%s); the next run takes it "
                            "over once its heartbeat is %.0f s old", self.root.display, err,
                            self.timeout_s)
            self.holder = None

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def run_leases(roots: list[Location], break_lease: bool = False,
               command: str | None = None) -> Iterator[list[RunLease]]:
    """Hold the lease of every root in `roots` (the same folder once) for the block; all or
    none: a root leased by another run releases those taken before it."""
    seen: dict[str, Location] = {}
    for root in roots:
        seen.setdefault(root.display, root)
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(RunLease(root, command, break_lease=break_lease))
               for root in seen.values()]
