"""`diffinf run`: the configured stages in order, each skipped when its outputs already exist
for the same config fingerprint (config.fingerprint), so a crashed or extended run resumes.

A stage whose fingerprint changed is run again, and so is every stage that reads its outputs.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable

from diffinf_ray.config import STAGES, Config, dump_config, fingerprint, upstream_stages
from diffinf_ray.run_root import RunRoot
from diffinf_ray.storage import StorageOptions

log = logging.getLogger(__name__)


# Each stage's entry point `run_<stage>(cfg, root) -> summary`, imported when the stage runs
# (the driver then only loads torch, cleanlab, diffusers... for the stages it needs).
STAGE_FUNCTIONS = {
    "ingest": "diffinf_ray.stages.ingest:run_ingest",
    "noise": "diffinf_ray.stages.noise:run_noise",
    "train": "diffinf_ray.stages.train:run_train",
    "evaluate": "diffinf_ray.stages.evaluate:run_evaluate",
    "influence": "diffinf_ray.stages.influence:run_influence",
    "cleanlab": "diffinf_ray.stages.detectors:run_cleanlab",
    "removal": "diffinf_ray.stages.detectors:run_removal",
    "baselines": "diffinf_ray.stages.baselines:run_baselines",
    "autoencoder": "diffinf_ray.stages.autoencoder:run_autoencoder",
    "predictor": "diffinf_ray.stages.predictor:run_predictor",
    "lossnets": "diffinf_ray.stages.lossnets:run_lossnets",
    "edit": "diffinf_ray.stages.edit:run_edit",
    "refine": "diffinf_ray.stages.refine:run_refine",
    "retrain": "diffinf_ray.stages.refine:run_retrain",
    "judges": "diffinf_ray.stages.oracle:run_judges",
    "oracle": "diffinf_ray.stages.oracle:run_oracle",
    "report": "diffinf_ray.stages.report:run_report",
}


def stage_function(stage: str) -> Callable[[Config, RunRoot], dict]:
    module, _, name = STAGE_FUNCTIONS[stage].partition(":")
    return getattr(importlib.import_module(module), name)


# What a stage owns under the run root: cleared before it runs with a new fingerprint.
STAGE_OUTPUTS = {
    "ingest": ("manifest", "quarantine"),
    "noise": ("manifest_noisy",),
    "train": ("checkpoints",),
    "evaluate": ("evaluation",),
    "influence": ("influence",),
    "cleanlab": ("cleanlab",),
    "removal": ("removal",),
    "baselines": ("baselines",),
    "autoencoder": ("autoencoder",),
    "predictor": ("predictor",),
    "lossnets": ("lossnets",),
    "edit": ("edits",),
    "refine": ("refined",),
    "retrain": ("retrain",),
    "judges": ("judges",),
    "oracle": ("oracle",),
    "report": ("report",),
}


def open_run_root(cfg: Config) -> RunRoot:
    return RunRoot(cfg.run.root, StorageOptions(cfg.storage.endpoint_override, cfg.storage.region))


def run_stage(cfg: Config, root: RunRoot, stage: str, force: bool = False) -> tuple[dict, bool]:
    """Run one stage unless done with the same fingerprint. Returns (summary, ran)."""
    fp = fingerprint(cfg, stage)
    record = root.stage_record(stage) or {}
    same = record.get("fingerprint") == fp
    if not force and same and record.get("status") == "done":
        log.info("stage %s: done already (fingerprint %s), skipped", stage, fp)
        return record.get("summary", {}), False
    if force or (record and not same):
        if record and not same:
            log.info("stage %s: settings changed (%s -> %s); its old outputs are replaced",
                     stage, record.get("fingerprint"), fp)
        for folder in STAGE_OUTPUTS[stage]:
            root.child(folder).delete()
    elif same:
        log.info("stage %s: resuming an unfinished run (fingerprint %s)", stage, fp)
    root.mark_started(stage, fp)
    started = time.perf_counter()
    log.info("stage %s: running (fingerprint %s)", stage, fp)
    summary = stage_function(stage)(cfg, root)
    seconds = time.perf_counter() - started
    root.mark_done(stage, fp, summary, seconds)
    log.info("stage %s: finished in %.1f s", stage, seconds)
    return summary, True


def run_pipeline(cfg: Config, stages: list[str] | None = None, force: bool = False) -> dict:
    """Run `stages` (default: the config's) in pipeline order; returns {stage: summary}."""
    from diffinf_ray.ray_session import ray_session

    wanted = stages or cfg.stages
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    root = open_run_root(cfg)
    root.child("config.yaml").write_bytes(dump_config(cfg).encode())
    results: dict = {}
    ran: set[str] = set()
    with ray_session(cfg):
        for stage in STAGES:
            if stage not in wanted:
                continue
            # a stage re-runs when something it reads was just rebuilt
            stale = bool(ran & upstream_stages(stage))
            summary, did_run = run_stage(cfg, root, stage, force=force or stale)
            if did_run:
                ran.add(stage)
            results[stage] = summary
    return results
