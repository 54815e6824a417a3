"""The fixed cost of a Ray Train fit: empty-loop TorchTrainer fits (one CPU worker, no data, no
checkpoint) in one local Ray, timed from `fit()` to the loop's first line and from the loop's
return to `fit()`'s. It is the floor under `benchmarks/ray_overhead.py`'s "trainer set-up and
worker start" and "loop exit to fit() return" phases: what every Ray Train stage pays whatever
its data size.

    python benchmarks/ray_train_start.py [--fits 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def empty_loop(config: dict) -> None:
    Path(config["stamp"]).write_text(repr(time.time()))


def timed_fit(index: int, storage: str, stamp: Path) -> tuple[float, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(empty_loop, train_loop_config={"stamp": str(stamp)},
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                           run_config=RunConfig(storage_path=storage, name=f"empty{index}"))
    called = time.time()
    trainer.fit()
    returned = time.time()
    loop_ran = float(stamp.read_text())
    return loop_ran - called, returned - loop_ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=3)
    args = parser.parse_args()
    import ray

    from diffinf_ray.ray_session import start_local_ray

    with tempfile.TemporaryDirectory(prefix="rts_") as tmp:
        started = time.perf_counter()
        start_local_ray(2, temp_dir=tempfile.mkdtemp(prefix="rts_ray_"), log_to_driver=False)
        print(f"ray.init {time.perf_counter() - started:.2f} s")
        try:
            starts, ends = [], []
            for i in range(args.fits):
                start, end = timed_fit(i, tmp, Path(tmp) / f"stamp{i}")
                starts.append(start)
                ends.append(end)
                print(f"fit {i + 1}: fit() -> loop {start:.2f} s, loop -> fit() return {end:.2f} s")
        finally:
            ray.shutdown()
    print(f"median: fit() -> loop {statistics.median(starts):.2f} s, "
          f"loop -> fit() return {statistics.median(ends):.2f} s")


if __name__ == "__main__":
    main()
