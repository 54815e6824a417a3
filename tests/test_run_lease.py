"""One writer per run root (diffinf_ray/run_lease.py): the lease on local disk and on the moto
S3 server, processes racing for it, stale takeover, and the CLI refusing a leased root before
Ray starts."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from diffinf_ray.run_lease import LEASE_FILE, Holder, LeaseHeldError, RunLease, run_leases
from diffinf_ray.storage import Location

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "jobs" / "configs" / "tiny.yaml")


def _lease_json(root: Location) -> dict:
    return root.child(LEASE_FILE).read_json()


def _write_lease(root: Location, host: str, pid: int, heartbeat_age_s: float) -> None:
    """A lease as another process would have left it."""
    beat = (datetime.now(UTC) - timedelta(seconds=heartbeat_age_s)).isoformat()
    root.child(LEASE_FILE).write_json({
        "host": host, "pid": pid, "command": "diffinf run old.yaml", "started_at": beat,
        "heartbeat_at": beat, "token": "old-token"})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    """A run root on local disk, or on a moto S3 server."""
    if request.param == "local":
        return Location(str(tmp_path / "run"))
    s3 = request.getfixturevalue("s3_endpoint")
    return Location(s3.bucket("leases")).child("runs", "a")


def test_lease_names_its_holder_and_is_released(root):
    with RunLease(root, command="diffinf run x.yaml") as lease:
        held = _lease_json(root)
        assert held["host"] == socket.gethostname()
        assert held["pid"] == os.getpid()
        assert held["command"] == "diffinf run x.yaml"
        assert held["token"] == lease.holder.token
        assert Holder.loads(json.dumps(held).encode()).age() < 60
    assert not root.child(LEASE_FILE).exists()


def test_lease_released_on_exception(root):
    with pytest.raises(ZeroDivisionError), RunLease(root):
        assert root.child(LEASE_FILE).exists()
        1 / 0  # noqa: B018
    assert not root.child(LEASE_FILE).exists()


def test_second_writer_gets_an_error_naming_the_holder(root):
    with RunLease(root, command="diffinf run first.yaml"):
        with pytest.raises(LeaseHeldError) as caught:
            RunLease(root, command="diffinf run second.yaml").acquire()
        message = str(caught.value)
        assert root.display in message
        assert f"host {socket.gethostname()}" in message
        assert f"pid {os.getpid()}" in message
        assert "'diffinf run first.yaml'" in message
        assert re.search(r"last heartbeat \d+ s ago", message)
        assert _lease_json(root)["command"] == "diffinf run first.yaml"  # untouched
    RunLease(root).acquire().release()  # free again once released


def test_heartbeat_refreshes_the_lease(root):
    with RunLease(root, heartbeat_s=0.2) as lease:
        started = lease.holder.started_at  # the first heartbeat_at too
        deadline = time.monotonic() + 20
        while _lease_json(root)["heartbeat_at"] == started:
            assert time.monotonic() < deadline, "no heartbeat within 20 s"
            time.sleep(0.1)
        assert _lease_json(root)["token"] == lease.holder.token
        assert _lease_json(root)["started_at"] == started


def test_stale_lease_is_taken_over_with_a_warning(root, caplog):
    _write_lease(root, "other-host", 12345, heartbeat_age_s=300)
    with caplog.at_level(logging.WARNING, logger="diffinf"), \
            RunLease(root, timeout_s=120) as lease:
        assert _lease_json(root)["token"] == lease.holder.token
    assert "taking over the lease" in caplog.text
    assert "host other-host, pid 12345" in caplog.text
    assert re.search(r"its last heartbeat is 30\d s old \(timeout 120 s\)", caplog.text)


def test_live_lease_of_another_host_is_not_taken_over(root):
    _write_lease(root, "other-host", 12345, heartbeat_age_s=10)
    with pytest.raises(LeaseHeldError, match="host other-host, pid 12345"):
        RunLease(root, timeout_s=120).acquire()
    assert _lease_json(root)["token"] == "old-token"
    with RunLease(root, timeout_s=120, break_lease=True) as lease:  # --break-lease
        assert _lease_json(root)["token"] == lease.holder.token


def test_lease_of_a_gone_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    root = Location(str(tmp_path))
    pid = _dead_pid()
    _write_lease(root, socket.gethostname(), pid, heartbeat_age_s=1)
    with caplog.at_level(logging.WARNING, logger="diffinf"), RunLease(root):
        pass
    assert f"its process {pid} on this host is gone" in caplog.text


def test_holder_whose_lease_was_taken_over_stops_and_keeps_the_new_lease(tmp_path, caplog):
    root = Location(str(tmp_path))
    lease = RunLease(root, heartbeat_s=0.1).acquire()
    _write_lease(root, "other-host", 999, heartbeat_age_s=0)  # as a takeover would
    deadline = time.monotonic() + 20
    while lease.lost_to is None:
        assert time.monotonic() < deadline, "the lost lease was not noticed within 20 s"
        time.sleep(0.05)
    lease.release()
    assert lease.lost_to.host == "other-host"
    assert _lease_json(root)["token"] == "old-token"  # not deleted by the old holder
    assert "was taken over by host other-host, pid 999" in caplog.text


def test_run_leases_takes_all_or_none(tmp_path):
    a, b = Location(str(tmp_path / "a")), Location(str(tmp_path / "b"))
    with RunLease(b), pytest.raises(LeaseHeldError):
        with run_leases([a, a, b]):
            pass
    assert not a.child(LEASE_FILE).exists()  # released when b could not be taken
    with run_leases([a, a]) as leases:
        assert len(leases) == 1


# -- processes racing --------------------------------------------------------------------------

RACER = textwrap.dedent("""
    import os, sys, time
    from diffinf_ray.run_lease import LeaseHeldError, RunLease
    from diffinf_ray.storage import Location

    lease = RunLease(Location(sys.argv[1]), command=f"racer {os.getpid()}")
    print("ready", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.001)
    try:
        lease.acquire()
        print("won", flush=True)
    except LeaseHeldError:
        print("held", flush=True)
    sys.stdin.read()  # hold until the test has every answer
    lease.release()
