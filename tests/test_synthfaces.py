"""synthfaces: determinism, labels that follow the generating factors, identity-disjoint splits,
region masks, spec validation and identity factors that stay fixed across a person's samples."""

from __future__ import annotations

import dataclasses
import io
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from diffinf_ray.data import synthfaces as sf
from diffinf_ray.manifest import REGIONS, REQUIRED_COLUMNS, SPLITS


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_same_seed_same_bytes_and_different_seed_different_bytes():
    spec = sf.SynthFacesSpec(task="age", seed=3)
    idx = np.arange(6)
    first = sf.generate_batch(spec, idx)
    sf.identity_factors.cache_clear()  # no dependence on what was cached
    again = sf.generate_batch(sf.SynthFacesSpec(task="age", seed=3), idx)
    for col in ("image", "mask", "sample_id", "split", "identity", "group", "expression"):
        assert list(first[col]) == list(again[col]), col
    np.testing.assert_array_equal(first["label"], again["label"])
    np.testing.assert_array_equal(first["age"], again["age"])

    other = sf.generate_batch(sf.SynthFacesSpec(task="age", seed=4), idx)
    assert all(a != b for a, b in zip(first["image"], other["image"], strict=True))
    # different samples of one data set differ too
    assert len(set(first["image"])) == len(idx)


def test_batch_columns_types_and_images():
    spec = sf.SynthFacesSpec(task="expression", seed=1, resolution=48)
    b = sf.generate_batch(spec, np.array([0, 5, 1234567]))
    assert set(REQUIRED_COLUMNS) <= set(b)
    assert {"age", "expression", "expression_intensity", "mask"} <= set(b)
    assert all(len(v) == 3 for v in b.values())
    assert list(b["sample_id"]) == ["sf1_0000000", "sf1_0000005", "sf1_1234567"]
    assert b["label"].dtype == np.int32
    np.testing.assert_array_equal(b["label"], b["label_clean"])
    assert not b["is_corrupted"].any()
    assert all(u is None for u in b["image_uri"])
    assert set(b["split"]) <= set(SPLITS)
    assert all(g in sf.SKIN_GROUPS for g in b["group"])
    assert all(i.startswith("p") and len(i) == 7 for i in b["identity"])
    for png in b["image"]:
        img = Image.open(io.BytesIO(png))
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (48, 48))
    for png in b["mask"]:
        assert _decode(png).shape == (48, 48)
    assert sf.generate_batch(spec, np.array([], dtype=np.int64))["image"].shape == (0,)


@pytest.mark.parametrize("res", [32, 128])
def test_render_sizes(res):
    f = sf.sample_factors(sf.SynthFacesSpec(), 7)
    image, mask = sf.render(f, res, True)
    assert image.shape == (res, res, 3) and image.dtype == np.uint8
    assert mask.shape == (res, res) and mask.dtype == np.uint8
    image2, none = sf.render(f, res, False)
    assert none is None
    np.testing.assert_array_equal(image, image2)
    assert image.std() > 10  # a picture, not a flat fill


def test_age_labels_follow_factors_and_every_class_present():
    spec = sf.SynthFacesSpec(task="age", age_bins=((0, 18), (25, 40), (50, 80)))
    assert sf.class_names(spec) == sf.AGE_CLASSES
    labels = []
    for i in range(400):
        f = sf.sample_factors(spec, i)
        k = sf.label_of(spec, f)
        lo, hi = spec.age_bins[k]
        assert lo <= f.age < hi, (i, f.age, k)
        labels.append(k)
    counts = np.bincount(labels, minlength=3)
    assert counts.min() > 90, counts  # class drawn uniformly
    # transitional ages are never generated
    ages = [sf.sample_factors(spec, i).age for i in range(400)]
    assert not any(18 <= a < 25 or 40 <= a < 50 for a in ages)

    custom = sf.SynthFacesSpec(task="age", age_bins=[[0, 10], [30, 35], [60, 70], [75, 90]])
    assert custom.age_bins == ((0.0, 10.0), (30.0, 35.0), (60.0, 70.0), (75.0, 90.0))
    assert len(sf.class_names(custom)) == 4
    got = {sf.label_of(custom, sf.sample_factors(custom, i)) for i in range(100)}
    assert got == {0, 1, 2, 3}


