"""Scale check: the real pipeline (ingest, noise, train for 1 epoch, influence) on synthfaces at
growing row counts, with wall time, CPU time and peak memory per stage.

    python benchmarks/scale.py --rows 10000 [--rows 70000] --root /tmp/scale_runs \
        [--stages ingest,noise,train,influence] [--object-store-mb 1024] [--max-seconds S]
        [--min-available-mb 1500]

Each row count runs in its own subprocess with a fresh local Ray
(`ray.init(address="local", num_cpus=2, ...)`, started before the pipeline so `ray_session`
never looks at RAY_ADDRESS or another cluster on the machine) and a fresh run root
`<root>/rows_<N>`. Config: `jobs/configs/tiny.yaml` with data.synthfaces.num_samples=N,
num_identities=N//5, resolution 32, with_masks false, train.epochs=1, train.checkpoint_every=1,
train.batch_size=128, influence.batch_size=128 (expression task, 20% symmetric noise).

This process samples, every 0.5 s, the process tree of that subprocess (the driver; Ray's
gcs_server, raylet and the other daemons are its children, Ray workers are the raylet's):
  - RSS of the driver, and the sum of RSS over the tree. Shared pages (the plasma object store,
    shared libraries) are counted once per process that maps them, so the RSS sum overstates;
  - the sum of PSS over the tree (shared pages split between the processes sharing them: the
    tree's real footprint);
  - CPU seconds of the tree: user + system of every process, by pid, summed over all pids
    seen (the raylet does not collect its exited workers' times, so a sum over live processes
    would lose them), so per-sample costs can be read as CPU time, which a contended box
    distorts less than wall time.
The subprocess itself records each stage's start and end and, every 2 s, the object store's
bytes in use and bytes spilled (Ray's memory-info reply, as in `ray memory --stats-only`).
Stage wall seconds are those of `<run root>/stages/<stage>.json`.

Prints a table and writes benchmarks/results/scale_<N>.json. `--max-seconds` and
`--min-available-mb` stop a run early (SIGINT to the subprocess, then SIGKILL to what is left of
its own tree) and keep the partial figures; `--reanalyse RUN_ROOT...` rebuilds the JSON from the
files a run left in its run root (_scale_run.json, _scale_samples.jsonl, _scale_events*.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "tiny.yaml"
RESULTS = REPO / "benchmarks" / "results"
MIB = 1024 * 1024


def _psutil():
    """psutil: installed, or the copy Ray vendors (on sys.path once ray is imported)."""
    try:
        import psutil
    except ImportError:
        import importlib

        import ray  # noqa: F401 - adds ray/thirdparty_files (psutil) to sys.path

        psutil = importlib.import_module("psutil")
    return psutil


def overrides_for(rows: int, run_root: str) -> list[str]:
    return [
        f"run.root={run_root}",
        f"run.name=scale_{rows}",
        f"data.synthfaces.num_samples={rows}",
        f"data.synthfaces.num_identities={max(1, rows // 5)}",
        "data.synthfaces.resolution=32",
        "data.synthfaces.with_masks=false",
        "train.epochs=1",
        "train.checkpoint_every=1",
        "train.batch_size=128",
        "influence.batch_size=128",
    ]


# ---------------------------------------------------------------- the subprocess (one row count)

def _object_store_sampler(path: Path, stop: threading.Event, gcs_address: str) -> None:
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    with path.open("a") as out:
        while not stop.wait(2.0):
            try:
                stats = get_memory_info_reply(get_state_from_address(gcs_address)).store_stats
                out.write(json.dumps({
                    "t": time.time(),
                    "used": int(stats.object_store_bytes_used),
                    "spilled": int(stats.spilled_bytes_total),
                }) + "\n")
                out.flush()
            except Exception as err:  # noqa: BLE001 - sampling must never fail the run
                out.write(json.dumps({"t": time.time(), "error": repr(err)}) + "\n")
                out.flush()


def child(args: argparse.Namespace) -> None:
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=args.ray_tmp,
             object_store_memory=args.object_store_mb * MIB, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False

    from diffinf_ray.config import load_config
    from diffinf_ray.pipeline import run_pipeline

    cfg = load_config(CONFIG, overrides_for(args.rows, args.run_root))
    events = Path(args.events)
    stop = threading.Event()
    sampler = threading.Thread(target=_object_store_sampler,
                               args=(events.with_suffix(".store.jsonl"), stop,
                                     ray.get_runtime_context().gcs_address), daemon=True)
    sampler.start()

    def mark(stage: str, event: str) -> None:
        with events.open("a") as out:
            out.write(json.dumps({"stage": stage, "event": event, "t": time.time()}) + "\n")

    try:
        for stage in args.stages:
            mark(stage, "start")
            run_pipeline(cfg, [stage])  # ray is initialised: ray_session uses this instance
            mark(stage, "end")
    finally:
        stop.set()
        sampler.join(timeout=5)
        ray.shutdown()


# ------------------------------------------------------------------- the parent (the sampler)

def _tree(proc):
    psutil = _psutil()

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def sample_tree(proc) -> dict | None:
    """One sample of the subprocess's tree: driver RSS, tree RSS / PSS sums, and the CPU seconds
    (user + system) of each live process by pid."""
    psutil = _psutil()

    rss = pss = 0
    names = []
    cpu: dict[str, float] = {}
    driver_rss = None
    for p in _tree(proc):
        try:
            with p.oneshot():
                mem = p.memory_full_info()
                t = p.cpu_times()
                name = p.name()
        except psutil.Error:
            continue
        rss += mem.rss
        pss += getattr(mem, "pss", mem.rss)
        # own time only: Ray's raylet does not collect its exited workers' times into its
        # children_* fields, so those are tracked per pid instead (tree_cpu_by_pid)
        cpu[str(p.pid)] = round(t.user + t.system, 2)
        names.append(name)
        if p.pid == proc.pid:
            driver_rss = mem.rss
    if driver_rss is None:
        return None
    return {"t": time.time(), "load": os.getloadavg()[0], "driver_rss": driver_rss,
            "tree_rss": rss, "tree_pss": pss, "cpu_by_pid": cpu, "n_procs": len(names),
            "names": names}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stage_rows(stage: str, rows: int, run_root: Path) -> tuple[int, str]:
    """Rows a stage processes, and what they are."""
    if stage in ("ingest", "noise"):
        return rows, "all rows"
    ingest = json.loads((run_root / "stages" / "ingest.json").read_text())
    train_rows = ingest["summary"]["split_counts"].get("train", 0)
    if stage == "train":
        return train_rows, "train split x 1 epoch"
    if stage == "influence":
        return train_rows, "train split x 1 checkpoint"
    return rows, "all rows"


def _cumulative_cpu(samples: list[dict]) -> tuple[list[float], str]:
    """CPU seconds used by the tree up to each sample.

    With per-pid times: the sum over every pid seen so far of its latest time (a process that
    exits between two samples loses at most one interval). Samples from the first version of this
    script hold only the sum over live processes, which drops when a process exits: there the
    cumulative figure is the sum of the positive steps, a lower bound."""
    out = []
    if samples and "cpu_by_pid" in samples[0]:
        last: dict[str, float] = {}
        for s in samples:
            last.update(s["cpu_by_pid"])
            out.append(sum(last.values()))
        return out, "per-pid: sum over all pids seen of their latest user+system seconds"
    total, prev = 0.0, None
    for s in samples:
        if prev is not None and s["tree_cpu"] > prev:
            total += s["tree_cpu"] - prev
        prev = s["tree_cpu"]
        out.append(total)
    return out, ("sum of positive steps of the live-tree CPU sum (first sampler version: "
                 "CPU of processes that exited between samples is lost; a lower bound)")


def analyse(run_root: Path, args: argparse.Namespace) -> dict:
    """The result record of one row count, from the files its run left in `run_root`."""
    psutil = _psutil()
    info = json.loads((run_root / "_scale_run.json").read_text())
    rows = info["rows"]
    samples = _read_jsonl(run_root / "_scale_samples.jsonl")
    events = run_root / "_scale_events.jsonl"
    store = [s for s in _read_jsonl(events.with_suffix(".store.jsonl")) if "used" in s]
    windows: dict[str, dict[str, float]] = {}
    for m in _read_jsonl(events):
        windows.setdefault(m["stage"], {})[m["event"]] = m["t"]
    cum, cpu_method = _cumulative_cpu(samples)
    ended = info["started"] + info["total_wall_seconds"]

    def peak(key: str, lo: float, hi: float, source=samples) -> int | None:
        values = [s[key] for s in source if lo <= s["t"] <= hi]
        return max(values) if values else None

    def cpu_at(t: float) -> float | None:
        before = [c for s, c in zip(samples, cum, strict=True) if s["t"] <= t]
        return before[-1] if before else (0.0 if samples else None)

    stages = {}
    for stage in info["stages_requested"]:
        w = windows.get(stage, {})
        marker = run_root / "stages" / f"{stage}.json"
        record = json.loads(marker.read_text()) if marker.exists() else {}
        done = record.get("status") == "done"
        lo = w.get("start")
        hi = w.get("end") or ended
        entry = {"status": "done" if done else ("started, not finished" if lo else "not reached")}
        if lo is not None:
            cpu_lo, cpu_hi = cpu_at(lo), cpu_at(hi)
            entry.update({
                "wall_seconds": record.get("wall_seconds") if done else round(hi - lo, 1),
                "wall_seconds_source": "stage marker" if done else "stage start to stop",
                "tree_cpu_seconds": (round(cpu_hi - cpu_lo, 1)
                                     if None not in (cpu_lo, cpu_hi) else None),
                "peak_tree_rss_mb": _mb(peak("tree_rss", lo, hi)),
                "peak_tree_pss_mb": _mb(peak("tree_pss", lo, hi)),
                "peak_driver_rss_mb": _mb(peak("driver_rss", lo, hi)),
                "peak_object_store_used_mb": _mb(peak("used", lo, hi, store)),
                "spilled_mb_at_end": _mb(max((s["spilled"] for s in store if s["t"] <= hi),
                                             default=None)),
                "mean_load_avg_1min": _mean([x["load"] for x in samples if lo <= x["t"] <= hi]),
            })
            if done:
                n, what = _stage_rows(stage, rows, run_root)
                wall = record["wall_seconds"]
                cpu = entry["tree_cpu_seconds"]
                entry.update({"rows": n, "rows_are": what,
                              "rows_per_s": round(n / wall, 2) if wall else None,
                              "wall_s_per_row": wall / n if n else None,
                              "cpu_s_per_row": cpu / n if n and cpu is not None else None})
        stages[stage] = entry

    intervals = [b["t"] - a["t"] for a, b in zip(samples, samples[1:], strict=False)]
    return {
        "rows": rows,
        "config": str(CONFIG.relative_to(REPO)),
        "overrides": overrides_for(rows, str(run_root)),
        "stages_requested": info["stages_requested"],
        "returncode": info["returncode"],
        "completed": info["returncode"] == 0 and all(v["status"] == "done" for v in stages.values()),
        "stopped_early": info.get("stopped"),
        "total_wall_seconds": info["total_wall_seconds"],
        "ray": {"num_cpus": 2, "object_store_mb": info["object_store_mb"],
                "address": "local (fresh instance)"},
        "sample_interval_s": {"asked": info["interval"], "mean": _mean(intervals, 2),
                              "max": round(max(intervals), 1) if intervals else None},
        "samples": len(samples),
        "cpu_method": cpu_method,
        "peak_tree_rss_mb": _mb(max((s["tree_rss"] for s in samples), default=None)),
        "peak_tree_pss_mb": _mb(max((s["tree_pss"] for s in samples), default=None)),
        "peak_driver_rss_mb": _mb(max((s["driver_rss"] for s in samples), default=None)),
        "peak_object_store_used_mb": _mb(max((s["used"] for s in store), default=None)),
        "spilled_mb": _mb(max((s["spilled"] for s in store), default=None)),
        "max_tree_processes": max((s["n_procs"] for s in samples), default=0),
        "process_names_seen": info.get("process_names_seen"),
        "load_avg_1min": {"mean": _mean([x["load"] for x in samples]),
                          "max": max((x["load"] for x in samples), default=None)},
        "machine": {"cpus": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 1024 ** 3, 1)},
        "stages": stages,
        "run_root": str(run_root),
        "child_log": str(run_root / "_scale_child.log"),
    }


def run_one(rows: int, args: argparse.Namespace) -> Path:
    """Run one row count in a subprocess, sampling its process tree; returns its run root."""
    psutil = _psutil()

    run_root = Path(args.root) / f"rows_{rows}"
    if run_root.exists():
        raise SystemExit(f"{run_root} exists: pass a fresh --root (each row count needs a fresh run root)")
    run_root.mkdir(parents=True)
    ray_tmp = tempfile.mkdtemp(prefix=f"rs{rows // 1000}k_", dir="/tmp")  # short: socket paths
    events = run_root / "_scale_events.jsonl"
    log_path = run_root / "_scale_child.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--rows", str(rows),
           "--run-root", str(run_root), "--ray-tmp", ray_tmp, "--events", str(events),
           "--stages", ",".join(args.stages), "--object-store-mb", str(args.object_store_mb)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"[scale] rows={rows}: run root {run_root}, ray temp {ray_tmp}, log {log_path}",
          flush=True)
    started = time.time()
    names_seen: set[str] = set()
    stopped = None
    with log_path.open("w") as log, (run_root / "_scale_samples.jsonl").open("w") as sample_log:
        child_proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc = psutil.Process(child_proc.pid)
        signal.signal(signal.SIGTERM, _request_stop)
        try:
            while child_proc.poll() is None:
                s = sample_tree(proc)
                if s is not None:
                    names_seen.update(s.pop("names"))
                    sample_log.write(json.dumps(s) + "\n")
                    sample_log.flush()
                over = args.max_seconds and time.time() - started > args.max_seconds
                low = psutil.virtual_memory().available < args.min_available_mb * MIB
                if (over or low or _STOP) and stopped is None:
                    stopped = ("time limit (--max-seconds)" if over else
                               f"machine memory available < {args.min_available_mb} MB" if low
                               else "SIGTERM")
                    print(f"[scale] rows={rows}: stopping ({stopped})", flush=True)
                    _stop_tree(proc, child_proc)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            stopped = "KeyboardInterrupt"
            _stop_tree(proc, child_proc)
    (run_root / "_scale_run.json").write_text(json.dumps({
        "rows": rows, "started": started, "total_wall_seconds": round(time.time() - started, 1),
        "returncode": child_proc.returncode, "stopped": stopped,
        "stages_requested": args.stages, "object_store_mb": args.object_store_mb,
        "interval": args.interval, "process_names_seen": sorted(names_seen),
    }, indent=2) + "\n")
    return run_root


def _mean(values: list[float], digits: int = 1) -> float | None:
    return round(sum(values) / len(values), digits) if values else None


_STOP = False


def _request_stop(signum, frame) -> None:
    global _STOP
    _STOP = True


def _stop_tree(proc, child_proc) -> None:
    """Stop our own subprocess: SIGINT (its `finally` shuts its Ray down), then, after a grace
    period, SIGKILL to what is left of its process tree (only that tree)."""
    psutil = _psutil()

    tree = _tree(proc)
    try:
        proc.send_signal(signal.SIGINT)
        child_proc.wait(timeout=90)
    except (psutil.Error, subprocess.TimeoutExpired):
        pass
    for p in tree:
        try:
            if p.is_running():
                p.kill()
        except psutil.Error:
            pass
    child_proc.wait()


def _mb(value) -> float | None:
    return None if value is None else round(value / MIB, 1)


def print_table(result: dict) -> None:
    print(f"\nrows={result['rows']}  completed={result['completed']}  stopped={result['stopped_early']}  total wall "
          f"{result['total_wall_seconds']} s  mean load {result['load_avg_1min']['mean']}")
    head = ("stage", "status", "rows", "wall s", "rows/s", "tree CPU s", "CPU ms/row",
            "peak tree RSS MB", "peak tree PSS MB", "peak driver RSS MB", "peak store MB")
    print(" | ".join(head))
    for stage, e in result["stages"].items():
        cpu_ms = e.get("cpu_s_per_row")
        print(" | ".join(str(x) for x in (
            stage, e["status"], e.get("rows", "-"), e.get("wall_seconds", "-"),
            e.get("rows_per_s", "-"), e.get("tree_cpu_seconds", "-"),
            "-" if cpu_ms is None else round(1000 * cpu_ms, 2),
            e.get("peak_tree_rss_mb", "-"), e.get("peak_tree_pss_mb", "-"),
            e.get("peak_driver_rss_mb", "-"), e.get("peak_object_store_used_mb", "-"))))
    print(f"overall: peak tree RSS {result['peak_tree_rss_mb']} MB, peak tree PSS "
          f"{result['peak_tree_pss_mb']} MB, peak driver RSS {result['peak_driver_rss_mb']} MB, "
          f"peak object store {result['peak_object_store_used_mb']} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", default=[])
    parser.add_argument("--root", default="/tmp/scale_runs")
    parser.add_argument("--stages", default="ingest,noise,train,influence")
    parser.add_argument("--object-store-mb", type=int, default=1024)
    parser.add_argument("--interval", type=float, default=0.5, help="sampling period, seconds")
    parser.add_argument("--max-seconds", type=float, default=0,
                        help="stop a row count's run after this long and report what it reached "
                             "(0: no limit)")
    parser.add_argument("--min-available-mb", type=int, default=1500,
                        help="stop a row count's run when the machine's available memory falls "
                             "below this (protects other work on a shared box; Ray's memory "
                             "monitor kills workers at 95%% use)")
    parser.add_argument("--reanalyse", nargs="+", metavar="RUN_ROOT",
                        help="rebuild the results of finished or stopped runs from their files")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-root", help=argparse.SUPPRESS)
    parser.add_argument("--ray-tmp", help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.stages = [s for s in args.stages.split(",") if s]
    if not args.rows and not args.reanalyse:
        parser.error("--rows N (repeatable) or --reanalyse RUN_ROOT is required")
    if args.child:
        args.rows = args.rows[0]
        child(args)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    run_roots = ([Path(p) for p in args.reanalyse] if args.reanalyse
                 else [run_one(rows, args) for rows in args.rows])
    for run_root in run_roots:
        result = analyse(run_root, args)
        out = RESULTS / f"scale_{result['rows']}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print_table(result)
        print(f"[scale] wrote {out}", flush=True)
        if result["returncode"] != 0:
            print(f"[scale] rows={result['rows']}: subprocess exited {result['returncode']} "
                  f"(stopped: {result['stopped_early']}); see {result['child_log']}", flush=True)

if __name__ == "__main__":
    main()
