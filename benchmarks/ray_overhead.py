"""Ray overhead: the train stage's classifier training through the project's Ray Train harness
against the same epochs in a plain PyTorch loop in one process, on the same data, in one run.

    python benchmarks/ray_overhead.py [--config jobs/configs/demo.yaml] [--epochs E]
                                      [--repeats 3] [--root DIR] [--json OUT] [--one-ray]
                                      [--plain-threads N] [--loss-rtol 0.25] [KEY=VALUE ...]

Data: the config's ingest and noise stages, run once (untimed) into `<root>` (a temporary
folder unless --root is given; a --root that already holds them is reused).

A (Ray): a fresh local Ray (`ray.init` with the pipeline's arguments, plus address="local" and
a private temp dir so it never joins another Ray on the machine), then
`diffinf_ray.models.training.train_classifier` (what the train stage calls: Ray Data datasets,
`fit_on_ray`, the harness's `_train_loop`, run as `train.runner` says: one Ray task by
default for one worker, `train.runner=ray_train` for Ray Train's worker group) into a fresh
checkpoint folder, then `ray.shutdown()`. The training loop is wrapped, in the worker, by `_instrumented_loop`, which
only observes: it times the dataset iterators, `to_bytes` and `ray.train.report`, and counts
optimiser steps with a global optimiser hook.
B (plain): the same noisy manifest read with pyarrow, the same row selection and decode
(`select_rows`, `decode_for_training`), decoded once; the same model builder, seed, optimiser,
learning rates, batch size, flip augmentation, skip rule for a last batch of one, per-epoch
validation pass (batch 256) and checkpoint payloads written at the same epochs; torch threads
= the Ray worker's (`train.cpus_per_worker`: Ray sets OMP_NUM_THREADS for its actors).
Unavoidable difference: the row order. With `train.cache_decoded_images` (the default) the
worker holds the split in memory and takes a seeded permutation per epoch
(harness.ShardInMemory); streamed, Ray Data feeds the rows through a local shuffle buffer (4 x
batch, seeded per epoch) in block order; B takes its own seeded full permutation per epoch. The
batch count and size per epoch are the same, so the steps must match (asserted), and the final
training loss must agree within --loss-rtol (asserted).

Repeats run A, B, A, B, ... Each A starts its own local Ray unless --one-ray, where one Ray
serves all runs (as one serves a whole pipeline run) and its start and shutdown, timed once,
are added to every A. CPU seconds: the whole process tree for A (driver, Ray daemons and
workers, sampled by pid every second), the process for B. Wall times are medians over repeats. Prints one line per run, the
medians, the ratios and the Ray phase breakdown (medians); --json writes all of it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"


# ---------------------------------------------------------------- worker side (A)

class _TimedShard:
    """A Ray Train dataset shard whose batch iterators record their waits in `record`."""

    def __init__(self, shard, kind: str, state: dict):
        self._shard, self._kind, self._state = shard, kind, state

    def __getattr__(self, name):
        return getattr(self._shard, name)

    def iter_torch_batches(self, **kwargs):
        return _timed_batches(self._shard.iter_torch_batches(**kwargs), self._kind, self._state)


def _timed_batches(batches, kind: str, state: dict):
    """`batches` passed through, their waits and rows recorded in the epoch of `state`."""
    epoch = state["epoch"]
    if kind == "train" and epoch["start"] is None:
        epoch["start"] = time.time()
    iterator = iter(batches)
    first = True
    while True:
        t0 = time.time()
        try:
            batch = next(iterator)
        except StopIteration:
            epoch[f"{kind}_wait_s"] += time.time() - t0
            return
        waited = time.time() - t0
        epoch[f"{kind}_wait_s"] += waited
        if first:
            epoch[f"{kind}_first_batch_s"] = waited
            first = False
        epoch[f"{kind}_rows"] += len(batch["label"])
        yield batch


def _new_epoch() -> dict:
    return {"start": None, "train_wait_s": 0.0, "train_first_batch_s": 0.0, "train_rows": 0,
            "val_wait_s": 0.0, "val_first_batch_s": 0.0, "val_rows": 0, "steps": 0,
            "serialize_s": 0.0}


def _instrumented_loop(timings_path: str, loop_config: dict) -> None:
    """Runs the harness's `_train_loop` unchanged in the fit's worker (a Ray Train worker or
    the fit task, `train.runner`), observing it: batch waits, optimiser steps, checkpoint
    serialisation and the harness's report (for Ray Train: its barrier and checkpoint
    persistence) per epoch. Writes `<timings_path>.<rank>.json`."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from diffinf_ray.models import harness
    from diffinf_ray.models import training as train_stage

    record = {"enter": time.time(), "torch_threads": torch.get_num_threads(), "epochs": []}
    state = {"epoch": _new_epoch()}

    def count_step(optimizer, args, kwargs):
        state["epoch"]["steps"] += 1

    real_dataset, real_report, real_to_bytes, real_in_memory = (
        harness.TrainWorker.dataset, harness.TrainWorker.report, harness.to_bytes,
        harness.ShardInMemory.batches)

    def timed_in_memory(memory, shard, *args, **kwargs):
        # a cached split's batches come from the worker's memory, not the shard: its one load
        # is the first epoch's first wait
        return _timed_batches(real_in_memory(memory, shard, *args, **kwargs), "train", state)

    def timed_to_bytes(payload):
        t0 = time.time()
        data = real_to_bytes(payload)
        state["epoch"]["serialize_s"] += time.time() - t0
        return data

    def timed_report(worker, metrics, files=None, dir_name=None):
        epoch = state["epoch"]
        epoch["report_start"] = time.time()
        real_report(worker, metrics, files, dir_name)
        epoch["end"] = time.time()
        epoch["checkpoint"] = bool(files)
        epoch["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        record["epochs"].append(epoch)
        state["epoch"] = _new_epoch()

    hook = register_optimizer_step_post_hook(count_step)
    patches = [mock.patch.object(harness.TrainWorker, "dataset",
                                 lambda worker, name: _TimedShard(real_dataset(worker, name),
                                                                  name, state)),
               mock.patch.object(harness.TrainWorker, "report", timed_report),
               mock.patch.object(harness, "to_bytes", timed_to_bytes),
               mock.patch.object(harness.ShardInMemory, "batches", timed_in_memory)]
    for patch in patches:
        patch.start()
    try:
        worker = harness.TrainWorker.current("train")
        train_stage._train_loop(loop_config)
    finally:
        for patch in reversed(patches):
            patch.stop()
        hook.remove()
    record["exit"] = time.time()
    record["runner"] = "task" if harness._TASK_RUN is not None else "ray_train"
    Path(f"{timings_path}.{worker.rank}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------- driver side

class TreeCpu:
    """CPU seconds (user + system) of this process and all its descendants (a local Ray's
    daemons and workers), sampled every `interval` s by pid so exited processes keep their
    last reading; a process that lives less than `interval` is missed."""

    def __init__(self, interval: float = 1.0):
        self._interval, self._stop = interval, threading.Event()
        self._seen: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        psutil = _psutil()
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                self._seen[proc.pid] = max(self._seen.get(proc.pid, 0.0), t.user + t.system)
            except psutil.Error:
                continue

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> TreeCpu:
        self._sample()
        self._start = sum(self._seen.values())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = sum(self._seen.values()) - self._start


def _psutil():
    """psutil: installed, or the copy Ray vendors (on sys.path once ray is imported)."""
    try:
        import psutil
    except ImportError:
        import importlib

        import ray  # noqa: F401 - adds ray/thirdparty_files (psutil) to sys.path

        psutil = importlib.import_module("psutil")
    return psutil


def load(config: Path, overrides: list[str], root: Path):
    from diffinf_ray.config import load_config

    return load_config(config, [*overrides, f"run.root={root}"])


def start_ray(cfg, attempts: int = 5) -> int:
    """ray.init as `ray_session` does for a local Ray, kept off any other Ray on the machine
    (address="local", a temp dir of its own), retried when a loaded box makes its start-up
    time out. Returns the number of attempts made."""
    import ray

    from diffinf_ray.ray_session import start_local_ray, worker_env

    attempt = start_local_ray(cfg.ray.num_cpus, attempts, tempfile.mkdtemp(prefix="ro_ray_"),
                              log_to_driver=True,
                              runtime_env={"env_vars": worker_env()})
    ray.data.DataContext.get_current().enable_progress_bars = True
    return attempt


def prepare_data(cfg) -> None:
    """The config's ingest and noise stages into cfg.run.root (skipped when already there)."""
    import ray

    from diffinf_ray.pipeline import open_run_root, run_stage

    own = not ray.is_initialized()
    if own:
        start_ray(cfg)
    try:
        root = open_run_root(cfg)
        for stage in ("ingest", "noise"):
            run_stage(cfg, root, stage)
    finally:
        if own:
            ray.shutdown()


def run_ray(cfg, work: Path, tag: str) -> dict:
    """One Ray Train run of the train stage's classifier training; wall clock of each phase.
    Starts (and shuts down) its own local Ray unless one is running already."""
    import ray

    from diffinf_ray.models import training as train_stage
    from diffinf_ray.pipeline import open_run_root
    from diffinf_ray.storage import Location

    if __name__ != "__main__":  # the worker cannot import this file as a module
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = open_run_root(cfg)
    checkpoints = Location(str(work / f"{tag}_checkpoints"))
    timings = work / f"{tag}_timings"
    own = not ray.is_initialized()
    t_begin, load_before = time.time(), os.getloadavg()[0]
    with TreeCpu() as cpu:
        attempts = start_ray(cfg) if own else 0
        t_call = time.time()
        with mock.patch.object(train_stage, "_train_loop",
                               functools.partial(_instrumented_loop, str(timings))):
            metrics = train_stage.train_classifier(cfg, root.noisy_manifest, checkpoints,
                                                   len(cfg.class_names))
        t_return = time.time()
        if own:
            ray.shutdown()
        t_end = time.time()
    worker = json.loads(Path(f"{timings}.0.json").read_text())
    shutil.rmtree(work / f"{tag}_checkpoints", ignore_errors=True)
    return {"kind": "ray", "tag": tag, "wall_s": t_end - t_begin, "fit_s": t_return - t_call,
            "cpu_s": cpu.seconds,
            "ray_start_s": t_call - t_begin if own else None, "ray_start_attempts": attempts,
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "ray_shutdown_s": t_end - t_return if own else None,
            "t_call": t_call, "t_return": t_return, "worker": worker,
            "steps": sum(e["steps"] for e in worker["epochs"]),
            "rows": sum(e["train_rows"] for e in worker["epochs"]),
            "final_train_loss": metrics["train_loss"]}


def _plain_data(cfg):
    """The train and val splits as the Ray datasets give them, decoded once, in one process."""
    import torch

    from diffinf_ray.datasets import decode_for_training, select_rows
    from diffinf_ray.pipeline import open_run_root

    table = open_run_root(cfg).noisy_manifest.read_table(columns=["image", "label", "split"])
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    out = {}
    for split in ("train", "val"):
        decoded = decode_for_training(select_rows(batch, split))
        out[split] = (torch.from_numpy(decoded["image"]), torch.from_numpy(decoded["label"]))
    return out


def _plain_epoch(model, optimizer, images, labels, train_cfg, generator) -> dict:
    """One training epoch as `_train_loop` runs it, over a seeded permutation of the rows."""
    import torch
    import torch.nn.functional as F

    model.train()
    order = torch.randperm(len(labels), generator=generator)
    steps, total_loss, total_n = 0, 0.0, 0
    for i in range(0, len(order), train_cfg.batch_size):
        idx = order[i:i + train_cfg.batch_size]
        x, y = images[idx], labels[idx]
        if len(y) < 2:  # as the harness: BatchNorm cannot train on one sample
            continue
        if train_cfg.augment:
            flip = torch.rand(x.shape[0]) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        total_loss += loss.item() * len(y)
        total_n += len(y)
    return {"steps": steps, "rows": total_n, "train_loss": total_loss / max(1, total_n)}


def _plain_validate(model, images, labels) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    loss = 0.0
    with torch.no_grad():
        for i in range(0, len(labels), 256):
            loss += F.cross_entropy(model(images[i:i + 256]), labels[i:i + 256],
                                    reduction="sum").item()
    return loss / max(1, len(labels))


def run_plain(cfg, work: Path, tag: str, threads: int) -> dict:
    """The same epochs in this process without Ray; wall clock of each phase."""
    import torch

    from diffinf_ray.models.checkpoint import CHECKPOINT_FILE, checkpoint_dir_name, to_bytes
    from diffinf_ray.models.classifier import build_classifier
    from diffinf_ray.models.harness import learning_rate_at

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    train_cfg, seed = cfg.train, cfg.run.seed
    out = work / f"{tag}_checkpoints"
    load_before, cpu_begin = os.getloadavg()[0], time.process_time()
    try:
        t_begin = time.time()
        data = _plain_data(cfg)
        t_data = time.time()
        torch.manual_seed(seed)  # the harness seeds seed + rank before building the model
        model = build_classifier(len(cfg.class_names), train_cfg.head_hidden)
        optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr,
                                     weight_decay=train_cfg.weight_decay)
        epochs, t_setup = [], time.time()
        for epoch in range(1, train_cfg.epochs + 1):
            t0 = time.time()
            lr = learning_rate_at(train_cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            result = _plain_epoch(model, optimizer, *data["train"], train_cfg,
                                  torch.Generator().manual_seed(seed + epoch))
            result["val_loss"] = _plain_validate(model, *data["val"])
            t1 = time.time()
            if epoch % train_cfg.checkpoint_every == 0 or epoch == train_cfg.epochs:
                blob = to_bytes({"model_state": {k: v.detach().cpu()
                                                 for k, v in model.state_dict().items()},
                                 "optimizer_state": optimizer.state_dict(), "epoch": epoch,
                                 "learning_rate": lr, "architecture": model.architecture()})
                path = out / checkpoint_dir_name(epoch) / CHECKPOINT_FILE
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(blob)
            epochs.append({**result, "compute_s": t1 - t0, "checkpoint_s": time.time() - t1})
        t_end, cpu_s = time.time(), time.process_time() - cpu_begin
    finally:
        torch.set_num_threads(saved_threads)
        shutil.rmtree(out, ignore_errors=True)
    return {"kind": "plain", "tag": tag, "wall_s": t_end - t_begin, "data_s": t_data - t_begin,
            "cpu_s": cpu_s,
            "setup_s": t_setup - t_data, "epochs": epochs, "torch_threads": threads,
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "steps": sum(e["steps"] for e in epochs), "rows": sum(e["rows"] for e in epochs),
            "final_train_loss": epochs[-1]["train_loss"]}


# ---------------------------------------------------------------- analysis

def ray_phases(run: dict) -> dict:
    """Seconds of each phase of one Ray run (driver and worker clocks: the same machine)."""
    worker, epochs = run["worker"], run["worker"]["epochs"]
    phases = {
        "ray_start": run["ray_start_s"] or 0.0,
        "trainer_setup_and_worker_start": worker["enter"] - run["t_call"],
        "loop_setup": epochs[0]["start"] - worker["enter"],
        "train_first_batch_wait": sum(e["train_first_batch_s"] for e in epochs),
        "train_other_batch_wait": sum(e["train_wait_s"] - e["train_first_batch_s"]
                                      for e in epochs),
        "val_batch_wait": sum(e["val_wait_s"] for e in epochs),
        "compute": 0.0,
        "checkpoint_serialise": sum(e["serialize_s"] for e in epochs),
        "report_with_checkpoint": sum(e["end"] - e["report_start"] for e in epochs
                                      if e["checkpoint"]),
        "report_without_checkpoint": sum(e["end"] - e["report_start"] for e in epochs
                                         if not e["checkpoint"]),
        "between_epochs": sum(b["start"] - a["end"] for a, b in zip(epochs, epochs[1:],
                                                                     strict=False)),
        "loop_exit_to_fit_return": run["t_return"] - worker["exit"],
        "ray_shutdown": run["ray_shutdown_s"] or 0.0,
    }
    for e in epochs:
        phases["compute"] += (e["report_start"] - e["start"] - e["train_wait_s"]
                              - e["val_wait_s"] - e["serialize_s"])
    phases["loop_end_to_exit"] = worker["exit"] - epochs[-1]["end"]
    return phases


def plain_phases(run: dict) -> dict:
    return {"data_read_and_decode": run["data_s"], "model_setup": run["setup_s"],
            "compute": sum(e["compute_s"] for e in run["epochs"]),
            "checkpoint_serialise_and_write": sum(e["checkpoint_s"] for e in run["epochs"])}


def check_same_steps(ray_run: dict, plain_run: dict) -> None:
    """Both paths ran the same optimiser steps over the same number of rows."""
    if ray_run["steps"] != plain_run["steps"] or ray_run["rows"] != plain_run["rows"]:
        raise AssertionError(f"different work: Ray {ray_run['steps']} steps over "
                             f"{ray_run['rows']} rows, plain {plain_run['steps']} over "
                             f"{plain_run['rows']}")


def check_similar_loss(ray_run: dict, plain_run: dict, loss_rtol: float) -> None:
    """Final training losses within `loss_rtol` of each other (relative to the larger)."""
    a, b = ray_run["final_train_loss"], plain_run["final_train_loss"]
    if abs(a - b) > loss_rtol * max(abs(a), abs(b)):
        raise AssertionError(f"final training loss differs: Ray {a:.4f}, plain {b:.4f} "
                             f"(rtol {loss_rtol})")


def summarise(runs: list[dict], session: dict | None = None) -> dict:
    """Medians and ratios. With `session` (one Ray for all runs), its start and shutdown are
    added to each Ray run's wall time and phases."""
    session = session or {}
    shared = session.get("ray_start_s", 0.0) + session.get("ray_shutdown_s", 0.0)
    ray_runs = [{**r, "wall_s": r["wall_s"] + shared,
                 "ray_start_s": r["ray_start_s"] or session.get("ray_start_s"),
                 "ray_shutdown_s": r["ray_shutdown_s"] or session.get("ray_shutdown_s")}
                for r in runs if r["kind"] == "ray"]
    plain_runs = [r for r in runs if r["kind"] == "plain"]
    med = statistics.median
    ray_wall = med(r["wall_s"] for r in ray_runs)
    fit = med(r["fit_s"] for r in ray_runs)
    plain_wall = med(r["wall_s"] for r in plain_runs)
    per_ray = [ray_phases(r) for r in ray_runs]
    per_plain = [plain_phases(r) for r in plain_runs]
    epochs = len(ray_runs[0]["worker"]["epochs"])
    return {
        "ray_wall_s": ray_wall, "ray_fit_s": fit, "plain_wall_s": plain_wall,
        "ray_cpu_s": med(r["cpu_s"] for r in ray_runs),
        "plain_cpu_s": med(r["cpu_s"] for r in plain_runs),
        "ratio_ray_over_plain": ray_wall / plain_wall,
        "ratio_fit_over_plain": fit / plain_wall,
        "ratios_per_repeat": [a["wall_s"] / b["wall_s"] for a, b in zip(ray_runs, plain_runs,
                                                                          strict=False)],
        "epochs": epochs, "steps": ray_runs[0]["steps"],
        "ray_phases_median": {k: med(p[k] for p in per_ray) for k in per_ray[0]},
        "plain_phases_median": {k: med(p[k] for p in per_plain) for k in per_plain[0]},
        "ray_epoch_s_median": [med(e["end"] - e["start"] for e in r["worker"]["epochs"])
                               for r in ray_runs],
        "final_train_loss": [(a["final_train_loss"], b["final_train_loss"])
                             for a, b in zip(ray_runs, plain_runs, strict=False)],
        "worker_torch_threads": ray_runs[0]["worker"]["torch_threads"],
        "plain_torch_threads": plain_runs[0]["torch_threads"],
    }


# ---------------------------------------------------------------- entry point

def benchmark(cfg, work: Path, repeats: int, loss_rtol: float = 0.25,
              plain_threads: int | None = None, log=print, json_path: Path | None = None,
              ray_per_run: bool = True) -> tuple[list[dict], dict]:
    """Prepare the data, then `repeats` x (Ray run, plain run), checked and summarised.
    `ray_per_run`: each Ray run starts and stops its own local Ray; otherwise one Ray serves
    the whole benchmark (as one serves a whole pipeline run) and its start and shutdown are
    timed once and added to every Ray run's wall time. With `json_path`, every run is written
    there as soon as it ends (a run stopped early keeps its figures); the loss check runs after
    all repeats, for the same reason."""
    import ray

    session = {}
    if not ray_per_run and not ray.is_initialized():
        t0 = time.time()
        session["ray_start_attempts"] = start_ray(cfg)
        session["ray_start_s"] = time.time() - t0
    prepare_data(cfg)
    threads = plain_threads or max(1, int(cfg.train.cpus_per_worker))
    runs = []
    for rep in range(repeats):
        for kind in ("ray", "plain"):
            tag = f"{kind}{rep}"
            run = (run_ray(cfg, work, tag) if kind == "ray"
                   else run_plain(cfg, work, tag, threads))
            runs.append(run)
            log(f"[ray_overhead] repeat {rep + 1}/{repeats} {kind:5s} wall {run['wall_s']:7.1f} s"
                f"  CPU {run['cpu_s']:7.1f} s  steps {run['steps']}"
                f"  final train loss {run['final_train_loss']:.4f}"
                f"  load {run['load_before']:.1f} -> {run['load_after']:.1f}")
            if json_path is not None:
                _write_json(json_path, {"session": session, "runs": runs})
        check_same_steps(runs[-2], runs[-1])
    if session:
        t0 = time.time()
        ray.shutdown()
        session["ray_shutdown_s"] = time.time() - t0
    summary = summarise(runs, session)
    if json_path is not None:
        _write_json(json_path, {"summary": summary, "session": session, "runs": runs})
    for ray_run, plain_run in zip(runs[::2], runs[1::2], strict=True):
        check_similar_loss(ray_run, plain_run, loss_rtol)
    return runs, summary


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def report(summary: dict, log=print) -> None:
    s = summary
    log(f"\nRay harness (ray.init .. shutdown): median {s['ray_wall_s']:.1f} s; "
        f"train_classifier alone {s['ray_fit_s']:.1f} s")
    log(f"plain PyTorch loop:                 median {s['plain_wall_s']:.1f} s")
    log(f"ratio ray/plain {s['ratio_ray_over_plain']:.2f} (fit only "
        f"{s['ratio_fit_over_plain']:.2f}); per repeat "
        + ", ".join(f"{r:.2f}" for r in s["ratios_per_repeat"]))
    log(f"CPU seconds (median): Ray process tree {s['ray_cpu_s']:.1f}, plain "
        f"{s['plain_cpu_s']:.1f}, ratio {s['ray_cpu_s'] / s['plain_cpu_s']:.2f}")
    log(f"{s['epochs']} epochs, {s['steps']} optimiser steps; torch threads: Ray worker "
        f"{s['worker_torch_threads']}, plain {s['plain_torch_threads']}")
    log("\nRay phases (median s):")
    for k, v in s["ray_phases_median"].items():
        log(f"  {k:34s} {v:8.2f}")
    log("plain phases (median s):")
    for k, v in s["plain_phases_median"].items():
        log(f"  {k:34s} {v:8.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--epochs", type=int, help="override train.epochs (a quick run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, help="data folder (ingest + noise), reused")
    parser.add_argument("--plain-threads", type=int, help="default: train.cpus_per_worker")
    parser.add_argument("--loss-rtol", type=float, default=0.25)
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    parser.add_argument("--one-ray", action="store_true",
                        help="one Ray for all runs, its start and shutdown timed once")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)
    overrides = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    with tempfile.TemporaryDirectory(prefix="ray_overhead_") as tmp:
        root = (args.root or Path(tmp) / "data").resolve()
        cfg = load(args.config, overrides, root)
        _, summary = benchmark(cfg, Path(tmp), args.repeats, args.loss_rtol,
                               args.plain_threads, json_path=args.json,
                               ray_per_run=not args.one_ray)
    report(summary)


if __name__ == "__main__":
    main()
