"""The interface every noisy-label training method implements, and what they share.

A method owns its network(s), their optimiser(s) and any per-sample state; a training loop only
feeds it batches. Epochs are 1-based (as in `models/training.py`), steps 0-based within an epoch.
A batch is a dict of tensors:

- "image": float (B, C, H, W) (any input the model factory's networks accept),
- "label": int64 (B,), the assigned (possibly noisy) labels,
- "index": int64 (B,), a stable per-sample index in 0..num_samples-1; required by methods that
  keep per-sample state (ELR+ targets, ProMix selection) and ignored by the others,
- optionally "is_corrupted": bool (B,), used only for diagnostics (the share of truly clean
  labels among the samples a method selects); no method reads it to train.

The loop's contract for one epoch (`run_epoch` below does exactly this):

    if method.needs_scan(epoch):            # ProMix: per-sample losses over the whole set
        for batch in all training batches:  # no augmentation, any order
            method.scan_batch(batch, epoch)
    method.on_epoch_start(epoch)
    for step, batch in enumerate(training batches):
        metrics = method.training_step(batch, epoch, step)
    method.on_epoch_end(epoch)

`set_lr` applies a learning-rate schedule to every optimiser of the method; `eval_model` is the
network used at test time; `state_dict` / `load_state_dict` cover networks, optimisers, EMA
copies, per-sample state and counters, so a run resumed from a checkpoint continues exactly.

Every method takes the common configuration keys below (besides its own):

- optimizer: "adam" (default) or "sgd". Adam, no weight decay, is the project's classifier
  recipe (METHOD.md stage 2); the papers use SGD (momentum 0.9, weight decay 5e-4 for ELR+ and
  ProMix; Co-teaching uses Adam). Using the project's optimiser for every method keeps the
  comparison about the method, not the optimiser.
- weight_decay: 0.0; momentum: 0.9 (SGD only).

All randomness (mixup coefficients and permutations) comes from torch's global generator, so a
run is deterministic given `torch.manual_seed` (and deterministic kernels on the device).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.baselines.registry import MethodError, method_defaults

Batch = Mapping[str, torch.Tensor]
ModelFactory = Callable[[], nn.Module]


@runtime_checkable
class NoisyLabelMethod(Protocol):
    """What a training loop needs from a noisy-label method (see the module docstring)."""

    name: str
    config: dict[str, Any]

    def models(self) -> list[nn.Module]:
        """The networks the method trains (1 or 2), in a fixed order."""
        ...

    def needs_scan(self, epoch: int) -> bool:
        """Whether the loop must pass every training sample through `scan_batch` before `epoch`."""
        ...

    def scan_batch(self, batch: Batch, epoch: int) -> None: ...

    def on_epoch_start(self, epoch: int) -> None: ...

    def training_step(self, batch: Batch, epoch: int, step: int) -> dict[str, float]:
        """Forward, loss, backward and optimiser step(s) on one batch; scalar metrics back."""
        ...

    def on_epoch_end(self, epoch: int) -> None: ...

    def eval_model(self) -> nn.Module:
        """The network that predicts at test time (logits out)."""
        ...

    def set_lr(self, lr: float) -> None: ...

    def to(self, device: torch.device | str) -> NoisyLabelMethod: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


# ----------------------------------------------------------------------------- shared maths


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample -sum_k targets_k log softmax(logits)_k, shape (B,)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t)^2), t = clip(current / length, 0, 1); 1 when length == 0 (Laine & Aila 2017;
    the ramp ELR+ uses for its EMA decay and regulariser weight)."""
    if length == 0:
        return 1.0
    t = min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(current: float, length: float) -> float:
    """min(current / length, 1); 1 when length == 0 (ProMix `linear_rampup2`)."""
    if length <= 0 or current >= length:
        return 1.0
    return max(current, 0.0) / length


def ceil_count(fraction: float, n: float) -> int:
    """ceil(fraction * n) robust to float error (0.85 * 20 -> 17, not 18)."""
    return int(math.ceil(fraction * n - 1e-9))


