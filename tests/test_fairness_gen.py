"""Fairness generators (diffinf_ray/fairness_gen), without Ray: LoRA changes only its own
weights and saves small, DreamBooth keeps the encoder, the z prior, k-means clusters, balanced
counts per cell, per-seed sampling, and generator folders that load back to the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffinf_ray.data.images import encode_png
from diffinf_ray.diffae.family import build_family, save_family
from diffinf_ray.fairness_gen import finetune
from diffinf_ray.fairness_gen.cells import Cell, cells_of, to_tensor
from diffinf_ray.fairness_gen.clusters import cluster_codes
from diffinf_ray.fairness_gen.generator import (
    load_generator,
    resolve_base,
    save_generator,
)
from diffinf_ray.fairness_gen.lora import add_lora, load_lora_state, lora_state, lora_targets
from diffinf_ray.fairness_gen.settings import FinetuneSettings, SynthesisSettings
from diffinf_ray.fairness_gen.synthesis import cell_counts, plan_rows, split_count
from diffinf_ray.fairness_gen.zprior import ZPrior
from diffinf_ray.storage import Location

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0):
    """The tiny family preset with 2 labels and non-zero weights everywhere (the official init
    zeroes output convs, which would leave every earlier adapter without a gradient)."""
    model = build_family("tiny", num_classes=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def pngs(n: int, colour, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float64)
    return [encode_png(np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))
            for _ in range(n)]


def _settings(**kw) -> FinetuneSettings:
    return FinetuneSettings(**{"steps": 3, "batch_size": 4, "lr": 1e-2, "sample_steps": 2, **kw})


def test_lora_changes_only_its_own_weights():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = to_tensor(pngs(6, (200, 80, 60)))
    tuned, fit = finetune.finetune_lora(model, images, 1, _settings(method="lora"))
    after = tuned.state_dict()
    lora_keys = [k for k in after if "lora_" in k]
    base_keys = [k for k in after if "lora_" not in k]
    assert lora_keys and fit["steps"] == 3
    # every base tensor (under its old name, or peft's base_layer) is bit-identical
    assert len(base_keys) == len(before)
    for key in base_keys:
        assert torch.equal(after[key], before[key.replace(".base_layer", "")]), key
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("encoder."))
    # the adapters moved: B starts at zero and must not be zero any more
    b_keys = [k for k in lora_keys if "lora_B" in k]
    assert all(after[k].abs().sum() > 0 for k in b_keys)
    assert not any(k.startswith("encoder.") for k in lora_keys)
    assert fit["trainable_parameters"] == sum(after[k].numel() for k in lora_keys)
    assert fit["trainable_parameters"] < 0.2 * fit["total_parameters"]


def test_lora_state_is_small_and_round_trips():
    torch.manual_seed(0)
    model = tiny_model()
    targets = lora_targets(model)
    assert "middle_block.1.qkv" in targets and "middle_block.1.proj_out" in targets
    assert not any(t.startswith("encoder.") for t in targets)
    tuned, _ = finetune.finetune_lora(model, to_tensor(pngs(4, (90, 90, 200))), 0,
                                      _settings(method="lora"))
    state = lora_state(tuned)
    full = sum(v.numel() for k, v in tuned.state_dict().items() if "lora_" not in k)
    assert sum(v.numel() for v in state.values()) < 0.2 * full
    fresh = load_lora_state(add_lora(tiny_model(), 4, 4.0, targets), state)
    x, t, z = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.randn(2, 32)
    label = torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.allclose(fresh(x, t, z, label), tuned(x, t, z, label), atol=1e-6)
        assert not torch.allclose(tiny_model()(x, t, z, label), tuned(x, t, z, label), atol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        load_lora_state(add_lora(tiny_model(), 4, 4.0, targets[:3]), state)


def test_dreambooth_trains_the_unet_with_the_prior_loss_and_keeps_the_encoder():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prior = ZPrior.fit(np.random.default_rng(0).normal(size=(5, 32)))
    settings = _settings(method="dreambooth", prior_images=3, prior_weight=1.0)
    prior_x = finetune.prior_images(model, prior, 1, settings)
    assert prior_x.shape == (3, 3, 32, 32) and prior_x.abs().max() <= 1.0
    tuned, fit = finetune.finetune_dreambooth(model, to_tensor(pngs(4, (30, 200, 30))), 1,
                                              settings, prior_x)
    after = tuned.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("encoder."))
    assert not torch.equal(after["middle_block.1.qkv.weight"], before["middle_block.1.qkv.weight"])
    # with the prior term the loss is larger than without it on the same draws
    plain, fit_plain = finetune.finetune_dreambooth(
        tiny_model(), to_tensor(pngs(4, (30, 200, 30))), 1, settings, None)
    assert fit["loss_first"] > fit_plain["loss_first"]


def test_z_prior_fits_and_samples():
    z = np.random.default_rng(0).normal(loc=3.0, scale=2.0, size=(4000, 3))
    prior = ZPrior.fit(z)
    draws = prior.sample(4000, torch.Generator().manual_seed(0)).numpy()
    assert np.allclose(draws.mean(0), 3.0, atol=0.15) and np.allclose(draws.std(0), 2.0, atol=0.1)
    assert ZPrior.from_dict(prior.to_dict()).count == 4000
    with pytest.raises(ValueError):
        ZPrior.fit(z[:1])
    # one code (a minority cell at severity 0.99): its code is the mean, the spread is lent
    one = ZPrior.fit(z[:1], spread_from=prior)
    assert np.array_equal(one.mean, z[0]) and np.array_equal(one.std, prior.std)
    assert one.count == 1
    with pytest.raises(ValueError, match="at least 2 codes"):
        ZPrior.fit(z[:0], spread_from=prior)


def test_clusters_follow_the_codes_and_respect_the_minimum_size():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 0.1, (12, 4)), rng.normal(5, 0.1, (6, 4))])
    assign = cluster_codes(z, 2)
    assert (assign[:12] == 0).all() and (assign[12:] == 1).all()  # largest cluster first
    assert (cluster_codes(z, 2, min_size=7) == 0).all()  # 6 < 7: no split
    assert (cluster_codes(z[:3], 4) == 0).all()


def test_balanced_counts_per_cell():
    real = {Cell(0, "a"): 50, Cell(0, "b"): 5, Cell(1, "a"): 3, Cell(1, "b"): 40}
    assert set(cell_counts(real, SynthesisSettings(per_cell=7)).values()) == {7}
    total = cell_counts(real, SynthesisSettings(total=10))
    assert sorted(total.values()) == [2, 2, 3, 3] and sum(total.values()) == 10
    fill = cell_counts(real, SynthesisSettings(fill=True))
    assert {c: fill[c] + real[c] for c in real} == dict.fromkeys(real, 50)
    assert split_count(10, [5, 3, 2]) == [5, 3, 2] and split_count(5, [1, 1, 1]) == [2, 2, 1]
    with pytest.raises(ValueError):
        SynthesisSettings(per_cell=3, fill=True)


def test_plan_rows_balances_cells_and_splits_clusters_by_size():
    gens = [{"name": "v/y0-a/c0", "folder": "f0", "label": 0, "group": "a", "images": 6},
            {"name": "v/y0-a/c1", "folder": "f1", "label": 0, "group": "a", "images": 2},
            {"name": "v/y1-b", "folder": "f2", "label": 1, "group": "b", "images": 3}]
    rows = plan_rows({"variant": "v", "generators": gens}, SynthesisSettings(per_cell=8))
    by_gen = {g["name"]: sum(r["generator"] == g["name"] for r in rows) for g in gens}
    assert by_gen == {"v/y0-a/c0": 6, "v/y0-a/c1": 2, "v/y1-b": 8}
    ids = [r["sample_id"] for r in rows]
    assert len(set(ids)) == 16 and "syn-v-y0-a-000007" in ids
    again = plan_rows({"variant": "v", "generators": gens}, SynthesisSettings(per_cell=8))
    assert [r["seed"] for r in again] == [r["seed"] for r in rows]


def test_variants_by_name():
    from diffinf_ray.fairness_gen.variants import VARIANTS, variant_by_name

    assert {v.name: (v.method, v.clusters > 0) for v in VARIANTS.values()} == {
        "vanilla": ("vanilla", False), "lora": ("lora", False),
        "dreambooth": ("dreambooth", False), "lora_cluster": ("lora", True),
        "dreambooth_cluster": ("dreambooth", True)}
    with pytest.raises(KeyError, match="choose from"):
        variant_by_name("nope")


def test_cells_group_rows_by_label_and_group():
    cells = cells_of(["s1", "s2", "s3"], [b"1", b"2", b"3"], [1, 0, 1], ["x", "y", "x"])
    assert list(cells) == [Cell(0, "y"), Cell(1, "x")]
    assert cells[Cell(1, "x")].sample_ids == ["s1", "s3"]
    assert Cell(0, "dark skin/1").name == "y0-dark_skin_1"


@pytest.mark.parametrize("kind", ["vanilla", "lora", "dreambooth"])
def test_generator_folders_load_back_to_the_same_images(tmp_path, kind):
    save_family(tiny_model(), tmp_path / "base")
    base = resolve_base(str(tmp_path / "base"))
    model, lora = tiny_model(), None
    images = to_tensor(pngs(4, (120, 40, 160)))
    settings = _settings(method=kind)
    if kind == "lora":
        model, fit = finetune.finetune_lora(model, images, 0, settings)
        lora = {"rank": settings.rank, "alpha": settings.alpha, "targets": fit["lora_targets"]}
    elif kind == "dreambooth":
        model, _ = finetune.finetune_dreambooth(model, images, 0, settings, None)
    prior = ZPrior.fit(model.encode(images).detach().numpy())
    folder = Location(str(tmp_path / kind))
    save_generator(folder, name=f"{kind}/y0-a", kind=kind, label=0, group="a", cluster=None,
                   base=base, prior=prior, model=model, lora=lora)
    if kind == "lora":  # the adapter alone is saved, not the base model
        assert (tmp_path / kind / "lora.safetensors").stat().st_size < \
            0.2 * (tmp_path / "base" / "model.safetensors").stat().st_size
    gen = load_generator(folder)
    assert (gen.kind, gen.label, gen.group) == (kind, 0, "a")
    direct = __import__("diffinf_ray.fairness_gen.sampling", fromlist=["x"]).sample_images(
        model, prior, 0, [5, 6, 7], steps=2)
    one_by_one = torch.cat([gen.sample([s], steps=2) for s in (5, 6, 7)])
    assert direct.shape == (3, 3, 32, 32)
    assert torch.allclose(gen.sample([5, 6, 7], steps=2), direct, atol=1e-5)
    assert torch.allclose(one_by_one, direct, atol=1e-5)
    assert not torch.allclose(direct[0], direct[1])


def test_plan_jobs_one_per_cell_or_per_cluster(tmp_path):
    from diffinf_ray.fairness_gen.fit import plan_jobs

    rng = np.random.default_rng(0)
    cells = cells_of([f"s{i}" for i in range(14)], [bytes([i]) for i in range(14)],
                     [0] * 10 + [1] * 4, ["a"] * 10 + ["b"] * 4)
    codes = {Cell(0, "a"): np.concatenate([rng.normal(0, .1, (6, 3)), rng.normal(4, .1, (4, 3))]),
             Cell(1, "b"): np.array([[0.0, 0, 0], [5, 5, 5], [0.1, 0, 0], [5, 5, 5.1]])}
    out = Location(str(tmp_path))
    plain = plan_jobs(cells, codes, "lora", out)
    assert [(j.name, len(j.images), j.cluster) for j in plain] == [("lora/y0-a", 10, None),
                                                                    ("lora/y1-b", 4, None)]
    assert plain[0].label_prior.count == 10 and plain[0].prior.count == 10
    clustered = plan_jobs(cells, codes, "lora_cluster", out, clusters=2)
    assert [(j.name, len(j.images)) for j in clustered] == [
        ("lora_cluster/y0-a/c0", 6), ("lora_cluster/y0-a/c1", 4),
        ("lora_cluster/y1-b/c0", 2), ("lora_cluster/y1-b/c1", 2)]
    assert clustered[1].images == [bytes([i]) for i in range(6, 10)]
    assert clustered[1].folder.endswith("lora_cluster/y0-a/c1")
    assert clustered[1].label_prior.count == 10  # DreamBooth's prior: every image of the label
    assert clustered[2].images == [bytes([10]), bytes([12])]
    skewed = {**codes, Cell(1, "b"): np.array([[0.0, 0, 0], [5, 5, 5], [0.1, 0, 0], [0, 0.1, 0]])}
    assert len(plan_jobs(cells, skewed, "v", out, clusters=2)) == 3  # 3 + 1 is below min_size


def test_a_cell_of_one_image_gets_a_generator_with_its_labels_spread(tmp_path):
    """Severity 0.99 left a minority cell one training image (a study failed on it): its
    generator's prior is centred on that image's code with the label's spread."""
    from diffinf_ray.fairness_gen.fit import plan_jobs

    rng = np.random.default_rng(0)
    cells = cells_of([f"s{i}" for i in range(9)], [bytes([i]) for i in range(9)],
                     [0] * 9, ["a"] * 8 + ["b"])
    codes = {Cell(0, "a"): rng.normal(0, 1.0, (8, 3)), Cell(0, "b"): np.array([[9.0, 9, 9]])}
    jobs = plan_jobs(cells, codes, "vanilla", Location(str(tmp_path)))
    one = jobs[1]
    assert (one.name, len(one.images), one.prior.count) == ("vanilla/y0-b", 1, 1)
    assert np.array_equal(one.prior.mean, [9.0, 9, 9])
    assert np.array_equal(one.prior.std, one.label_prior.std) and one.label_prior.count == 9
