"""`diffinf experiment CONFIG`: the Table-1 runner (METHOD.md, "The paper's Table 1").

For each task (e.g. age 3-class at 30% noise, expression 4-class at 20%) and each seed, one
pipeline run trains every method on the same noisy labels (the base config's stages: noisy
baseline, removal, the noisy-label baselines, DiffInf's edit + retrain, ...); optionally a
clean-label ceiling run and noisy-baseline runs at other noise rates. Then the per-run metrics
are aggregated into one Table-1-shaped result.

Experiment YAML (ExperimentConfig; an unknown key is an error naming it):

    name: table1
    root: ./runs/table1             # local folder or s3://bucket/prefix (relative: to the cwd)
    base: diffinf_age32.yaml        # pipeline config; relative: to this file's folder
    seeds: [0, 1, 2]                # each sets run.seed and the keys of `seed_keys`
    seed_keys: [noise.seed]         # (default) so each seed also draws its own label noise
    tasks:                          # per task, dotted overrides on top of the base
      age: {data.task: age, noise.rate: 0.3}
      expression: {data.task: expression, noise.rate: 0.2}
    overrides: {train.epochs: 10}   # on every run, before the task's
    # overrides (and each task's) map dotted keys to values, as in sweep files; a list of
    # key=value strings ([train.epochs=10]) is read as the same mapping
    stages: [ingest, noise, ...]    # what each task run executes
    clean_ceiling: true             # + per task and seed: noise.rate=0, ingest..evaluate
    noise_rates: [0.1, 0.4]         # + per task, rate and seed: noisy baseline only
    ledger: benchmarks/ledger       # optional: the results ledger (below)

Runs (`plan`, deterministic: seed, then task, then methods / clean / noisy_<rate>):
    <root>/<task>/methods/seed_<s>     the task's noise rate, `stages`
    <root>/<task>/clean/seed_<s>       noise.rate=0; ingest, noise, train, evaluate
    <root>/<task>/noisy_<rate>/seed_<s>  noise.rate=<rate>; ingest, noise, train, evaluate
Each is a normal pipeline run (`run_pipeline`), so finished stages are skipped by fingerprint
and repeating the command resumes. A failing stage is recorded with its error; the stages that
do not read its outputs still run (`report` always does: it shows what exists), then the next
run starts. Progress: <root>/experiment.json {"runs": {run_id: {status, stages_ran, errors,
...}}}.

With `ledger` (experiment/held.py): a run that the ledger already holds (a record of its seed
whose every stage has the fingerprint the run's config gives it now) is not run again, and the
table takes its figures from the record; every run that finishes is recorded there. Table
cells that include a record of another commit than the checkout's are marked † and the
table names those commits: Table 1 accumulates across sessions and machines without any row
passing for fresher than the code that produced it.

Out (`write_table`), under <root>/table/:
    table.md, table.csv, table.html  rows: noisy, Small-loss, ELR+, removal, DiffInf,
        ProSelfLC, ProMix (the paper's), any other condition measured (a registered method,
        labelled as in baselines/registry.py), clean ceiling; per task: accuracy (%), AUROC (x100), linear kappa,
        ECE of the last epoch's model (the paper's protocol) and accuracy (%) of the
        best-validation checkpoint, as "mean ± std (n=seeds)" (sample std, ddof=1); "-" where
        nothing was measured.
        A second table: per task and condition, accuracy and its paired differences against
        the noisy classifier and against removal (same seed), each "mean [95% t interval]
        (n=seeds)"; a third: per-class LPIPS of the edits (mean ± std over seeds of the
        per-seed class means). The HTML embeds its images (base64): one self-contained file.
    metrics_long.csv   one row per (task, run, condition, seed): the numbers behind the table
    paired.csv         per (metric, task, condition, vs): n, mean, std, lo, hi of the
                       accuracy and of the best-validation accuracy (vs
                       empty) and of its paired differences (aggregate.condition_intervals)
    lpips_long.csv     one row per (task, seed, class)
    plots/detection_curves.png    precision@k per detector (influence/ and cleanlab/
                                  detection.json), k as a fraction of the training split,
                                  mean ± std over seeds
    plots/treatments_<task>[_best_val].png   (last epoch; best-validation checkpoint)
                                  accuracy per condition and its paired differences against
                                  noisy and against removal, with their 95% t intervals
    plots/accuracy_vs_noise.png   noisy baseline per noise rate (0 = the clean ceiling), and
                                  DiffInf / removal at the task's rate
    grids/<task>_grid_<class>.png the before/after edit grids of the first seed's report

Modules: spec (the file's schema, conditions, metrics), plan (runs and their configs), run
(executing them), aggregate (their outputs in long form), table and plots (the files under
<root>/table/), command (`diffinf experiment`).
"""

from diffinf_ray.experiment.aggregate import aggregate, aggregate_detection, aggregate_lpips
from diffinf_ray.experiment.command import main, run_command
from diffinf_ray.experiment.plan import Run, experiment_location, load_experiment, plan
from diffinf_ray.experiment.plots import accuracy_vs_noise_png, detection_curves_png
from diffinf_ray.experiment.run import ExperimentResult, RunOutcome, execute_run, run_experiment
from diffinf_ray.experiment.spec import (
    BASELINE_STAGES,
    CONDITIONS,
    DEFAULT_STAGES,
    METRICS,
    ExperimentConfig,
)
from diffinf_ray.experiment.table import (
    format_lpips_table,
    format_table,
    mean_std_cell,
    write_table,
)

__all__ = [
    "BASELINE_STAGES", "CONDITIONS", "DEFAULT_STAGES", "METRICS", "ExperimentConfig",
    "ExperimentResult", "Run", "RunOutcome", "accuracy_vs_noise_png", "aggregate",
    "aggregate_detection", "aggregate_lpips", "detection_curves_png", "execute_run",
    "experiment_location", "format_lpips_table", "format_table", "load_experiment", "main",
    "mean_std_cell", "plan", "run_command", "run_experiment", "write_table",
]
