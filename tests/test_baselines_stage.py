"""The baselines stage on a real local Ray: each noisy-label method trained with Ray Train on a
tiny synthfaces run, checkpointed in the classifier format, evaluated; options checked; resume."""

import json

import pytest
import torch

from diffinf_ray.config import load_config
from diffinf_ray.models.checkpoint import list_checkpoints, load_checkpoint
from diffinf_ray.models.method_training import METHOD_STATE_FILE
from diffinf_ray.pipeline import open_run_root, run_pipeline
from diffinf_ray.stages.baselines import (
    check_methods,
    run_baselines,
    train_method,
    training_ids,
)

TINY = "jobs/configs/tiny.yaml"
METHODS = ["small_loss", "elr_plus", "proselflc", "promix"]
# Switch each method's real mechanism on from the first epoch (the defaults warm up for
# several epochs with plain cross-entropy).
OPTIONS = ("baselines.options={small_loss: {num_gradual: 0}, proselflc: {burn_in_epochs: 0}, "
           "promix: {pretrain_epochs: 0, rampup_epochs: 1}}")


def tiny_config(root, *extra):
    return load_config(TINY, [f"run.root={root}", "data.synthfaces.num_samples=120",
                              "train.epochs=1", "train.batch_size=32", "train.checkpoint_every=1",
                              f"baselines.methods=[{','.join(METHODS)}]", OPTIONS, *extra])


@pytest.fixture(scope="module")
def baseline_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines_run")
    cfg = tiny_config(root, "stages=[ingest,noise,baselines]")
    results = run_pipeline(cfg)
    return cfg, root, results


def _method_state(root, name: str, epoch: int) -> dict:
    path = root / "baselines" / name / "checkpoints" / f"epoch_{epoch:04d}" / METHOD_STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


# The fixture trains and evaluates four methods here: ~1 min each on an idle 2-core box, far more
# when the box is shared.
@pytest.mark.timeout(2400)
def test_every_method_is_trained_checkpointed_and_evaluated(baseline_run):
    cfg, root, results = baseline_run
    summary = json.loads((root / "baselines" / "summary.json").read_text())
    assert set(summary) == set(METHODS)  # summary.json is written with sorted keys
    assert results["baselines"] == summary
    for name in METHODS:
        folder = root / "baselines" / name
        ckpts = list_checkpoints(open_run_root(cfg).child("baselines", name, "checkpoints"))
        assert [load_checkpoint(c).epoch for c in ckpts] == [1], name
        ckpt = load_checkpoint(ckpts[0])
        assert ckpt.learning_rate == pytest.approx(cfg.train.lr)
        assert ckpt.architecture["num_classes"] == len(cfg.class_names)
        # ELR+ and ProMix predict with the mean of two networks
        assert len(ckpt.peer_states or []) == (1 if name in ("elr_plus", "promix") else 0), name
        assert _method_state(root, name, 1)["epoch"] == 1
        metrics = json.loads((folder / "evaluation" / "metrics.json").read_text())
        assert 0 <= metrics["accuracy"] <= 100  # metrics.py reports percent
        assert metrics["method"] == name and metrics["epoch"] == 1
        assert (folder / "evaluation" / "predictions.parquet").stat().st_size > 0
        assert summary[name]["accuracy"] == metrics["accuracy"]
        assert summary[name]["last_epoch"]["epoch"] == 1
    # the selection methods report what they kept, and how clean it was
    assert 0 < summary["small_loss"]["last_epoch"]["train_kept_fraction"] < 1
    assert 0 <= summary["promix"]["last_epoch"]["train_label_precision"] <= 1


def test_checkpoint_predicts_like_the_method(baseline_run):
    """checkpoint.pt holds the method's test-time network (the ensemble for ELR+ / ProMix)."""
    from diffinf_ray.baselines import build_method
    from diffinf_ray.models.classifier import build_classifier

    cfg, root, _ = baseline_run
    ids, _ = training_ids(open_run_root(cfg).noisy_manifest)
    options = check_methods(cfg, len(ids))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    for name in ("elr_plus", "promix", "small_loss"):
        method = build_method(name, len(cfg.class_names), len(ids), options[name],
                              lambda: build_classifier(len(cfg.class_names)), cfg.train.lr)
        method.load_state_dict(_method_state(root, name, 1)["method"])
        with torch.no_grad():
            expected = method.eval_model().eval()(images)
            got = load_checkpoint(open_run_root(cfg).child(
                "baselines", name, "checkpoints", "epoch_0001", "checkpoint.pt")).build_model()(images)
        torch.testing.assert_close(got, expected, msg=name)


