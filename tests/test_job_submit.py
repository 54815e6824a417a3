"""`ray job submit` of the tiny job to a local `ray start --head` cluster: how users run it."""

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

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("ray CLI not installed next to the interpreter")
    env = dict(os.environ)
    # A local ray.init() in earlier tests leaves ~/.ray/auth_token, which turns token auth on
    # for `ray start`; pin the mode on both sides (RAY_NOTES 4.3).
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    dash = _free_port()
    temp = Path("/tmp") / f"rayjob_{os.getpid()}"  # short: unix socket paths have a length limit
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
    log = open(tmp_path / "ray_head.log", "wb")  # noqa: SIM115 - closed below
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("ray head did not start:\n" + (tmp_path / "ray_head.log").read_text()[-3000:])
                time.sleep(1)
        yield address, env, ray_bin
    finally:
        head.send_signal(signal.SIGINT)  # what --block waits for; it then stops its processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_tiny(ray_head, tmp_path):
    address, env, ray_bin = ray_head
    run_root = tmp_path / "job_run"
    cmd = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--", sys.executable, "-m", "jobs.pipeline", "--config", "jobs/configs/tiny.yaml",
           f"run.root={run_root}", "train.epochs=1"]
    for _attempt in range(10):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        # the dashboard answers before its job agent is up; Ray says to try again later
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    metrics = json.loads((run_root / "evaluation" / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["n"] > 0
    assert (run_root / "checkpoints" / "epoch_0001" / "checkpoint.pt").exists()
