"""The one Ray Train harness: every model this project trains (the classifier, each noisy-label
baseline, the diffusion autoencoder) goes through it. It owns what is not the model's business:

- driver side, `fit`: the TorchTrainer with its ScalingConfig (workers, GPU or CPU, CPUs per
  worker, from the config section that trains), RunConfig (storage, checkpoints kept),
  FailureConfig (the section's `max_failures`: after a worker error, a killed worker process
  or a lost node, Ray Train restarts the worker group, which resumes from the latest
  checkpoint; past that many the error fails the stage), and which Ray Data datasets are
  sharded ("train"; every worker sees all of "val");
- worker side, `TrainWorker`: rank, world size and device; resume from the latest checkpoint;
  rank-0 checkpointing (`report`: every worker reports, only rank 0 writes the files); logging;
- for the epoch-based trainings (classifier and baselines), `run_epochs`: the learning-rate
  schedule, resume at the epoch after the last checkpoint's, one training epoch by the core,
  validation, per-epoch metrics and log line, and a classifier checkpoint
  (models/checkpoint.py's format, with the learning rate in force) every
  `train.checkpoint_every` epochs and at the last epoch.

A core (`EpochCore`) supplies only the model's part: building its networks and optimisers,
one training epoch (augmentation, mixed precision, EMA are the core's), the network to
validate, its checkpoint files and how to restore them.

How a fit runs (`Placement.runner`, the section's `runner`): `ray_train`, a Ray Train worker
group (TorchTrainer: controller, workers, DDP when several, its failover); `task`, the same loop
in one Ray task (`TaskRun` gives the loop what Ray Train's context would: resume, report with
checkpoints in the same folders, the datasets; a failed task is retried up to `max_failures`
times and resumes from its latest checkpoint); `auto` (default): `task` for one worker, Ray
Train for several. A task is placed like a worker (CPUs, a GPU) but starts no controller,
placement-group cleaner, worker actor, process group or dataset actors, which cost ~25 s per
fit on a 2-core box (benchmarks/RESULTS.md, "Ray overhead").

Checkpoints: <checkpoints>/epoch_NNNN/checkpoint.pt and metrics.json (the epoch's reported
figures, for best-validation selection), plus a core's own files beside them (e.g. a baseline's
method_state.pt), or the autoencoder's step_NNNNNNNN/autoencoder_state.pt. Resume:
Ray Train V2 restores a run from `(storage_path, name)` = the checkpoints folder's parent and
name; `ray.train.get_checkpoint()` is then the latest checkpoint. A restart after a worker
failure within one `fit` resumes the same way: the epochs after the latest checkpoint are
trained again at the learning rates of the schedule (a function of the epoch), and their
checkpoints, named by epoch, land in the same folders: none is missing or duplicated
(tests/test_train_failover.py).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from diffinf_ray.config import TrainSection
from diffinf_ray.datasets import ORDER_KEY
from diffinf_ray.models.checkpoint import (
    CHECKPOINT_FILE,
    EPOCH_METRICS_FILE,
    ClassifierCheckpoint,
    checkpoint_dir_name,
    parse,
    to_bytes,
)
from diffinf_ray.storage import Location

# ----------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class Placement:
    """Where the workers run, and how often they are restarted after failing: a config
    section's num_workers, use_gpu, cpus_per_worker, max_failures."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    max_failures: int  # worker errors Ray Train recovers from (-1: any number)
    runner: str = "auto"  # auto | ray_train | task (module docstring)

    @classmethod
    def of(cls, section) -> Placement:
        """From any section with those fields (`train`, `autoencoder`)."""
        return cls(section.num_workers, section.use_gpu, section.cpus_per_worker,
                   section.max_failures, section.runner)

    @property
    def in_task(self) -> bool:
        """Whether the fit runs as one Ray task rather than a Ray Train worker group."""
        if self.runner == "task" and self.num_workers != 1:
            raise ValueError(f"runner task trains on one worker, not num_workers="
                             f"{self.num_workers}; use runner ray_train (or auto)")
        return self.runner == "task" or (self.runner == "auto" and self.num_workers == 1)


