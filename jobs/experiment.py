"""Recipe: Table 1 — every method over tasks and seeds, then one aggregated table.

Runs unchanged locally and under `ray job submit`:

    python -m jobs.experiment --config jobs/configs/experiment.yaml [--task age] [--dry-run]
    ray job submit --working-dir . -- python -m jobs.experiment --config jobs/configs/experiment_tiny.yaml

Under `ray job submit` it joins the job's cluster; otherwise it starts a local Ray. Repeating
the command resumes: finished stages of every run are skipped (diffinf_ray/experiment.py).
Writes <root>/experiment.json (progress) and <root>/table/ (table.md, .csv, .html, plots).
"""

from __future__ import annotations

import argparse
import sys

from diffinf_ray.experiment import main as experiment_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--task", action="append", default=[], help="only this task (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--table-only", action="store_true", help="only re-aggregate the table")
    args = parser.parse_args(argv)
    flags = [f for f, on in (("--dry-run", args.dry_run), ("--table-only", args.table_only)) if on]
    return experiment_main([args.config, *(a for t in args.task for a in ("--task", t)), *flags])


if __name__ == "__main__":
    sys.exit(main())
