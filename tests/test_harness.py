"""The Ray Train harness (models/harness.py) on one in-process worker: Ray Train's worker calls
(`get_checkpoint`, `get_dataset_shard`, `report`, `prepare_model`) are replaced by local ones
that keep checkpoints in a folder, so resume and the checkpoint format are checked in seconds.
The same harness on real Ray Train workers: tests/test_pipeline_ray.py (classifier resume),
tests/test_baselines_stage.py, tests/test_autoencoder_stage.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffinf_ray.config import TrainSection
from diffinf_ray.models.checkpoint import CHECKPOINT_FILE, checkpoint_dir_name, load_checkpoint
from diffinf_ray.models.harness import TrainWorker, learning_rate_at, run_epochs
from diffinf_ray.models.method_training import METHOD_STATE_FILE, MethodCore
from diffinf_ray.models.training import ClassifierCore
from diffinf_ray.storage import Location

NUM_CLASSES, ROWS = 3, 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Interrupted(Exception):
    """Stands in for a run killed after some epochs."""


class Shard:
    """A train/val shard: the same rows each pass, in an order drawn from the shuffle seed."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(ROWS, 3, 32, 32, generator=g) * 2 - 1
        self.labels = torch.randint(0, NUM_CLASSES, (ROWS,), generator=g)

    def iter_batches(self, batch_size=None, batch_format="numpy"):
        """Ray Data's blocks of a cached split: here two, the second half first."""
        order = np.r_[np.arange(ROWS // 2, ROWS), np.arange(ROWS // 2)]
        for part in np.array_split(order, 2):
            yield {"image": self.images[part].numpy(), "label": self.labels[part].numpy(),
                   "order": part.astype(np.int64)}

    def iter_torch_batches(self, batch_size, device, local_shuffle_buffer_size=None,
                           local_shuffle_seed=None):
        order = torch.arange(ROWS)
        if local_shuffle_seed is not None:
            order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(local_shuffle_seed))
        for i in range(0, ROWS, batch_size):
            idx = order[i:i + batch_size]
            yield {"image": self.images[idx].to(device), "label": self.labels[idx].to(device),
                   "index": idx.to(device)}


class LocalTrain:
    """Ray Train's worker calls, kept in `store`: report() copies a checkpoint to
    store/<dir name>; get_checkpoint() is `resume_dir` (a folder of the store) or None."""

    def __init__(self, monkeypatch, store: Path):
        import ray.train
        import ray.train.torch

        self.store, self.reports, self.resume_dir, self.stop_after = store, [], None, None
        shards = {"train": Shard(1), "val": Shard(2)}
        monkeypatch.setattr(ray.train, "report", self.report)
        monkeypatch.setattr(ray.train, "get_checkpoint", self.get_checkpoint)
        monkeypatch.setattr(ray.train, "get_dataset_shard", shards.__getitem__)
        monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)

    def report(self, metrics, checkpoint=None, checkpoint_dir_name=None):
        self.reports.append(dict(metrics))
        if checkpoint is not None:
            shutil.copytree(checkpoint.path, self.store / checkpoint_dir_name)
        if self.stop_after is not None and len(self.reports) >= self.stop_after:
            raise Interrupted

    def get_checkpoint(self):
        from ray.train import Checkpoint

        return None if self.resume_dir is None else Checkpoint.from_directory(str(self.resume_dir))


def worker(tag: str = "test") -> TrainWorker:
    return TrainWorker(tag, rank=0, world=1, device=torch.device("cpu"))


def train_section(**kw) -> TrainSection:
    return TrainSection(**{"epochs": 4, "batch_size": 4, "lr": 1e-3, "lr_schedule": "cosine",
                           "checkpoint_every": 1, "head_hidden": 8, "augment": False, **kw})


def classifier_config(train: TrainSection) -> dict:
    return {"train": train.model_dump(mode="json"), "num_classes": NUM_CLASSES, "seed": 3,
            "init_state": None}


def saved(store: Path, epoch: int):
    return load_checkpoint(Location(str(store / checkpoint_dir_name(epoch) / CHECKPOINT_FILE)))


