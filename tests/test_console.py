"""What reaches the console and what goes to the run root's log file (diffinf_ray/console.py),
on Ray's own log plumbing without starting Ray: worker-line batches as Ray's log monitor hands
them to the driver, and the driver's `ray*` loggers. The end-to-end check (a real run's console
and log file) is in test_job_submit.py."""

from __future__ import annotations

import io
import logging
import sys
import types

import pytest

from diffinf_ray import console

EPOCH = "[train] epoch 1/2 lr 1.00e-04 train loss 1.3996 acc 23.0% | val loss 1.4053 acc 16.7%"
NOISE = "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable."


def batch(lines, pid=13980, actor="RayTrainWorker", is_err=False) -> dict:
    return {"lines": lines, "pid": pid, "actor_name": actor, "ip": "192.0.2.2",
            "localhost": "192.0.2.2", "is_err": is_err}


class PlainRayHandler(logging.StreamHandler):
    """Named as Ray's console handler (ray._private.log), here writing to a buffer."""


@pytest.fixture
def router(tmp_path):
    out = io.StringIO()
    r = console.RayLogRouter(tmp_path / "logs" / "ray.log", console=out)
    yield r, out
    r.close()


def test_only_tagged_worker_lines_reach_the_console_each_once(router):
    r, out = router
    r.on_worker_lines(batch([NOISE, EPOCH, "Reporting training result 1: TrainingReport(...)"]))
    r.on_worker_lines(batch([EPOCH], is_err=True))  # Train's print patch: the same line again
    r.on_worker_lines(batch([NOISE], pid=13935, actor="PlacementGroupCleaner"))
    r.on_worker_lines(batch(["[2026-12-01 00:19:16,488 E 13784] core_worker.cc:2465: ..."]))
    assert out.getvalue() == EPOCH + "\n"
    logged = r.path.read_text().splitlines()
    assert f"(RayTrainWorker pid=13980) {EPOCH}" in logged
    assert logged.count(f"(RayTrainWorker pid=13980) {EPOCH}") == 2  # nothing lost
    assert f"(PlacementGroupCleaner pid=13935) {NOISE}" in logged
    assert len(logged) == 6


def test_of_the_autoscalers_status_dumps_only_its_events_are_logged(router, monkeypatch):
    pytest.importorskip("ray")
    import ray._private.worker as ray_worker

    def events(lines):  # Ray's filter needs a live GCS: as it would answer, for the test
        return (line.split(":event_summary:")[1] for line in lines if ":event_summary:" in line)

    monkeypatch.setattr(ray_worker, "filter_autoscaler_events", events)
    r, out = router
    r.on_worker_lines({"pid": "autoscaler", "lines": [
        "======== Autoscaler status ========", "Pending Demands:",
        ":event_summary:Adding 1 node(s) of type worker."]})
    assert r.path.read_text() == "(pid=autoscaler) Adding 1 node(s) of type worker.\n"
    assert out.getvalue() == ""


def test_verbose_hands_every_line_to_rays_printer_and_still_logs_it(tmp_path):
    printed = []
    r = console.RayLogRouter(tmp_path / "ray.log", verbose=True, console=io.StringIO())
    r._ray_printer = printed.append
    r.on_worker_lines(batch([NOISE]))
    r.close()
    assert printed == [batch([NOISE])]
    assert NOISE in (tmp_path / "ray.log").read_text()


@pytest.fixture
def dispatcher(monkeypatch):
    """A fresh copy of Ray's driver-side dispatcher of worker lines, with Ray's printer
    ("ray_print_logs", as ray.init adds it) recording what it is given in `.printed`."""
    pytest.importorskip("ray")
    import ray._private.ray_logging as ray_logging

    fresh = ray_logging.WorkerStandardStreamDispatcher()
    fresh.printed = []
    fresh.add_handler("ray_print_logs", fresh.printed.append)
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", fresh)
    return fresh


def test_rays_worker_printer_is_taken_over_and_given_back_by_name(router, dispatcher):
    printed = dispatcher.printed
    r, out = router
    assert r.capture_worker_lines()
    dispatcher.emit(batch([NOISE, EPOCH]))
    assert printed == [] and out.getvalue() == EPOCH + "\n"
    dispatcher.remove_handler("ray_print_logs")  # what ray.shutdown does
    assert dispatcher.handlers == []


