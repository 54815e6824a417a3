"""The experiment and the results ledger (`ledger: FOLDER` in the experiment file): runs the
ledger already holds are not run again, finished runs are recorded, and the table reads a held
run's figures from its record, marking those written by other code than the checkout's.

    held = held_records(exp, runs)        {run id: the newest record that holds the run}
    record_run(exp, run)                   after a run finished: its record in the ledger

A record holds a run when it is of the run's seed and every stage of the run is in the record
with the fingerprint the run's config gives that stage now (stage_registry.fingerprint: the
settings the stage reads, and its upstream stages'): the same settings, wherever and by
whichever commit it ran. Its commit may be older than the checkout; the table says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffinf_ray.experiment.plan import Run
from diffinf_ray.experiment.spec import ExperimentConfig

log = logging.getLogger(__name__)


def _folder(exp: ExperimentConfig) -> Path | None:
    return Path(exp.ledger) if exp.ledger else None


def holds(record: dict, run: Run) -> bool:
    """Whether `record` measured `run`: same seed, every stage of the run done with the
    fingerprint the run's config gives it."""
    from diffinf_ray.stage_registry import fingerprint

    if record.get("seed") != run.seed or record.get("kind", "pipeline") != "pipeline":
        return False
    stages = record.get("stages", {})
    return all(stages.get(s, {}).get("fingerprint") == fingerprint(run.config, s)
               for s in run.stages)


def held_records(exp: ExperimentConfig, runs: list[Run]) -> dict[str, dict]:
    """{run id: the newest ledger record that holds the run}; empty without a ledger."""
    from diffinf_ray.ledger import read_ledger

    folder = _folder(exp)
    if folder is None or not folder.exists():
        return {}
    records = read_ledger(folder)  # oldest first: a later record replaces an earlier one
    held = {}
    for run in runs:
        for record in records:
            if holds(record, run):
                held[run.id] = record
    return held


def record_run(exp: ExperimentConfig, run: Run) -> Path | None:
    """Write a finished run's record to the experiment's ledger (None without one). A run
    with nothing to record (no stage done) is logged, not raised: its figures are in its root."""
    from diffinf_ray.ledger import run_record, write_record
    from diffinf_ray.pipeline import open_run_root

    folder = _folder(exp)
    if folder is None:
        return None
    try:
        path = write_record(run_record(run.config, open_run_root(run.config)), folder)
    except ValueError as err:
        log.warning("run %s: not recorded in the ledger: %s", run.id, err)
        return None
    log.info("run %s: recorded in %s", run.id, path)
    return path


def head_commit() -> str | None:
    """The checkout's commit: records of another one are marked in the table."""
    from diffinf_ray.ledger import git_commit

    return git_commit(Path(__file__).resolve().parent)["commit"]