@pytest.mark.parametrize("augment", [False, True])
def test_resume_continues_at_the_next_epoch_with_the_saved_state_and_lr(monkeypatch, tmp_path,
                                                                         augment):
    # with flips: an epoch trained again after a restart draws the flips of the first time
    train = train_section(augment=augment)
    whole = LocalTrain(monkeypatch, tmp_path / "whole")
    run_epochs(ClassifierCore(classifier_config(train), worker()), worker(), train)
    assert [m["epoch"] for m in whole.reports] == [1, 2, 3, 4]
    for epoch, reported in enumerate(whole.reports, start=1):  # beside each checkpoint
        figures = json.loads((whole.store / checkpoint_dir_name(epoch) / "metrics.json").read_text())
        assert figures == pytest.approx(reported) and "val_accuracy" in figures

    # the same run killed after epoch 2's checkpoint, then started again on its folder
    cut = LocalTrain(monkeypatch, tmp_path / "cut")
    cut.stop_after = 2
    with pytest.raises(Interrupted):
        run_epochs(ClassifierCore(classifier_config(train), worker()), worker(), train)
    assert sorted(p.name for p in cut.store.iterdir()) == ["epoch_0001", "epoch_0002"]
    cut.stop_after, cut.resume_dir = None, cut.store / "epoch_0002"
    restored = {}
    core = ClassifierCore(classifier_config(train), worker())
    real_restore = core.restore

    def spy(ckpt, directory):
        restored["epoch"], restored["lr"] = ckpt.epoch, ckpt.learning_rate
        real_restore(ckpt, directory)

    core.restore = spy
    run_epochs(core, worker(), train)

    assert restored == {"epoch": 2, "lr": pytest.approx(learning_rate_at(train, 2))}
    assert [m["epoch"] for m in cut.reports] == [1, 2, 3, 4]  # 3 and 4 after the restart
    for epoch in (1, 2, 3, 4):
        assert saved(cut.store, epoch).learning_rate == pytest.approx(learning_rate_at(train, epoch))
        assert cut.reports[epoch - 1]["learning_rate"] == pytest.approx(
            learning_rate_at(train, epoch))
    assert learning_rate_at(train, 3) < learning_rate_at(train, 2)  # cosine: the lr moved on
    # weights, batch-norm statistics and Adam's state carried over: the same end as unbroken
    a, b = saved(whole.store, 4), saved(cut.store, 4)
    for key, value in a.model_state.items():
        torch.testing.assert_close(b.model_state[key], value, msg=key)
    steps = [s["step"] for s in b.optimizer_state["state"].values()]
    assert steps and all(float(s) == 4 * 3 for s in steps)  # 3 batches of 10 rows per epoch
    assert cut.reports[-1]["train_loss"] == pytest.approx(whole.reports[-1]["train_loss"])


def test_a_checkpoint_without_checkpoint_pt_is_a_clear_error(monkeypatch, tmp_path):
    train = train_section()
    local = LocalTrain(monkeypatch, tmp_path)
    (tmp_path / "epoch_0001").mkdir()
    local.resume_dir = tmp_path / "epoch_0001"
    with pytest.raises(FileNotFoundError, match=r"\[train\].*checkpoint\.pt: missing"):
        run_epochs(ClassifierCore(classifier_config(train), worker()), worker("train"), train)


@pytest.mark.parametrize("method", ["standard", "elr_plus"])
def test_one_checkpoint_format_whoever_trained_the_classifier(monkeypatch, tmp_path, method):
    """The classifier and a baseline method (one network, or ELR+'s two-network ensemble)
    write checkpoint.pt through the harness; the classifier loader reads both back into a
    network that predicts like the trainer's own."""
    train = train_section(epochs=1)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    local = LocalTrain(monkeypatch, tmp_path)
    cores = {
        "classifier": ClassifierCore(classifier_config(train), worker()),
        method: MethodCore({"train": train.model_dump(mode="json"), "method": method,
                            "options": {}, "num_classes": NUM_CLASSES, "num_samples": ROWS,
                            "seed": 3}, worker()),
    }
    for name, core in cores.items():
        local.store = tmp_path / name
        run_epochs(core, worker(), train)
        ckpt = saved(local.store, 1)
        assert (ckpt.epoch, ckpt.learning_rate) == (1, pytest.approx(train.lr))
        assert ckpt.architecture == {"name": "resnet18_fc2", "num_classes": NUM_CLASSES,
                                     "head_hidden": 8}
        with torch.no_grad():
            expected = core.eval_model().eval()(images)
            torch.testing.assert_close(ckpt.build_model()(images), expected, msg=name)
        assert len(ckpt.peer_states or []) == (1 if name == "elr_plus" else 0)
        if name == "classifier":
            assert ckpt.optimizer_state is not None  # what the classifier resumes from
        else:
            assert (local.store / "epoch_0001" / METHOD_STATE_FILE).is_file()


