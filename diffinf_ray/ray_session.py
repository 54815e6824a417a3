"""Connect to Ray: the cluster of `ray job submit` / RAY_ADDRESS / `ray.address`, or a local
one started (and shut down) here."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from diffinf_ray.config import Config

log = logging.getLogger(__name__)

# Forwarded to Ray workers so they reach the same S3 endpoint as the driver. Not the
# credentials: Ray's runtime-env agent logs the runtime env in full (runtime_env_agent.log),
# and the workers of a local Ray inherit them from this process's environment anyway.
_FORWARDED_ENV = (
    "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}


# Ray Train settings for a Ray started here, on one machine (Ray Train hands them from the
# driver to its controller and workers; a value already in the environment wins):
# - the controller polls its workers every 0.5 s, not 2 s: a finished fit returns ~3 s sooner
#   (benchmarks/RESULTS.md, "Ray Train's fixed cost per fit");
# - no preemption watcher, an actor process per fit that waits for the node to be drained,
#   which a local node never is;
# - no Ray Train metrics: a local Ray has no dashboard to show them.
LOCAL_RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


# A loaded machine can make a local Ray's start-up fail: the raylet waits a fixed 15 s for the
# dashboard agent's port file and exits when it is late (Ray issue 65983), and ray.init then
# says "timed out during startup". Seen on a 2-core box at load average 25-45; a retry with a
# fresh temp dir, after stopping what the failed attempt left running, gets it up.
START_ATTEMPTS = 3


def start_timed_out(err: BaseException) -> bool:
    return "timed out during startup" in str(err)


def stop_processes_of(temp_dir: str) -> None:
    """Kill this process's descendants that were started for the Ray whose temp dir is
    `temp_dir` (the daemons a failed start leaves behind)."""
    import psutil  # Ray's vendored copy, on sys.path once ray is imported

    for proc in psutil.Process().children(recursive=True):
        try:
            if temp_dir in " ".join(proc.cmdline()):
                proc.kill()
        except psutil.Error:
            continue


def start_local_ray(num_cpus: int | None, attempts: int = START_ATTEMPTS,
                    temp_dir: str | None = None, pause_s: float = 10.0, **init_kwargs) -> int:
    """`ray.init` of a new local Ray (no dashboard), retried up to `attempts` times when its
    start-up times out. `temp_dir`: Ray's temp dir (retries use `<temp_dir>.2`, `.3`: a new
    one each, as short as the first, since Ray's socket paths below it must stay under 108
    bytes); None keeps Ray's default. Waits `pause_s` times the attempt number before a retry,
    so that a burst of load can pass. Sets LOCAL_RAY_TRAIN_ENV in this process's environment
    where unset. Returns the number of attempts made."""
    import ray

    for name, value in LOCAL_RAY_TRAIN_ENV.items():  # before ray.init: its daemons inherit them
        os.environ.setdefault(name, value)
    for attempt in range(1, attempts + 1):
        attempt_dir = temp_dir if temp_dir is None or attempt == 1 else f"{temp_dir}.{attempt}"
        if attempt_dir is not None:
            init_kwargs["_temp_dir"] = attempt_dir
        try:
            # address "local": always a new Ray. Without it ray.init joins whatever cluster it
            # finds running on this machine (another run's, a test's), whose loss then fails
            # this run; a cluster is joined only when named (RAY_ADDRESS, ray.address).
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **init_kwargs)
            return attempt
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception on this timeout
            ray.shutdown()
            # this process's own descendants: only the failed attempt's daemons match
            stop_processes_of(attempt_dir or "ray")
            if attempt == attempts or not start_timed_out(err):
                raise
            log.warning("Ray's start-up timed out (attempt %d of %d); retrying", attempt,
                        attempts)
            time.sleep(pause_s * attempt)
    raise AssertionError("unreachable")


@contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """Ray for the `with` block (joined or started here, shut down after), its logs in a file
    under the config's run root and off the console (diffinf_ray/console.py). A Ray already
    initialised (a test's, an experiment's) is used as it is."""
    from diffinf_ray.run_root import RunRoot
    from diffinf_ray.storage import StorageOptions

    with ray_session_at(RunRoot(cfg.run.root, StorageOptions.of(cfg.storage)), cfg.ray):
        yield


@contextmanager
def ray_session_at(root, ray_section) -> Iterator[None]:
    """`ray_session` for any command: logs under the run root `root` (run_root.RunRoot), the
    cluster and CPUs of `ray_section` (config.RaySection)."""
    import ray
    import ray.data  # configures its loggers, which the routing below takes over

    from diffinf_ray.console import is_verbose, routed_ray_logs

    if ray.is_initialized():
        yield
        return
    address = ray_section.address or os.environ.get("RAY_ADDRESS")
    with routed_ray_logs(root) as router:
        if address:
            # Under `ray job submit` the job's runtime env already reaches the workers; adding
            # ours could conflict with it.
            ray.init(address=address, log_to_driver=True)
        else:
            start_local_ray(ray_section.num_cpus, log_to_driver=True,
                            runtime_env={"env_vars": worker_env()})
        if not router.capture_worker_lines():
            log.warning("this Ray version's worker logs cannot be routed: they stay here")
        # Ray Data's bars on a terminal (one per dataset) only with --verbose; elsewhere it logs
        # progress, which goes to the log file (and the stage progress line)
        ray.data.DataContext.get_current().enable_progress_bars = (
            is_verbose() or not sys.stdout.isatty())
        try:
            yield
        finally:
            ray.shutdown()


def without_progress_bars(datasets: dict) -> dict:
    """`datasets` (Ray Data, handed to Ray Train) with their progress bars off, the driver's
    left on. Train runs them in its workers and split coordinator, whose tqdm output reaches the
    driver as raw lines full of cursor moves: they garble the terminal and log, and keep
    redrawing finished bars long after the epoch. The training loop's per-epoch line is the
    progress there."""
    for ds in datasets.values():
        ds.context.enable_progress_bars = False  # the context this dataset (and its run) uses
    return datasets
