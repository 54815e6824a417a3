"""The stage lifecycle, in one place: `diffinf run`, the experiment runner and every sweep trial
run their stages through `run_pipeline` / `run_stage`.

A stage is skipped when its record under the run root says it finished with the same config
fingerprint (stage_registry.fingerprint), so a crashed or extended run resumes. A stage whose
fingerprint changed has its old outputs deleted and runs again, and so does every stage that
reads its outputs. Each stage sees only the settings its fingerprint covers
(stage_registry.config_for_stage).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from diffinf_ray.config import Config, dump_config
from diffinf_ray.console import stage_progress
from diffinf_ray.run_root import RunRoot
from diffinf_ray.stage_registry import (
    REGISTRY,
    STAGES,
    config_for_stage,
    fingerprint,
    upstream_stages,
)
from diffinf_ray.storage import StorageError, StorageOptions, storage_failure

log = logging.getLogger(__name__)

# A stage's work: `run_<stage>(cfg, root) -> summary` (the registry's entry), or a caller's
# replacement for it (a sweep trial trains its objective stage in chunks to report to Tune).
StageBody = Callable[[Config, RunRoot], dict]


@dataclass
class StageOutcome:
    """What became of one stage in one pipeline run. `blocked`: not run because a stage whose
    outputs it reads failed in this run."""

    stage: str
    status: Literal["ran", "skipped", "failed", "blocked"]
    fingerprint: str
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: BaseException | None = None


class PipelineRun(Mapping):
    """The outcome of every stage asked for, in pipeline order; as a mapping, {stage: summary}
    of the stages that finished (ran now or before)."""

    def __init__(self, outcomes: dict[str, StageOutcome]):
        self.outcomes = outcomes

    def __getitem__(self, stage: str) -> dict:
        outcome = self.outcomes[stage]
        if outcome.status not in ("ran", "skipped"):
            raise KeyError(f"stage {stage} did not finish ({outcome.status})")
        return outcome.summary

    def __iter__(self) -> Iterator[str]:
        return (s for s, o in self.outcomes.items() if o.status in ("ran", "skipped"))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def with_status(self, *statuses: str) -> list[str]:
        return [s for s, o in self.outcomes.items() if o.status in statuses]

    @property
    def failed(self) -> dict[str, BaseException]:
        return {s: o.error for s, o in self.outcomes.items() if o.status == "failed"}


def stage_function(stage: str) -> StageBody:
    return REGISTRY[stage].function()


def open_run_root(cfg: Config) -> RunRoot:
    return RunRoot(cfg.run.root, StorageOptions.of(cfg.storage))


def is_done(root: RunRoot, cfg: Config, stage: str) -> bool:
    """Whether `stage` finished under `root` with the settings of `cfg`."""
    record = root.stage_record(stage) or {}
    return record.get("status") == "done" and record.get("fingerprint") == fingerprint(cfg, stage)


def upstream_attempts(root: RunRoot, stage: str, cfg: Config | None = None) -> dict[str, str | None]:
    """{upstream stage (under `cfg`): attempt id of its finished record, None when it has none}."""
    return {s: (root.stage_record(s) or {}).get("attempt")
            for s in REGISTRY[stage].upstream_of(cfg)}


def _check_upstream_done(root: RunRoot, stage: str, cfg: Config) -> None:
    """A clear error, before any work, when a stage whose outputs `stage` reads has not
    finished under `root` (tolerant stages, the report, show whatever exists)."""
    if REGISTRY[stage].tolerant:
        return
    missing = [s for s in STAGES if s in upstream_stages(stage, cfg)
               and (root.stage_record(s) or {}).get("status") != "done"]
    if missing:
        raise RuntimeError(
            f"stage {stage} reads outputs that are not there: "
            + ", ".join(f"stage {s}" for s in missing)
            + f" has not finished under {root}; run them first (`diffinf run CONFIG` runs the "
            "configured stages in order)")


@contextmanager
def _storage_errors_named(stage: str) -> Iterator[None]:
    """A storage failure inside (from Ray's workers too) as one StorageError naming the stage
    and the URI; the original stays the exception's context."""
    try:
        yield
    except Exception as err:
        failure = storage_failure(err)
        if failure is None or str(failure).startswith("stage "):
            raise
        raise StorageError(f"stage {stage}: {failure}") from None


def run_stage(cfg: Config, root: RunRoot, stage: str, force: bool = False,
              body: StageBody | None = None) -> StageOutcome:
    """Run one stage unless it is done with the same fingerprint on the same upstream outputs
    (or `force`). Exceptions of the stage propagate; its record then says "failed" with the
    error, and a rerun resumes it (a Train stage continues from its last checkpoint)."""
    fp = fingerprint(cfg, stage)
    record = root.stage_record(stage) or {}
    same = record.get("fingerprint") == fp
    inputs = upstream_attempts(root, stage, cfg)
    # records written before inputs were recorded are taken as built on the current ones
    rebuilt = [s for s, attempt in record.get("inputs", inputs).items() if inputs.get(s) != attempt]
    if not force and same and record.get("status") == "done" and not rebuilt:
        log.info("stage %s: done already (fingerprint %s), skipped", stage, fp)
        return StageOutcome(stage, "skipped", fp, record.get("summary", {}))
    if force or rebuilt or (record and not same):
        if record and not same:
            log.info("stage %s: settings changed (%s -> %s); its old outputs are replaced",
                     stage, record.get("fingerprint"), fp)
        elif rebuilt and not force:
            log.info("stage %s: %s rebuilt since it ran; its old outputs are replaced",
                     stage, ", ".join(rebuilt))
        for folder in REGISTRY[stage].outputs:
            root.child(folder).delete()
    elif same:
        log.info("stage %s: resuming an unfinished run (fingerprint %s)", stage, fp)
    _check_upstream_done(root, stage, cfg)
    with _storage_errors_named(stage):
        root.mark_started(stage, fp)
    started = time.perf_counter()
    log.info("stage %s: running (fingerprint %s)", stage, fp)
    try:
        with stage_progress(stage), _storage_errors_named(stage):
            summary = (body or stage_function(stage))(config_for_stage(cfg, stage), root)
    except Exception as err:
        try:
            root.mark_failed(stage, fp, f"{type(err).__name__}: {err}"[:2000])
        except StorageError as marker_err:  # the store is failing: the stage's error matters
            log.error("stage %s: could not record its failure: %s", stage, marker_err)
        raise
    seconds = time.perf_counter() - started
    # last, one object: a reader sees the stage done only once every output is written
    with _storage_errors_named(stage):
        root.mark_done(stage, fp, summary, seconds, inputs)
    log.info("stage %s: finished in %.1f s", stage, seconds)
    return StageOutcome(stage, "ran", fp, summary, seconds)


def run_pipeline(cfg: Config, stages: list[str] | None = None, force: bool = False,
                 keep_going: bool = False, root: RunRoot | None = None,
                 bodies: Mapping[str, StageBody] | None = None) -> PipelineRun:
    """Run `stages` (default: the config's) in pipeline order under `root` (default: the
    config's run root).

    A stage re-runs when a stage whose outputs it reads ran in this call. When a stage fails,
    the error propagates, unless `keep_going`: then the stages that read its outputs are
    `blocked` (but tolerant ones, the report, still run), the others run, and the failure is in
    the returned outcomes."""
    from diffinf_ray.ray_session import ray_session

    wanted = stages or cfg.stages
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    root = root or open_run_root(cfg)
    root.child("config.yaml").write_bytes(dump_config(cfg).encode())
    outcomes: dict[str, StageOutcome] = {}
    with ray_session(cfg):
        for stage in (s for s in STAGES if s in wanted):
            upstream = upstream_stages(stage, cfg)
            failed = [s for s in STAGES if s in upstream and s in outcomes
                      and outcomes[s].status == "failed"]
            if failed and not REGISTRY[stage].tolerant:
                log.error("stage %s: not run, it reads the outputs of %s", stage, failed[0])
                outcomes[stage] = StageOutcome(stage, "blocked", fingerprint(cfg, stage),
                                               error=RuntimeError(f"needs {failed[0]}"))
                continue
            stale = any(outcomes[s].status == "ran" for s in upstream if s in outcomes)
            try:
                outcomes[stage] = run_stage(cfg, root, stage, force=force or stale,
                                            body=(bodies or {}).get(stage))
            except Exception as err:
                if not keep_going:
                    raise
                log.error("stage %s failed: %s", stage, err)
                outcomes[stage] = StageOutcome(stage, "failed", fingerprint(cfg, stage),
                                               error=err)
    return PipelineRun(outcomes)
