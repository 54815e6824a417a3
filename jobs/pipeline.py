"""Recipe: the DiffInf pipeline on one config (ingest -> noise -> train -> evaluate).

Runs unchanged locally and under `ray job submit`:

    python -m jobs.pipeline --config jobs/configs/demo.yaml [train.epochs=3 ...]
    ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/tiny.yaml

Under `ray job submit` it joins the job's cluster; otherwise it starts a local Ray.
The arguments are `diffinf run`'s (diffinf_ray/cli.py), the config as --config.
"""

from __future__ import annotations

import sys

from diffinf_ray.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("run", "jobs.pipeline", argv)


if __name__ == "__main__":
    sys.exit(main())
