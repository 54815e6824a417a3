"""A sweep trial's run root: the folders of the stages it shares with the base run are read
from there, everything else (and every stage marker) is the trial's own."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from diffinf_ray.config import STAGES, Config
from diffinf_ray.pipeline import is_done
from diffinf_ray.run_root import RunRoot
from diffinf_ray.stage_registry import REGISTRY
from diffinf_ray.storage import Location, StorageOptions


@dataclass(frozen=True)
class SharedStorageOptions(StorageOptions):
    """Storage options of a sweep trial's root, carrying its routing (the root travels
    pickled to Ray Data actors, the edit stage's, and routes the same way there)."""

    trial_uri: str = ""
    base_uri: str = ""
    shared_stages: tuple[str, ...] = ()


class SharedRunRoot(RunRoot):
    """A sweep trial's run root. `child(folder)` of a folder owned by a shared stage (one whose
    base-run marker is done with the fingerprint the trial config gives it) resolves to the
    base run root; every other folder, and every stage marker, is the trial's own.
    `stage_record` of a shared stage is the base run's, so `run_stage` skips it."""

    def __init__(self, uri: str, options: SharedStorageOptions):
        super().__init__(uri, options)
        self.shared_base = RunRoot(options.base_uri, StorageOptions(
            options.endpoint_override, options.region, options.max_attempts))
        self.shared_stages = frozenset(options.shared_stages)
        self._routes = {folder for stage in self.shared_stages
                        for folder in REGISTRY[stage].outputs}

    @classmethod
    def for_trial(cls, base: RunRoot, trial_uri: str, cfg: Config,
                  exclude: Iterable[str] = ()) -> SharedRunRoot:
        """The trial root at `trial_uri` for config `cfg`, sharing with `base` every stage
        (but `exclude`) that base has done with the same fingerprint."""
        shared = [s for s in STAGES if s not in exclude and is_done(base, cfg, s)]
        trial = Location(trial_uri, base.options)
        options = SharedStorageOptions(
            base.options.endpoint_override, base.options.region, base.options.max_attempts,
            trial_uri=trial.uri,
            base_uri=base.base.uri, shared_stages=tuple(shared))
        return cls(trial.uri, options)

    def child(self, *parts: str) -> Location:
        if parts and parts[0] in self._routes:
            return self.shared_base.child(*parts)
        return self.base.child(*parts)

    def stage_record(self, stage: str) -> dict | None:
        if stage in self.shared_stages:
            return self.shared_base.stage_record(stage)
        return super().stage_record(stage)

    def _own(self, stage: str) -> None:
        if stage in self.shared_stages:
            raise RuntimeError(f"stage {stage} is shared with the base run "
                               f"{self.shared_base}; a trial must not rerun it")

    def mark_started(self, stage: str, fingerprint: str) -> None:
        self._own(stage)
        super().mark_started(stage, fingerprint)

    def mark_done(self, stage: str, fingerprint: str, summary: dict, seconds: float,
                  inputs: dict | None = None) -> None:
        self._own(stage)
        super().mark_done(stage, fingerprint, summary, seconds, inputs)

    def mark_failed(self, stage: str, fingerprint: str, error: str) -> None:
        self._own(stage)
        super().mark_failed(stage, fingerprint, error)