def test_a_fit_task_keeps_its_checkpoints_where_ray_train_would_and_resumes_from_them(
        monkeypatch, tmp_path):
    """runner task (harness.TaskRun, in this process): checkpoints in <checkpoints>/epoch_NNNN
    with their metrics, the last `keep` kept, an index naming the finished ones; a run started
    again on the folder resumes after the latest and ends as an unbroken one."""
    from diffinf_ray.models import harness

    train = train_section()
    shards = {"train": Shard(1), "val": Shard(2)}

    def run(folder: Path, keep, stop_after=None) -> harness.TaskRun:
        task = harness.TaskRun(Location(str(folder)), shards, keep)
        monkeypatch.setattr(harness, "_TASK_RUN", task)
        report = task.report

        def counted(metrics, files, dir_name):
            report(metrics, files, dir_name)
            if stop_after is not None and metrics["epoch"] >= stop_after:
                raise Interrupted

        monkeypatch.setattr(task, "report", counted)
        here = TrainWorker.current("test")
        assert (here.rank, here.world, here.device.type) == (0, 1, "cpu")
        run_epochs(ClassifierCore(classifier_config(train), here), here, train)
        return task

    whole = run(tmp_path / "whole", keep=None)
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == [
        "epoch_0001", "epoch_0002", "epoch_0003", "epoch_0004", "task_checkpoints.json"]
    assert whole.last_metrics["epoch"] == 4 and whole.latest_name() == "epoch_0004"

    with pytest.raises(Interrupted):
        run(tmp_path / "cut", keep=2, stop_after=3)
    assert sorted(p.name for p in (tmp_path / "cut").glob("epoch_*")) == ["epoch_0002",
                                                                          "epoch_0003"]
    index = json.loads((tmp_path / "cut" / "task_checkpoints.json").read_text())
    assert index["checkpoints"] == ["epoch_0002", "epoch_0003"]
    resumed = run(tmp_path / "cut", keep=2)
    assert resumed.names == ["epoch_0003", "epoch_0004"]
    assert not (tmp_path / "cut" / "epoch_0002").exists()
    a, b = saved(tmp_path / "whole", 4), saved(tmp_path / "cut", 4)
    for key, value in a.model_state.items():
        torch.testing.assert_close(b.model_state[key], value, msg=key)


def test_runner_task_trains_one_worker():
    from diffinf_ray.models.harness import Placement

    assert Placement(1, False, 1.0, 3).in_task  # auto: a task for one worker
    assert not Placement(2, False, 1.0, 3).in_task  # Ray Train for several
    assert not Placement(1, False, 1.0, 3, runner="ray_train").in_task
    with pytest.raises(ValueError, match="runner task trains on one worker"):
        Placement(2, False, 1.0, 3, runner="task").in_task  # noqa: B018


class Blocks:
    """A cached shard as Ray Data may deliver it: the same rows in blocks of any order and size."""

    def __init__(self, rows: dict, cuts: list[int], order: np.ndarray):
        self.parts = [{k: v[idx] for k, v in rows.items()} for idx in np.split(order, cuts)]

    def iter_batches(self, batch_size=None, batch_format="numpy"):
        yield from self.parts


def test_a_cached_shard_gives_the_same_batches_whatever_order_its_rows_arrive_in():
    from diffinf_ray.datasets import order_keys
    from diffinf_ray.models.harness import ShardInMemory

    n = 23
    rows = {"image": np.random.default_rng(0).random((n, 3, 4, 4), dtype=np.float32),
            "label": np.arange(n) % 3, "order": order_keys([f"s{i}" for i in range(n)])}
    runs = []
    for cuts, order in (([5, 12], np.arange(n)), ([17], np.random.default_rng(1).permutation(n)),
                        ([2, 3, 4, 20], np.arange(n)[::-1])):
        memory, shard = ShardInMemory(), Blocks(rows, cuts, order)
        runs.append([[(b["image"].clone(), b["label"].clone())
                      for b in memory.batches(shard, 8, "cpu", seed)] for seed in (7, 8)])
    for other in runs[1:]:
        for epoch, batches in enumerate(other):
            for (xa, ya), (xb, yb) in zip(runs[0][epoch], batches, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    first, second = runs[0]
    assert [len(y) for _, y in first] == [8, 8, 7]
    seen = torch.cat([x for x, _ in first]).flatten(1)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, torch.from_numpy(
        rows["image"]).flatten(1).tolist()))  # every row once per epoch
    assert not torch.equal(first[0][1], second[0][1]) or not torch.equal(first[0][0], second[0][0])
