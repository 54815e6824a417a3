"""`ray job submit` of the tiny job to a local `ray start --head` cluster: how users run it."""

import json
import os
import shutil
import socket
import subprocess
import sys
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
    cmd = [str(ray_bin), "start", "--head", "--num-cpus=2", "--disable-usage-stats",
           f"--port={_free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--temp-dir={temp}"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env, ray_bin
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_tiny(ray_head, tmp_path):
    address, env, ray_bin = ray_head
    run_root = tmp_path / "job_run"
    cmd = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--", sys.executable, "-m", "jobs.pipeline", "--config", "jobs/configs/tiny.yaml",
           f"run.root={run_root}", "train.epochs=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    metrics = json.loads((run_root / "evaluation" / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["n"] > 0
    assert (run_root / "checkpoints" / "epoch_0001" / "checkpoint.pt").exists()
