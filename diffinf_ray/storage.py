"""One code path for local and S3 storage: URIs resolve to a `pyarrow.fs` filesystem and a
scheme-less path, the form Ray Train (`storage_filesystem=`), Ray Data (`filesystem=`) and
Ray Tune all accept.

Accepted URIs:
- a local path (`./runs/demo`, `/data/x`, `file:///data/x`);
- `s3://bucket/prefix`, optionally `?endpoint_override=http://host:port&region=us-east-1`.

Credentials come from the standard AWS chain (environment, profile, instance role) and are
never printed. The endpoint comes from, in order: the URI's query, the config's
`storage.endpoint_override`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`.

Faults: object stores answer 500/503/SlowDown and drop connections as a matter of course.
Every S3 request is retried by the AWS SDK under pyarrow (exponential backoff, no retry budget:
`storage.max_attempts` attempts, also in Ray workers: the setting survives pickling). A
whole-object read or write that the SDK does not retry (a connection cut while the body
streams) is retried here, `WHOLE_OBJECT_ATTEMPTS` times. A local write is atomic (a hidden
temporary file renamed into place); an S3 object appears only when its upload completes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# Attempts per S3 request (pyarrow's default is 3: at a 20 % fault rate 1 in ~125 requests
# then fails); `storage.max_attempts` sets it. 10 attempts wait ~25 s in all before giving up.
DEFAULT_MAX_ATTEMPTS = 10
# Attempts of a whole read or write of one object, each with the SDK's own retries inside.
WHOLE_OBJECT_ATTEMPTS = 3
# Errors worth another whole-object attempt: those the SDK does not retry itself. Measured: a
# small object's GET cut halfway through its body (a larger one's cut, 500/503/SlowDown and
# dropped connections the SDK retries).
TRANSIENT_ERRORS = ("Failed to flush response stream",)


class StorageError(RuntimeError):
    """A storage location that cannot be reached or read; the message names the URI."""


# pyarrow's S3 errors name the object as "... for key 'K' in bucket 'B': ..." (or "under key")
_S3_OBJECT = re.compile(r"(?:for|under) key '([^']*)' in bucket '([^']*)'")


def storage_failure(err: BaseException) -> str | None:
    """The one-line storage failure behind `err` (found through Ray's task and worker wrappers
    and exception chains), naming the URI; None when `err` is not a storage failure."""
    seen: set[int] = set()
    pending = [err]
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageError):
            return str(e).strip().splitlines()[0]
        pending += [getattr(e, "cause", None), e.__cause__, e.__context__,
                    *(getattr(e, "worker_failures", None) or {}).values()]
    lines = [ln.strip() for ln in str(err).splitlines() if "AWS Error" in ln]
    if not lines:
        return None
    line = lines[-1]  # Ray prints the remote traceback before the message
    found = _S3_OBJECT.search(line)
    where = f"s3://{found.group(2)}/{found.group(1)}: " if found else ""
    return f"storage failed at {where}{line[:500]}"


@dataclass(frozen=True)
class StorageOptions:
    endpoint_override: str | None = None
    region: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # per S3 request, backoff between

    @classmethod
    def of(cls, storage) -> StorageOptions:
        """From a config's `storage` section: every place that opens a run's storage."""
        return cls(storage.endpoint_override, storage.region, storage.max_attempts)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem retrying each request `max_attempts` times, kept when pickled (to
    Ray Data and Ray Train workers): pyarrow's own pickling drops the retry strategy and the
    workers would fall back to 3 attempts. Credentials are not pickled; each process reads
    them from its environment.

    The SDK's "default" strategy (exponential backoff from 25 ms, no retry budget), not its
    "standard" one: measured through a proxy failing 20 % of requests, standard's shared retry
    budget ran dry and 8 of ~800 operations failed even at 10 attempts (none with default),
    and its backoff took ~90 s to give up on a persistent fault (default: ~25 s)."""

    def __init__(self, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, **kwargs):
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts),
                         **kwargs)
        self._init_kwargs = dict(kwargs, max_attempts=max_attempts)

    def __reduce__(self):
        return _rebuild_s3, (self._init_kwargs,)


