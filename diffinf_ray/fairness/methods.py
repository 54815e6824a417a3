"""The fairness methods by name, and the plug point for synthetic-pretraining variants.

Training methods (`METHODS`): name -> a GroupMethodBase class (group_dro.py, reweighting.py),
options in fairness/options.GROUP_METHOD_OPTIONS:

    method = build_method("group_dro", num_classes, group_counts, {"step_size": 0.01},
                          lambda: build_classifier(num_classes), lr=1e-3)

Pretraining variants (`PRETRAINERS`): name -> a callable

    pretrainer(train_manifest: pandas.DataFrame, context: dict) -> pandas.DataFrame

that gets the real training rows (sample_id, label, group, image (PNG bytes), ...) and
`context` {"seed", "run_dir" (a local folder it may write to), "class_names", "resolution",
"options" (the entry's `pretrain_options`)}
and returns a pretraining manifest: rows with at least `label`, `group` and `image` (e.g.
group-balanced synthetic images from per-group fine-tuned diffusion models, `synthetic` true).
A config method entry {name: X, pretrain: P, method: M} (runner.py) then trains the
classifier with ERM on P's manifest for `pretrain_epochs` and fine-tunes it on the real
training split with method M. `register_pretrainer(name, fn)` adds one at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from diffinf_ray.baselines.base import MethodError
from diffinf_ray.fairness.group_dro import GroupDRO, GroupMethodBase
from diffinf_ray.fairness.reweighting import GroupERM, GroupReweighted, GroupUpsampled
from diffinf_ray.fairness_gen.pretrain import synthetic_pretrainers

METHODS: dict[str, type[GroupMethodBase]] = {
    cls.name: cls for cls in (GroupERM, GroupReweighted, GroupUpsampled, GroupDRO)
}

Pretrainer = Callable[[Any, dict], Any]
# every synthetic-data variant (fairness_gen/variants.py) is one; `pretrain_options` are theirs
PRETRAINERS: dict[str, Pretrainer] = synthetic_pretrainers()


def register_pretrainer(name: str, fn: Pretrainer) -> None:
    """Make `fn` available as `pretrain: name` in fairness configs (module docstring)."""
    if name in PRETRAINERS and PRETRAINERS[name] is not fn:
        raise MethodError(f"pretrainer {name!r} is already registered")
    PRETRAINERS[name] = fn


def build_method(name: str, num_classes: int, group_counts: Sequence[int],
                 cfg: Mapping[str, Any] | None, model_factory, lr: float) -> GroupMethodBase:
    """A fresh fairness method (its network from `model_factory()`)."""
    if name not in METHODS:
        raise MethodError(f"unknown fairness method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](num_classes, group_counts, cfg, model_factory, lr)
