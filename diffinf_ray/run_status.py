"""`diffinf status RUN_ROOT [CONFIG]`: what each registered stage recorded under a run root
(local or S3), and, given a config, which stages `diffinf run` would run and why.

Read only: it reads the stage records (`stages/<stage>.json`, written by RunRoot.mark_*) and the
config the last run wrote (`config.yaml`), and decides as the stage lifecycle does
(pipeline.run_pipeline / run_stage): a stage runs when it has no finished record, when its
fingerprint changed, when outputs it was built on were rebuilt since, or when a stage whose
outputs it reads runs first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffinf_ray.config import Config, ConfigError, load_config
from diffinf_ray.run_root import RunRoot
from diffinf_ray.stage_registry import REGISTRY, STAGES, fingerprint, fingerprint_parts
from diffinf_ray.storage import StorageError


@dataclass(frozen=True)
class StageStatus:
    """One stage's record. `status`: done, failed, running (started, never finished: a
    crash, or a run still going) or "not run" (no record)."""

    stage: str
    status: str
    fingerprint: str | None = None
    when: str | None = None  # finished_at, or failed_at
    wall_seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Plan:
    """What `diffinf run CONFIG` would do with one stage: "run", "skip" (done with these
    settings), "blocked" (it reads a stage that is neither done nor configured) or "-" (not
    among the config's stages); `reason` says why."""

    stage: str
    action: str
    reason: str


def stage_statuses(root: RunRoot) -> list[StageStatus]:
    """Every registered stage's record under `root`, in pipeline order."""
    out = []
    for stage in STAGES:
        record = root.stage_record(stage)
        if record is None:
            out.append(StageStatus(stage, "not run"))
            continue
        out.append(StageStatus(
            stage, record.get("status", "unknown"), record.get("fingerprint"),
            record.get("finished_at") or record.get("failed_at"), record.get("wall_seconds"),
            record.get("error")))
    return out


def _changed_settings(previous: Config | None, cfg: Config, stage: str) -> list[str]:
    """The settings behind `stage`'s fingerprint that differ between the config the last run
    wrote and `cfg`, as "key old -> new" ([] when unknown)."""
    if previous is None:
        return []
    old, new = fingerprint_parts(previous, stage), fingerprint_parts(cfg, stage)
    changed = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                changed.append(f"run.{section} {a} -> {b}" if section == "seed"
                               else f"{section} {a} -> {b}")
            continue
        changed += [f"{section}.{k} {a.get(k)!r} -> {b.get(k)!r}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return changed


def _previous_config(root: RunRoot) -> Config | None:
    """The config the last run under `root` wrote (None when absent or no longer valid)."""
    marker = root.child("config.yaml")
    try:
        if not marker.exists():
            return None
        import yaml

        return Config.model_validate(yaml.safe_load(marker.read_bytes().decode()) or {})
    except (StorageError, ConfigError, ValueError):
        return None


def _own_reason(root: RunRoot, cfg: Config, stage: str, previous: Config | None,
                runs: set[str]) -> str | None:
    """Why `stage` runs on its own record (None: done with these settings on current inputs;
    an input in `runs`, which re-runs first, is the upstream's reason, not this one's)."""
    record = root.stage_record(stage)
    fp = fingerprint(cfg, stage)
    if record is None:
        return "not run yet"
    status = record.get("status")
    if record.get("fingerprint") != fp:
        changed = _changed_settings(previous, cfg, stage)
        if previous is not None and fingerprint(previous, stage) != record.get("fingerprint"):
            changed = []  # the config file is from a later run than this record
        detail = "; ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
        return (f"settings changed (fingerprint {record.get('fingerprint')} -> {fp}"
                + (f": {detail})" if detail else ")"))
    if status == "failed":
        return f"failed last time ({record.get('error', 'no error recorded')}); runs again"
    if status != "done":
        return "unfinished (started, never marked done); resumes"
    inputs = record.get("inputs", {})
    rebuilt = [s for s, attempt in inputs.items() if s not in runs
               and (root.stage_record(s) or {}).get("attempt") != attempt]
    if rebuilt:
        return f"built on outputs of {', '.join(rebuilt)} that were rebuilt since"
    return None


def rerun_plan(root: RunRoot, cfg: Config) -> list[Plan]:
    """What `diffinf run` with `cfg` would do with each registered stage under `root`."""
    wanted = set(cfg.stages)
    previous = _previous_config(root)
    runs: set[str] = set()
    plans = []
    for stage in STAGES:
        if stage not in wanted:
            plans.append(Plan(stage, "-", "not among the config's stages"))
            continue
        upstream = REGISTRY[stage].upstream_of(cfg)
        missing = [s for s in upstream if s not in wanted and s not in runs
                   and (root.stage_record(s) or {}).get("status") != "done"]
        rerun_upstream = [s for s in upstream if s in runs]
        reason = _own_reason(root, cfg, stage, previous, runs)
        if missing and not REGISTRY[stage].tolerant:
            plans.append(Plan(stage, "blocked", f"reads {', '.join(missing)}, which is not "
                              "done and not among the config's stages"))
            continue
        if reason is None and rerun_upstream:
            reason = f"upstream {', '.join(rerun_upstream)} re-runs"
        if reason is None:
            plans.append(Plan(stage, "skip", "done with these settings"))
        else:
            runs.add(stage)
            plans.append(Plan(stage, "run", reason))
    return plans


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_status(root: RunRoot, statuses: list[StageStatus],
                  plans: list[Plan] | None = None) -> str:
    """The table `diffinf status` prints."""
    lines = [f"run root: {root}", "",
             f"{'stage':<12} {'status':<8} {'fingerprint':<17} {'finished':<25} {'wall':>9}"]
    for s in statuses:
        lines.append(f"{s.stage:<12} {s.status:<8} {s.fingerprint or '-':<17} "
                     f"{s.when or '-':<25} {_wall(s.wall_seconds):>9}")
        if s.error:
            lines.append(f"{'':<12} error: {s.error.splitlines()[0][:200]}")
    if plans is not None:
        lines += ["", "with this config, `diffinf run` would:"]
        lines += [f"  {p.action:<7} {p.stage:<12} {p.reason}" for p in plans]
    return "\n".join(lines)


def status_command(root_uri: str, config: str | None, overrides: list[str]) -> str:
    """`diffinf status`'s output: the records under `root_uri`, and the plan when `config` is
    given (its storage settings reach `root_uri`; its run.root is replaced by it)."""
    from diffinf_ray.pipeline import open_run_root

    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # `status ROOT key=value`: no config
    if config is None and overrides:
        raise ConfigError(f"overrides {overrides} need a config: diffinf status RUN_ROOT CONFIG "
                          "key=value ...")
    cfg = load_config(config, [*overrides, f"run.root={root_uri}"]) if config else None
    root = open_run_root(cfg) if cfg is not None else RunRoot(root_uri)
    if not root.exists():
        raise StorageError(f"run root {root} does not exist")
    plans = rerun_plan(root, cfg) if cfg is not None else None
    return format_status(root, stage_statuses(root), plans)