def fit(train_loop, loop_config: dict, datasets: dict, checkpoints: Location,
        placement: Placement, keep: int | None = None, cache: bool = False):
    """Run `train_loop(loop_config)` on Ray Train workers placed by `placement`, with Ray Data
    `datasets` ("train" sharded across workers, any other one seen whole by every worker),
    checkpoints under `checkpoints` (a run already there is resumed; the last `keep` are kept,
    all when None). Up to `placement.max_failures` worker errors restart the workers from the
    latest checkpoint. `cache`: run each dataset once, here, and keep its blocks in Ray's
    object store for every epoch (the section's `cache_decoded_images`). Returns the Ray Train
    `Result`; a failed run raises its error."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from diffinf_ray.ray_session import without_progress_bars, worker_env

    if cache:
        # A streaming dataset is executed again every epoch; on small CPUs the start of each
        # execution (tasks, workers, file listing) costs seconds however few the rows.
        datasets = {key: ds.materialize() for key, ds in datasets.items()}
    if placement.in_task:
        return fit_in_task(train_loop, loop_config, without_progress_bars(datasets),
                           checkpoints, placement, keep)
    parent, name = checkpoints.path.rsplit("/", 1)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=placement.num_workers,
            use_gpu=placement.use_gpu,
            resources_per_worker={"CPU": placement.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=checkpoints.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            # a lost worker costs the epochs since the last checkpoint; a bug fails the stage
            # after the same number of restarts (max_failures=0 for at once)
            failure_config=FailureConfig(max_failures=placement.max_failures),
            worker_runtime_env={"env_vars": worker_env()},
        ),
        datasets=without_progress_bars(datasets),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def fit_in_task(train_loop, loop_config: dict, datasets: dict, checkpoints: Location,
                placement: Placement, keep: int | None = None):
    """`fit` as one Ray task placed like one worker (`placement`'s CPUs and GPU), retried up to
    `max_failures` times (worker errors and lost processes alike, as Ray Train restarts its
    group); each attempt resumes from the run's latest checkpoint. Returns a Ray Train
    `Result` (last metrics, latest checkpoint); a run that keeps failing raises its error."""
    import ray
    from ray.train import Checkpoint, Result
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from diffinf_ray.ray_session import worker_env

    options = {"num_cpus": placement.cpus_per_worker, "num_gpus": int(placement.use_gpu),
               "max_retries": placement.max_failures,
               "retry_exceptions": placement.max_failures != 0,
               "name": f"fit:{loop_config.get('tag', checkpoints.path.rsplit('/', 2)[-2])}",
               # outside any placement group of the caller: a Tune trial's holds only the
               # trial's own CPUs, and the fit is placed as Ray Train places its workers
               "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)}
    env = worker_env()
    if env:
        options["runtime_env"] = {"env_vars": env}
    task = ray.remote(_run_fit_task).options(**options)
    metrics, latest = ray.get(task.remote(train_loop, loop_config, datasets, checkpoints, keep))
    checkpoint = None
    if latest is not None:
        checkpoint = Checkpoint(checkpoints.child(latest).path, filesystem=checkpoints.fs)
    return Result(metrics=metrics, checkpoint=checkpoint, error=None, path=checkpoints.path)


def _run_fit_task(train_loop, loop_config: dict, datasets: dict, checkpoints: Location,
                  keep: int | None):
    """The body of `fit_in_task`'s task: the loop with this process's `TaskRun` set."""
    global _TASK_RUN
    _TASK_RUN = TaskRun(checkpoints, datasets, keep)
    try:
        train_loop(loop_config)
        return _TASK_RUN.last_metrics, _TASK_RUN.latest_name()
    finally:
        _TASK_RUN = None


def numeric_metrics(result) -> dict:
    """The numbers among a Ray Train result's last reported metrics."""
    return {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}


# ----------------------------------------------------------------------------- worker side


class TaskRun:
    """What a loop run by `fit_in_task` gets in place of Ray Train's context: the datasets
    whole, checkpoints written where Ray Train writes them (<checkpoints>/<dir name>/), and the
    run's list of finished checkpoints in <checkpoints>/task_checkpoints.json, written after each
    checkpoint's files, so a retried task resumes from a complete one (as Ray Train's snapshot
    does for its runs)."""

    INDEX = "task_checkpoints.json"

    def __init__(self, checkpoints: Location, datasets: dict, keep: int | None):
        self.checkpoints, self.datasets, self.keep = checkpoints, datasets, keep
        self.index = checkpoints.child(self.INDEX)
        self.names: list[str] = self.index.read_json()["checkpoints"] if self.index.exists() else []
        self.last_metrics: dict | None = None

    def latest_name(self) -> str | None:
        return self.names[-1] if self.names else None

    def latest(self):
        """The latest finished checkpoint as a `ray.train.Checkpoint`, or None."""
        from ray.train import Checkpoint

        name = self.latest_name()
        if name is None:
            return None
        return Checkpoint(self.checkpoints.child(name).path, filesystem=self.checkpoints.fs)

    def report(self, metrics: dict, files: dict | None, dir_name: str | None) -> None:
        self.last_metrics = metrics
        if not files:
            return
        folder = self.checkpoints.child(dir_name)
        for name, payload in files.items():
            folder.child(name).write_bytes(payload_bytes(payload))
        self.names = [n for n in self.names if n != dir_name] + [dir_name]
        stale = self.names[:-self.keep] if self.keep else []
        self.names = self.names[len(stale):]
        self.index.write_json({"checkpoints": self.names, "metrics": metrics})
        for name in stale:  # after the index stops naming them (Ray Train's num_to_keep)
            self.checkpoints.child(name).delete()


def payload_bytes(payload) -> bytes:
    """A checkpoint file's bytes: given as bytes, or a torch.save-able dict serialised."""
    return payload if isinstance(payload, bytes) else to_bytes(payload)


_TASK_RUN: TaskRun | None = None  # set while this process runs `fit_in_task`'s loop


@dataclass
class TrainWorker:
    """This Ray Train worker: where it runs, and how it logs, resumes and checkpoints."""

    tag: str  # log prefix, e.g. "train" or "baselines:elr_plus"
    rank: int
    world: int
    device: Any  # torch.device

    @classmethod
    def current(cls, tag: str) -> TrainWorker:
        import ray.train
        import ray.train.torch
        import torch

        if _TASK_RUN is not None:  # one worker; a GPU when the task was given one
            return cls(tag, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        ctx = ray.train.get_context()
        return cls(tag, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())

    def log(self, message: str) -> None:
        """A line on rank 0's log."""
        if self.rank == 0:
            print(f"[{self.tag}] {message}", flush=True)

    def resume_from(self):
        """The checkpoint this run resumes from (Ray Train's latest), or None."""
        import ray.train

        return _TASK_RUN.latest() if _TASK_RUN is not None else ray.train.get_checkpoint()

    def dataset(self, name: str):
        """This worker's part of the fit's dataset `name` ("train" sharded, others whole)."""
        import ray.train

        if _TASK_RUN is not None:
            return _TASK_RUN.datasets[name]
        return ray.train.get_dataset_shard(name)

    def prepare_model(self, model):
        """`model` on this worker's device (wrapped in DDP by Ray Train when several)."""
        import ray.train.torch

        if _TASK_RUN is not None:
            return model.to(self.device)
        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict, files: dict[str, dict] | None = None,
               dir_name: str | None = None) -> None:
        """Report `metrics`, with a checkpoint of `files` ({file name: torch.save-able dict,
        plain tensors and scalars only, or bytes written as they are}) in `dir_name` when
        given. Every worker must call this once per epoch (it is a barrier); only rank 0
        passes files."""
        import ray.train
        from ray.train import Checkpoint

        if _TASK_RUN is not None:
            _TASK_RUN.report(metrics, files, dir_name)
            return
        if not files:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, payload in files.items():
                (Path(tmp) / name).write_bytes(payload_bytes(payload))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=dir_name)