def test_rerun_of_finished_methods_starts_no_training(baseline_run):
    """An interrupted stage resumes: methods already at train.epochs keep their checkpoints
    and evaluations."""
    cfg, root, results = baseline_run
    files = sorted((root / "baselines").rglob("*.pt")) + sorted(
        (root / "baselines").rglob("metrics.json"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert run_baselines(cfg, open_run_root(cfg)) == results["baselines"]
    assert stamps == {p: p.stat().st_mtime_ns for p in files}


def test_resume_continues_with_the_saved_method_state(baseline_run):
    """A longer run on the same folder trains epoch 2 only, from ELR+'s saved state (its step
    counter and per-sample targets carry on)."""
    cfg, root, _ = baseline_run
    location = open_run_root(cfg).child("baselines", "elr_plus", "checkpoints")
    before = {c.path: c.read_bytes() for c in list_checkpoints(location)}
    first = _method_state(root, "elr_plus", 1)

    longer = tiny_config(root, "train.epochs=2")
    ids, with_corruption = training_ids(open_run_root(longer).noisy_manifest)
    options = check_methods(longer, len(ids))
    metrics = train_method(longer, open_run_root(longer).noisy_manifest, location, "elr_plus",
                           options["elr_plus"], ids, with_corruption)
    after = list_checkpoints(location)
    assert [load_checkpoint(c).epoch for c in after] == [1, 2]
    assert after[0].read_bytes() == before[after[0].path]  # epoch 1 was not retrained
    assert metrics["epoch"] == 2
    second = _method_state(root, "elr_plus", 2)
    steps = first["method"]["extra"]["global_step"]
    assert steps > 0 and second["method"]["extra"]["global_step"] == 2 * steps
    # every training sample got a target in epoch 1; epoch 2 moved them on from there
    t1, t2 = first["method"]["extra"]["targets"][0], second["method"]["extra"]["targets"][0]
    assert bool((t1.sum(1) > 0).all())
    assert not torch.allclose(t1, t2)


def test_promix_that_would_only_warm_up_is_warned(caplog):
    """ProMix selects clean samples only after `pretrain_epochs`: a run no longer than its
    warm-up is plain two-network cross-entropy, which the user must hear about."""
    from diffinf_ray.stages.baselines import method_options

    short = load_config("jobs/configs/tiny.yaml", ["train.epochs=10"])
    with caplog.at_level("WARNING", logger="diffinf_ray.stages.baselines"):
        method_options(short, "promix")
    assert "only warms up" in caplog.text
    caplog.clear()
    fixed = load_config("jobs/configs/tiny.yaml", [
        "train.epochs=10", "baselines.options={promix: {pretrain_epochs: 3}}"])
    with caplog.at_level("WARNING", logger="diffinf_ray.stages.baselines"):
        assert method_options(fixed, "promix")["pretrain_epochs"] == 3
    assert "only warms up" not in caplog.text


def test_coteaching_forget_rate_defaults_to_the_injected_noise_rate(caplog):
    """Co-teaching's run options (its `run_options`): noise.rate unless a rate is given."""
    from diffinf_ray.stages.baselines import method_options

    cfg = load_config(TINY, ["noise.rate=0.3"])
    assert method_options(cfg, "small_loss")["noise_rate"] == 0.3
    given = load_config(TINY, ["noise.rate=0.3",
                               "baselines.options={small_loss: {forget_rate: 0.1}}"])
    assert "noise_rate" not in method_options(given, "small_loss")
    clean = load_config(TINY, ["noise.rate=0.0"])
    with caplog.at_level("WARNING", logger="diffinf_ray.stages.baselines"):
        assert method_options(clean, "small_loss")["noise_rate"] == 0.0
    assert "forgets nothing" in caplog.text


@pytest.mark.parametrize("name", ["standard", "small_loss", "elr_plus", "proselflc", "promix"])
def test_checkpoint_members_predict_like_the_method(name):
    """The classifiers stored in a method's checkpoint average to its test-time logits."""
    from diffinf_ray.baselines import build_method
    from diffinf_ray.models.classifier import AttributeClassifier, build_classifier
    from diffinf_ray.models.method_training import checkpoint_members
    from diffinf_ray.stages.baselines import method_options

    cfg = load_config(TINY, ["noise.rate=0.3", "train.epochs=20"])
    torch.manual_seed(0)
    method = build_method(name, 3, 10, method_options(cfg, name),
                          lambda: build_classifier(3, 16), 1e-3)
    model = method.eval_model().eval()
    members = checkpoint_members(model)
    assert members and all(isinstance(m, AttributeClassifier) for m in members)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        mean = torch.stack([m.eval()(x) for m in members]).mean(dim=0)
        assert torch.allclose(model(x), mean, atol=1e-5)
