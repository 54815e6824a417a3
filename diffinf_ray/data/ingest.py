"""Ingest of user data: the compute core (no Ray import; the ingest stage wraps `ingest_batch`
in Ray Data `map_batches`).

Inputs, local or `s3://`:
- an image folder, `root/<class>/<file>` or `root/<split>/<class>/<file>` (`list_image_folder`);
- a CSV or parquet label table with columns `image` (a path relative to the table's folder, or
  an absolute local path / `s3://` URI inside it), `label` (class name or integer index), and
  optionally `split`, `sample_id`, `group`, `identity` (`read_label_table`).

Both become rows `sample_id, source, label_name | label, split[, group, identity]`. The driver
computes the duplicated ids once (`find_duplicate_ids`), then `ingest_batch` checks and loads
each batch and returns good and bad rows together, bad ones with a `quarantine_reason`:

    missing sample_id | duplicate sample_id '<id>' (<n> rows) | missing label |
    label '<x>' not in classes [...] | label index <i> out of range 0..<k-1> |
    label <x> is not a class name or an integer index | split '<x>' not one of ... |
    missing image path | unsupported image URI ... | path escapes dataset root |
    missing file | not a file (a folder) | unreadable file: ... | truncated image |
    unreadable image: ...

Only the first failing check is reported, in that order (cheap checks before any I/O).
Every input row comes out exactly once, so input rows = manifest rows + quarantined rows
(`check_counts_conserved`), and `check_quarantine_fraction` fails the stage when too many
rows were quarantined.

Image paths cannot escape the dataset root: `..` segments, absolute paths elsewhere, symlinks
that lead outside (local roots) and `s3://` URIs outside the root's bucket/prefix are all
quarantined as "path escapes dataset root".
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import posixpath
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from diffinf_ray.data.images import (
    ImageDecodeError,
    TruncatedImageError,
    decode_image,
    encode_png,
    square_resize,
)
from diffinf_ray.manifest import QUARANTINE_SCHEMA, SCHEMA, SPLITS, ManifestError
from diffinf_ray.storage import Location, StorageError, StorageOptions

STAGE = "ingest"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LABEL_TABLE_EXTENSIONS = (".csv", ".parquet", ".pq")
SPLIT_ALIASES = {"valid": "val", "validation": "val"}
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# What the folder listing returns (the label table has `label` instead of `label_name`, of
# string or int64 type, plus `group` and `identity`).
LISTING_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("label_name", pa.string()),
        pa.field("split", pa.string()),
    ]
)

# What `ingest_batch` returns, as a table: the manifest columns, plus the row's `source` and
# its `quarantine_reason` (null for good rows). Quarantined rows have label -1 and no image,
# and may lack a split or id, so every column is nullable here (`to_manifest_and_quarantine`
# checks the manifest's non-null columns on the good rows).
OUTPUT_SCHEMA = pa.schema(
    [*(f.with_nullable(True) for f in SCHEMA), pa.field("source", pa.string()),
     pa.field("quarantine_reason", pa.string())]
)

REASON_MISSING_ID = "missing sample_id"
REASON_MISSING_LABEL = "missing label"
REASON_MISSING_PATH = "missing image path"
REASON_ESCAPE = "path escapes dataset root"
REASON_MISSING_FILE = "missing file"
REASON_NOT_A_FILE = "not a file (a folder)"
REASON_TRUNCATED = "truncated image"


class IngestError(ValueError):
    """Input that cannot be ingested at all (bad layout, unreadable or malformed label table);
    the message names the file and column."""


class SourceError(ValueError):
    """An image path or URI that is not usable (empty, unsupported scheme)."""


class QuarantineLimitExceeded(RuntimeError):
    """More rows were quarantined than the configured fraction allows."""


# -- listing inputs ---------------------------------------------------------------------------
def _relative(path: str, root_path: str) -> str:
    prefix = root_path.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else posixpath.relpath(path, root_path)


def _strip_extension(path: str) -> str:
    stem, ext = posixpath.splitext(path)
    return stem if ext else path


def list_image_folder(root: Location, classes: Sequence[str] | None = None) -> pa.Table:
    """Rows `sample_id, source, label_name, split` for an image folder.

    Layouts: `root/<class>/<file>` (split null, assigned later) and
    `root/<split>/<class>/<file>` with split in train/val/test/holdout (case-insensitive).
    `source` is the path relative to `root`; `sample_id` is that path without its extension.
    Hidden files and folders (names starting with ".") and non-image files are skipped; an
    image anywhere else is an error (it would otherwise be dropped without a trace).
    `classes`, when given, is only used to catch a wrong folder early: the listing fails if
    no class folder matches any class (labels outside the list are quarantined by
    `ingest_batch`, not here).
    """
    try:
        if root.fs.get_file_info(root.path).type != pafs.FileType.Directory:
            raise IngestError(f"{root.display}: image folder does not exist or is not a folder")
        infos = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True))
    except OSError as err:
        raise IngestError(f"cannot list {root.display}: {err}") from err
    rows: list[tuple[str, str, str, str | None]] = []
    misplaced: list[str] = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = _relative(info.path, root.path)
        parts = rel.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if posixpath.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        if len(parts) == 2:
            split, label = None, parts[0]
        elif len(parts) == 3 and parts[0].lower() in SPLITS:
            split, label = parts[0].lower(), parts[1]
        else:
            misplaced.append(rel)
            continue
        rows.append((_strip_extension(rel), rel, label, split))
    if misplaced:
        raise IngestError(
            f"{root.display}: {len(misplaced)} image(s) outside the layout root/<class>/<file> "
            f"or root/<split>/<class>/<file> (split in {', '.join(SPLITS)}), "
            f"e.g. {sorted(misplaced)[:3]}"
        )
    if not rows:
        raise IngestError(
            f"{root.display}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in "
            f"root/<class>/<file> or root/<split>/<class>/<file>"
        )
    if classes is not None:
        found = {r[2] for r in rows}
        if not found & set(classes):
            raise IngestError(
                f"{root.display}: none of the class folders {sorted(found)[:10]} is in "
                f"classes {list(classes)[:10]}"
            )
    rows.sort(key=lambda r: r[1])
    columns = list(zip(*rows, strict=True))
    return pa.table([pa.array(c, pa.string()) for c in columns], schema=LISTING_SCHEMA)


def _csv_header(data: bytes, where: str) -> list[str]:
    text = data[:1 << 20].decode("utf-8-sig", errors="replace")
    try:
        header = next(csv.reader(io.StringIO(text)))
    except StopIteration:
        raise IngestError(f"{where}: empty CSV file (no header row)") from None
    except csv.Error as err:
        raise IngestError(f"{where}: cannot parse the CSV header: {err}") from err
    return header


def _read_csv(data: bytes, where: str) -> pa.Table:
    header = _csv_header(data, where)
    duplicated = sorted(c for c, n in Counter(h.strip() for h in header).items() if n > 1)
    if duplicated:
        raise IngestError(f"{where}: duplicate column(s) {duplicated} in the CSV header")
    # Every column as a string: type inference would turn sample_id "007" into 7.
    convert = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in header},
        null_values=[""],
        strings_can_be_null=True,
    )
    try:
        table = pacsv.read_csv(io.BytesIO(data), convert_options=convert)
    except pa.ArrowInvalid as err:
        raise IngestError(f"{where}: cannot parse CSV: {err}") from err
    return table.rename_columns([c.strip() for c in table.column_names])


def _as_string(column: pa.ChunkedArray, name: str, where: str) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_string(column.type):
        return column
    if (
        pa.types.is_large_string(column.type)
        or pa.types.is_integer(column.type)
        or pa.types.is_null(column.type)
    ):
        return column.cast(pa.string())
    raise IngestError(f"{where}: column {name!r} has type {column.type}; expected strings")


def _trimmed(column: pa.ChunkedArray) -> pa.ChunkedArray:
    trimmed = pc.utf8_trim_whitespace(column)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)


def _label_column(column: pa.ChunkedArray, where: str) -> pa.ChunkedArray:
    """Labels as strings (class names, or digits) or int64 indices."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return _trimmed(column.cast(pa.string()))
    if pa.types.is_integer(column.type):
        return column.cast(pa.int64())
    if pa.types.is_floating(column.type):
        # pandas writes an integer column with missing values as float.
        values = column.to_pylist()
        for row, value in enumerate(values):
            if value is not None and not math.isnan(value) and value != int(value):
                raise IngestError(
                    f"{where}: column 'label' row {row}: {value} is not an integer class index"
                )
        return pa.chunked_array(
            [pa.array([None if v is None or math.isnan(v) else int(v) for v in values],
                      pa.int64())]
        )
    if pa.types.is_null(column.type):
        return column.cast(pa.string())
    raise IngestError(
        f"{where}: column 'label' has type {column.type}; expected class names or integer indices"
    )


