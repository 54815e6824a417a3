"""Training survives a lost worker (models/harness.py): with `train.max_failures` > 0 Ray Train
restarts a killed worker (runner ray_train), or Ray retries a killed fit task (runner task),
which resumes from the latest checkpoint, and the run ends with the
checkpoints, epochs and learning rates of a run that never failed. `max_failures` reaches
Ray Train from both sections that train, and is not in any fingerprint."""

from __future__ import annotations

import pytest

from diffinf_ray.config import load_config
from diffinf_ray.models.checkpoint import list_checkpoints, load_checkpoint
from diffinf_ray.models.harness import Placement, fit, learning_rate_at
from diffinf_ray.stage_registry import STAGES, fingerprint, fingerprint_parts
from diffinf_ray.storage import Location

TINY = "jobs/configs/tiny.yaml"
EPOCHS = 3
KILL_EPOCH = 2


def test_max_failures_reaches_ray_train(monkeypatch, tmp_path):
    """Each section's max_failures is the FailureConfig of its Ray Train run (default 3)."""
    import ray.train.torch

    seen = []

    class Trainer:
        def __init__(self, *args, run_config, **kwargs):
            seen.append(run_config.failure_config.max_failures)

        def fit(self):
            return type("Result", (), {"error": None})()

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    ray_train = ["train.runner=ray_train", "autoencoder.runner=ray_train"]
    cfg = load_config(TINY, ["train.max_failures=5", "autoencoder.max_failures=0", *ray_train])
    checkpoints = Location(str(tmp_path / "checkpoints"))
    for section in (cfg.train, cfg.autoencoder, load_config(TINY, ray_train).train):
        fit(lambda config: None, {}, {}, checkpoints, Placement.of(section))
    assert seen == [5, 0, 3]


def test_max_failures_is_not_in_any_fingerprint():
    base = load_config(TINY)
    other = load_config(TINY, ["train.max_failures=0", "autoencoder.max_failures=-1"])
    for stage in STAGES:
        assert fingerprint(base, stage) == fingerprint(other, stage), stage
        for section in fingerprint_parts(base, stage).values():
            assert "max_failures" not in (section if isinstance(section, dict) else {}), stage


def _killing_loop(marker: str, trained: str, kill_epoch: int, checkpoints: str):
    """The classifier's train loop, unchanged but for a worker that records each epoch it
    trains (pid, epoch, learning rate) and kills its own process with SIGKILL at the start of
    `kill_epoch`, the first time only, once the previous epoch's checkpoint is committed: Ray
    Train's controller's snapshot in `checkpoints` names it (a worker lost within the
    controller's poll interval after a report takes that checkpoint with it, and the restart
    resumes from the one before), or the fit task's own index (harness.TaskRun, written before
    the report returns). Self-contained: Ray pickles it by value."""

    def loop(config: dict) -> None:
        import os
        import signal
        import time
        from pathlib import Path

        def committed() -> str:
            found = [Path(checkpoints) / name for name in
                     ("checkpoint_manager_snapshot.json", "task_checkpoints.json")]
            return "".join(f.read_text() for f in found if f.exists())

        def wait_for_commit(epoch: int) -> None:
            deadline = time.monotonic() + 300
            while f'"epoch_{epoch:04d}"' not in committed():
                assert time.monotonic() < deadline, f"epoch {epoch} was never committed"
                time.sleep(0.2)

        from diffinf_ray.models.harness import TrainWorker, run_epochs
        from diffinf_ray.models.training import ClassifierCore

        worker = TrainWorker.current("train")
        core = ClassifierCore(config, worker)
        train_epoch = core.train_epoch

        def train_epoch_or_die(shard, epoch: int, lr: float) -> dict:
            with open(trained, "a") as f:
                f.write(f"{os.getpid()} {epoch} {lr!r}\n")
            if epoch == kill_epoch and not Path(marker).exists():
                wait_for_commit(epoch - 1)
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return train_epoch(shard, epoch, lr)

        core.train_epoch = train_epoch_or_die
        run_epochs(core, worker, core.train)

    return loop


@pytest.fixture(scope="module")
def tiny_manifest(ray_local, tmp_path_factory):
    """The tiny config on 64 rows, cosine learning rate, a checkpoint every epoch; its noisy
    manifest written."""
    from diffinf_ray.pipeline import open_run_root, run_pipeline

    root = tmp_path_factory.mktemp("failover")
    cfg = load_config(TINY, [
        f"run.root={root}", "stages=[ingest,noise]", "data.synthfaces.num_samples=64",
        "data.synthfaces.num_identities=16", f"train.epochs={EPOCHS}", "train.batch_size=16",
        "train.checkpoint_every=1", "train.lr_schedule=cosine", "train.lr=0.001",
        "train.max_failures=1"])
    run_pipeline(cfg)
    return cfg, open_run_root(cfg)


def _epochs_and_rates(checkpoints: Location) -> list[tuple[int, float]]:
    return [(c.epoch, c.learning_rate) for c in map(load_checkpoint,
                                                    list_checkpoints(checkpoints))]


# In CI: two Ray Train fits and a restart, 91 s on the idle 2-core box (2026-12-05); 19 minutes
# once at load 45-60, when the 900 s default timeout cut it off, hence the long timeout
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("runner", ["ray_train", "task"])
def test_a_killed_train_worker_resumes_from_the_latest_checkpoint(tiny_manifest, tmp_path,
                                                                   monkeypatch, runner):
    from diffinf_ray.models import training

    cfg, root = tiny_manifest
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"runner": runner})})
    manifest, root = root.noisy_manifest, root.child(runner)
    clean = root.child("clean_checkpoints")
    training.train_classifier(cfg, manifest, clean, 4)

    marker, trained = tmp_path / "killed", tmp_path / "trained.txt"
    failed_over = root.child("failover_checkpoints")
    monkeypatch.setattr(training, "_train_loop", _killing_loop(
        str(marker), str(trained), KILL_EPOCH, failed_over.path))
    metrics = training.train_classifier(cfg, manifest, failed_over, 4)

    assert marker.exists(), "the worker was not killed"
    rows = [line.split() for line in trained.read_text().splitlines()]
    killed_pid = marker.read_text()
    first = [int(epoch) for pid, epoch, _ in rows if pid == killed_pid]
    second = [int(epoch) for pid, epoch, _ in rows if pid != killed_pid]
    assert first == list(range(1, KILL_EPOCH + 1))  # died in its KILL_EPOCH
    assert second == list(range(KILL_EPOCH, EPOCHS + 1))  # a new worker, from the checkpoint
    for _, epoch, lr in rows:
        assert float(lr) == learning_rate_at(cfg.train, int(epoch))

    expected = [(e, pytest.approx(learning_rate_at(cfg.train, e))) for e in range(1, EPOCHS + 1)]
    assert _epochs_and_rates(clean) == expected
    assert _epochs_and_rates(failed_over) == _epochs_and_rates(clean)
    assert failed_over.list_dirs() == clean.list_dirs()  # no stray or duplicate checkpoint
    assert metrics["epoch"] == EPOCHS