def cpu_state(module) -> dict:
    """A module's state_dict as detached CPU tensors (what checkpoints hold)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class ShardInMemory:
    """A worker's shard of a small (cached) train split held in memory, its rows put in the
    order of their `order` key (datasets.order_keys) and shuffled each epoch by a permutation
    drawn from the epoch's seed: the same batches in every run, whatever order and block sizes
    Ray Data delivered the rows in (a local shuffle buffer's output depends on both, so two runs
    of one config trained differently). Deterministic for one worker; with several, which rows
    reach which worker still follows Ray Data's delivery."""

    def __init__(self):
        self.columns = None  # {name: CPU tensor}, loaded at the first epoch

    def _load(self, shard) -> None:
        import numpy as np
        import torch

        parts = list(shard.iter_batches(batch_size=None, batch_format="numpy"))
        if not parts:
            raise ValueError("the train shard is empty")
        columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(columns.pop(ORDER_KEY), kind="stable")
        self.columns = {k: torch.from_numpy(np.ascontiguousarray(v[order]))
                        for k, v in columns.items()}

    def batches(self, shard, batch_size: int, device, seed: int):
        import torch

        if self.columns is None:
            self._load(shard)
        n = len(next(iter(self.columns.values())))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            yield {k: v[idx].to(device) for k, v in self.columns.items()}


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one worker's random draws in one epoch (augmentation): a function of the
    run's seed, the worker and the epoch alone, so that an epoch trained again after a
    failover (harness resume) draws what it drew the first time."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def random_hflip(images, generator=None):
    """Each image flipped left-right with probability 1/2 (the cores' augmentation); the draws
    come from `generator` (on the CPU) when given, else from the images' device."""
    import torch

    if generator is None:
        flip = torch.rand(images.shape[0], device=images.device) < 0.5
    else:
        flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


