"""Noisy-label training methods (METHOD.md stage 9 comparisons), Ray-free PyTorch cores.

Each method owns its network(s) and optimiser(s) and is driven per batch by a training loop
through the `NoisyLabelMethod` interface (base.py documents the contract and the batch format).
registry.py names them (torch-free, so the run config checks `baselines.options` on load):

- `standard`: cross-entropy on the given labels (the noisy baseline);
- `small_loss`: Co-teaching, Han et al. 2018 (coteaching.py);
- `elr_plus`: ELR+, Liu et al. 2020 (elr.py);
- `proselflc`: ProSelfLC, Wang et al. 2021 (proselflc.py);
- `promix`: ProMix, Xiao et al. 2023, simplified as documented (promix.py).

    method = build_method("small_loss", num_classes=3, num_samples=n_train,
                          cfg={"noise_rate": 0.3}, model_factory=lambda: build_classifier(3),
                          lr=1e-4)
    for epoch in range(1, epochs + 1):
        run_epoch(method, lambda: loader, epoch)      # base.run_epoch
    logits = method.eval_model()(images)

Importing this package does not import torch; build_method imports the method's module.
"""

from __future__ import annotations

from diffinf_ray.baselines.registry import (
    METHODS,
    MethodError,
    build_method,
    method,
    method_defaults,
)

__all__ = ["METHODS", "MethodError", "build_method", "method", "method_defaults"]
