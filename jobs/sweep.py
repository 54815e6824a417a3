"""Recipe: a Ray Tune sweep of DiffInf's settings (edit loss weights, tau, noise rate) on one
base pipeline config; the stages no swept key affects run once and are shared by the trials.

Runs unchanged locally and under `ray job submit`:

    python -m jobs.sweep --config jobs/configs/sweep_tiny.yaml [--dry-run] [num_samples=4 ...]
    ray job submit --working-dir . -- python -m jobs.sweep --config jobs/configs/sweep.yaml \\
        run.root=s3://bucket/runs/age32 train.use_gpu=true

Under `ray job submit` it joins the job's cluster; otherwise it starts a local Ray. Running it
again resumes an interrupted sweep (`--no-restore` starts over). Results: results.csv,
best.json and objective_vs_<param>.png under the sweep root (diffinf_ray/sweep/).
The arguments are `diffinf sweep`'s (diffinf_ray/cli.py), the config as --config.
"""

from __future__ import annotations

import sys

from diffinf_ray.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("sweep", "jobs.sweep", argv)


if __name__ == "__main__":
    sys.exit(main())