def mixup_coefficient(alpha: float) -> float:
    """lambda ~ Beta(alpha, alpha), folded to max(lambda, 1 - lambda) (ELR+, ProMix, DivideMix)."""
    a = torch.tensor(float(alpha))
    lam = float(torch.distributions.Beta(a, a).sample())
    return max(lam, 1.0 - lam)


@torch.no_grad()
def ema_update(model: nn.Module, ema: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters only (buffers are the EMA model's own,
    updated by its own forward passes, as in the ELR+ code)."""
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.mul_(decay).add_(p.detach(), alpha=1.0 - decay)


class LogitAverage(nn.Module):
    """Test-time ensemble: the mean of the members' logits (ELR+ and ProMix evaluation)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def checkpoint_members(self) -> list[nn.Module]:
        """The networks whose logits it averages (stored as one classifier checkpoint)."""
        return list(self.members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(images) for m in self.members]).mean(dim=0)


# ----------------------------------------------------------------------------- base class


def resolve_config(name: str, cfg: Mapping[str, Any] | None,
                   defaults: Mapping[str, Any] | None = None) -> dict:
    """`defaults` (default: the registered ones of method `name`, method + common, registry.py)
    updated by cfg; unknown keys are an error (typos fail loudly)."""
    merged = dict(method_defaults(name) if defaults is None else defaults)
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(merged))
    if unknown:
        raise MethodError(f"{name}: unknown config keys {unknown}; known: {sorted(merged)}")
    merged.update(cfg)
    if merged["optimizer"] not in ("adam", "sgd"):
        raise MethodError(f"{name}: optimizer must be 'adam' or 'sgd', got {merged['optimizer']!r}")
    return merged


