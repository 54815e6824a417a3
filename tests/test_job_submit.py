"""`ray job submit` of the three entry points (pipeline, experiment, sweep) with tiny configs to
a local `ray start --head` cluster: how users run them."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffinf_ray.ray_session import LOCAL_RAY_TRAIN_ENV

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ray_head")
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("ray CLI not installed next to the interpreter")
    env = dict(os.environ)
    # A local ray.init() in earlier tests leaves ~/.ray/auth_token, which turns token auth on
    # for `ray start`; pin the mode on both sides (RAY_NOTES 4.3).
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    # a one-machine cluster: Ray Train's settings for a local Ray (the job's driver inherits them)
    env = {**LOCAL_RAY_TRAIN_ENV, **env}
    # A loaded box can make `ray start` itself time out (see conftest's ray_local): retried.
    for attempt in range(1, HEAD_START_ATTEMPTS + 1):
        head, log, address, temp = _start_head(tmp_path / f"ray_head_{attempt}.log", env, ray_bin)
        try:
            _wait_for_dashboard(head, address, log.name)
            break
        except HeadDidNotStart as err:
            _stop_head(head, log, temp, leftovers=True)
            if attempt == HEAD_START_ATTEMPTS or "timed out during startup" not in str(err):
                pytest.fail(f"ray head did not start:\n{err}")
    try:
        yield address, env, ray_bin
    finally:
        _stop_head(head, log, temp)


HEAD_START_ATTEMPTS = 3


class HeadDidNotStart(Exception):
    pass


def _start_head(log_path: Path, env: dict, ray_bin: Path):
    """`ray start --head --block` on free ports and a temp dir of its own; (process, its log,
    dashboard URL, temp dir)."""
    dash = _free_port()
    temp = Path("/tmp") / f"rayjob_{os.getpid()}_{dash}"  # short: unix socket paths have a limit
    # --block keeps `ray start` in the foreground and ends the processes it started when it is
    # stopped: unlike `ray stop`, this leaves any other Ray on the machine alone.
    cmd = [str(ray_bin), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
           f"--port={_free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--temp-dir={temp}",
           # every fixed default port moved aside, so a Ray already running here cannot clash
           *(f"--{name}={_free_port()}" for name in (
               "node-manager-port", "object-manager-port", "runtime-env-agent-port",
               "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port",
               "ray-client-server-port"))]
    log = open(log_path, "wb")  # noqa: SIM115 - closed by _stop_head
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return head, log, f"http://127.0.0.1:{dash}", temp


def _wait_for_dashboard(head: subprocess.Popen, address: str, log_path: str) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise HeadDidNotStart(Path(log_path).read_text()[-3000:]) from None
            time.sleep(1)


def _stop_head(head: subprocess.Popen, log, temp: Path, leftovers: bool = False) -> None:
    """Stop the head; `leftovers`: also kill what a failed start left in its process group."""
    head.send_signal(signal.SIGINT)  # what --block waits for; it then stops its processes
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    if leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


def submit(ray_head, *entry: str) -> str:
    """`ray job submit --working-dir <repo> -- python -m <entry...>`; its output."""
    address, env, ray_bin = ray_head
    cmd = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--", sys.executable, "-m", *entry]
    for _attempt in range(10):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        # the dashboard answers before its job agent is up; Ray says to try again later
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in out.lower()
    return out


# 120 faces, batch 20: no training split of these seeds leaves a last batch of 1 (batch norm)
SMALL = ["data.synthfaces.num_samples=120", "data.synthfaces.num_identities=30",
         "train.batch_size=20", "train.epochs=1"]


def test_ray_job_submit_tiny(ray_head, tmp_path):
    run_root = tmp_path / "job_run"
    # Ray Train's worker group under `ray job submit` (a one-worker fit would run as a task)
    out = submit(ray_head, "jobs.pipeline", "--config", "jobs/configs/tiny.yaml",
                 f"run.root={run_root}", "train.epochs=1", "train.runner=ray_train")
    metrics = json.loads((run_root / "evaluation" / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["n"] > 0
    assert (run_root / "checkpoints" / "epoch_0001" / "checkpoint.pt").exists()
    # the console (the job's output): the epoch line once, none of Ray's own chatter; Ray's
    # lines are in the log file under the run root that the first line names
    epoch = "[train] epoch 1/1 "
    assert sum(line.startswith(epoch) for line in out.splitlines()) == 1, out[-4000:]
    assert "Failed to query" not in out and "TrainingReport(" not in out
    [log_file] = (run_root / "logs").glob("ray-*.log")
    assert f"Ray's logs: {log_file}" in out
    logged = log_file.read_text()
    assert "(RayTrainWorker pid=" in logged and "TrainingReport(" in logged
    assert epoch in logged


# slow (make test-fast leaves it out): 135 s on the idle box, 700 s once at load 20-45
@pytest.mark.slow
@pytest.mark.timeout(1800)  # two jobs (the experiment, then its resume); a loaded box
def test_ray_job_submit_experiment(ray_head, tmp_path):
    """The Table-1 runner as a job: one task, 2 seeds, noisy + removal; the table comes back
    with mean ± std over the seeds, and submitting it again resumes with nothing to re-run.
    (The project's one real experiment run: test_experiment.py covers the runner with stand-in
    stages.)"""
    root = tmp_path / "exp"
    config = tmp_path / "experiment.yaml"
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in SMALL)}
    config.write_text(yaml.safe_dump({
        "name": "job_experiment", "root": str(root), "base": str(REPO / "jobs/configs/tiny.yaml"),
        "seeds": [0, 1], "tasks": {"expression": {"data.task": "expression", "noise.rate": 0.2}},
        "overrides": overrides, "stages": ["ingest", "noise", "train", "evaluate", "influence",
                                           "removal"],
        "clean_ceiling": False, "noise_rates": []}))
    submit(ray_head, "jobs.experiment", "--config", str(config))  # exit 0: no failure, a table
    progress = json.loads((root / "experiment.json").read_text())["runs"]
    assert len(progress) == 2 and all(r["status"] == "done" for r in progress.values())

    out = root / "table"
    table = pd.read_csv(out / "table.csv").set_index("method")
    long = pd.read_csv(out / "metrics_long.csv")
    assert sorted(long.condition.unique()) == ["noisy", "removal"]
    for cond, label in (("noisy", "trained on noisy labels"), ("removal", "self-influence removal")):
        acc = long[long.condition == cond].sort_values("seed").accuracy.to_numpy()
        assert len(acc) == 2
        assert table.loc[label, "expression acc (%)"] == \
            f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f} (n=2)"
    assert table.loc["ProMix", "expression acc (%)"] == "-"
    assert "±" in (out / "table.md").read_text() and "±" in (out / "table.html").read_text()
    assert (out / "plots" / "detection_curves.png").read_bytes()[:4] == b"\x89PNG"

    # resume: nothing re-runs, checkpoints untouched
    ckpts = sorted(root.rglob("checkpoint.pt"))
    assert len(ckpts) == 4  # train + removal, 2 seeds, 1 epoch
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    submit(ray_head, "jobs.experiment", "--config", str(config))
    again = json.loads((root / "experiment.json").read_text())["runs"]
    assert [r["stages_ran"] for r in again.values()] == [[], []]
    assert all(r["status"] == "done" for r in again.values())
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps


@pytest.mark.slow
def test_ray_job_submit_sweep(ray_head, tmp_path):
    """A Tune sweep as a job: the shared stages once, 2 trials, results and best.json back."""
    base_root = tmp_path / "sweep_base"
    config = tmp_path / "job_sweep.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(REPO / "jobs/configs/tiny.yaml"),
        "overrides": [f"run.root={base_root}", "train.cpus_per_worker=0.5", *SMALL],
        "params": {"influence.tau": {"grid": [0.1, 0.2]}}, "objective_stage": "removal",
        "scheduler": {"kind": "fifo"}, "trial_cpus": 0.5}))
    out = submit(ray_head, "jobs.sweep", "--config", str(config))
    sweep_root = base_root / "sweeps" / "job_sweep"
    results = pd.read_csv(sweep_root / "results.csv")
    assert sorted(results["influence.tau"]) == [0.1, 0.2]
    assert (results["status"] == "done").all()
    best = json.loads((sweep_root / "best.json").read_text())
    assert best["value"] == results["val_accuracy"].max()
    assert "best: val_accuracy" in out
    assert json.loads((base_root / "stages" / "train.json").read_text())["status"] == "done"