""")


def _race(uri: str, go: Path, racers: int = 3) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(go)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(racers)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * racers
        go.touch()
        answers = [p.stdout.readline().strip() for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [0] * racers
    return answers


@pytest.mark.parametrize("stale_lease", [False, True], ids=["free", "stale"])
def test_racing_processes_exactly_one_wins(root, tmp_path, stale_lease):
    if stale_lease:
        _write_lease(root, "other-host", 12345, heartbeat_age_s=1000)
    answers = _race(root.uri, tmp_path / "go")
    assert sorted(answers) == ["held", "held", "won"]
    assert not root.child(LEASE_FILE).exists()  # the winner released it on exit


# -- the commands take it before starting Ray ---------------------------------------------------


@pytest.fixture
def no_pipeline(monkeypatch):
    """Running anything is a test failure: the commands must stop at the lease."""
    import diffinf_ray.experiment
    import diffinf_ray.pipeline
    import diffinf_ray.sweep

    def refuse(*args, **kwargs):
        raise AssertionError("ran past a held lease")

    monkeypatch.setattr(diffinf_ray.pipeline, "run_pipeline", refuse)
    monkeypatch.setattr(diffinf_ray.experiment, "run_experiment", refuse)
    monkeypatch.setattr(diffinf_ray.sweep, "run_sweep", refuse)


def _assert_refused(rc: int, capsys, root: Location) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"error: run root {root.display} is being written by another run" in err
    assert f"pid {os.getpid()}" in err and "'holder'" in err
    import ray

    assert not ray.is_initialized()


def test_run_on_a_leased_root_fails_before_ray(tmp_path, capsys, no_pipeline):
    from diffinf_ray.cli import main
    from jobs import pipeline

    root = Location(str(tmp_path / "run"))
    with RunLease(root, command="holder"):
        _assert_refused(main(["run", TINY, f"run.root={root.path}"]), capsys, root)
        _assert_refused(main(["stage", "train", TINY, f"run.root={root.path}"]), capsys, root)
        _assert_refused(pipeline.main(["--config", TINY, f"run.root={root.path}"]), capsys, root)


def test_experiment_and_sweep_on_a_leased_root_fail_before_ray(tmp_path, capsys, no_pipeline):
    from diffinf_ray.cli import main

    exp_root = Location(str(tmp_path / "table"))
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: t\nroot: {exp_root.path}\nbase: {TINY}\nseeds: [0]\n"
                   "tasks: {expression: {data.task: expression}}\nstages: [ingest]\n")
    with RunLease(exp_root, command="holder"):
        _assert_refused(main(["experiment", str(exp)]), capsys, exp_root)
    base = Location(str(tmp_path / "base"))
    sweep = str(REPO / "jobs" / "configs" / "sweep_tiny.yaml")
    with RunLease(base, command="holder"):  # the base run root: the sweep's shared stages
        _assert_refused(main(["sweep", sweep, f"run.root={base.path}"]), capsys, base)
