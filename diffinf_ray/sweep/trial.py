"""A sweep trial (the Tune function trainable): the stages its values affect through the
pipeline, then the objective stage trained in chunks with a Tune report after each (package
docstring, "Objective")."""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path

from diffinf_ray.config import Config, override_config
from diffinf_ray.pipeline import run_pipeline
from diffinf_ray.run_root import RunRoot
from diffinf_ray.storage import Location
from diffinf_ray.sweep.plan import TrialSetup, reports_per_trial
from diffinf_ray.sweep.spec import OBJECTIVE_METRICS
from diffinf_ray.sweep.trial_root import SharedRunRoot


def _objective_inputs(stage: str, root: RunRoot) -> tuple[Location, frozenset | None, dict]:
    """(manifest to train on, rows to leave out, extra metrics) of the objective stage, as
    stages/refine.py:run_retrain and stages/detectors.py:run_removal train."""
    if stage == "retrain":
        from diffinf_ray.stages.refine import REFINED

        return root.child(REFINED), None, {}
    from diffinf_ray.artifacts import high_influence_ids

    flagged = high_influence_ids(root)
    return root.noisy_manifest, flagged, {"removed_rows": len(flagged)}


def _reported_epoch() -> int:
    """The epoch of this trial's last Tune checkpoint (a restored or retried trial)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        return int(json.loads((Path(d) / "progress.json").read_text())["epoch"])


def _report(metrics: dict) -> None:
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "progress.json").write_text(json.dumps({"epoch": metrics["epoch"]}))
        # Blocks until Tune asks for the next result; a scheduler stop ends the trial here.
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def train_objective(cfg: Config, root: RunRoot, setup: TrialSetup) -> dict:
    """The objective stage's work in chunks of epochs, a Tune report after each but the last
    (module docstring); the pipeline's `run_stage` runs it in place of the stage's own."""
    from diffinf_ray.models.evaluation import evaluate_checkpoints
    from diffinf_ray.models.training import train_classifier

    stage = setup.objective_stage
    manifest, exclude_ids, extra = _objective_inputs(stage, root)
    out = root.child(stage)
    base_metrics = {"trial_root": root.display, "epochs": cfg.train.epochs}
    done_epoch = _reported_epoch()
    ends = reports_per_trial(cfg.train.epochs, setup.epochs_per_report, cfg.train.lr_schedule)
    metrics: dict = {}
    for end in ends:
        if end <= done_epoch and end != ends[-1]:
            continue
        chunk = cfg.model_copy(deep=True)
        chunk.train.epochs = end
        # A Train run on the same checkpoints folder resumes after its latest epoch.
        trained = train_classifier(chunk, manifest, out.child("checkpoints"),
                                   len(cfg.class_names), exclude_ids=exclude_ids, tag="retrain")
        metrics = {k: float(trained[k]) for k in OBJECTIVE_METRICS if k in trained}
        if end != ends[-1]:
            _report({**base_metrics, **metrics, "epoch": end})
    evaluation = evaluate_checkpoints(cfg, manifest, out.child("checkpoints"),
                                      out.child("evaluation"), extra=extra)
    return {**evaluation, **metrics}


def run_trial(params: dict, setup: TrialSetup) -> None:
    """Tune function trainable: the stages this trial's values affect, then the objective;
    the stages it shares with the base run are skipped (done there with the same
    fingerprint). The final report follows the objective's stage record, so a trial restored
    after it finished reports the same result again."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    base = RunRoot(setup.base_uri, setup.storage)
    trial_uri = Location(setup.trials_uri, setup.storage).child(trial_id).uri
    cfg = override_config(Config.model_validate(setup.base_config),
                          {**params, "run.root": trial_uri}, f"trial {trial_id}")
    root = SharedRunRoot.for_trial(base, trial_uri, cfg, exclude={setup.objective_stage})
    objective = setup.objective_stage
    run = run_pipeline(cfg, stages=list(setup.stages), root=root,
                       bodies={objective: partial(train_objective, setup=setup)})
    summary = run[objective]
    _report({"trial_root": root.display, "epochs": cfg.train.epochs,
             **{k: summary[k] for k in OBJECTIVE_METRICS if k in summary},
             "epoch": cfg.train.epochs, "test_accuracy": float(summary["accuracy"])})

