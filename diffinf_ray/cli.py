"""The `diffinf` command.

    diffinf run CONFIG [key=value ...] [--force] [--keep-going]  all configured stages, resumable
    diffinf stage NAME CONFIG [key=value ...]          one stage (config.STAGES)
    diffinf config CONFIG [key=value ...]              the validated config and stage fingerprints
    diffinf experiment CONFIG [--task T] [--dry-run]   the Table-1 comparison over tasks and seeds
    diffinf sweep CONFIG [key=value ...] [--no-restore] [--dry-run]
                                                       a Ray Tune sweep of edit weights, tau, noise
    diffinf diagnose-labels CONFIG [key=value ...] [--images N] [--scales 1 3 5] [--depths full 5]
                                                       does the autoencoder's label path carry
                                                       the attribute? (the judges' oracle decides)
    diffinf status RUN_ROOT [CONFIG [key=value ...]]   each stage's status, fingerprint, finish
                                                       and wall time; with a config, which
                                                       stages would re-run and why
    diffinf record CONFIG [key=value ...] [--ledger DIR]  add the finished run's results to the
                                                       results ledger (benchmarks/ledger/)
    diffinf ledger [--ledger DIR] [--a diffinf] [--b removal] [--metric accuracy] [--html FILE]
                   [--factorial] [--commit PREFIX]     paired differences over the ledger's seeds;
                                                       the detector x treatment table
    diffinf fairness CONFIG [key=value ...] [--dry-run]  ERM / reweighting / Group-DRO over
                                                       bias severities and seeds; table, plot
    diffinf synthfaces-preview --task age --out grid.png

Every command's arguments are defined here (`diffinf COMMAND --help`); the jobs/ recipes reuse
them with the config given as `--config`. `run`, `stage`, `experiment` and `sweep` hold their
run root's lease while they run, taken before Ray starts (one writer per run root:
diffinf_ray/run_lease.py; `--break-lease` takes over a lease whose holder is known to be gone).
Errors print as one message (the file, key or row at fault), not a Ray traceback; `--debug`
shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from diffinf_ray.config import STAGES, ConfigError, dump_config, fingerprint, load_config


def _root_cause(err: BaseException) -> BaseException:
    """The innermost meaningful exception behind Ray's wrappers (task/actor/training errors)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if inner is None:
            worker_errors = getattr(err, "worker_failures", None)
            if isinstance(worker_errors, dict) and worker_errors:
                inner = next(iter(worker_errors.values()))
        if not isinstance(inner, BaseException):
            break
        err = inner
    return err


def format_error(err: BaseException) -> str:
    """An exception (unwrapped from Ray's wrappers) as the one line the CLIs print."""
    from diffinf_ray.run_lease import LeaseHeldError  # here: it imports pyarrow

    cause = _root_cause(err)
    text = str(cause).strip() or type(cause).__name__
    # Ray prefixes task errors with a traceback dump; keep the last line, which is the message.
    if "Traceback (most recent call last)" in text:
        text = text.strip().splitlines()[-1]
    if isinstance(cause, ConfigError | LeaseHeldError):
        return text
    return f"{type(cause).__name__}: {text}"