def default_sample_id(image: str | None) -> str | None:
    """The image path without its extension (query string dropped; relative paths normalised)."""
    if image is None:
        return None
    if "://" in image:
        return _strip_extension(image.split("?", 1)[0])
    return _strip_extension(posixpath.normpath(image) if image else image)


def read_label_table(location: Location) -> pa.Table:
    """A CSV or parquet label table -> rows `sample_id, source, label, split, group, identity`.

    Required columns: `image` (becomes `source`, unchanged apart from surrounding whitespace)
    and `label` (string class names or integer indices; in a CSV every value is read as a
    string and digits are taken as an index unless they are a class name). Optional: `split`,
    `sample_id` (default: the image path without extension), `group`, `identity`. Other
    columns are ignored. Relative image paths are relative to the table's folder
    (`location.parent()`) unless the stage is given another dataset root.
    """
    where = location.display
    name = posixpath.basename(location.path).lower()
    if not name.endswith(LABEL_TABLE_EXTENSIONS):
        raise IngestError(
            f"{where}: a label table must be {' or '.join(LABEL_TABLE_EXTENSIONS)}"
        )
    try:
        data = location.read_bytes()
    except StorageError as err:
        raise IngestError(f"cannot read label table: {err}") from err
    if name.endswith(".csv"):
        table = _read_csv(data, where)
    else:
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as err:
            raise IngestError(f"{where}: cannot read parquet: {err}") from err
    missing = [c for c in ("image", "label") if c not in table.column_names]
    if missing:
        raise IngestError(
            f"{where}: label table lacks column(s) {missing} (has {table.column_names}); "
            f"it needs 'image' and 'label', optionally 'split', 'sample_id', 'group', 'identity'"
        )
    if table.num_rows == 0:
        raise IngestError(f"{where}: label table has no rows")
    source = _trimmed(_as_string(table["image"], "image", where))
    label = _label_column(table["label"], where)
    if "sample_id" in table.column_names:
        sample_id = _trimmed(_as_string(table["sample_id"], "sample_id", where))
    else:
        sample_id = pa.chunked_array(
            [pa.array([default_sample_id(s) for s in source.to_pylist()], pa.string())]
        )
    optional = {}
    for col in ("split", "group", "identity"):
        if col in table.column_names:
            optional[col] = _trimmed(_as_string(table[col], col, where))
        else:
            optional[col] = pa.nulls(table.num_rows, pa.string())
    return pa.table(
        {"sample_id": sample_id, "source": source, "label": label, **optional}
    )


