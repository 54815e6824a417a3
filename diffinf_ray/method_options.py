"""The noisy-label methods' option keys, value kinds and defaults (diffinf_ray.baselines), as
plain data: the run config checks `baselines.options` against it when it is loaded, without
importing torch. The methods take their DEFAULTS from here.

A kind is `int`, `float` (an int is accepted), `bool`, or a tuple of the allowed strings.
"""

from __future__ import annotations

from typing import Any

# key -> (kind, default); every method also takes these (its optimiser)
COMMON_OPTIONS: dict[str, tuple[Any, Any]] = {
    "optimizer": (("adam", "sgd"), "adam"),
    "weight_decay": (float, 0.0),
    "momentum": (float, 0.9),
}

METHOD_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "standard": {},
    "small_loss": {  # Co-teaching
        "forget_rate": (float, None), "noise_rate": (float, None), "num_gradual": (int, 10),
        "exponent": (float, 1.0), "co_teaching": (bool, True), "eval_net": (("net1", "mean"), "net1"),
    },
    "elr_plus": {
        "beta": (float, 0.7), "lam": (float, 3.0), "mixup_alpha": (float, 1.0),
        "ema_alpha": (float, 0.997), "ema_step": (int, 40000), "coef_step": (int, 0),
        "clamp": (float, 1e-4),
    },
    "proselflc": {
        "epochs": (int, None), "exp_base": (float, 6.0), "transit_time_ratio": (float, 0.5),
        "burn_in_epochs": (int, None), "steps_per_epoch": (int, None),
        "detach_target": (bool, False),
    },
    "promix": {
        "epochs": (int, None), "rho_start": (float, 0.5), "rho_end": (float, 0.5),
        "tau": (float, 0.99), "pretrain_epochs": (int, 10), "rampup_epochs": (int, 50),
        "lga_epochs": (int, 250), "lga_threshold": (float, 0.9), "debias_output": (float, 0.8),
        "debias_pl": (float, 0.8), "bias_momentum": (float, 0.9999), "temperature": (float, 0.5),
        "mixup_alpha": (float, 4.0), "beta_max": (float, 0.1), "beta_cutoff": (bool, True),
        "pseudo_head": (bool, True), "confidence_penalty": (bool, False),
    },
}

# the fairness methods (diffinf_ray/fairness/: batches carry a group index); Group-DRO's strong
# L2 is its own default (Sagawa et al. 2020), the others keep the common 0.0
GROUP_METHOD_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "erm": {},
    "reweight": {},
    "upsample": {},
    "group_dro": {
        "step_size": (float, 0.01), "adjustment": (float, 0.0), "normalize_loss": (bool, False),
        "weight_decay": (float, 1e-2),
    },
}


def option_defaults(options: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """key -> default of an options table (COMMON_OPTIONS or one of METHOD_OPTIONS)."""
    return {key: default for key, (_, default) in options.items()}


def kind_name(kind) -> str:
    return " | ".join(map(repr, kind)) if isinstance(kind, tuple) else kind.__name__


def fits(kind, value) -> bool:
    """Whether `value` is of `kind` (bool is not taken for a number)."""
    if isinstance(kind, tuple):
        return value in kind
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_options(method: str, given: dict[str, Any],
                  methods: dict[str, dict[str, tuple[Any, Any]]] | None = None
                  ) -> tuple[str, str, str] | None:
    """The first problem with method `method`'s options as (kind, key, message), kind
    "unknown_key" (the key is the method for an unknown method) or "bad_value"; None if fine.
    `methods`: the options tables to check against (default METHOD_OPTIONS)."""
    methods = METHOD_OPTIONS if methods is None else methods
    if method not in methods:
        return "unknown_key", method, f"known methods: {sorted(methods)}"
    table = {**COMMON_OPTIONS, **methods[method]}
    for key, value in given.items():
        if key not in table:
            return "unknown_key", f"{method}.{key}", f"{method} takes {sorted(table)}"
        kind = table[key][0]
        if not fits(kind, value):
            return "bad_value", f"{method}.{key}", f"expected {kind_name(kind)}, got {value!r}"
    return None