def _print_metrics(results: dict) -> None:
    named = [("trained on assigned labels", results.get("evaluate")),
             ("self-influence removal", results.get("removal")),
             ("oracle relabel (control)", results.get("relabel"))]
    named += [(method, m) for method, m in (results.get("baselines") or {}).items()
              if isinstance(m, dict) and "accuracy" in m]
    named.append(("DiffInf (refined, retrained)", results.get("retrain")))
    rows = [(name, m) for name, m in named if m]
    if rows:
        print("\nclean test split:")
        print(f"  {'':<28} {'acc %':>7} {'AUROC':>7} {'kappa':>7} {'ECE':>7}")
        for name, m in rows:
            auroc = m.get("auroc_macro_ovr")
            print(f"  {name:<28} {m['accuracy']:7.2f} "
                  f"{(f'{auroc:7.2f}' if auroc is not None else '    n/a')} "
                  f"{m['kappa_linear']:7.3f} {m['ece']:7.4f}")
        per_class = rows[0][1]["per_class_accuracy"]
        print("  per class (" + rows[0][0] + "): " + ", ".join(
            f"{k} {v:.1f}%" if v is not None else f"{k} n/a" for k, v in per_class.items()))
        groups = rows[0][1].get("per_group_accuracy", {})
        if groups:
            print("  per group: " + ", ".join(f"{k} {v:.1f}%" for k, v in groups.items()))
    from diffinf_ray.detectors import detection_stages

    detectors = {k: v for stage in detection_stages() for k, v in results.get(stage, {}).items()}
    found = {k: v for k, v in detectors.items() if isinstance(v, dict) and "auroc" in v}
    if found:
        print("\nlabel-noise detection (top tau flagged vs injected corruption):")
        width = max(len(name) for name in found)
        for name, rep in found.items():
            # cleanlab's own precision/recall are of find_label_issues' set: its top tau's here
            precision = rep.get("top_tau_precision", rep["precision"])
            recall = rep.get("top_tau_recall", rep["recall"])
            print(f"  {name:<{width}}  precision {precision:.3f}  recall {recall:.3f}  "
                  f"AUROC {rep['auroc']:.3f}")


def _cmd_run(args) -> int:
    from diffinf_ray.pipeline import open_run_root, run_pipeline
    from diffinf_ray.run_lease import run_leases

    cfg = load_config(args.config, args.overrides)
    stages = [args.name] if getattr(args, "name", None) else None
    with run_leases([open_run_root(cfg).base], args.break_lease):
        results = run_pipeline(cfg, stages=stages, force=args.force,
                               keep_going=args.keep_going)
    _print_metrics(results)
    print(f"\nrun root: {open_run_root(cfg)}")
    for stage, outcome in results.outcomes.items():
        if outcome.status in ("failed", "blocked"):
            print(f"stage {stage} {outcome.status}: {format_error(outcome.error)}",
                  file=sys.stderr)
    return 1 if results.failed else 0


def _cmd_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg))
    for stage in STAGES:
        print(f"# fingerprint {stage}: {fingerprint(cfg, stage)}")
    return 0


def _cmd_preview(args) -> int:
    from pathlib import Path

    from diffinf_ray.data.synthfaces import SynthFacesSpec, preview_grid

    spec = SynthFacesSpec(task=args.task, resolution=args.resolution, seed=args.seed,
                          expression_gain=args.expression_gain)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(preview_grid(spec, per_class=args.per_class))
    print(f"wrote {args.out}")
    return 0


def _cmd_diagnose_labels(args) -> int:
    from diffinf_ray.diffae.label_sensitivity import format_label_sensitivity
    from diffinf_ray.label_diagnostic import run_label_diagnostic

    cfg = load_config(args.config, args.overrides)
    depths = [None if d == "full" else int(d) for d in args.depths]
    result = run_label_diagnostic(cfg, images=args.images, scales=args.scales, depths=depths,
                                  steps=args.steps)
    print(format_label_sensitivity(result, result["class_names"]))
    print(f"\nwritten to {result['written_to']}")
    print("what the oracle was shown (original | null-label reconstruction | each class per "
          "scale): " + ", ".join(result["grids"]))
    return 0


def _cmd_record(args) -> int:
    from diffinf_ray.ledger import run_record, write_record
    from diffinf_ray.pipeline import open_run_root

    cfg = load_config(args.config, args.overrides)
    record = run_record(cfg, open_run_root(cfg))
    if record.get("dirty"):
        print("warning: the checkout has uncommitted changes; the record names commit "
              f"{record['commit']}, which is not exactly the code that ran", file=sys.stderr)
    path = write_record(record, args.ledger)
    conditions = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in record["metrics"].items())
    print(f"wrote {path} ({len(record['stages'])} stages; accuracy: {conditions or 'none'})")
    return 0


