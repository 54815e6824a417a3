"""`diffinf experiment` with parsed arguments (diffinf_ray.cli parses them)."""

from __future__ import annotations

import sys
from pathlib import Path

from diffinf_ray.experiment.held import held_records
from diffinf_ray.experiment.plan import Run, experiment_location, load_experiment
from diffinf_ray.experiment.run import run_experiment
from diffinf_ray.experiment.table import write_table
from diffinf_ray.storage import display_uri


def _print_plan(runs: list[Run], held: dict[str, dict]) -> None:
    print(f"{len(runs)} runs" + (f", {len(held)} held by the ledger (not run):" if held else ":"))
    for r in runs:
        print(f"  {r.id:<32} noise {r.noise_rate:<5g} {display_uri(r.root)}\n"
              f"  {'':<32} stages {', '.join(r.stages)}")
        if r.id in held:
            print(f"  {'':<32} held by {held[r.id].get('_file')} "
                  f"(commit {str(held[r.id].get('commit'))[:7]})")


def run_command(args) -> int:
    """`diffinf experiment` with parsed arguments (config, tasks, dry_run, table_only; see
    cli.add_experiment_arguments). Exit status 0; 1 when some run (or the table) failed,
    listing them; a config error is raised (the CLI prints it, exit status 2)."""
    exp = load_experiment(args.config)
    if args.table_only:
        files = write_table(exp)
        print(Path(args.config).name, "->")
        print("\n".join(f"  {v}" for v in files.values()))
        return 0
    result = run_experiment(exp, only_tasks=args.tasks, dry_run=args.dry_run)
    if args.dry_run:
        _print_plan(result.runs, held_records(exp, result.runs))
        return 0
    print(f"\ntable: {experiment_location(exp).child('table', 'table.md').display}")
    if result.table_error:
        print(f"error: the table could not be written: {result.table_error}", file=sys.stderr)
    for o in result.failures:
        print(f"failed: {o.run.id}: " + "; ".join(f"{k}: {v}" for k, v in o.errors.items()),
              file=sys.stderr)
    return 1 if result.failures or result.table_error else 0


def main(argv: list[str] | None = None) -> int:
    """`diffinf experiment CONFIG [--task T ...] [--dry-run] [--table-only]` (diffinf_ray.cli)."""
    from diffinf_ray.cli import main as diffinf_main

    return diffinf_main(["experiment", *(sys.argv[1:] if argv is None else argv)])
