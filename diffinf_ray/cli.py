"""The `diffinf` command.

    diffinf run CONFIG [key=value ...] [--force]       all configured stages, resumable
    diffinf stage NAME CONFIG [key=value ...]          one stage (config.STAGES)
    diffinf config CONFIG [key=value ...]              the validated config and stage fingerprints
    diffinf experiment CONFIG [--task T] [--dry-run]   the Table-1 comparison over tasks and seeds
    diffinf sweep CONFIG [--no-restore] [--dry-run]    a Ray Tune sweep of edit weights, tau, noise
    diffinf synthfaces-preview --task age --out grid.png

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
    cause = _root_cause(err)
    text = str(cause).strip() or type(cause).__name__
    # Ray prefixes task errors with a traceback dump; keep the last line, which is the message.
    if "Traceback (most recent call last)" in text:
        text = text.strip().splitlines()[-1]
    if isinstance(cause, ConfigError):
        return text
    return f"{type(cause).__name__}: {text}"


def _print_metrics(results: dict) -> None:
    named = [("trained on assigned labels", results.get("evaluate")),
             ("self-influence removal", results.get("removal"))]
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
    detectors = {**results.get("influence", {}), **results.get("cleanlab", {})}
    found = {k: v for k, v in detectors.items() if isinstance(v, dict) and "auroc" in v}
    if found:
        print("\nlabel-noise detection (flagged set vs injected corruption):")
        for name, rep in found.items():
            print(f"  {name:<10} precision {rep['precision']:.3f}  recall {rep['recall']:.3f}  "
                  f"AUROC {rep['auroc']:.3f}")


def _cmd_run(args) -> int:
    from diffinf_ray.pipeline import open_run_root, run_pipeline

    cfg = load_config(args.config, args.overrides)
    stages = [args.name] if getattr(args, "name", None) else None
    results = run_pipeline(cfg, stages=stages, force=args.force,
                           keep_going=getattr(args, "keep_going", False))
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

    spec = SynthFacesSpec(task=args.task, resolution=args.resolution, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(preview_grid(spec, per_class=args.per_class))
    print(f"wrote {args.out}")
    return 0


def _cmd_forward(args) -> int:
    """`diffinf experiment|sweep ...`: the module's own argument parser takes the rest."""
    import importlib

    module = importlib.import_module(f"diffinf_ray.{args.command}")
    return module.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffinf", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the configured stages (skips those already done)")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    run.add_argument("--force", action="store_true", help="re-run stages even if done")
    run.add_argument("--keep-going", action="store_true",
                     help="after a failed stage, run the stages that do not read its outputs")
    run.set_defaults(func=_cmd_run)

    stage = sub.add_parser("stage", help="run one stage")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("config")
    stage.add_argument("overrides", nargs="*")
    stage.add_argument("--force", action="store_true")
    stage.set_defaults(func=_cmd_run)

    cfg = sub.add_parser("config", help="print the validated config and fingerprints")
    cfg.add_argument("config")
    cfg.add_argument("overrides", nargs="*")
    cfg.set_defaults(func=_cmd_config)

    for name, text in (("experiment", "the Table-1 comparison: every method, task and seed"),
                       ("sweep", "a Ray Tune sweep over edit loss weights, tau and noise rate")):
        forward = sub.add_parser(name, help=text, add_help=False)
        forward.add_argument("rest", nargs=argparse.REMAINDER)
        forward.set_defaults(func=_cmd_forward)

    prev = sub.add_parser("synthfaces-preview", help="write a PNG grid of samples per class")
    prev.add_argument("--task", choices=["age", "expression"], default="age")
    prev.add_argument("--resolution", type=int, default=64)
    prev.add_argument("--per-class", type=int, default=8)
    prev.add_argument("--seed", type=int, default=0)
    prev.add_argument("--out", required=True)
    prev.set_defaults(func=_cmd_preview)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="[diffinf] %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for users; --debug for the traceback
        if args.debug:
            traceback.print_exc()
        print(f"error: {format_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
