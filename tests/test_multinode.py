"""A node lost mid-stage on a multi-node Ray cluster (issue 17): two raylets on this machine
(`ray.cluster_utils.Cluster`, as Ray's own tests do), a head that runs no work and a worker node
that runs every task and actor. The worker node is removed while the influence stage's actor
pool is scoring and while the edit stage's actor pool is editing, a fresh node joins, and the
stage ends with every row exactly once: Ray restarts the actors (Ray Data's max_restarts=-1)
and re-runs the lost batches and the reads whose blocks died with the node (lineage).

The influence test runs the stage's own scoring (`stages.influence.score_training_set`, the real
`InfluenceScorer` on real checkpoints) and checks the scores against the scorer run without Ray.
The edit test runs the stage's own actor-pool mapping (`stages.edit.edit_dataset`) over the
stage's own row selection (`high_influence_rows`) with a stand-in actor: the real `EditActor`
needs a finished autoencoder, predictor and loss networks (their recovery is the same Ray Data
mechanism; `test_lifecycle.py` runs the real one). Both actors only add a progress line per batch
(and a pause, so that the node is removed mid-stage) to what they wrap.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffinf_ray.config import load_config
from diffinf_ray.storage import Location

ray = pytest.importorskip("ray")

TRAIN_ROWS = 96
BATCH = 8
BATCHES = TRAIN_ROWS // BATCH
REMOVE_AFTER = 3  # batches done before the worker node is removed


@pytest.fixture
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    temp_dir = str(tmp_path_factory.mktemp("ray"))
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "temp_dir": temp_dir})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _run_root(root: Path, corrupted_share: float = 0.3) -> None:
    """manifest_noisy/ of 96 synthfaces train rows (a third of them corrupted) and two
    classifier checkpoints in the train stage's format: enough for influence scoring."""
    import torch

    from diffinf_ray.data import synthfaces as sf
    from diffinf_ray.models.checkpoint import (
        CHECKPOINT_FILE,
        checkpoint_dir_name,
        classifier_payload,
        to_bytes,
    )
    from diffinf_ray.models.classifier import build_classifier

    spec = sf.SynthFacesSpec(task="age", resolution=32, seed=0, num_identities=12)
    rows = sf.generate_batch(spec, np.arange(TRAIN_ROWS))
    rng = np.random.default_rng(0)
    corrupted = rng.random(TRAIN_ROWS) < corrupted_share
    label = np.where(corrupted, (rows["label"] + 1) % 3, rows["label"]).astype(np.int32)
    (root / "manifest_noisy").mkdir(parents=True)
    pq.write_table(pa.table({"sample_id": rows["sample_id"].astype(str),
                             "split": np.full(TRAIN_ROWS, "train"), "image": rows["image"],
                             "label": label, "is_corrupted": corrupted}),
                   root / "manifest_noisy" / "part-0.parquet")
    torch.manual_seed(0)
    for epoch in (1, 2):
        model = build_classifier(3)
        path = root / "checkpoints" / checkpoint_dir_name(epoch) / CHECKPOINT_FILE
        path.parent.mkdir(parents=True)
        path.write_bytes(to_bytes(classifier_payload([model], epoch, 1e-4 / epoch)))


def _paced(cls, log: Path):
    """`cls` with one line per finished batch appended to `log`, and a pause after it."""

    class Paced(cls):
        def __call__(self, batch):
            import ray

            out = super().__call__(batch)
            with open(log, "a") as f:  # node, then the batch's sample ids
                f.write(" ".join([ray.get_runtime_context().get_node_id(),
                                  *(str(s) for s in batch["sample_id"])]) + "\n")
            time.sleep(0.5)
            return out

    return Paced


def _remove_the_worker_node_mid_stage(cluster, log: Path, work):
    """Run `work()` in a thread; once REMOVE_AFTER batches are logged, remove the node that runs
    them and add a fresh one. Returns (work's result, batches logged when the node went); checks
    that the batches logged after that ran on the new node."""
    result, errors = {}, []

    def run():
        try:
            result["value"] = work()
        except BaseException as err:  # re-raised in the test's thread
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 600
    while not (log.exists() and len(log.read_text().splitlines()) >= REMOVE_AFTER):
        assert thread.is_alive() or errors, "the stage ended before the node was removed"
        if errors:
            raise errors[0]
        assert time.monotonic() < deadline, "no batch finished in 10 minutes"
        time.sleep(0.2)
    done_at_removal = len(log.read_text().splitlines())
    [worker] = [n for n in cluster.worker_nodes]
    cluster.remove_node(worker, allow_graceful=False)
    fresh = cluster.add_node(num_cpus=2)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the stage did not finish after the node was replaced"
    if errors:
        raise errors[0]
    nodes = [line.split()[0] for line in log.read_text().splitlines()]
    assert set(nodes[:done_at_removal]) == {worker.node_id}
    assert nodes[-1] == fresh.node_id  # the stage went on on the new node
    return result["value"], done_at_removal


