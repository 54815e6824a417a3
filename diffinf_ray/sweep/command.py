"""`diffinf sweep` with parsed arguments (diffinf_ray.cli parses them)."""

from __future__ import annotations

import json
import sys

from diffinf_ray.config import override_args
from diffinf_ray.sweep.plan import SweepPlan, load_sweep
from diffinf_ray.sweep.run import run_sweep


def describe(plan: SweepPlan) -> str:
    spec = plan.spec
    lines = [
        f"sweep {spec.name}: {plan.source}",
        f"  base config      {plan.base_path} {' '.join(override_args(spec.overrides))}".rstrip(),
        f"  base run root    {plan.base_root} (shared stages)",
        f"  sweep root       {plan.root.display}",
        f"  shared, run once {', '.join(plan.shared) or '-'}",
        f"  per trial        {', '.join(plan.per_trial)}",
        f"  objective        {spec.metric} ({spec.mode}) of {spec.objective_stage}; "
        f"{plan.max_reports} report(s) per trial, scheduler {spec.scheduler.kind}",
        f"  trials           num_samples {spec.num_samples}, at most "
        f"{spec.max_concurrent_trials} at a time, {spec.trial_cpus} CPU per trial driver",
        *(f"  tried first      {json.dumps(p)}" for p in spec.points_to_evaluate),
        "  params",
    ]
    lines += [f"    {k}: {v.model_dump(mode='json')}" for k, v in spec.params.items()]
    if plan.experiment.child("tuner.pkl").exists():
        lines.append(f"  an experiment exists at {plan.experiment.display}: it is restored "
                     "(--no-restore starts over)")
    return "\n".join(lines)


def _print_results(summary: dict, plan: SweepPlan) -> None:
    metric = plan.spec.metric
    print(f"\nsweep {plan.spec.name}: {summary['trials']} trials, {summary['done']} finished, "
          f"{summary['stopped']} stopped early, {summary['error']} failed")
    best = summary.get("best")
    if best:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in best["params"].items())
        print(f"best: {metric} {best['value']:.2f} (test accuracy {best['test_accuracy']:.2f}) "
              f"with {params}\n  {best['trial_root']}\n  reproduce: {best['reproduce']}")
    print(f"results: {plan.root.child('results.csv').display}")


def run_command(args) -> int:
    """`diffinf sweep` with parsed arguments (config, overrides, restore, dry_run; see
    cli.add_sweep_arguments). Exit status 0; 1 when a trial failed; 130 when interrupted."""
    plan = load_sweep(args.config, args.overrides)
    print(describe(plan))
    if args.dry_run:
        return 0
    summary = run_sweep(plan, restore=args.restore)
    _print_results(summary, plan)
    if summary["interrupted"]:
        print("the sweep was interrupted; run the same command again to resume it")
        return 130
    return 1 if summary["error"] else 0


def main(argv: list[str] | None = None) -> int:
    """`diffinf sweep CONFIG [key=value ...] [--restore/--no-restore] [--dry-run]`
    (diffinf_ray.cli)."""

    from diffinf_ray.cli import main as diffinf_main

    return diffinf_main(["sweep", *(sys.argv[1:] if argv is None else argv)])