def _rebuild_s3(kwargs: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**kwargs)


def _transient(err: OSError) -> bool:
    return not isinstance(err, (FileNotFoundError, PermissionError)) and any(
        marker in str(err) for marker in TRANSIENT_ERRORS)


def with_retries(op: Callable, what: str, attempts: int = WHOLE_OBJECT_ATTEMPTS,
                 pause_s: float = 0.5):
    """`op()`, again after a transient OSError (up to `attempts` in all, with a growing,
    jittered pause); `what` (e.g. "read s3://b/k") names it in the log."""
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except OSError as err:
            if attempt == attempts or not _transient(err):
                raise
            log.warning("%s: transient storage error (attempt %d of %d), retrying: %s",
                        what, attempt, attempts, str(err).splitlines()[0][:300])
            time.sleep(pause_s * 2 ** (attempt - 1) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _s3_filesystem(query: dict[str, list[str]], options: StorageOptions) -> pafs.S3FileSystem:
    endpoint = (
        (query.get("endpoint_override") or [None])[0]
        or options.endpoint_override
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = (
        (query.get("region") or [None])[0]
        or options.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
        # Without a region pyarrow asks real AWS where the bucket lives, which fails
        # against MinIO/moto/Ceph endpoints.
        region = region or "us-east-1"
    if region:
        kwargs["region"] = region
    return RetryingS3FileSystem(max_attempts=options.max_attempts, **kwargs)


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """`uri` -> (filesystem, scheme-less path). Local paths become absolute."""
    options = options or StorageOptions()
    parsed = urlparse(str(uri))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri!r}: an s3 URI needs a bucket (s3://bucket/prefix)")
        path = posixpath.join(parsed.netloc, parsed.path.lstrip("/")).rstrip("/")
        return _s3_filesystem(parse_qs(parsed.query), options), path
    if parsed.scheme in ("", "file"):
        local = parsed.path if parsed.scheme == "file" else str(uri)
        return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())
    raise StorageError(f"{uri!r}: unsupported scheme {parsed.scheme!r} (use a local path or s3://)")


def absolute_uri(uri: str) -> str:
    """A relative local path made absolute against the current directory (so that a process
    with another working directory, e.g. a Ray Tune trial, finds the same folder); s3:// and
    absolute paths unchanged."""
    parsed = urlparse(str(uri))
    if parsed.scheme == "" and not Path(str(uri)).expanduser().is_absolute():
        return str(Path(str(uri)).expanduser().resolve())
    return str(uri)


def display_uri(uri: str) -> str:
    """The URI without its query string (no endpoint or other parameters in logs)."""
    return str(uri).split("?", 1)[0]


class Location:
    """A folder on local disk or S3, with the handful of operations the stages need.

    `Location(uri).child("checkpoints")` is the folder below it; `.fs` and `.path` are what
    Ray's `filesystem=` / `storage_filesystem=` arguments take.
    """

    def __init__(self, uri: str, options: StorageOptions | None = None,
                 _resolved: tuple[pafs.FileSystem, str] | None = None):
        self.uri = str(uri).rstrip("/") if "?" not in str(uri) else str(uri)
        self.options = options or StorageOptions()
        self.fs, self.path = _resolved or resolve(self.uri, self.options)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Location({display_uri(self.uri)!r})"

    def __str__(self) -> str:
        return self.display

    @property
    def display(self) -> str:
        if self.is_local:
            return self.path
        return f"s3://{self.path}"

    def child(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        base, _, query = self.uri.partition("?")
        uri = posixpath.join(base, *parts) + (f"?{query}" if query else "")
        return Location(uri, self.options, _resolved=(self.fs, path))

    def parent(self) -> Location:
        base, _, query = self.uri.partition("?")
        uri = posixpath.dirname(base.rstrip("/")) + (f"?{query}" if query else "")
        return Location(uri, self.options, _resolved=(self.fs, posixpath.dirname(self.path)))

    # -- queries --------------------------------------------------------------------------
    def _info(self, target, what: str = "cannot reach"):
        """`fs.get_file_info(target)`, retried; a StorageError naming this location."""
        try:
            return with_retries(lambda: self.fs.get_file_info(target), f"list {self.display}")
        except OSError as err:
            raise StorageError(f"{what} {self.display}: {err}") from err

    def exists(self) -> bool:
        return self._info(self.path).type != pafs.FileType.NotFound

    def list_files(self, suffix: str = "", recursive: bool = False) -> list[str]:
        """Full paths of files below this folder (sorted), filtered by suffix."""
        if not self.exists():
            return []
        infos = self._info(pafs.FileSelector(self.path, recursive=recursive), "cannot list")
        return sorted(
            i.path for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(suffix)
            and not posixpath.basename(i.path).startswith((".", "_"))
        )

    def list_dirs(self) -> list[str]:
        if not self.exists():
            return []
        infos = self._info(pafs.FileSelector(self.path), "cannot list")
        return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)

    # -- bytes and JSON -------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        def read() -> bytes:
            # A random-access file knows its size, so read() is one GET; a stream would read
            # in 256 KiB chunks, one ranged GET each (519 GETs for a 135 MB checkpoint).
            with self.fs.open_input_file(self.path) as f:
                return f.read()

        try:
            return with_retries(read, f"read {self.display}")
        except FileNotFoundError as err:
            raise StorageError(f"{self.display} does not exist") from err
        except OSError as err:
            raise StorageError(f"cannot read {self.display}: {err}") from err

    def write_bytes(self, data: bytes) -> None:
        """Write the whole object: it appears complete or not at all (S3 shows an object when
        its upload completes; a local file is written aside and renamed into place)."""
        try:
            if self.is_local:
                self._write_local(data)
            else:
                with_retries(lambda: self._write_stream(self.path, data), f"write {self.display}")
        except OSError as err:
            raise StorageError(f"cannot write {self.display}: {err}") from err

    def _write_stream(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _write_local(self, data: bytes) -> None:
        parent, name = posixpath.split(self.path)
        self.fs.create_dir(parent, recursive=True)
        # hidden (list_files and parquet datasets skip names starting with "."), same folder
        tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self._write_stream(tmp, data)
            self.fs.move(tmp, self.path)
        finally:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)

    def read_json(self) -> dict:
        return json.loads(self.read_bytes().decode())

    def write_json(self, obj: dict) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def delete(self) -> None:
        """Delete this folder (or file) and everything below it; a missing one is fine."""
        try:
            with_retries(self._delete_once, f"delete {self.display}")
        except OSError as err:
            raise StorageError(f"cannot delete {self.display}: {err}") from err

    def _delete_once(self) -> None:
        info = self.fs.get_file_info(self.path)  # again on a retry: part may be gone
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    # -- tables ---------------------------------------------------------------------------
    def read_table(self, columns: list[str] | None = None, filters=None) -> pa.Table:
        """A parquet file, or every parquet file below a folder, as one table; `filters` as
        `pyarrow.parquet.read_table` takes them (row groups that cannot match are skipped)."""
        if not self.exists():
            raise StorageError(f"{self.display} does not exist")
        try:
            return with_retries(
                lambda: pq.read_table(self.path, filesystem=self.fs, columns=columns,
                                      filters=filters), f"read {self.display}")
        except (OSError, pa.ArrowInvalid) as err:
            raise StorageError(f"cannot read parquet at {self.display}: {err}") from err

    def write_table(self, table: pa.Table) -> None:
        """Write one parquet file at this path."""
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(buf.getvalue())