# ----------------------------------------------------------------------------- epoch runner


def learning_rate_at(train: TrainSection, epoch: int) -> float:
    """Learning rate in force during 1-based `epoch` (recorded in each checkpoint for TracIn)."""
    if train.lr_schedule == "constant":
        return train.lr
    progress = (epoch - 1) / max(1, train.epochs)
    return train.lr * 0.5 * (1 + math.cos(math.pi * progress))


def validate(model, val_shard, device) -> dict:
    """{val_loss, val_accuracy (%)} of `model` (put in eval mode) on a Ray Train val shard."""
    import torch
    import torch.nn.functional as F

    model.eval()
    n, correct, loss = 0, 0, 0.0
    with torch.no_grad():
        for batch in val_shard.iter_torch_batches(batch_size=256, device=device):
            logits = model(batch["image"])
            loss += F.cross_entropy(logits, batch["label"], reduction="sum").item()
            correct += (logits.argmax(1) == batch["label"]).sum().item()
            n += len(batch["label"])
    return {"val_loss": loss / max(1, n), "val_accuracy": 100 * correct / max(1, n)}


class EpochCore(Protocol):
    """What a classifier-like training supplies to `run_epochs`."""

    def restore(self, ckpt: ClassifierCheckpoint, directory: Path) -> None:
        """Continue from a checkpoint: `ckpt` is its checkpoint.pt, `directory` holds any
        further files the core wrote there."""

    def train_epoch(self, shard, epoch: int, lr: float) -> dict[str, float]:
        """One epoch over the worker's train shard at learning rate `lr`; metrics averaged
        over samples, named without the "train_" prefix."""

    def eval_model(self):
        """The network validated (and saved) for this epoch."""

    def checkpoint_files(self, epoch: int, lr: float) -> dict[str, dict]:
        """{file name: payload}; CHECKPOINT_FILE in models/checkpoint.py's format."""

    def describe(self, train_metrics: dict[str, float]) -> str:
        """The training part of the epoch's log line."""


def resume_epoch(core: EpochCore, worker: TrainWorker) -> int:
    """The first epoch to train: 1, or the one after the latest checkpoint's (restored into
    `core`). A checkpoint without a readable checkpoint.pt is an error naming the file."""
    resume = worker.resume_from()
    if resume is None:
        return 1
    with resume.as_directory() as d:
        source = f"{resume.path}/{CHECKPOINT_FILE}"
        path = Path(d) / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"[{worker.tag}] {source}: missing; cannot resume (delete "
                                    "the checkpoints folder to start over)")
        ckpt = parse(path.read_bytes(), source)
        core.restore(ckpt, Path(d))
    worker.log(f"resuming after epoch {ckpt.epoch} from {resume.path}")
    return ckpt.epoch + 1


def run_epochs(core: EpochCore, worker: TrainWorker, train: TrainSection) -> None:
    """Epochs up to `train.epochs` (from the one after the latest checkpoint's): the
    scheduled learning rate, the core's epoch, validation on the "val" dataset, the metrics
    {epoch, learning_rate, train_*, val_loss, val_accuracy} reported every epoch, with a
    checkpoint every `train.checkpoint_every` epochs and at the last one."""
    start = resume_epoch(core, worker)
    train_shard, val_shard = worker.dataset("train"), worker.dataset("val")
    for epoch in range(start, train.epochs + 1):
        lr = learning_rate_at(train, epoch)
        train_metrics = core.train_epoch(train_shard, epoch, lr)
        metrics = {"epoch": epoch, "learning_rate": lr,
                   **{f"train_{k}": v for k, v in train_metrics.items()},
                   **validate(core.eval_model(), val_shard, worker.device)}
        worker.log(f"epoch {epoch}/{train.epochs} lr {lr:.2e} {core.describe(train_metrics)} | "
                   f"val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.1f}%")
        save = epoch % train.checkpoint_every == 0 or epoch == train.epochs
        files = core.checkpoint_files(epoch, lr) if save and worker.rank == 0 else None
        if files is not None:  # the epoch's figures beside its weights, for model selection
            files[EPOCH_METRICS_FILE] = json.dumps(metrics).encode()
        worker.report(metrics, files, checkpoint_dir_name(epoch))
