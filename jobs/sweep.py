"""Recipe: a Ray Tune sweep of DiffInf's settings (edit loss weights, tau, noise rate) on one
base pipeline config; the stages no swept key affects run once and are shared by the trials.

Runs unchanged locally and under `ray job submit`:

    python -m jobs.sweep --config jobs/configs/sweep_tiny.yaml [--dry-run] [num_samples=4 ...]
    ray job submit --working-dir . -- python -m jobs.sweep --config jobs/configs/sweep.yaml \\
        run.root=s3://bucket/runs/age32 train.use_gpu=true

Under `ray job submit` it joins the job's cluster; otherwise it starts a local Ray. Running it
again resumes an interrupted sweep (`--no-restore` starts over). Results: results.csv,
best.json and objective_vs_<param>.png under the sweep root (diffinf_ray/sweep.py).
"""

from __future__ import annotations

import argparse
import sys

from diffinf_ray.cli import main as diffinf_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--restore", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("overrides", nargs="*", help="sweep keys or base config keys")
    args = parser.parse_intermixed_args(argv)
    flags = ["--restore" if args.restore else "--no-restore",
             *(["--dry-run"] if args.dry_run else [])]
    return diffinf_main(["sweep", args.config, *args.overrides, *flags])


if __name__ == "__main__":
    sys.exit(main())
