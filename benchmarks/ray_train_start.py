"""The fixed cost of a Ray Train fit: empty-loop TorchTrainer fits (one CPU worker, no data, no
checkpoint; the loop reports once, as the harness's last epoch does) in one local Ray, timed from
`fit()` to the loop's first line and from the loop's last line to `fit()`'s return. It is the
floor under `benchmarks/ray_overhead.py`'s "trainer set-up and worker start" and "loop exit to
fit() return" phases: what every Ray Train stage pays whatever its data size.

    python benchmarks/ray_train_start.py [--fits 3] [--env local|ray]
    python benchmarks/ray_train_start.py --compare [--fits 3] [--repeats 2]

`--env local` (the default) starts Ray as the project does (`start_local_ray`, with
`ray_session.LOCAL_RAY_TRAIN_ENV`); `--env ray` with Ray Train's own defaults for those settings.
`--compare` runs both, each in its own process (the settings must be in place before Ray
starts), alternating, and prints the medians and the ratio local / ray.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Ray Train's defaults for the settings ray_session.LOCAL_RAY_TRAIN_ENV changes
RAY_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_METRICS_ENABLED": "1"}


def empty_loop(config: dict) -> None:
    import ray.train

    Path(config["stamp"] + ".start").write_text(repr(time.time()))
    ray.train.report({"done": 1})
    Path(config["stamp"] + ".end").write_text(repr(time.time()))


def timed_fit(index: int, storage: str, stamp: Path) -> tuple[float, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(empty_loop, train_loop_config={"stamp": str(stamp)},
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                           run_config=RunConfig(storage_path=storage, name=f"empty{index}"))
    called = time.time()
    trainer.fit()
    returned = time.time()
    started = float(Path(f"{stamp}.start").read_text())
    ended = float(Path(f"{stamp}.end").read_text())
    return started - called, returned - ended


def run_fits(fits: int, env: str) -> dict:
    import ray

    from diffinf_ray.ray_session import start_local_ray

    if env == "ray":
        os.environ.update(RAY_DEFAULTS)
    with tempfile.TemporaryDirectory(prefix="rts_") as tmp:
        begun = time.perf_counter()
        start_local_ray(2, temp_dir=tempfile.mkdtemp(prefix="rts_ray_"), log_to_driver=False)
        out = {"env": env, "ray_init_s": time.perf_counter() - begun, "start_s": [], "end_s": []}
        try:
            for i in range(fits):
                start, end = timed_fit(i, tmp, Path(tmp) / f"stamp{i}")
                out["start_s"].append(start)
                out["end_s"].append(end)
                print(f"[{env}] fit {i + 1}: fit() -> loop {start:.2f} s, "
                      f"loop -> fit() return {end:.2f} s", file=sys.stderr)
        finally:
            ray.shutdown()
    return out


def compare(fits: int, repeats: int) -> None:
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for _ in range(repeats):
        for env in ("ray", "local"):
            done = subprocess.run([sys.executable, __file__, "--fits", str(fits), "--env", env,
                                   "--json"], check=True, capture_output=True, text=True)
            runs[env].append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = {env: {key: statistics.median([v for r in rs for v in r[key]])
                    for key in ("start_s", "end_s")} for env, rs in runs.items()}
    print(f"{fits} fits x {repeats} alternating runs per setting, medians (s):")
    print("| setting | fit() -> loop | loop -> fit() return | fit() in all |")
    print("|---|---|---|---|")
    for env, label in (("ray", "Ray Train's defaults"), ("local", "LOCAL_RAY_TRAIN_ENV")):
        m = median[env]
        print(f"| {label} | {m['start_s']:.2f} | {m['end_s']:.2f} | "
              f"{m['start_s'] + m['end_s']:.2f} |")
    total = {env: m["start_s"] + m["end_s"] for env, m in median.items()}
    print(f"ratio local / ray: {total['local'] / total['ray']:.2f} "
          f"({total['ray'] - total['local']:+.2f} s per fit saved)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--env", choices=["local", "ray"], default="local")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare:
        compare(args.fits, args.repeats)
        return
    out = run_fits(args.fits, args.env)
    if args.json:
        print(json.dumps(out))
        return
    print(f"ray.init {out['ray_init_s']:.2f} s")
    print(f"median: fit() -> loop {statistics.median(out['start_s']):.2f} s, "
          f"loop -> fit() return {statistics.median(out['end_s']):.2f} s")


if __name__ == "__main__":
    main()
