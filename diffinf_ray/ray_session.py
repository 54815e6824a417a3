"""Connect to Ray: the cluster of `ray job submit` / RAY_ADDRESS / `ray.address`, or a local
one started (and shut down) here."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from diffinf_ray.config import Config

log = logging.getLogger(__name__)

# Forwarded to Ray workers so they reach the same S3 endpoint as the driver.
_FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}


@contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Under `ray job submit` the job's runtime env already reaches the workers; adding
        # ours could conflict with it.
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": worker_env()})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
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
