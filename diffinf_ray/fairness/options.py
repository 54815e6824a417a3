"""The fairness methods' option keys, kinds and defaults (diffinf_ray/fairness/), as plain data
in the noisy-label registry's format (baselines/registry.py: key -> (kind, default), every
method also taking its COMMON_OPTIONS), so a fairness config is checked without importing torch.
"""

from __future__ import annotations

from diffinf_ray.baselines.registry import OptionTable

# batches carry a group index; Group-DRO's strong L2 is its own default (Sagawa et al. 2020),
# the others keep the common 0.0
GROUP_METHOD_OPTIONS: dict[str, OptionTable] = {
    "erm": {},
    "reweight": {},
    "upsample": {},
    "group_dro": {
        "step_size": (float, 0.01), "adjustment": (float, 0.0), "normalize_loss": (bool, False),
        "weight_decay": (float, 1e-2),
    },
}
