"""Running an experiment: every planned run through the pipeline's stage lifecycle, progress in
<root>/experiment.json, then the table."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

from diffinf_ray.config import ConfigError
from diffinf_ray.experiment.held import held_records, record_run
from diffinf_ray.experiment.plan import Run, experiment_location, plan
from diffinf_ray.experiment.spec import ExperimentConfig
from diffinf_ray.experiment.table import write_table
from diffinf_ray.storage import Location, display_uri

log = logging.getLogger(__name__)

@dataclass
class RunOutcome:
    run: Run
    status: str  # "done" | "failed" | "held" (the ledger holds it: not run)
    stages_ran: list[str]
    errors: dict[str, str]  # stage (or "run") -> message
    wall_seconds: float


@dataclass
class ExperimentResult:
    runs: list[Run]
    outcomes: list[RunOutcome] = field(default_factory=list)
    table_error: str | None = None

    @property
    def failures(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def execute_run(run: Run) -> RunOutcome:
    """Run one planned run's stages with `run_pipeline`, resuming by fingerprint.

    When a stage fails, the stages that read its outputs (directly or through others) are
    skipped, the others still run: one crashing baseline must not cost the seed its DiffInf
    result."""
    from diffinf_ray.cli import format_error
    from diffinf_ray.pipeline import run_pipeline

    errors: dict[str, str] = {}
    ran: list[str] = []
    started = time.perf_counter()
    try:
        result = run_pipeline(run.config, keep_going=True)
    except Exception as err:  # not inside a stage (Ray start, storage): recorded, the experiment goes on
        errors["run"] = format_error(err)
        log.error("run %s failed: %s", run.id, errors["run"])
    else:
        ran = result.with_status("ran")
        for stage, outcome in result.outcomes.items():
            if outcome.status == "failed":
                errors[stage] = format_error(outcome.error)
                log.error("run %s: stage %s failed: %s", run.id, stage, errors[stage])
            elif outcome.status == "blocked":
                errors[stage] = f"not run: {outcome.error}"
    return RunOutcome(run, "failed" if errors else "done", ran, errors,
                      round(time.perf_counter() - started, 2))


class _Progress:
    """<root>/experiment.json: one record per run, rewritten after every change."""

    def __init__(self, location: Location, exp: ExperimentConfig):
        self.location = location
        self.state = location.read_json() if location.exists() else {}
        self.state.update({"name": exp.name, "base": exp.base})
        self.state.setdefault("runs", {})

    def update(self, run: Run, **fields) -> None:
        rec = self.state["runs"].setdefault(run.id, {})
        rec.update({"root": display_uri(run.root),
                    "task": run.task, "kind": run.kind, "seed": run.seed,
                    "noise_rate": run.noise_rate, **fields})
        self.state["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.location.write_json(self.state)


def run_experiment(exp: ExperimentConfig, only_tasks: Iterable[str] | None = None,
                   dry_run: bool = False) -> ExperimentResult:
    """Run every planned run (of `only_tasks`, if given) and write the table.

    Ray is joined or started once for all runs (ray_session with the first run's config). A
    failed run is recorded and the next one starts; see `ExperimentResult.failures`. With a
    ledger, the runs it holds are not run and each run that finishes is recorded."""
    from diffinf_ray.ray_session import ray_session

    runs = plan(exp)
    if only_tasks:
        wanted = list(only_tasks)
        unknown = sorted(set(wanted) - set(exp.tasks))
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; the experiment has {list(exp.tasks)}")
        runs = [r for r in runs if r.task in wanted]
    result = ExperimentResult(runs)
    if dry_run or not runs:
        return result
    location = experiment_location(exp, runs)
    progress = _Progress(location.child("experiment.json"), exp)
    held = held_records(exp, runs)
    to_run = [r for r in runs if r.id not in held]
    for run in runs:
        if run.id in held:
            record = held[run.id]
            log.info("experiment %s: run %s is held by the ledger (%s, commit %s): not run",
                     exp.name, run.id, record.get("_file"), str(record.get("commit"))[:7])
            result.outcomes.append(RunOutcome(run, "held", [], {}, 0.0))
            progress.update(run, status="held", ledger_record=record.get("_file"),
                            commit=record.get("commit"), errors={})
    with ray_session(to_run[0].config) if to_run else nullcontext():
        for i, run in enumerate(to_run, 1):
            log.info("experiment %s: run %d/%d %s (%s)", exp.name, i, len(to_run), run.id,
                     run.root)
            progress.update(run, status="running",
                            started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), errors={})
            outcome = execute_run(run)
            result.outcomes.append(outcome)
            recorded = record_run(exp, run) if outcome.status == "done" else None
            progress.update(run, status=outcome.status, stages_ran=outcome.stages_ran,
                            errors=outcome.errors, wall_seconds=outcome.wall_seconds,
                            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            **({"ledger_record": recorded.name} if recorded else {}))
    try:
        write_table(exp, plan(exp))
    except Exception as err:  # the runs' outputs are safe; say why the table is missing
        log.exception("experiment %s: writing the table failed", exp.name)
        result.table_error = f"{type(err).__name__}: {err}"
    return result

