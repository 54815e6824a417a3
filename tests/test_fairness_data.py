"""The biased synthfaces draw (issue "fairness"): the training split's per-class majority share
is the severity, val/test cells are balanced, people stay in one split, the group column is the
(class, spurious value) cell."""

from __future__ import annotations

import numpy as np
import pytest

from diffinf_ray.data import synthfaces as sf


def _cells(spec: sf.SynthFacesSpec, n: int):
    """(split, class, spurious value) of samples 0..n-1, without rendering."""
    rows = []
    for i in range(n):
        split, value = sf.biased_cell(spec, i)
        rows.append((split, sf.drawn_class(spec, i), value))
    return rows


@pytest.mark.parametrize("severity,levels", [(0.5, 2), (0.9, 2), (0.95, 2), (0.99, 2), (0.8, 3)])
def test_training_majority_share_is_the_severity(severity, levels):
    spec = sf.SynthFacesSpec(task="age", age_bins=((18, 35), (50, 80)) if levels == 2 else
                             ((0, 18), (25, 40), (50, 80)), seed=1, severity=severity,
                             spurious_levels=levels)
    rows = _cells(spec, 12000)
    train = [(k, v) for split, k, v in rows if split == "train"]
    classes = sorted({k for k, _ in train})
    for k in classes:
        values = np.array([v for kk, v in train if kk == k])
        share = float(np.mean(values == k % levels))
        tol = 4 * np.sqrt(severity * (1 - severity) / len(values)) + 1e-3  # 4 binomial sd
        assert abs(share - severity) < tol, (k, share, severity)
        if levels == 3:  # the minority share is split evenly between the other values
            others = [float(np.mean(values == v)) for v in range(levels) if v != k % levels]
            assert abs(others[0] - others[1]) < 0.04
    for split in ("val", "test"):
        cells = np.array([k * levels + v for s, k, v in rows if s == split])
        counts = np.bincount(cells, minlength=len(classes) * levels)
        expected = len(cells) / len(counts)
        assert (np.abs(counts - expected) < 5 * np.sqrt(expected)).all(), (split, counts)


def test_biased_rows_group_column_people_and_splits():
    spec = sf.SynthFacesSpec(task="age", age_bins=((18, 35), (50, 80)), resolution=32, seed=2,
                             num_identities=120, with_masks=False, severity=0.9)
    batch = sf.generate_batch(spec, np.arange(60))
    names = sf.class_names(spec)
    people_split: dict[str, set] = {}
    for i in range(60):
        split, value = sf.biased_cell(spec, i)
        assert batch["split"][i] == split
        assert batch["label"][i] == sf.drawn_class(spec, i)
        assert batch["spurious"][i] == sf.SPURIOUS_VALUES[2][value]
        assert batch["group"][i] == f"{names[batch['label'][i]]}|{batch['spurious'][i]}"
        person = sf.identity_factors(spec.seed, int(batch["identity"][i][1:]))
        assert sf.spurious_index(2, person.skin_tone) == value  # the drawn tone is the person's
        people_split.setdefault(batch["identity"][i], set()).add(split)
    assert all(len(s) == 1 for s in people_split.values())
    # the plain draw is unchanged: no spurious column, skin-tone groups
    plain = sf.generate_batch(sf.SynthFacesSpec(task="age", resolution=32, with_masks=False),
                              np.arange(3))
    assert "spurious" not in plain and set(plain["group"]) <= set(sf.SKIN_GROUPS)


def test_severity_and_levels_are_validated():
    with pytest.raises(ValueError, match="severity"):
        sf.SynthFacesSpec(severity=1.5)
    with pytest.raises(ValueError, match="spurious_levels"):
        sf.SynthFacesSpec(severity=0.9, spurious_levels=4)
    tiny = sf.SynthFacesSpec(num_identities=2, severity=0.9, resolution=32)
    with pytest.raises(ValueError, match="num_identities"):
        for i in range(50):
            sf.identity_of(tiny, i)