# -- checks done once in the driver -----------------------------------------------------------
def find_duplicate_ids(sample_ids: Iterable[str | None] | pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """Every sample_id that occurs more than once, with its row count.

    All copies of such an id are quarantined (which copy is "right" cannot be known). The
    result is a dict, so `id in result` works as with a set and the count goes in the reason.
    Null ids are not counted here (they are quarantined as "missing sample_id").
    """
    if isinstance(sample_ids, pa.Array | pa.ChunkedArray):
        sample_ids = _trimmed(_as_string(sample_ids, "sample_id", "find_duplicate_ids"))
    else:
        sample_ids = pa.array([_optional_str(v) for v in sample_ids], pa.string())
    if len(sample_ids) == 0:
        return {}
    counts = pc.value_counts(sample_ids.drop_null())
    values, ns = counts.field("values").to_pylist(), counts.field("counts").to_pylist()
    return {v: n for v, n in zip(values, ns, strict=True) if n > 1}


# -- path safety ------------------------------------------------------------------------------
def _is_within(root: str, path: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def resolve_source(source: str, dataset_root: Location) -> Location | None:
    """The Location of a row's image, or None when it would escape `dataset_root`.

    Relative paths are joined to the root and normalised; absolute local paths and `file://`
    URIs must lie inside a local root, `s3://` URIs inside an S3 root's bucket/prefix (the
    image is read with the root's filesystem, endpoint and credentials). For a local root the
    check is made again on the real path, so a symlink that leads outside is an escape.
    Raises `SourceError` for an empty path or a scheme other than s3:// and file://.
    """
    if source is None or not str(source).strip():
        raise SourceError(REASON_MISSING_PATH)
    text = str(source).strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme not in ("", "s3", "file"):
        raise SourceError(f"unsupported image URI scheme {scheme!r} (use a path or s3://)")
    root_path = dataset_root.path.rstrip("/")

    if scheme == "s3":
        parsed = urlparse(text)
        if not parsed.netloc:
            raise SourceError(f"unsupported image URI {text.split('?', 1)[0]!r} (no bucket)")
        if dataset_root.is_local:
            return None
        candidate = posixpath.normpath(posixpath.join(parsed.netloc, parsed.path.lstrip("/")))
    elif dataset_root.is_local:
        local = urlparse(text).path if scheme == "file" else text
        joined = local if os.path.isabs(local) else os.path.join(root_path, local)
        candidate = os.path.normpath(joined)
        if not _is_within(root_path, candidate):
            return None
        # The root's path is already real (storage.resolve); follow links in the rest.
        if not _is_within(os.path.realpath(root_path), os.path.realpath(candidate)):
            return None
    else:
        if scheme == "file" or text.startswith("/"):
            return None  # a local file can never be inside an S3 root
        candidate = posixpath.normpath(posixpath.join(root_path, text))

    if not _is_within(root_path, candidate):
        return None
    relative = _relative(candidate, root_path)
    if candidate == root_path or relative in ("", "."):
        raise SourceError("image path points at the dataset root itself")
    return dataset_root.child(relative)


# -- per-row checks ---------------------------------------------------------------------------
def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float | np.floating) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _optional_str(value: object) -> str | None:
    if _is_missing(value):
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        value = int(value)
    return str(value).strip()


def _short_list(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names)} classes)" if len(names) > limit else ""
    return f"[{shown}{more}]"


