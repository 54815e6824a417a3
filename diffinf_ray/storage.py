"""One code path for local and S3 storage: URIs resolve to a `pyarrow.fs` filesystem and a
scheme-less path, the form Ray Train (`storage_filesystem=`), Ray Data (`filesystem=`) and
Ray Tune all accept.

Accepted URIs:
- a local path (`./runs/demo`, `/data/x`, `file:///data/x`);
- `s3://bucket/prefix`, optionally `?endpoint_override=http://host:port&region=us-east-1`.

Credentials come from the standard AWS chain (environment, profile, instance role) and are
never printed. The endpoint comes from, in order: the URI's query, the config's
`storage.endpoint_override`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(RuntimeError):
    """A storage location that cannot be reached or read; the message names the URI."""


@dataclass(frozen=True)
class StorageOptions:
    endpoint_override: str | None = None
    region: str | None = None


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
    return pafs.S3FileSystem(**kwargs)


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
    def exists(self) -> bool:
        try:
            return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound
        except OSError as err:
            raise StorageError(f"cannot reach {self.display}: {err}") from err

    def list_files(self, suffix: str = "", recursive: bool = False) -> list[str]:
        """Full paths of files below this folder (sorted), filtered by suffix."""
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))
        return sorted(
            i.path for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(suffix)
            and not posixpath.basename(i.path).startswith((".", "_"))
        )

    def list_dirs(self) -> list[str]:
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path))
        return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)

    # -- bytes and JSON -------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        try:
            # A random-access file knows its size, so read() is one GET; a stream would read
            # in 256 KiB chunks, one ranged GET each (519 GETs for a 135 MB checkpoint).
            with self.fs.open_input_file(self.path) as f:
                return f.read()
        except FileNotFoundError as err:
            raise StorageError(f"{self.display} does not exist") from err
        except OSError as err:
            raise StorageError(f"cannot read {self.display}: {err}") from err

    def write_bytes(self, data: bytes) -> None:
        parent = posixpath.dirname(self.path)
        if self.is_local:
            self.fs.create_dir(parent, recursive=True)
        try:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        except OSError as err:
            raise StorageError(f"cannot write {self.display}: {err}") from err

    def read_json(self) -> dict:
        return json.loads(self.read_bytes().decode())

    def write_json(self, obj: dict) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def delete(self) -> None:
        """Delete this folder (or file) and everything below it; a missing one is fine."""
        info = self.fs.get_file_info(self.path)
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
            return pq.read_table(self.path, filesystem=self.fs, columns=columns, filters=filters)
        except (OSError, pa.ArrowInvalid) as err:
            raise StorageError(f"cannot read parquet at {self.display}: {err}") from err

    def write_table(self, table: pa.Table) -> None:
        """Write one parquet file at this path."""
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(buf.getvalue())