def _cmd_ledger(args) -> int:
    from diffinf_ray.ledger import (
        format_paired,
        git_commit,
        paired_differences,
        paired_html,
        read_ledger,
    )

    records = read_ledger(args.ledger)
    print(f"{len(records)} records in {args.ledger}\n")
    if args.factorial:
        from diffinf_ray.ledger_factorial import (
            detection_rows,
            factorial_cells,
            format_detection,
            format_factorial,
        )

        print(format_factorial(factorial_cells(records, args.metric, args.commit), args.metric))
        print()
        print(format_detection(detection_rows(records, args.commit)))
        return 0
    if args.commit:
        records = [r for r in records if str(r.get("commit", "")).startswith(args.commit)]
    rows = paired_differences(records, args.a, args.b, args.metric,
                              head=git_commit()["commit"])
    print(format_paired(rows, args.a, args.b, args.metric))
    if args.html:
        from pathlib import Path

        note = (f"{len(records)} records in {args.ledger}; stale records: from another commit "
                "than the checkout's.")
        html_path = Path(args.html)
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(paired_html(rows, args.a, args.b, args.metric, note))
        print(f"\nwritten to {html_path}")
    return 0


def _cmd_status(args) -> int:
    from diffinf_ray.run_status import status_command

    print(status_command(args.root, args.config, args.overrides))
    return 0


def _cmd_experiment(args) -> int:
    from diffinf_ray.experiment import experiment_location, load_experiment, run_command
    from diffinf_ray.run_lease import run_leases

    roots = [] if args.dry_run else [experiment_location(load_experiment(args.config))]
    with run_leases(roots, args.break_lease):
        return run_command(args)


def _cmd_fairness(args) -> int:
    from diffinf_ray.fairness.runner import run_command

    return run_command(args)


def _cmd_sweep(args) -> int:
    from diffinf_ray.run_lease import run_leases
    from diffinf_ray.sweep import load_sweep, run_command

    # the driver leases the base run root (the shared stages) and the sweep root; its Tune
    # trials write under them on its behalf
    plan = None if args.dry_run else load_sweep(args.config, args.overrides)
    with run_leases([plan.base_root.base, plan.root] if plan else [], args.break_lease):
        return run_command(args)


# -- the arguments of each command: here, so `diffinf --help` imports no command's module -------
# Each adder takes `config`: the config file's argument ("config" positional, or "--config" for
# the jobs/ recipes, which `ray job submit` runs with the same options).

def _config_argument(parser, config: str, help_text: str) -> None:
    if config.startswith("--"):
        parser.add_argument(config, dest="config", required=True, help=help_text)
    else:
        parser.add_argument(config, help=help_text)


def _overrides_argument(parser, help_text: str = "dotted config overrides, e.g. train.epochs=3 "
                        "(values are YAML: 3, true, [1,2])") -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=help_text)


def _break_lease_argument(parser) -> None:
    parser.add_argument("--break-lease", action="store_true",
                        help="take over the run root's lease even if its holder looks alive "
                        "(only when you know it is gone; see diffinf_ray/run_lease.py)")


def add_run_arguments(parser, config: str = "config") -> None:
    _config_argument(parser, config, "pipeline config YAML (jobs/configs/demo.yaml)")
    _overrides_argument(parser)
    _break_lease_argument(parser)
    parser.add_argument("--force", action="store_true",
                        help="re-run the stages even if they are done with the same settings")
    parser.add_argument("--keep-going", action="store_true",
                        help="after a failed stage, still run the stages that do not read its "
                        "outputs (exit status 1)")


def add_stage_arguments(parser, config: str = "config") -> None:
    parser.add_argument("name", choices=STAGES, metavar="STAGE",
                        help=f"the stage to run: {', '.join(STAGES)}")
    add_run_arguments(parser, config)


def add_config_arguments(parser, config: str = "config") -> None:
    _config_argument(parser, config, "pipeline config YAML")
    _overrides_argument(parser)


def add_experiment_arguments(parser, config: str = "config") -> None:
    _config_argument(parser, config, "experiment YAML (jobs/configs/experiment.yaml; the "
                     "format is in diffinf_ray/experiment/__init__.py)")
    parser.add_argument("--task", action="append", dest="tasks", metavar="T",
                        help="run only this task (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--table-only", action="store_true",
                        help="re-aggregate the finished runs into the table; run nothing")
    _break_lease_argument(parser)


