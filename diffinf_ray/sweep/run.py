"""Running a sweep: the shared stages once, then the Tune experiment (new or restored), then
the results."""

from __future__ import annotations

import logging
import posixpath

from diffinf_ray.config import ConfigError
from diffinf_ray.sweep.plan import EXPERIMENT, TRIALS, SweepPlan
from diffinf_ray.sweep.spec import SweepConfig
from diffinf_ray.sweep.table import write_results
from diffinf_ray.sweep.trial import run_trial

log = logging.getLogger(__name__)

def _trial_dirname(trial) -> str:
    return trial.trial_id  # params in folder names get long; results.csv lists them


def _check_same_sweep(plan: SweepPlan, restoring: bool) -> None:
    marker = plan.root.child("sweep.json")
    if restoring and marker.exists():
        before = marker.read_json()
        if before != plan.identity():
            raise ConfigError(
                f"{plan.root.display} holds a sweep started with other settings (params, "
                "scheduler, objective or base fingerprints differ); Tune cannot change a "
                "search space on restore. Use --no-restore to start over, or another name")
    else:
        marker.write_json(plan.identity())


def _clear(plan: SweepPlan) -> None:
    for name in (EXPERIMENT, TRIALS, "results.csv", "best.json", "sweep.json"):
        plan.root.child(name).delete()
    for path in plan.root.list_files(".png"):
        if posixpath.basename(path).startswith("objective_vs_"):
            plan.root.child(posixpath.basename(path)).delete()


def search_algorithm(spec: SweepConfig):
    """Tune's random/grid search: `points_to_evaluate` first, then seeded samples."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(
        points_to_evaluate=[dict(p) for p in spec.points_to_evaluate] or None,
        max_concurrent=spec.max_concurrent_trials, random_state=spec.seed)


def build_tuner(plan: SweepPlan, restore: bool = True, callbacks: list | None = None):
    """A Tuner for the sweep: restored from the sweep root's experiment when there is one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = plan.spec
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=plan.trial_setup()),
                                    {"cpu": spec.trial_cpus})
    fs = {} if plan.root.is_local else {"storage_filesystem": plan.root.fs}
    if restore and tune.Tuner.can_restore(plan.experiment.path, **fs):
        log.info("sweep: restoring the Tune experiment at %s", plan.experiment.display)
        return tune.Tuner.restore(plan.experiment.path, trainable, resume_unfinished=True,
                                  resume_errored=True, **fs)
    if spec.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=plan.max_reports,
                                  grace_period=min(spec.scheduler.grace_period, plan.max_reports),
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=plan.param_space(),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
            scheduler=scheduler, trial_dirname_creator=_trial_dirname,
            search_alg=search_algorithm(spec)),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=plan.root.path, callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures), **fs),
    )


def check_trial_resources(plan: SweepPlan, cluster_cpus: float) -> None:
    """Concurrent trials must leave a whole CPU for Ray Data's read tasks (each asks for 1):
    otherwise the objective's Train run waits forever for its first block (RAY_NOTES 2.7)."""
    spec, train = plan.spec, plan.base.train
    per_trial = spec.trial_cpus + train.num_workers * train.cpus_per_worker
    held = spec.max_concurrent_trials * per_trial
    if cluster_cpus - held < 1:
        raise ConfigError(
            f"{plan.source}: {spec.max_concurrent_trials} trial(s) x (trial_cpus "
            f"{spec.trial_cpus} + {train.num_workers} Train worker(s) x train.cpus_per_worker "
            f"{train.cpus_per_worker}) hold {held:g} of the cluster's {cluster_cpus:g} CPUs, "
            "leaving less than 1 for Ray Data's read tasks: the trials would hang. Lower "
            "max_concurrent_trials, trial_cpus or train.cpus_per_worker (e.g. "
            "`overrides: [train.cpus_per_worker=0.5]`: it does not change any stage's "
            "fingerprint), or add CPUs")


def run_sweep(plan: SweepPlan, restore: bool = True, callbacks: list | None = None) -> dict:
    """Run (or resume) the sweep: the shared stages once, then the Tune experiment; write
    results.csv, best.json and the plots. Returns the summary `write_results` gives.

    `callbacks`: extra Tune callbacks (loggers) for a new experiment; a restored one keeps
    those it was started with."""
    from diffinf_ray.pipeline import run_pipeline
    from diffinf_ray.ray_session import ray_session

    if not restore:
        log.info("sweep: --no-restore, deleting %s", plan.root.display)
        _clear(plan)
    restoring = plan.experiment.child("tuner.pkl").exists()
    _check_same_sweep(plan, restoring)
    with ray_session(plan.base):
        import ray

        check_trial_resources(plan, ray.cluster_resources().get("CPU", 0.0))
        if plan.shared:
            log.info("sweep: shared stages %s in the base run root %s", plan.shared,
                     plan.base_root)
            run_pipeline(plan.base, stages=plan.shared)
        grid = build_tuner(plan, restore, callbacks).fit()
        return write_results(plan, grid)


