"""Ingest of user data: image decoding, listing, label tables, per-row validation and
quarantine, path confinement, and the same over a real S3 protocol endpoint (moto)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffinf_ray.data import images as img
from diffinf_ray.data.ingest import (
    OUTPUT_SCHEMA,
    IngestError,
    QuarantineLimitExceeded,
    check_counts_conserved,
    check_quarantine_fraction,
    find_duplicate_ids,
    hash_split,
    ingest_batch,
    list_image_folder,
    output_table,
    read_label_table,
    resolve_source,
    split_thresholds,
    summarise,
    to_manifest_and_quarantine,
)
from diffinf_ray.manifest import QUARANTINE_SCHEMA, SCHEMA
from diffinf_ray.storage import Location

CLASSES = ["cat", "dog", "bird"]
SIZE = 8


def noise_image(seed: int, width: int = 24, height: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def as_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """What Ray Data hands `map_batches` with batch_format="numpy"."""
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def run_ingest(rows: pa.Table, root: Location, batch_size: int | None = None, **kwargs):
    """Driver-side duplicate check, batches through ingest_batch, then the split."""
    duplicates = find_duplicate_ids(rows["sample_id"])
    batch_size = batch_size or rows.num_rows
    outputs = []
    for start in range(0, rows.num_rows, batch_size):
        out = ingest_batch(
            as_batch(rows.slice(start, batch_size)),
            dataset_root_uri=root.uri, storage_options=root.options, classes=CLASSES,
            image_size=SIZE, duplicate_ids=duplicates, **kwargs,
        )
        outputs.append(output_table(out))
    table = pa.concat_tables(outputs)
    assert table.schema == OUTPUT_SCHEMA
    manifest, quarantine = to_manifest_and_quarantine(table)
    return table, manifest, quarantine


# -- images -----------------------------------------------------------------------------------
def test_decode_encode_resize_and_tensor_batch():
    array = noise_image(0)
    for fmt in ("PNG", "BMP", "WEBP"):
        decoded = img.decode_image(encoded(array, fmt))
        assert decoded.shape == (16, 24, 3) and decoded.dtype == np.uint8
    assert np.array_equal(img.decode_image(encoded(array)), array)  # PNG is lossless
    grey = img.decode_image(encoded(array[:, :, 0]))  # mode L -> RGB
    assert grey.shape == (16, 24, 3) and np.array_equal(grey[:, :, 1], array[:, :, 0])
    sixteen = (np.arange(16 * 24, dtype=np.uint16).reshape(16, 24) * 170).astype(np.uint16)
    deep = img.decode_image(encoded(sixteen))
    assert deep.max() == round(int(sixteen.max()) / 257) and deep.min() == 0

    # A large JPEG may be decoded at a reduced DCT scale, never below min_side.
    photo = encoded(noise_image(4, 400, 304), "JPEG")
    reduced = img.decode_image(photo, min_side=40)
    assert 40 <= min(reduced.shape[:2]) < 304 and reduced.shape[2] == 3
    assert img.decode_image(photo).shape == (304, 400, 3)
    # EXIF orientation 6 (rotate 90 degrees clockwise) is applied.
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(noise_image(5, 20, 10)).save(buf, format="JPEG", exif=exif.tobytes())
    assert img.decode_image(buf.getvalue()).shape == (20, 10, 3)

    png = img.encode_png(array)
    assert png == img.encode_png(array.copy())
    assert np.array_equal(img.decode_image(png), array)

    # Centre crop: a wide image whose outer columns are black and centre white.
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255
    square = img.square_resize(wide, 10)
    assert square.shape == (10, 10, 3) and square.min() == 255
    assert img.square_resize(wide, 4).shape == (4, 4, 3)

    batch = img.to_tensor_batch([encoded(noise_image(1)), encoded(noise_image(2, 16, 30))], size=SIZE)
    assert batch.shape == (2, 3, SIZE, SIZE) and batch.dtype == np.float32
    assert -1.0 <= batch.min() < -0.5 and 0.5 < batch.max() <= 1.0
    exact = img.to_tensor_batch([encoded(np.full((2, 2, 3), 255, np.uint8))])
    assert np.allclose(exact, 1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        img.to_tensor_batch([encoded(noise_image(1)), encoded(noise_image(2, 16, 30))])


def test_decode_errors():
    png = encoded(noise_image(3, 32, 32))
    with pytest.raises(img.TruncatedImageError):
        img.decode_image(png[: len(png) // 2])
    with pytest.raises(img.TruncatedImageError):  # pixel data complete, IEND cut off
        img.decode_image(png[:-12])
    jpeg = encoded(noise_image(3, 32, 32), "JPEG")
    with pytest.raises(img.TruncatedImageError):
        img.decode_image(jpeg[: len(jpeg) // 2])
    webp = encoded(noise_image(3, 32, 32), "WEBP")
    with pytest.raises(img.TruncatedImageError):
        img.decode_image(webp[: len(webp) // 2])
    with pytest.raises(img.ImageDecodeError, match="not a recognised image format"):
        img.decode_image(np.random.default_rng(0).bytes(500))
    with pytest.raises(img.ImageDecodeError, match="empty"):
        img.decode_image(b"")
    assert issubclass(img.ImageDecodeError, ValueError)


# -- a dataset with every kind of bad row ----------------------------------------------------
# sample_id -> expected quarantine reason (None: good row)
EXPECTED = {
    "good_a": None,
    "good_b": None,
    "good_c": None,
    "good_abs": None,
    "007": None,  # an id that type inference would turn into the integer 7
    "corrupt": "unreadable image: not a recognised image format",
    "truncated": "truncated image",
    "missing": "missing file",
    "folder": "not a file (a folder)",
    "horse": "label 'horse' not in classes ['cat', 'dog', 'bird']",
    "index7": "label index 7 out of range 0..2",
    "nolabel": "missing label",
    "badsplit": "split 'bogus' not one of train, val, test, holdout",
    "dup": "duplicate sample_id 'dup' (2 rows)",
    "dotdot": "path escapes dataset root",
    "abs_outside": "path escapes dataset root",
    "symlink_out": "path escapes dataset root",
    "s3_in_local": "path escapes dataset root",
    "http": "unsupported image URI scheme 'http' (use a path or s3://)",
}


@pytest.fixture
def local_dataset(tmp_path: Path) -> tuple[Path, list[dict]]:
    root = tmp_path / "ds"
    (root / "images" / "sub.png").mkdir(parents=True)  # a folder named like an image
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3), ("d.png", 4), ("e.png", 5)):
        (root / "images" / name).write_bytes(encoded(noise_image(seed)))
    (root / "images" / "corrupt.png").write_bytes(np.random.default_rng(9).bytes(400))
    whole = encoded(noise_image(6, 32, 32))
    (root / "images" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    outside = tmp_path / "outside.png"
    outside.write_bytes(encoded(noise_image(7)))
    os.symlink(outside, root / "images" / "link.png")

    rows = [
        {"sample_id": "good_a", "image": "images/a.png", "label": "cat", "split": "train"},
        {"sample_id": "good_b", "image": "./images/b.png", "label": "1", "split": ""},
        {"sample_id": "good_c", "image": "images/sub.png/../c.png", "label": "bird", "split": "Validation"},
        {"sample_id": "good_abs", "image": str(root / "images" / "d.png"), "label": "2", "split": "test"},
        {"sample_id": "007", "image": "images/e.png", "label": "dog", "split": "holdout"},
        {"sample_id": "corrupt", "image": "images/corrupt.png", "label": "cat", "split": ""},
        {"sample_id": "truncated", "image": "images/truncated.png", "label": "cat", "split": ""},
        {"sample_id": "missing", "image": "images/missing.png", "label": "cat", "split": ""},
        {"sample_id": "folder", "image": "images/sub.png", "label": "cat", "split": ""},
        {"sample_id": "horse", "image": "images/a.png", "label": "horse", "split": ""},
        {"sample_id": "index7", "image": "images/a.png", "label": "7", "split": ""},
        {"sample_id": "nolabel", "image": "images/a.png", "label": "", "split": ""},
        {"sample_id": "badsplit", "image": "images/a.png", "label": "cat", "split": "bogus"},
        {"sample_id": "dup", "image": "images/a.png", "label": "cat", "split": ""},
        {"sample_id": "dup", "image": "images/b.png", "label": "dog", "split": ""},
        {"sample_id": "dotdot", "image": "../outside.png", "label": "cat", "split": ""},
        {"sample_id": "abs_outside", "image": str(outside), "label": "cat", "split": ""},
        {"sample_id": "symlink_out", "image": "images/link.png", "label": "cat", "split": ""},
        {"sample_id": "s3_in_local", "image": "s3://bucket/images/a.png", "label": "cat", "split": ""},
        {"sample_id": "http", "image": "http://example.com/a.png", "label": "cat", "split": ""},
    ]
    return root, rows


def write_table(root: Path, rows: list[dict], fmt: str) -> Location:
    if fmt == "csv":
        path = root / "labels.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path = root / "labels.parquet"
        columns = {k: [r[k] or None for r in rows] for k in rows[0]}
        pq.write_table(pa.table(columns), path)
    return Location(str(path))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_label_table_rows_get_the_right_reasons(local_dataset, fmt):
    root, rows = local_dataset
    table_location = write_table(root, rows, fmt)
    rows_table = read_label_table(table_location)
    assert rows_table.column_names == ["sample_id", "source", "label", "split", "group", "identity"]
    assert rows_table.num_rows == len(rows)
    assert "007" in rows_table["sample_id"].to_pylist()  # not read as the integer 7

    dataset_root = table_location.parent()
    assert dataset_root.path == str(root.resolve())
    table, manifest, quarantine = run_ingest(rows_table, dataset_root)

    reasons = dict(zip(table["sample_id"].to_pylist(), table["quarantine_reason"].to_pylist(), strict=True))
    assert reasons == EXPECTED
    assert table["quarantine_reason"].to_pylist().count(EXPECTED["dup"]) == 2  # both copies

    # Counts conserved, schemas as the manifest module defines them.
    assert manifest.num_rows + quarantine.num_rows == len(rows)
    check_counts_conserved(len(rows), manifest.num_rows, quarantine.num_rows, "test")
    assert manifest.schema == SCHEMA and quarantine.schema == QUARANTINE_SCHEMA
    assert set(quarantine["stage"].to_pylist()) == {"ingest"}
    assert sorted(manifest["sample_id"].to_pylist()) == sorted(["good_a", "good_b", "good_c", "good_abs", "007"])

    good = {r["sample_id"]: r for r in manifest.to_pylist()}
    assert {k: v["label"] for k, v in good.items()} == {
        "good_a": 0, "good_b": 1, "good_c": 2, "good_abs": 2, "007": 1,
    }
    assert good["good_a"]["split"] == "train" and good["good_c"]["split"] == "val"
    assert good["good_abs"]["split"] == "test" and good["007"]["split"] == "holdout"
    assert good["good_b"]["split"] in ("train", "val", "test")
    assert good["good_a"]["image_uri"] == str(root.resolve() / "images" / "a.png")
    assert good["good_c"]["image_uri"] == str(root.resolve() / "images" / "c.png")
    for row in good.values():
        assert row["label_clean"] is None and row["is_corrupted"] is None
        assert img.decode_image(row["image"]).shape == (SIZE, SIZE, 3)
    expected_a = img.encode_png(img.square_resize(noise_image(1), SIZE))
    assert good["good_a"]["image"] == expected_a

    bad = {r["sample_id"]: r for r in quarantine.to_pylist()}
    assert bad["dotdot"]["source"] == "../outside.png"
    assert bad["missing"]["source"] == "images/missing.png"

    kinds = summarise(table["quarantine_reason"].to_pylist())
    assert kinds["path escapes dataset root"] == 4
    assert kinds["duplicate sample_id '…' (N rows)"] == 2
    assert sum(kinds.values()) == quarantine.num_rows


def test_batches_and_threads_give_the_same_rows(local_dataset):
    root, rows = local_dataset
    rows_table = read_label_table(write_table(root, rows, "csv"))
    dataset_root = Location(str(root))
    whole, _, _ = run_ingest(rows_table, dataset_root, io_threads=1)
    batched, manifest, quarantine = run_ingest(rows_table, dataset_root, batch_size=3, io_threads=4)
    assert whole.to_pylist() == batched.to_pylist()
    assert manifest.num_rows + quarantine.num_rows == len(rows)


def test_parquet_integer_labels_and_default_ids(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for name, seed in (("x.png", 1), ("y.png", 2), ("z.png", 3)):
        (root / name).write_bytes(encoded(noise_image(seed)))
    pq.write_table(
        pa.table({"image": ["x.png", "y.png", "z.png"], "label": pa.array([2, 0, 3], pa.int64()),
                  "identity": [17, 17, 4], "group": ["g1", None, "g2"]}),
        root / "labels.pq",
    )
    rows = read_label_table(Location(str(root / "labels.pq")))
    assert rows["sample_id"].to_pylist() == ["x", "y", "z"]
    assert rows["identity"].to_pylist() == ["17", "17", "4"]
    table, manifest, _ = run_ingest(rows, Location(str(root)), split_seed=3)
    reasons = table["quarantine_reason"].to_pylist()
    assert reasons == [None, None, "label index 3 out of range 0..2"]
    assert manifest["label"].to_pylist() == [2, 0]
    assert manifest["group"].to_pylist() == ["g1", None]
    # One identity, one split.
    assert manifest["split"][0] == manifest["split"][1]


def test_label_table_errors_name_file_and_column(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("path,label\na.png,cat\n")
    with pytest.raises(IngestError, match=r"labels\.csv.*lacks column\(s\) \['image'\]"):
        read_label_table(Location(str(path)))
    path.write_text("image,klass\na.png,cat\n")
    with pytest.raises(IngestError, match=r"lacks column\(s\) \['label'\]"):
        read_label_table(Location(str(path)))
    pq.write_table(pa.table({"image": ["a.png"], "label": [1.5]}), tmp_path / "f.parquet")
    with pytest.raises(IngestError, match=r"f\.parquet.*'label' row 0: 1\.5"):
        read_label_table(Location(str(tmp_path / "f.parquet")))
    (tmp_path / "labels.txt").write_text("image,label\n")
    with pytest.raises(IngestError, match="must be .csv"):
        read_label_table(Location(str(tmp_path / "labels.txt")))
    with pytest.raises(IngestError, match="does not exist"):
        read_label_table(Location(str(tmp_path / "nope.csv")))


# -- folders ----------------------------------------------------------------------------------
def test_folder_layouts(tmp_path):
    flat = tmp_path / "flat"
    for rel, seed in (("cat/1.png", 1), ("dog/2.JPG", 2), ("dog/.hidden.png", 3), ("cat/notes.txt", 0)):
        (flat / rel).parent.mkdir(parents=True, exist_ok=True)
        (flat / rel).write_bytes(encoded(noise_image(seed)) if rel.endswith("png") or rel.endswith("JPG") else b"x")
    listing = list_image_folder(Location(str(flat)), CLASSES)
    assert listing.to_pylist() == [
        {"sample_id": "cat/1", "source": "cat/1.png", "label_name": "cat", "split": None},
        {"sample_id": "dog/2", "source": "dog/2.JPG", "label_name": "dog", "split": None},
    ]

    nested = tmp_path / "nested"
    for rel, seed in (("train/cat/a.png", 1), ("train/dog/b.png", 2), ("Val/bird/c.webp", 3),
                      ("test/cat/d.jpeg", 4), ("holdout/zebra/e.bmp", 5),
                      ("train/cat/a.jpg", 6), ("train/cat/bad.png", -1)):
        path = nested / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".png": "PNG", ".webp": "WEBP", ".jpeg": "JPEG", ".bmp": "BMP", ".jpg": "JPEG"}[path.suffix]
        path.write_bytes(b"not an image" if seed < 0 else encoded(noise_image(seed), fmt))
    listing = list_image_folder(Location(str(nested)), CLASSES)
    by_source = {r["source"]: r for r in listing.to_pylist()}
    assert by_source["Val/bird/c.webp"] == {"sample_id": "Val/bird/c", "source": "Val/bird/c.webp",
                                          "label_name": "bird", "split": "val"}
    assert by_source["holdout/zebra/e.bmp"]["split"] == "holdout"
    assert listing.num_rows == 7

    table, manifest, quarantine = run_ingest(listing, Location(str(nested)))
    reasons = dict(zip(table["source"].to_pylist(), table["quarantine_reason"].to_pylist(), strict=True))
    assert reasons == {
        "Val/bird/c.webp": None,
        "holdout/zebra/e.bmp": "label 'zebra' not in classes ['cat', 'dog', 'bird']",
        "test/cat/d.jpeg": None,
        "train/cat/a.jpg": "duplicate sample_id 'train/cat/a' (2 rows)",
        "train/cat/a.png": "duplicate sample_id 'train/cat/a' (2 rows)",
        "train/cat/bad.png": "unreadable image: not a recognised image format",
        "train/dog/b.png": None,
    }
    assert dict(zip(manifest["sample_id"].to_pylist(), manifest["split"].to_pylist(), strict=True)) == {
        "Val/bird/c": "val", "test/cat/d": "test", "train/dog/b": "train"}
    assert manifest.num_rows + quarantine.num_rows == listing.num_rows


def test_folder_layout_errors(tmp_path):
    root = tmp_path / "ds"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(encoded(noise_image(1)))
    (root / "stray.png").write_bytes(encoded(noise_image(2)))
    with pytest.raises(IngestError, match=r"1 image\(s\) outside the layout.*stray\.png"):
        list_image_folder(Location(str(root)))
    (root / "stray.png").unlink()
    with pytest.raises(IngestError, match=r"none of the class folders \['cat'\]"):
        list_image_folder(Location(str(root)), ["dog"])
    with pytest.raises(IngestError, match="does not exist"):
        list_image_folder(Location(str(tmp_path / "nope")))


# -- small pieces -----------------------------------------------------------------------------
def test_find_duplicate_ids():
    assert find_duplicate_ids(["a", "b", "a", None, None, "c", "a"]) == {"a": 3}
    assert find_duplicate_ids(pa.chunked_array([["x", "y"], ["y"]])) == {"y": 2}
    assert find_duplicate_ids([]) == {}


def test_hash_split_is_stable_and_follows_fractions():
    thresholds = split_thresholds((0.8, 0.1, 0.1))
    ids = [f"id{i}" for i in range(4000)]
    splits = [hash_split(i, 0, thresholds) for i in ids]
    assert splits == [hash_split(i, 0, thresholds) for i in ids]
    assert 0.77 < splits.count("train") / 4000 < 0.83
    assert 0.08 < splits.count("test") / 4000 < 0.12
    assert splits != [hash_split(i, 1, thresholds) for i in ids]  # the seed matters
    assert {hash_split(i, 0, split_thresholds((0, 0, 0, 1))) for i in ids[:50]} == {"holdout"}
    with pytest.raises(ValueError, match="sum to 1"):
        split_thresholds((0.5, 0.1))


def test_resolve_source_on_an_s3_root():
    root = Location("s3://bucket/data?endpoint_override=http://127.0.0.1:1&region=us-east-1")
    inside = resolve_source("s3://bucket/data/x/a.png", root)
    assert inside is not None and inside.path == "bucket/data/x/a.png"
    assert "endpoint_override=http://127.0.0.1:1" in inside.uri  # read with the root's endpoint
    assert resolve_source("x/../a.png", root).path == "bucket/data/a.png"
    for escape in ("s3://bucket/data2/a.png", "s3://other/data/a.png", "../data2/a.png",
                   "/etc/passwd", "file:///etc/passwd", "s3://bucket/data/../x.png"):
        assert resolve_source(escape, root) is None, escape


def test_quarantine_limit():
    assert check_quarantine_fraction(100, 5, 0.05, "q/") == pytest.approx(0.05)
    assert check_quarantine_fraction(0, 0, 0.0, "q/") == 0.0
    with pytest.raises(QuarantineLimitExceeded, match=r"6 of 100 rows \(6\.0%\).*limit 5\.0%.*see runs/x/quarantine.*missing file: 4"):
        check_quarantine_fraction(100, 6, 0.05, "runs/x/quarantine", {"missing file": 4, "truncated image": 2})
    with pytest.raises(ValueError, match="limit"):
        check_quarantine_fraction(10, 1, 1.5, "q/")
    with pytest.raises(IngestError, match="rows were lost"):
        check_counts_conserved(10, 8, 1, "ingest")


def test_dataset_quarantine_fraction_fails_the_stage(local_dataset):
    root, rows = local_dataset
    _, manifest, quarantine = run_ingest(read_label_table(write_table(root, rows, "csv")), Location(str(root)))
    n = manifest.num_rows + quarantine.num_rows
    with pytest.raises(QuarantineLimitExceeded):
        check_quarantine_fraction(n, quarantine.num_rows, 0.5, "quarantine/",
                                  summarise(quarantine["reason"].to_pylist()))
    check_quarantine_fraction(n, quarantine.num_rows, 0.9, "quarantine/")


# -- S3 ---------------------------------------------------------------------------------------
def test_ingest_over_s3(s3_endpoint):
    base = Location(s3_endpoint.bucket("data")).child("ds")
    s3_endpoint.bucket("other")
    for key, seed in (("ds/img/a.png", 1), ("ds/img/b.png", 2), ("ds2/c.png", 3)):
        s3_endpoint.put("data", key, encoded(noise_image(seed)))
    s3_endpoint.put("other", "ds/img/a.png", encoded(noise_image(4)))
    whole = encoded(noise_image(5, 32, 32))
    s3_endpoint.put("data", "ds/img/t.png", whole[: len(whole) // 2])
    s3_endpoint.put("data", "ds/labels.csv", (
        b"image,label,split\n"
        b"img/a.png,cat,train\n"
        b"s3://data/ds/img/b.png,dog,val\n"
        b"img/missing.png,cat,\n"
        b"img/t.png,cat,\n"
        b"../ds2/c.png,cat,\n"
        b"s3://other/ds/img/a.png,cat,\n"
    ))

    table_location = base.child("labels.csv")
    rows = read_label_table(table_location)
    root = table_location.parent()
    assert root.path == "data/ds" and not root.is_local
    table, manifest, quarantine = run_ingest(rows, root)
    assert table["quarantine_reason"].to_pylist() == [
        None, None, "missing file", "truncated image",
        "path escapes dataset root", "path escapes dataset root",
    ]
    assert manifest["image_uri"].to_pylist() == ["s3://data/ds/img/a.png", "s3://data/ds/img/b.png"]
    assert manifest["split"].to_pylist() == ["train", "val"]
    assert manifest["image"][0].as_py() == img.encode_png(img.square_resize(noise_image(1), SIZE))
    assert manifest.num_rows + quarantine.num_rows == rows.num_rows

    s3_endpoint.put("data", "folder/train/cat/a.png", encoded(noise_image(1)))
    s3_endpoint.put("data", "folder/dog/b.png", encoded(noise_image(2)))
    folder = Location(s3_endpoint.bucket("data")).child("folder")
    listing = list_image_folder(folder, CLASSES)
    assert listing["source"].to_pylist() == ["dog/b.png", "train/cat/a.png"]
    _, manifest, quarantine = run_ingest(listing, folder)
    assert manifest["label"].to_pylist() == [1, 0] and quarantine.num_rows == 0
