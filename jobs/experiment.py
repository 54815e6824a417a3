"""Recipe: Table 1 — every method over tasks and seeds, then one aggregated table.

Runs unchanged locally and under `ray job submit`:

    python -m jobs.experiment --config jobs/configs/experiment.yaml [--task age] [--dry-run]
    ray job submit --working-dir . -- python -m jobs.experiment --config jobs/configs/experiment_tiny.yaml

Under `ray job submit` it joins the job's cluster; otherwise it starts a local Ray. Repeating
the command resumes: finished stages of every run are skipped (diffinf_ray/experiment/).
Writes <root>/experiment.json (progress) and <root>/table/ (table.md, .csv, .html, plots).
The arguments are `diffinf experiment`'s (diffinf_ray/cli.py), the config as --config.
"""

from __future__ import annotations

import sys

from diffinf_ray.cli import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("experiment", "jobs.experiment", argv)


if __name__ == "__main__":
    sys.exit(main())
