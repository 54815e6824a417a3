"""Starting a local Ray on a loaded machine: a start-up that times out is retried in a fresh
temp dir, any other failure is raised at once (ray.init replaced, so no Ray starts here)."""

import pytest

from diffinf_ray import ray_session


class FakeInit:
    def __init__(self, errors):
        self.errors = list(errors)
        self.temp_dirs = []

    def __call__(self, **kwargs):
        self.temp_dirs.append(kwargs.get("_temp_dir"))
        if self.errors:
            raise self.errors.pop(0)


@pytest.fixture
def fake_ray(monkeypatch):
    ray = pytest.importorskip("ray")
    stopped = []
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_session, "stop_processes_of", stopped.append)
    return ray, stopped


def test_a_timed_out_start_is_retried_in_a_new_temp_dir(fake_ray, monkeypatch, tmp_path):
    ray, stopped = fake_ray
    init = FakeInit([Exception("The current node timed out during startup.")])
    monkeypatch.setattr(ray, "init", init)
    base = str(tmp_path / "r")
    assert ray_session.start_local_ray(2, temp_dir=base, pause_s=0) == 2
    assert init.temp_dirs == [base, f"{base}.2"]
    assert stopped == [base]  # the failed attempt's daemons, and only those


def test_other_errors_and_the_last_timeout_are_raised(fake_ray, monkeypatch):
    ray, _ = fake_ray
    monkeypatch.setattr(ray, "init", FakeInit([ValueError("bad num_cpus")]))
    with pytest.raises(ValueError, match="bad num_cpus"):
        ray_session.start_local_ray(2)
    timeouts = [Exception("timed out during startup")] * 3
    monkeypatch.setattr(ray, "init", init := FakeInit(timeouts))
    with pytest.raises(Exception, match="timed out during startup"):
        ray_session.start_local_ray(2, attempts=3, pause_s=0)
    assert init.temp_dirs == [None, None, None]  # Ray's default temp dir when none is given


def test_a_local_ray_gets_ray_trains_local_settings_unless_the_user_set_them(fake_ray,
                                                                             monkeypatch):
    """The settings must be in the environment when ray.init starts the daemons (the Train
    controller and workers inherit them); a value the user exported wins."""
    ray, _ = fake_ray
    seen = {}

    def init(**kwargs):
        seen.update({k: ray_session.os.environ.get(k) for k in ray_session.LOCAL_RAY_TRAIN_ENV})

    for name in ray_session.LOCAL_RAY_TRAIN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    monkeypatch.setattr(ray, "init", init)
    ray_session.start_local_ray(2)
    assert seen == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3",
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                    "RAY_TRAIN_METRICS_ENABLED": "0"}