def resolve_label(value: object, classes: Sequence[str],
                  class_index: Mapping[str, int] | None = None) -> tuple[int | None, str | None]:
    """(index into classes, None) or (None, quarantine reason).

    A string is looked up as a class name first; a string of digits that is not a class name,
    an integer, or an integral float is taken as an index into `classes`.
    """
    class_index = class_index if class_index is not None else {c: i for i, c in enumerate(classes)}
    if _is_missing(value):
        return None, REASON_MISSING_LABEL
    index: int | None = None
    if isinstance(value, bool | np.bool_):
        return None, f"label {value!r} is not a class name or an integer index"
    if isinstance(value, str | np.str_):
        name = str(value).strip()
        if name in class_index:
            return class_index[name], None
        if re.fullmatch(r"[+-]?\d+", name):
            index = int(name)
        else:
            return None, f"label {name!r} not in classes {_short_list(list(classes))}"
    elif isinstance(value, int | np.integer):
        index = int(value)
    elif isinstance(value, float | np.floating) and float(value).is_integer():
        index = int(value)
    else:
        return None, f"label {value!r} is not a class name or an integer index"
    if not 0 <= index < len(classes):
        return None, f"label index {index} out of range 0..{len(classes) - 1}"
    return index, None


def split_thresholds(fractions: Sequence[float]) -> list[tuple[str, float]]:
    """Cumulative thresholds for `fractions` over train, val, test, holdout (in that order)."""
    fractions = [float(f) for f in fractions]
    if not 1 <= len(fractions) <= len(SPLITS):
        raise ValueError(f"split_fractions needs 1 to {len(SPLITS)} values ({SPLITS}), got {fractions}")
    if any(f < 0 or math.isnan(f) for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be >= 0 and sum to 1, got {fractions}")
    out, total = [], 0.0
    for name, fraction in zip(SPLITS, fractions, strict=False):
        total += fraction
        out.append((name, total))
    return out


def hash_split(key: str, seed: int, thresholds: Sequence[tuple[str, float]]) -> str:
    """A split chosen by a hash of (seed, key): the same key always lands in the same split."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    for name, upper in thresholds:
        if u < upper:
            return name
    # Rounding at the top end: the last split with a non-zero share.
    return next(name for name, upper in reversed(thresholds) if upper > 0)


def _check_split(value: object) -> tuple[str | None, str | None]:
    """(normalised split or None when missing, quarantine reason or None)."""
    if _is_missing(value):
        return None, None
    name = str(value).strip().lower()
    name = SPLIT_ALIASES.get(name, name)
    if name not in SPLITS:
        return None, f"split {str(value).strip()!r} not one of {', '.join(SPLITS)}"
    return name, None


def _load_image(location: Location, image_size: int) -> tuple[bytes | None, str | None]:
    """(PNG bytes of the square-resized image, None) or (None, quarantine reason).

    A missing file, a folder, a permission error or undecodable bytes are row problems;
    any other storage error (network, throttling) is raised so the batch fails loudly
    instead of quarantining rows for an outage.
    """
    try:
        data = location.read_bytes()
    except StorageError as err:
        cause = err.__cause__
        if isinstance(cause, FileNotFoundError):
            return None, REASON_MISSING_FILE
        if isinstance(cause, PermissionError):
            return None, f"unreadable file: {cause.strerror or cause}"
        try:
            kind = location.fs.get_file_info(location.path).type
        except OSError:
            raise err from cause
        if kind == pafs.FileType.NotFound:
            return None, REASON_MISSING_FILE
        if kind == pafs.FileType.Directory:
            return None, REASON_NOT_A_FILE
        raise err from cause
    try:
        array = decode_image(data, min_side=image_size)
    except TruncatedImageError:
        return None, REASON_TRUNCATED
    except ImageDecodeError as err:
        return None, f"unreadable image: {err}"
    return encode_png(square_resize(array, image_size)), None


def _column(batch: Mapping[str, np.ndarray], name: str, n: int) -> list[object]:
    if name not in batch:
        return [None] * n
    values = batch[name]
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _input_label_key(batch: Mapping[str, np.ndarray]) -> str:
    """The label column of an input batch ('label' or 'label_name'); a batch without the
    required columns is an error naming what it has."""
    for required in ("sample_id", "source"):
        if required not in batch:
            raise ValueError(f"ingest_batch: input batch lacks column {required!r} (has {sorted(batch)})")
    if "label" in batch:
        return "label"
    if "label_name" in batch:
        return "label_name"
    raise ValueError(f"ingest_batch: input batch lacks 'label' or 'label_name' (has {sorted(batch)})")


@dataclass(frozen=True)
class _RowRules:
    """What `ingest_batch` checks every row against (built once per batch)."""

    root: Location
    classes: list[str]
    class_index: dict[str, int]
    duplicate_ids: Collection[str]
    thresholds: list[tuple[str, float]]
    split_seed: int
    split_by_identity: bool


def _check_row(rules: _RowRules, sid: str | None, source: str | None, raw_label: object,
               raw_split: object, identity: str | None
               ) -> tuple[tuple[int, str, Location] | None, str | None]:
    """((label index, split, image location), None) for a good row, (None, reason) for a bad
    one. The split is the given one, or a hash of identity (when `split_by_identity` and
    known) or sample_id."""
    if sid is None:
        return None, REASON_MISSING_ID
    if sid in rules.duplicate_ids:
        counts = rules.duplicate_ids if isinstance(rules.duplicate_ids, Mapping) else None
        times = f" ({counts[sid]} rows)" if counts is not None else ""
        return None, f"duplicate sample_id {sid!r}{times}"
    index, reason = resolve_label(raw_label, rules.classes, rules.class_index)
    if reason is not None:
        return None, reason
    split, reason = _check_split(raw_split)
    if reason is not None:
        return None, reason
    try:
        location = resolve_source(source, rules.root)
    except SourceError as err:
        return None, str(err)
    if location is None:
        return None, REASON_ESCAPE
    if split is None:
        key = (f"identity:{identity}" if rules.split_by_identity and identity is not None
               else f"sample_id:{sid}")
        split = hash_split(key, rules.split_seed, rules.thresholds)
    return (index, split, location), None


def _load_images(locations: Mapping[int, Location], image_size: int, io_threads: int
                 ) -> list[tuple[int, bytes | None, str | None]]:
    """(row, PNG or None, quarantine reason or None) for each row of `locations`, read with
    up to `io_threads` threads (S3 latency)."""
    todo = list(locations)

    def load(i: int) -> tuple[int, bytes | None, str | None]:
        return (i, *_load_image(locations[i], image_size))

    if io_threads > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=min(io_threads, len(todo))) as pool:
            return list(pool.map(load, todo))
    return [load(i) for i in todo]


def _objects(values: list[object]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def ingest_batch(
    batch: Mapping[str, np.ndarray],
    *,
    dataset_root_uri: str,
    storage_options: StorageOptions | None = None,
    classes: Sequence[str],
    image_size: int,
    duplicate_ids: Collection[str],
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    split_seed: int = 0,
    split_by_identity: bool = True,
    io_threads: int = 8,
) -> dict[str, np.ndarray]:
    """Check and load one batch of input rows; every row comes out once (`OUTPUT_SCHEMA`).

    Input columns: `sample_id`, `source`, `label_name` or `label`, optionally `split`,
    `group`, `identity`. Good rows get the manifest columns: `label` (int32 index into
    `classes`), `split` (given, or by a hash of (`split_seed`, identity or sample_id) with
    `split_fractions` over train/val/test[/holdout]; identity is used when present and
    `split_by_identity`, so one person's images never straddle train and test), `image` (PNG
    of the centre-cropped, LANCZOS-resized `image_size` square), `image_uri` (where it was
    read from, without query string), `label_clean`/`is_corrupted` null, and
    `quarantine_reason` null. Bad rows keep `sample_id`, `source`, `group`, `identity`, have
    `label` -1, no image, and their `quarantine_reason`.

    `duplicate_ids` comes from `find_duplicate_ids` over the whole input (a dict id -> count
    puts the count in the reason). Images are read with `io_threads` threads (S3 latency).
    """
    classes = [str(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be a non-empty list of distinct names, got {classes}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    thresholds = split_thresholds(split_fractions)
    label_key = _input_label_key(batch)
    rules = _RowRules(Location(dataset_root_uri, storage_options), classes,
                      {c: i for i, c in enumerate(classes)}, duplicate_ids, thresholds,
                      split_seed, split_by_identity)
    n = len(batch["sample_id"])
    sample_ids = [_optional_str(v) for v in _column(batch, "sample_id", n)]
    sources = [_optional_str(v) for v in _column(batch, "source", n)]
    raw_labels = _column(batch, label_key, n)
    raw_splits = _column(batch, "split", n)
    groups = [_optional_str(v) for v in _column(batch, "group", n)]
    identities = [_optional_str(v) for v in _column(batch, "identity", n)]

    labels = np.full(n, -1, dtype=np.int32)
    splits: list[str | None] = [None] * n
    reasons: list[str | None] = [None] * n
    locations: dict[int, Location] = {}
    for i in range(n):
        good, reasons[i] = _check_row(rules, sample_ids[i], sources[i], raw_labels[i],
                                      raw_splits[i], identities[i])
        if good is not None:
            labels[i], splits[i], locations[i] = good

    images: list[bytes | None] = [None] * n
    image_uris: list[str | None] = [None] * n
    for i, png, reason in _load_images(locations, image_size, io_threads):
        if reason is not None:
            reasons[i], labels[i], splits[i] = reason, -1, None
        else:
            images[i], image_uris[i] = png, locations[i].display

    return {
        "sample_id": _objects(sample_ids),
        "split": _objects(splits),
        "label": labels,
        "label_clean": _objects([None] * n),
        "is_corrupted": _objects([None] * n),
        "image": _objects(images),
        "image_uri": _objects(image_uris),
        "group": _objects(groups),
        "identity": _objects(identities),
        "source": _objects(sources),
        "quarantine_reason": _objects(reasons),
    }


# -- after the batches ------------------------------------------------------------------------
def output_table(batch: Mapping[str, np.ndarray]) -> pa.Table:
    """An `ingest_batch` result (or Ray Data's concatenation of them) as an `OUTPUT_SCHEMA`
    table (all-null columns get their proper types)."""
    columns = {}
    for field in OUTPUT_SCHEMA:
        values = batch[field.name]
        if isinstance(values, pa.ChunkedArray | pa.Array):
            columns[field.name] = values.cast(field.type)
        else:
            values = values.tolist() if isinstance(values, np.ndarray) else list(values)
            columns[field.name] = pa.array(values, field.type)
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def to_manifest_and_quarantine(table: pa.Table, stage: str = STAGE) -> tuple[pa.Table, pa.Table]:
    """Split ingest output into the manifest (`manifest.SCHEMA`) and the quarantine table
    (`manifest.QUARANTINE_SCHEMA`)."""
    reason = table["quarantine_reason"]
    if pa.types.is_null(reason.type):
        reason = reason.cast(pa.string())
    bad = pc.is_valid(reason)
    good_rows = table.filter(pc.invert(bad))
    bad_rows = table.filter(bad)
    manifest = pa.table(
        {f.name: good_rows[f.name].cast(f.type) for f in SCHEMA}, schema=SCHEMA
    )
    for field in SCHEMA:
        if not field.nullable and manifest[field.name].null_count:
            raise ManifestError(f"{stage}: {manifest[field.name].null_count} good row(s) lack {field.name!r}")
    if manifest.num_rows and pc.min(manifest["label"]).as_py() < 0:
        raise ManifestError(f"{stage}: a good row has a negative label")
    quarantine = pa.table(
        {
            "sample_id": bad_rows["sample_id"].cast(pa.string()),
            "source": bad_rows["source"].cast(pa.string()),
            "stage": pa.array([stage] * bad_rows.num_rows, pa.string()),
            "reason": bad_rows["quarantine_reason"].cast(pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )
    return manifest, quarantine


def reason_kind(reason: str) -> str:
    """A reason with its specifics masked, for counting: "label '…' not in classes […]"."""
    kind = reason.split(":", 1)[0]
    kind = re.sub(r"\[.*\]", "[…]", kind)
    kind = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", kind)
    return re.sub(r"-?\d+", "N", kind).strip()


def summarise(reasons: Iterable[str | None]) -> dict[str, int]:
    """Quarantine counts by kind of reason, most frequent first."""
    counts = Counter(reason_kind(r) for r in reasons if r is not None)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_counts_conserved(n_input: int, n_manifest: int, n_quarantined: int, where: str) -> None:
    """Input rows must equal manifest rows plus quarantined rows."""
    if n_input != n_manifest + n_quarantined:
        raise IngestError(
            f"{where}: {n_input} input rows but {n_manifest} manifest + {n_quarantined} "
            f"quarantined = {n_manifest + n_quarantined}; rows were lost or duplicated"
        )


def check_quarantine_fraction(
    n_input: int,
    n_quarantined: int,
    limit: float,
    where: str,
    reasons: Mapping[str, int] | None = None,
) -> float:
    """The quarantined fraction; raises `QuarantineLimitExceeded` when it is above `limit`.

    `where` names the quarantine table (it goes into the message); `reasons` (from
    `summarise`) adds the most frequent reasons to the message.
    """
    if not 0.0 <= limit <= 1.0:
        raise ValueError(f"quarantine limit must be in [0, 1], got {limit}")
    if n_input < 0 or not 0 <= n_quarantined <= max(n_input, 0):
        raise ValueError(f"{where}: {n_quarantined} quarantined of {n_input} input rows is impossible")
    fraction = n_quarantined / n_input if n_input else 0.0
    if fraction > limit:
        top = ""
        if reasons:
            shown = "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:5])
            top = f" Most frequent reasons: {shown}."
        raise QuarantineLimitExceeded(
            f"{n_quarantined} of {n_input} rows ({fraction:.1%}) were quarantined, more than "
            f"the limit {limit:.1%}; see {where}.{top}"
        )
    return fraction