class MethodBase:
    """Shared plumbing: config, optimisers, learning rate, device moves, state dicts.

    Subclasses set `name` (their registry.py entry holds their options and defaults), may
    adjust the options a run builds them with (`run_options`), build their networks into
    `self._nets` (ordered), optimisers into `self._optimizers`, list extra modules (EMA copies)
    in `self._extra_modules` and per-sample / scalar state through `_extra_state` /
    `_load_extra_state`.
    """

    name = "base"

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Every option key the method takes, with its default: its registry.py entry's and
        the common optimiser keys (the fairness methods have their own table)."""
        return method_defaults(cls.name)

    @classmethod
    def run_options(cls, given: dict[str, Any], epochs: int,
                    noise_rate: float) -> tuple[dict[str, Any], list[str]]:
        """The options a pipeline run builds the method with: `given` (baselines.options) plus
        what the run knows for it (`epochs` = train.epochs, `noise_rate` = noise.rate), and
        warnings for the user. By default `given` as it is."""
        return given, []

    def __init__(self, num_classes: int, num_samples: int, cfg: Mapping[str, Any] | None,
                 model_factory: ModelFactory, lr: float):
        if num_classes < 2:
            raise MethodError(f"{self.name}: need at least 2 classes, got {num_classes}")
        if num_samples < 1:
            raise MethodError(f"{self.name}: num_samples must be positive, got {num_samples}")
        if not lr > 0:
            raise MethodError(f"{self.name}: lr must be positive, got {lr}")
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.lr = float(lr)
        self.config = resolve_config(self.name, cfg, self.option_defaults())
        self.model_factory = model_factory
        self._nets: list[nn.Module] = []
        self._extra_modules: list[nn.Module] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self.device = torch.device("cpu")

    # -- construction helpers
    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        c = self.config
        if c["optimizer"] == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=c["weight_decay"])
        return torch.optim.SGD(params, lr=self.lr, momentum=c["momentum"],
                               weight_decay=c["weight_decay"])

    def _required(self, key: str):
        value = self.config.get(key)
        if value is None:
            raise MethodError(f"{self.name}: config key {key!r} is required")
        return value

    # -- step helpers
    def _single_step(self, loss: torch.Tensor, logits: torch.Tensor,
                     y: torch.Tensor) -> dict[str, float]:
        """One optimiser step of a single-network method on `loss`; its loss and batch
        accuracy for the epoch log."""
        opt = self._optimizers[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()),
                "accuracy": float((logits.detach().argmax(1) == y).float().mean())}

    # -- batch helpers
    def _xy(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["image"].to(self.device)
        y = batch["label"].to(self.device).long()
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise MethodError(f"{self.name}: label must be (B,), got {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise MethodError(f"{self.name}: labels must be in 0..{self.num_classes - 1}")
        return x, y

    def _index(self, batch: Batch) -> torch.Tensor:
        if "index" not in batch:
            raise MethodError(f"{self.name} keeps per-sample state: batches need an 'index' column")
        idx = batch["index"].to(self.device).long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise MethodError(f"{self.name}: index must be in 0..{self.num_samples - 1}")
        return idx

    @staticmethod
    def _label_precision(batch: Batch, chosen: torch.Tensor) -> dict[str, float]:
        """Share of truly clean labels among the chosen rows (diagnostic; needs is_corrupted)."""
        if "is_corrupted" not in batch or chosen.numel() == 0:
            return {}
        corrupted = batch["is_corrupted"].to(chosen.device).bool()
        return {"label_precision": float((~corrupted[chosen]).float().mean())}

    # -- interface defaults
    def models(self) -> list[nn.Module]:
        return list(self._nets)

    def needs_scan(self, epoch: int) -> bool:
        return False

    def scan_batch(self, batch: Batch, epoch: int) -> None:
        raise MethodError(f"{self.name} does not scan the training set")

    def on_epoch_start(self, epoch: int) -> None:
        return None

    def on_epoch_end(self, epoch: int) -> None:
        return None

    def eval_model(self) -> nn.Module:
        return self._nets[0]

    def set_lr(self, lr: float) -> None:
        for opt in self._optimizers:
            for group in opt.param_groups:
                group["lr"] = float(lr)

    def to(self, device: torch.device | str) -> MethodBase:
        """Move networks and per-sample state (call before the first training step)."""
        self.device = torch.device(device)
        for module in self._nets + self._extra_modules:
            module.to(self.device)
        for key, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, key, value.to(self.device))
            elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
                setattr(self, key, [v.to(self.device) for v in value])
        return self

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": dict(self.config),
            "nets": [copy.deepcopy(m.state_dict()) for m in self._nets],
            "extra_modules": [copy.deepcopy(m.state_dict()) for m in self._extra_modules],
            "optimizers": [copy.deepcopy(o.state_dict()) for o in self._optimizers],
            "extra": copy.deepcopy(self._extra_state()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise MethodError(f"state is for method {state.get('name')!r}, not {self.name!r}")
        for key in ("nets", "extra_modules", "optimizers"):
            have = {"nets": self._nets, "extra_modules": self._extra_modules,
                    "optimizers": self._optimizers}[key]
            if len(state[key]) != len(have):
                raise MethodError(f"{self.name}: state has {len(state[key])} {key}, "
                                  f"expected {len(have)}")
        for module, sd in zip(self._nets + self._extra_modules,
                              list(state["nets"]) + list(state["extra_modules"]), strict=True):
            module.load_state_dict(sd)
        for opt, sd in zip(self._optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)
        self._load_extra_state(state["extra"])


def run_epoch(method: NoisyLabelMethod, batches: Callable[[], Iterable[Batch]],
              epoch: int, scan_batches: Callable[[], Iterable[Batch]] | None = None
              ) -> dict[str, float]:
    """One epoch by the contract in the module docstring; metrics averaged over samples.

    `batches()` must return a fresh iterable over the training set each time it is called (it is
    called twice when the method needs a scan). `scan_batches()`, when given, is what the scan
    pass reads instead (the Ray Train loop: unshuffled, without augmentation).
    """
    if method.needs_scan(epoch):
        with torch.no_grad():
            for batch in (scan_batches or batches)():
                method.scan_batch(batch, epoch)
    method.on_epoch_start(epoch)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for step, batch in enumerate(batches()):
        metrics = method.training_step(batch, epoch, step)
        n = float(len(batch["label"]))
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value * n
            weights[key] = weights.get(key, 0.0) + n
    method.on_epoch_end(epoch)
    return {key: sums[key] / weights[key] for key in sums}