def add_sweep_arguments(parser, config: str = "config") -> None:
    _config_argument(parser, config, "sweep YAML (jobs/configs/sweep.yaml; the format is in "
                     "diffinf_ray/sweep/__init__.py)")
    _overrides_argument(parser, "sweep keys (num_samples=4, scheduler.kind=fifo, "
                        "params.edit.w_id={choice: [1, 2]}) or base config keys (run.root=...)")
    parser.add_argument("--restore", action=argparse.BooleanOptionalAction, default=True,
                        help="resume the sweep's Tune experiment if it exists (default: yes)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (shared and per-trial stages) and exit")
    _break_lease_argument(parser)


def add_diagnose_labels_arguments(parser, config: str = "config") -> None:
    _config_argument(parser, config, "pipeline config YAML (its autoencoder and judges are used)")
    _overrides_argument(parser)
    parser.add_argument("--images", type=int, default=96,
                        help="faces of the judges' test split to decode (default 96)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0],
                        help="classifier-free guidance scales (default 1 3 5)")
    parser.add_argument("--depths", nargs="+", default=["full"], metavar="K",
                        help="inversion depths: 'full' (the official loop) or k < S steps of "
                        "a partial inversion (default: full)")
    parser.add_argument("--steps", type=int, default=None,
                        help="DDIM steps S (default: the edit's decode steps)")


def _ledger_argument(parser) -> None:
    parser.add_argument("--ledger", default="benchmarks/ledger",
                        help="the ledger folder (default benchmarks/ledger)")


def add_record_arguments(parser, config: str = "config") -> None:
    _config_argument(parser, config, "the pipeline config YAML of a finished run")
    _overrides_argument(parser)
    _ledger_argument(parser)


def add_ledger_arguments(parser, config: str | None = None) -> None:
    _ledger_argument(parser)
    parser.add_argument("--a", default="diffinf", help="condition a (default diffinf)")
    parser.add_argument("--b", default="removal", help="condition b (default removal)")
    parser.add_argument("--metric", default="accuracy",
                        choices=["accuracy", "auroc", "kappa", "ece", "accuracy_best_val"],
                        help="the clean-test metric (default accuracy, the last epoch's; "
                        "accuracy_best_val: the best-validation checkpoint's)")
    parser.add_argument("--factorial", action="store_true",
                        help="the detector x treatment table instead: every treatment paired "
                        "with the noisy and removal fits of its own record, the share of the "
                        "noisy -> clean gap where a noise.rate=0 record of the setting exists, "
                        "and each detector's detection figures")
    parser.add_argument("--commit", default=None, metavar="PREFIX",
                        help="only the records written at this commit (a prefix of its hash)")
    parser.add_argument("--html", default=None, metavar="FILE",
                        help="also write the table and a plot of the differences with their "
                        "intervals as one self-contained HTML page")


def add_status_arguments(parser, config: str | None = None) -> None:
    parser.add_argument("root", metavar="RUN_ROOT",
                        help="the run root: a local folder or s3://bucket/prefix")
    parser.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                        help="a pipeline config YAML: then also say which stages `diffinf run "
                        "CONFIG` would run and why")
    _overrides_argument(parser)


def add_fairness_arguments(parser, config: str = "config") -> None:
    _config_argument(parser, config, "fairness YAML (jobs/configs/fairness.yaml; the format is "
                     "in diffinf_ray/fairness/runner.py)")
    _overrides_argument(parser, "fairness config keys (severities=[0.95], train.epochs=3)")
    parser.add_argument("--dry-run", action="store_true", help="print the cells, run nothing")


def add_preview_arguments(parser, config: str | None = None) -> None:
    parser.add_argument("--task", choices=["age", "expression"], default="age")
    parser.add_argument("--resolution", type=int, default=64, help="pixels (default 64)")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--expression-gain", type=float, default=None,
                        help="how far clear expressions are drawn (data.synthfaces."
                             "expression_gain; default: the task's, 1 for age, 4 for expression)")
    parser.add_argument("--out", required=True, help="PNG file to write")