def test_cluster_messages_reach_the_console_unless_known_noise(router, dispatcher,
                                                               monkeypatch):
    import ray._private.worker as ray_worker

    printed = []
    fake = lambda data, ignore_prefix: printed.append(data["lines"])  # noqa: E731
    monkeypatch.setattr(ray_worker, "print_to_stdstream", fake)
    r, _ = router
    assert r.capture_worker_lines()
    noise = "WARNING: 8 PYTHON worker processes have been started on node: 4a61 ..."
    oom = "Task was killed due to the node running low on memory."
    ray_worker.print_to_stdstream({"lines": [noise], "pid": "raylet", "is_err": False}, False)
    ray_worker.print_to_stdstream({"lines": [oom], "pid": "raylet", "is_err": False}, False)
    assert printed == [[oom]]
    r.close()
    assert ray_worker.print_to_stdstream is fake
    text = r.path.read_text()
    assert f"(raylet) {noise}" in text and f"(raylet) {oom}" in text


def test_ray_loggers_go_to_the_file_and_only_their_errors_to_the_console(router):
    r, _ = router
    stream = io.StringIO()
    logger = logging.getLogger("ray.diffinf_console_test")
    own = PlainRayHandler(stream)
    logger.addHandler(own)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    errors = io.StringIO()
    try:
        r.route_loggers()
        [extra] = [h for h in logger.handlers if getattr(h, "_diffinf_errors", False)]
        extra.setStream(errors)
        logger.info("Execution plan of Dataset dataset_0: InputDataBuffer[Input] -> ...")
        logger.error("a Ray error")
        assert stream.getvalue() == ""
        assert errors.getvalue() == "[ray] a Ray error\n"
        text = r.path.read_text()
        assert "Execution plan of Dataset" in text and "a Ray error" in text
        r.close()
        assert logger.handlers == [own]  # put back as it was
    finally:
        logger.handlers.clear()


def test_stage_progress_says_the_stage_is_running_and_stops(caplog):
    import time

    caplog.set_level(logging.INFO, logger="diffinf_ray.console")
    with console.stage_progress("influence", first_s=0.05, max_s=0.05):
        time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records if "running" in r.getMessage()]
    assert lines and all(m.startswith("stage influence: running, ") for m in lines)
    count = len(lines)
    time.sleep(0.2)
    assert len([r for r in caplog.records if "running" in r.getMessage()]) == count


def test_a_workers_warning_of_this_package_is_a_console_line(capsys, monkeypatch):
    logger = logging.getLogger("diffinf_ray")
    before = list(logger.handlers)
    console.tag_worker_logs()  # the driver (this process): nothing changes
    assert logger.handlers == before
    worker = types.SimpleNamespace(WORKER_MODE=1, global_worker=types.SimpleNamespace(mode=1))
    monkeypatch.setitem(sys.modules, "ray._private.worker", worker)
    try:
        console.tag_worker_logs()
        console.tag_worker_logs()  # idempotent: one handler
        logging.getLogger("diffinf_ray.stages.edit").warning("edit attempt 1 of 32 rows failed")
        [line] = capsys.readouterr().err.splitlines()
        assert line == "[diffinf] WARNING edit attempt 1 of 32 rows failed"
        assert console.for_console(line)
    finally:
        logger.handlers[:] = before


def test_the_log_file_lies_under_a_local_run_root(tmp_path):
    from diffinf_ray.run_root import RunRoot

    path, upload = console.log_file_for(RunRoot(str(tmp_path)))
    assert path.parent == tmp_path / "logs" and path.name.startswith("ray-")
    assert upload is None


def test_an_s3_run_roots_log_is_copied_there_at_the_end(s3_endpoint, caplog):
    pytest.importorskip("ray")  # its `ray` logger, with Ray's console handler
    from diffinf_ray.run_root import RunRoot

    caplog.set_level(logging.INFO, logger="diffinf_ray.console")
    root = RunRoot(s3_endpoint.bucket("logs-runs").replace("s3://logs-runs", "s3://logs-runs/r"))
    with console.routed_ray_logs(root) as r:
        logging.getLogger("ray").warning("a line of Ray's")
    [said] = [m.getMessage() for m in caplog.records if "Ray's logs" in m.getMessage()]
    assert str(r.path) in said and "s3://logs-runs/r/logs/" in said
    [key] = [o["Key"] for o in s3_endpoint.client.list_objects_v2(
        Bucket="logs-runs", Prefix="r/logs/")["Contents"]]
    body = s3_endpoint.client.get_object(Bucket="logs-runs", Key=key)["Body"].read().decode()
    assert "a line of Ray's" in body
    assert console.last_log_file == f"s3://logs-runs/{key}"
