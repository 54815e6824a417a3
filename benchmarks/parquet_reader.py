"""Ray Data's two parquet readers on a 70k-row folder (8 files, 3 kB of bytes per row, ~200 MB):
planning, one pass over every row, and a rewrite (how many files come out).

    python benchmarks/parquet_reader.py v1   # datasets.read_parquet as the project uses it
    python benchmarks/parquet_reader.py v2   # Ray's default (RAY_DATA_USE_DATASOURCE_V2=1)

The folder is written once under --data (default /tmp/parquet_reader/m). Results:
benchmarks/RESULTS.md, "Ray Data's parquet reader".
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROWS, FILES, IMAGE_BYTES = 70_000, 8, 3000


def write_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_file = ROWS // FILES
    for f in range(FILES):
        pq.write_table(pa.table({
            "sample_id": [f"s{f}_{i}" for i in range(per_file)],
            "split": ["train"] * per_file,
            "image": [rng.bytes(IMAGE_BYTES) for _ in range(per_file)],
            "label": rng.integers(0, 3, per_file),
        }), folder / f"part{f}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reader", choices=["v1", "v2"])
    parser.add_argument("--data", type=Path, default=Path("/tmp/parquet_reader/m"))
    args = parser.parse_args()
    if not args.data.exists():
        write_folder(args.data)
    if args.reader == "v2":  # before read_parquet looks at it
        os.environ["RAY_DATA_USE_DATASOURCE_V2"] = "1"

    import ray

    from diffinf_ray.datasets import read_parquet
    from diffinf_ray.storage import Location

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().use_datasource_v2 = args.reader == "v2"
    try:
        started = time.perf_counter()
        ds = read_parquet(Location(str(args.data)))
        plan_s = time.perf_counter() - started
        started = time.perf_counter()
        rows = ds.map_batches(lambda b: {"n": [len(b["label"])]}, batch_format="numpy").sum("n")
        pass_s = time.perf_counter() - started
        out = args.data.parent / f"out_{args.reader}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        read_parquet(Location(str(args.data))).write_parquet(str(out))
        rewrite_s = time.perf_counter() - started
        print(f"{args.reader}: plan {plan_s:.1f} s, {rows} rows in {pass_s:.1f} s, "
              f"rewrite {rewrite_s:.1f} s -> {len(list(out.iterdir()))} files")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
