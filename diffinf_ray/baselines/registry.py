"""The noisy-label methods by name, torch-free: what `baselines.methods` may list, each method's
option keys with their kinds and defaults (checked when the run config is loaded), its row label
in the experiment table, and where its class lives (imported only when the method is built).

To add a method: a module with a `MethodBase` subclass (base.py) and one `Method(...)` line in
`REGISTERED` below.

An option kind is `int`, `float` (an int is accepted), `bool`, or a tuple of the allowed
strings; a table maps key -> (kind, default).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OptionTable = dict[str, tuple[Any, Any]]

# every method also takes these (its optimiser)
COMMON_OPTIONS: OptionTable = {
    "optimizer": (("adam", "sgd"), "adam"),
    "weight_decay": (float, 0.0),
    "momentum": (float, 0.9),
}


class MethodError(ValueError):
    """A method was configured or fed wrongly."""


@dataclass(frozen=True)
class Method:
    name: str  # baselines.methods / baselines.options key; the folder baselines/<name>
    label: str  # its row in the experiment table
    source: str  # "module:Class" of its MethodBase subclass
    options: OptionTable  # its own keys (besides COMMON_OPTIONS)

    @property
    def defaults(self) -> dict[str, Any]:
        """Its own keys with their defaults (without the common ones)."""
        return option_defaults(self.options)

    def load(self) -> type:
        module, _, name = self.source.partition(":")
        return getattr(importlib.import_module(module), name)


REGISTERED = (
    Method("standard", "standard", "diffinf_ray.baselines.standard:Standard", {}),
    Method("small_loss", "Small-loss", "diffinf_ray.baselines.coteaching:CoTeaching", {
        "forget_rate": (float, None), "noise_rate": (float, None), "num_gradual": (int, 10),
        "exponent": (float, 1.0), "co_teaching": (bool, True),
        "eval_net": (("net1", "mean"), "net1"),
    }),
    Method("elr_plus", "ELR+", "diffinf_ray.baselines.elr:ELRPlus", {
        "beta": (float, 0.7), "lam": (float, 3.0), "mixup_alpha": (float, 1.0),
        "ema_alpha": (float, 0.997), "ema_step": (int, 40000), "coef_step": (int, 0),
        "clamp": (float, 1e-4),
    }),
    Method("proselflc", "ProSelfLC", "diffinf_ray.baselines.proselflc:ProSelfLC", {
        "epochs": (int, None), "exp_base": (float, 6.0), "transit_time_ratio": (float, 0.5),
        "burn_in_epochs": (int, None), "steps_per_epoch": (int, None),
        "detach_target": (bool, False),
    }),
    Method("promix", "ProMix", "diffinf_ray.baselines.promix:ProMix", {
        "epochs": (int, None), "rho_start": (float, 0.5), "rho_end": (float, 0.5),
        "tau": (float, 0.99), "pretrain_epochs": (int, 10), "rampup_epochs": (int, 50),
        "lga_epochs": (int, 250), "lga_threshold": (float, 0.9), "debias_output": (float, 0.8),
        "debias_pl": (float, 0.8), "bias_momentum": (float, 0.9999), "temperature": (float, 0.5),
        "mixup_alpha": (float, 4.0), "beta_max": (float, 0.1), "beta_cutoff": (bool, True),
        "pseudo_head": (bool, True), "confidence_penalty": (bool, False),
    }),
)
METHODS: dict[str, Method] = {m.name: m for m in REGISTERED}


def method(name: str) -> Method:
    """The registered method `name`; an unknown name is a MethodError listing the known ones."""
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def method_defaults(name: str) -> dict[str, Any]:
    """The method's own config keys with their defaults, plus the common optimiser keys."""
    return {**option_defaults(COMMON_OPTIONS), **method(name).defaults}


def build_method(name: str, num_classes: int, num_samples: int, cfg: Mapping[str, Any] | None,
                 model_factory, lr: float):
    """A fresh NoisyLabelMethod (base.py): `model_factory()` is called once per network it
    trains. Imports the method's module (torch)."""
    return method(name).load()(num_classes, num_samples, cfg, model_factory, lr)


# -- option tables ---------------------------------------------------------------------------


def option_defaults(options: OptionTable) -> dict[str, Any]:
    """key -> default of an options table."""
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


def check_options(name: str, given: dict[str, Any],
                  tables: Mapping[str, OptionTable] | None = None) -> tuple[str, str, str] | None:
    """The first problem with method `name`'s options as (kind, key, message), kind
    "unknown_key" (the key is the method for an unknown method) or "bad_value"; None if fine.
    `tables`: name -> options table to check against (default: the registered methods'; the
    fairness methods pass theirs, fairness/options.py)."""
    tables = {n: m.options for n, m in METHODS.items()} if tables is None else tables
    if name not in tables:
        return "unknown_key", name, f"known methods: {sorted(tables)}"
    table = {**COMMON_OPTIONS, **tables[name]}
    for key, value in given.items():
        if key not in table:
            return "unknown_key", f"{name}.{key}", f"{name} takes {sorted(table)}"
        kind = table[key][0]
        if not fits(kind, value):
            return "bad_value", f"{name}.{key}", f"expected {kind_name(kind)}, got {value!r}"
    return None
