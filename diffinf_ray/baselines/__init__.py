"""Noisy-label training methods (METHOD.md stage 9 comparisons), Ray-free PyTorch cores.

Each method owns its network(s) and optimiser(s) and is driven per batch by a training loop
through the `NoisyLabelMethod` interface (base.py documents the contract and the batch format):

- `standard`: cross-entropy on the given labels (the noisy baseline);
- `small_loss`: Co-teaching, Han et al. 2018 (coteaching.py);
- `elr_plus`: ELR+, Liu et al. 2020 (elr.py);
- `proselflc`: ProSelfLC, Wang et al. 2021 (proselflc.py);
- `promix`: ProMix, Xiao et al. 2023, simplified as documented (promix.py).

    method = build_method("small_loss", num_classes=3, num_samples=n_train,
                          cfg={"noise_rate": 0.3}, model_factory=lambda: build_classifier(3),
                          lr=1e-4)
    for epoch in range(1, epochs + 1):
        run_epoch(method, lambda: loader, epoch)
    logits = method.eval_model()(images)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffinf_ray.baselines.base import (
    COMMON_DEFAULTS,
    MethodBase,
    MethodError,
    ModelFactory,
    NoisyLabelMethod,
    run_epoch,
)
from diffinf_ray.baselines.coteaching import CoTeaching
from diffinf_ray.baselines.elr import ELRPlus
from diffinf_ray.baselines.promix import ProMix
from diffinf_ray.baselines.proselflc import ProSelfLC
from diffinf_ray.baselines.standard import Standard

METHODS: dict[str, type[MethodBase]] = {
    cls.name: cls for cls in (Standard, CoTeaching, ELRPlus, ProSelfLC, ProMix)
}


def method_defaults(name: str) -> dict[str, Any]:
    """The method's own config keys with their defaults (plus the common optimiser keys)."""
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return {**COMMON_DEFAULTS, **METHODS[name].DEFAULTS}


def build_method(name: str, num_classes: int, num_samples: int, cfg: Mapping[str, Any] | None,
                 model_factory: ModelFactory, lr: float) -> NoisyLabelMethod:
    """A fresh method: `model_factory()` is called once per network it trains."""
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](num_classes, num_samples, cfg, model_factory, lr)


__all__ = ["METHODS", "MethodError", "NoisyLabelMethod", "build_method", "method_defaults",
           "run_epoch"]