# name -> (one-line help, argument adder, function)
COMMANDS = {
    "run": ("run the configured stages, skipping those done", add_run_arguments, _cmd_run),
    "stage": ("run one stage (skipped if done)", add_stage_arguments, _cmd_run),
    "config": ("print the validated config and stage fingerprints", add_config_arguments,
               _cmd_config),
    "experiment": ("Table 1: every method, task and seed; the table",
                   add_experiment_arguments, _cmd_experiment),
    "sweep": ("Ray Tune sweep of edit weights, tau, noise rate", add_sweep_arguments,
              _cmd_sweep),
    "diagnose-labels": ("does the label path carry the attribute? (oracle)",
                        add_diagnose_labels_arguments, _cmd_diagnose_labels),
    "status": ("each stage's status; with a config, what re-runs",
               add_status_arguments, _cmd_status),
    "record": ("add a finished run's results to the results ledger", add_record_arguments,
               _cmd_record),
    "ledger": ("paired differences over the ledger's seeds",
               add_ledger_arguments, _cmd_ledger),
    "fairness": ("fairness methods over bias severities; table, plot",
                 add_fairness_arguments, _cmd_fairness),
    "synthfaces-preview": ("write a PNG grid of synthetic faces per class",
                           add_preview_arguments, _cmd_preview),
}


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """--debug and -q, accepted before or after the command (after it, they must not reset
    what was given before it: hence SUPPRESS there)."""
    common = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else False
    common.add_argument("--debug", action="store_true", default=default,
                        help="show full tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="warnings and errors only")
    common.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="Ray's own logs on the console too (they always go to a log "
                        "file under the run root)")
    return common


class _CommandListFormatter(argparse.HelpFormatter):
    """Each command and its summary on one line: argparse measures the command names without
    their indent, so the longest (synthfaces-preview) would get a line of its own."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=30)
        self._action_max_length = 2 + max(map(len, COMMANDS)) + 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffinf", description="DiffInf on Ray: find mislabelled images by self-influence "
        "and repair them with a diffusion-autoencoder edit.",
        epilog="`diffinf COMMAND --help` shows a command's arguments.",
        parents=[_common_options(suppress=False)],
        formatter_class=_CommandListFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    for name, (text, add_arguments, func) in COMMANDS.items():
        command = sub.add_parser(name, help=text, description=text,
                                 parents=[_common_options(suppress=True)])
        add_arguments(command)
        command.set_defaults(func=func)
    return parser


def job_parser(command: str, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of a jobs/ recipe: the command's arguments, the config as `--config`."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     parents=[_common_options(suppress=False)])
    COMMANDS[command][1](parser, "--config")
    parser.set_defaults(func=COMMANDS[command][2], command=command)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; `key=value` overrides may also come after the options
    (`diffinf sweep s.yaml --dry-run num_samples=2`)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or
             not isinstance(getattr(args, "overrides", None), list)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def execute(args: argparse.Namespace) -> int:
    """Run a parsed command: one clear error line (exit status 2) unless --debug."""
    from diffinf_ray import console

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="[diffinf] %(message)s")
    console.set_verbose(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for users; --debug for the traceback
        if args.debug:
            traceback.print_exc()
        print(f"error: {format_error(err)}", file=sys.stderr)
        if console.last_log_file:
            print(f"Ray's logs (workers' tracebacks): {console.last_log_file}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return execute(parse(build_parser(), argv))


def run_job(command: str, module: str, argv: list[str] | None = None) -> int:
    """The main of the jobs/ recipe `module` (its docstring's first line describes it):
    `command` with the config given as --config."""
    import importlib

    description = (importlib.import_module(module).__doc__ or "").split("\n")[0]
    return execute(parse(job_parser(command, description, f"python -m {module}"), argv))


if __name__ == "__main__":
    sys.exit(main())
