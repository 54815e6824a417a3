"""`diffinf sweep CONFIG`: a Ray Tune sweep over settings of the method (the edit loss weights
w_id, w_reg, w_si; the high-influence fraction tau; the noise rate), scored by the clean
validation accuracy of the classifier trained at the end of the pipeline.

Sweep file (SweepConfig; `base` is relative to the sweep file's folder, `root` like run.root):

    base: diffinf_age32.yaml              # the pipeline config every trial starts from
    overrides: {train.epochs: 6}          # dotted keys applied to the base (as `diffinf run`;
                                          #   a list [train.epochs=6] is read the same)
    params:                               # dotted config keys -> one search space each
      edit.w_id: {loguniform: [0.1, 10]}  #   uniform | loguniform: [lo, hi]
      influence.tau: {choice: [0.05, 0.1, 0.2]}   # choice | grid: [values]
    objective_stage: retrain              # or removal (train without the flagged set)
    metric: val_accuracy                  # of the objective stage's classifier; mode max
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
    epochs_per_report: 2                  # one Tune report (an ASHA rung) per chunk of epochs
    points_to_evaluate:                   # optional: tried first (each replaces one sample)
      - {edit.w_id: 1.0}                  #   e.g. the base's own values, as a reference

Shared work. A trial's config is base + overrides + its sampled values. The stages whose
fingerprint (config.fingerprint) is the same for every value a param can take run once, before
any trial, in the base config's run root; each trial reads their outputs from there through a
`SharedRunRoot` and runs only the stages downstream of the swept sections, under
`<sweep root>/trials/<trial_id>/` (stage markers `stages/<stage>.json` always in the trial).
Sweeping `edit.*` shares ingest, noise, train (the baseline classifier), influence, the
autoencoder, predictor and loss networks; `influence.tau` also reruns TracIn scoring per trial
(tau is part of the influence stage's settings); `noise.rate` necessarily reruns everything
from the noise stage on (the labels change), so only ingest is shared. The shared stages run
in the base run root after `overrides`: if the overrides change their settings, that run's
stages are rebuilt as `diffinf run BASE overrides` would (set `run.root` in `overrides` to
keep an existing run untouched).

Objective. The objective stage's classifier (`retrain`: on the refined set; `removal`: on the
noisy set minus the high-influence rows) is trained in chunks of `epochs_per_report` epochs,
each chunk a Ray Train run that resumes the previous one from its checkpoints; after each
chunk the trial reports `val_accuracy` (also val_loss, train_*) with `tune.report`. Tune's
function trainables report synchronously, so ASHA can only stop a trial while it waits in
`tune.report`, between Train runs, never while a Train worker group is alive (RAY_NOTES 3.2:
stopping a trial mid-Train leaks the Train placement groups). After the last chunk the
classifier is evaluated on the clean test split and `test_accuracy` is reported (not the
objective). A cosine learning-rate schedule depends on `train.epochs`, so with one the
objective trains in a single chunk.

Out, under the sweep root (default `<base run.root>/sweeps/<name>`; local or s3://):
    tune/                       the Tune experiment (Tuner.restore resumes it)
    trials/<trial_id>/          each trial's run root (its own stages, config.yaml)
    results.csv                 one row per trial: trial_id, status, params, the objective,
                                test_accuracy, epochs, trial_root (best first)
    best.json                   the best finished trial and the overrides that reproduce it
    objective_vs_<param>.png    the objective against each swept key
    sweep.json                  what the experiment was started with (a restore must match)

Resume: running the same sweep again restores the Tune experiment (`Tuner.restore`,
unfinished and errored trials resumed, finished ones kept); `--no-restore` deletes the
experiment and its trials and starts over.

Modules: spec (the sweep file's schema and search spaces), plan (shared and per-trial stages),
trial_root (a trial's run root reading the shared stages' outputs), trial (the Tune trainable),
run (the Tune driver), table (results.csv, best.json, plots), command (`diffinf sweep`).
"""

from diffinf_ray.sweep.command import describe, main, run_command
from diffinf_ray.sweep.plan import SweepPlan, TrialSetup, affected_stages, load_sweep
from diffinf_ray.sweep.run import build_tuner, check_trial_resources, run_sweep, search_algorithm
from diffinf_ray.sweep.spec import Choice, Grid, LogUniform, SweepConfig, Uniform
from diffinf_ray.sweep.table import plot_objective, write_results
from diffinf_ray.sweep.trial import run_trial, train_objective
from diffinf_ray.sweep.trial_root import SharedRunRoot, SharedStorageOptions

__all__ = [
    "Choice", "Grid", "LogUniform", "SharedRunRoot", "SharedStorageOptions", "SweepConfig",
    "SweepPlan", "TrialSetup", "Uniform", "affected_stages", "build_tuner",
    "check_trial_resources", "describe", "load_sweep", "main", "plot_objective", "run_command",
    "run_sweep", "run_trial", "search_algorithm", "train_objective", "write_results",
]