def test_influence_scoring_survives_the_loss_of_its_node(cluster, tmp_path, monkeypatch):
    from diffinf_ray.data.images import to_tensor_batch
    from diffinf_ray.influence.grad_norms import SelfInfluenceScorer
    from diffinf_ray.stages import influence

    _run_root(tmp_path)
    log = tmp_path / "batches.log"
    monkeypatch.setattr(influence, "InfluenceScorer", _paced(influence.InfluenceScorer, log))
    cfg = load_config("jobs/configs/tiny.yaml", [
        f"run.root={tmp_path}", f"influence.batch_size={BATCH}", "influence.actors=1"])
    df, done_at_removal = _remove_the_worker_node_mid_stage(
        cluster, log, lambda: influence.score_training_set(
            cfg, Location(str(tmp_path / "manifest_noisy")), Location(str(tmp_path / "checkpoints"))))

    assert REMOVE_AFTER <= done_at_removal < BATCHES  # the node went mid-stage
    manifest = pq.read_table(tmp_path / "manifest_noisy").to_pandas()
    assert sorted(df["sample_id"]) == sorted(manifest["sample_id"])  # every row, exactly once
    # the scores are the scorer's, whichever node computed them
    scorer = SelfInfluenceScorer(str(tmp_path / "checkpoints"), device="cpu")
    manifest = manifest.sort_values("sample_id").reset_index(drop=True)
    expected = scorer(to_tensor_batch(list(manifest["image"])), manifest["label"].to_numpy(np.int64))
    np.testing.assert_allclose(df["score"].to_numpy(), expected["score"], rtol=1e-4)
    assert (df["label"].to_numpy() == manifest["label"].to_numpy()).all()


def _stand_in_editor():
    """The edit actor's interface (constructor kwargs config, root; numpy batch in, columns
    out) with a cheap deterministic edit: the image's bytes reversed. Made in a function so
    that Ray pickles it by value (the workers cannot import this test module)."""

    class StandInEditor:
        def __init__(self, config, root):
            self.root = root

        def __call__(self, batch):
            return {"sample_id": batch["sample_id"], "label": batch["label"],
                    "edited": np.array([bytes(b)[::-1] for b in batch["image"]], dtype=object)}

    return StandInEditor


def test_editing_survives_the_loss_of_its_node(cluster, tmp_path):
    from diffinf_ray.artifacts import INFLUENCE_FOLDER, INFLUENCE_TABLE
    from diffinf_ray.run_root import RunRoot
    from diffinf_ray.stages import edit

    _run_root(tmp_path)
    manifest = pq.read_table(tmp_path / "manifest_noisy").to_pandas()
    flagged = manifest["sample_id"].iloc[::2].to_numpy()  # 48 of 96 rows flagged
    (tmp_path / INFLUENCE_FOLDER).mkdir()
    pq.write_table(pa.table({"sample_id": manifest["sample_id"],
                             "is_high": manifest["sample_id"].isin(flagged)}),
                   tmp_path / INFLUENCE_FOLDER / INFLUENCE_TABLE)
    root = RunRoot(str(tmp_path))
    cfg = load_config("jobs/configs/tiny.yaml", [
        f"run.root={tmp_path}", f"edit.batch_size={BATCH // 2}", "edit.actors=1"])
    log = tmp_path / "batches.log"

    def work():
        rows, expected = edit.high_influence_rows(root)
        assert expected == len(flagged)
        return edit.edit_dataset(cfg, root, rows, _paced(_stand_in_editor(), log)).to_pandas()

    df, done_at_removal = _remove_the_worker_node_mid_stage(cluster, log, work)

    assert REMOVE_AFTER <= done_at_removal < len(flagged) // (BATCH // 2)
    assert sorted(df["sample_id"]) == sorted(flagged)  # every flagged row, exactly once
    images = dict(zip(manifest["sample_id"], manifest["image"], strict=True))
    assert all(bytes(e) == bytes(images[s])[::-1] for s, e in zip(df["sample_id"], df["edited"],
                                                                   strict=True))


def test_a_local_run_starts_its_own_ray_beside_a_running_cluster(cluster):
    """`diffinf run` without RAY_ADDRESS starts a Ray of its own even when another cluster runs
    on the machine: it once joined a test's two-node cluster and failed when that went away."""
    from diffinf_ray.ray_session import start_local_ray

    ray.shutdown()  # the fixture's driver: this process now starts as `diffinf run` does
    start_local_ray(1)  # Ray's default temp dir, as `diffinf run` starts it
    try:
        assert ray.get_runtime_context().gcs_address != cluster.address
        assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    finally:
        ray.shutdown()