def test_expression_labels_follow_factors():
    spec = sf.SynthFacesSpec(task="expression", seed=2)
    assert sf.class_names(spec) == ("happy", "neutral", "surprised", "sad")
    b = sf.generate_batch(spec, np.arange(40))
    for label, name, intensity in zip(
        b["label"], b["expression"], b["expression_intensity"], strict=True
    ):
        assert sf.EXPRESSION_CLASSES[label] == name
        assert (intensity == 0.0) == (name == "neutral")
    factors = [sf.sample_factors(spec, i) for i in range(800)]
    labels = np.array([sf.label_of(spec, f) for f in factors])
    assert np.bincount(labels, minlength=4).min() > 150
    ages = np.array([f.age for f in factors])
    assert ages.min() >= 0 and ages.max() <= 80 and ages.std() > 18  # uniform over 0-80
    inten = np.array([f.intensity for f in factors if f.expression != sf.NEUTRAL])
    assert inten.min() > 0 and inten.max() <= 1
    weak = (inten < 0.25).mean()
    assert 0.08 < weak < 0.25, weak  # ~15% weak (ambiguous) samples


def test_expression_and_age_change_the_picture_where_expected():
    spec = sf.SynthFacesSpec(task="expression", seed=5)
    f = dataclasses.replace(sf.sample_factors(spec, 0), noise_sigma=0.0, age=30.0)
    neutral, nmask = sf.render(
        dataclasses.replace(f, expression=sf.NEUTRAL, intensity=0.0), 64, True
    )
    surprised, smask = sf.render(
        dataclasses.replace(f, expression=sf.SURPRISED, intensity=1.0), 64, True
    )
    diff = np.abs(neutral.astype(int) - surprised.astype(int)).sum(-1) > 30
    assert diff.any()
    face = np.isin(nmask, [REGIONS[r] for r in ("skin", "eyes", "brows", "nose", "mouth")])
    assert diff[face].sum() >= 0.9 * diff.sum()  # the face changes, not the background
    assert (smask == REGIONS["mouth"]).sum() > (nmask == REGIONS["mouth"]).sum()  # open mouth

    young, _ = sf.render(dataclasses.replace(f, age=5.0), 64, False)
    old, _ = sf.render(dataclasses.replace(f, age=78.0), 64, False)
    assert np.abs(young.astype(int) - old.astype(int)).mean() > 5


def test_expression_gain_grows_clear_expressions_and_leaves_weak_ones_ambiguous():
    """The gain stretches intensity above the weak band only: weak (ambiguous) faces are drawn
    as they always were, clear ones show more. The age task's default gain is 1, so its faces
    never change; the expression task's is 4 (RESULTS, "Is synthfaces expression learnable?")."""
    assert sf.SynthFacesSpec().expression_gain == 1.0
    assert sf.SynthFacesSpec(task="expression").expression_gain == 4.0
    assert sf.SynthFacesSpec(task="expression", expression_gain=1).expression_gain == 1.0
    assert sf.sample_factors(sf.SynthFacesSpec(task="expression"), 0).expression_gain == 4.0
    from diffinf_ray.config import SynthFacesSection

    bound = next(m.le for m in SynthFacesSection.model_fields["expression_gain"].metadata
                 if hasattr(m, "le"))
    assert bound == sf.MAX_EXPRESSION_GAIN  # the config refuses what the renderer refuses
    for weak in (0.0, *sf.WEAK_INTENSITY):
        assert sf.shown_intensity(weak, 4.0) == weak
    assert sf.shown_intensity(1.0, 1.0) == 1.0
    assert sf.shown_intensity(1.0, 4.0) == pytest.approx(1.0 + 3.0 * (1.0 - sf.WEAK_INTENSITY[1]))

    spec = sf.SynthFacesSpec(task="expression", seed=5)
    f = dataclasses.replace(sf.sample_factors(spec, 0), noise_sigma=0.0, age=30.0)
    neutral, _ = sf.render(dataclasses.replace(f, expression=sf.NEUTRAL, intensity=0.0), 64, False)

    def change(expression: int, intensity: float, gain: float) -> np.ndarray:
        face = dataclasses.replace(f, expression=expression, intensity=intensity,
                                   expression_gain=gain)
        return np.abs(sf.render(face, 64, False)[0].astype(int) - neutral.astype(int)).sum(-1)

    for expression in (sf.HAPPY, sf.SURPRISED, sf.SAD):
        weak = sf.WEAK_INTENSITY[1]
        assert np.array_equal(change(expression, weak, 4.0), change(expression, weak, 1.0))
        clear_1, clear_4 = change(expression, 0.9, 1.0), change(expression, 0.9, 4.0)
        assert clear_4.sum() > clear_1.sum(), sf.EXPRESSION_CLASSES[expression]
        assert (clear_4 > 30).sum() > (clear_1 > 30).sum()  # more pixels change visibly


