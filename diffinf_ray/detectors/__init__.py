"""Registered label-noise detectors (one line each) and the detection report they share.

To add one: a module with a `Detector` (base.py) and a line in `REGISTERED`.
"""

from __future__ import annotations

import importlib

import numpy as np

from diffinf_ray.detectors.base import Detector

REGISTERED = (
    "diffinf_ray.detectors.tracin:TRACIN",
    "diffinf_ray.detectors.tracin_variants:TRACIN_LAST",
    "diffinf_ray.detectors.tracin_variants:TRACIN_EARLY",
    "diffinf_ray.detectors.loss:LOSS",
    "diffinf_ray.detectors.aum:AUM",
    "diffinf_ray.detectors.cleanlab:CLEANLAB",
    "diffinf_ray.detectors.ekfac:EKFAC",
    "diffinf_ray.detectors.oracle:ORACLE",
)


def _load(path: str) -> Detector:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


DETECTORS: dict[str, Detector] = {d.name: d for d in map(_load, REGISTERED)}


def detectors_of(stage: str) -> list[Detector]:
    """The registered detectors whose scores `stage` computes."""
    return [d for d in DETECTORS.values() if d.stage == stage]


def flagging_detector(name: str) -> Detector:
    """The detector `influence.flag_by` names: one whose score the influence stage computes, or
    one of a stage the influence stage can read first (cleanlab, ekfac: stage_registry's
    `upstream_when`), since the flagged set is the influence stage's output; anything else is a
    ValueError."""
    from diffinf_ray.stage_registry import REGISTRY

    readable = {"influence", *(s for s, _, _ in REGISTRY["influence"].upstream_when)}
    choices = [d.name for d in DETECTORS.values() if d.stage in readable]
    if name not in choices:
        raise ValueError(f"influence.flag_by: {name!r} is not one of {choices} (the detectors "
                         "scored by the influence stage or a stage it can read first)")
    return DETECTORS[name]


def detection_stages() -> list[str]:
    """The stages (run-root folders) holding a detection.json, in registration order."""
    return list(dict.fromkeys(d.stage for d in DETECTORS.values()))


def detection_reports(root, stage: str, tau: float, per_class: bool) -> dict:
    """{detector: detection_report} for the detectors of `stage` against the injected
    corruption, or {"note": why not} when the truth is unknown or one-sided."""
    from diffinf_ray.influence.detection import detection_report

    reports: dict = {}
    for detector in detectors_of(stage):
        rows = detector.scores(root)
        if np.isnan(rows["score"]).all():
            continue  # not scored in this run (tracin_early without per-epoch val figures)
        known = np.array([v is not None for v in rows["is_corrupted"]])
        if not known.all():
            return {"note": "is_corrupted unknown for some rows (no injected noise); "
                            "detection not measured"}
        truth = rows["is_corrupted"].astype(bool)
        if truth.all() or not truth.any():
            return {"note": f"{int(truth.sum())} of {truth.size} training labels corrupted; "
                            "detection needs both corrupted and clean rows"}
        reports[detector.name] = detection_report(rows["score"], truth, tau=tau,
                                                  labels=rows["label"], per_class=per_class)
    return reports


def read_detection(root) -> dict:
    """{detector: report} from every detection.json of a run root (missing ones skipped)."""
    found: dict = {}
    for stage in detection_stages():
        loc = root.child(stage, "detection.json")
        if loc.exists():
            found.update({k: v for k, v in loc.read_json().items() if isinstance(v, dict)})
    return found