def test_splits_disjoint_by_identity():
    spec = sf.SynthFacesSpec(task="age", num_identities=300, seed=9)
    splits_of = defaultdict(set)
    b = sf.generate_batch(spec, np.arange(150))
    for ident, split in zip(b["identity"], b["split"], strict=True):
        splits_of[ident].add(split)
    for i in range(150, 3000):
        person = sf.identity_of(spec, i)
        splits_of[f"p{person:06d}"].add(sf.split_of(spec, person))
    assert all(len(s) == 1 for s in splits_of.values())
    per_split = defaultdict(int)
    for s in splits_of.values():
        per_split[next(iter(s))] += 1
    assert set(per_split) == {"train", "val", "test"}
    n = sum(per_split.values())
    assert 0.6 < per_split["train"] / n < 0.8, per_split
    only_train = sf.SynthFacesSpec(split_fractions=(1.0, 0.0, 0.0))
    assert {sf.split_of(only_train, i) for i in range(50)} == {"train"}


def test_masks_have_the_regions():
    spec = sf.SynthFacesSpec(task="expression", seed=4, resolution=64)
    b = sf.generate_batch(spec, np.arange(12))
    for png in b["mask"]:
        m = _decode(png)
        ids = set(np.unique(m).tolist())
        assert ids <= set(REGIONS.values())
        assert ids == set(REGIONS.values()), ids  # every region visible at 64 px
        assert m[0, 0] == REGIONS["background"] or m[0, -1] == REGIONS["background"]
        h, w = m.shape
        assert m[h // 2, w // 2] in (REGIONS["skin"], REGIONS["nose"])
        eyes_y = np.nonzero(m == REGIONS["eyes"])[0].mean()
        mouth_y = np.nonzero(m == REGIONS["mouth"])[0].mean()
        brows_y = np.nonzero(m == REGIONS["brows"])[0].mean()
        assert brows_y < eyes_y < mouth_y
    assert all(
        v is None
        for v in sf.generate_batch(dataclasses.replace(spec, with_masks=False), np.arange(2))[
            "mask"
        ]
    )


def test_same_identity_keeps_identity_factors_across_ages():
    spec = sf.SynthFacesSpec(task="age", num_identities=3, seed=11)
    by_person = defaultdict(list)
    for i in range(60):
        f = sf.sample_factors(spec, i)
        by_person[f.identity.index].append(f)
    person, samples = max(by_person.items(), key=lambda kv: len(kv[1]))
    ages = [f.age for f in samples]
    assert max(ages) - min(ages) > 20
    first = samples[0].identity
    for f in samples[1:]:
        assert f.identity == first
        assert f.identity.skin_rgb == first.skin_rgb and f.identity.hair_rgb == first.hair_rgb
    sf.identity_factors.cache_clear()
    assert sf.identity_factors(11, person) == first
    b = sf.generate_batch(spec, np.arange(60))
    groups = defaultdict(set)
    for ident, group in zip(b["identity"], b["group"], strict=True):
        groups[ident].add(group)
    assert all(len(g) == 1 for g in groups.values())
    # different people differ
    others = [sf.identity_factors(11, i) for i in range(3) if i != person]
    assert all(o.skin_rgb != first.skin_rgb for o in others)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"task": "gender"}, "task"),
        ({"resolution": 16}, "resolution"),
        ({"resolution": 256}, "resolution"),
        ({"resolution": 64.0}, "resolution"),
        ({"seed": -1}, "seed"),
        ({"num_identities": 0}, "num_identities"),
        ({"age_bins": ((25, 40), (0, 18))}, "age_bins"),
        ({"age_bins": ((0, 30), (25, 40))}, "age_bins"),
        ({"age_bins": ((10, 5),)}, "age_bins"),
        ({"age_bins": ()}, "age_bins"),
        ({"age_bins": ((0, 18), (25, 140))}, "age_bins"),
        ({"age_bins": (1, 2)}, "age_bins"),
        ({"split_fractions": (0.7, 0.2, 0.2)}, "split_fractions"),
        ({"split_fractions": (0.7, 0.3)}, "split_fractions"),
        ({"split_fractions": (1.2, -0.1, -0.1)}, "split_fractions"),
        ({"expression_gain": -1.0}, "expression_gain"),
        ({"expression_gain": 5.0}, "expression_gain"),
        ({"expression_gain": True}, "expression_gain"),
        ({"expression_gain": "4"}, "expression_gain"),
    ],
)
def test_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"SynthFacesSpec.{field}"):
        sf.SynthFacesSpec(**kwargs)


def test_render_and_sample_argument_errors():
    f = sf.sample_factors(sf.SynthFacesSpec(), 0)
    with pytest.raises(ValueError, match="resolution"):
        sf.render(f, 200, False)
    with pytest.raises(ValueError, match="negative"):
        sf.sample_factors(sf.SynthFacesSpec(), -1)


def test_preview_grid():
    spec = sf.SynthFacesSpec(task="expression", resolution=32)
    png = sf.preview_grid(spec, per_class=3)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.height == 4 * 32 and img.width > 3 * 32
    assert png == sf.preview_grid(spec, per_class=3)
    age = Image.open(io.BytesIO(sf.preview_grid(sf.SynthFacesSpec(resolution=32), per_class=2)))
    assert age.height == 3 * 32
