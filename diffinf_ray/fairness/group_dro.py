"""Group-DRO (Sagawa et al., ICLR 2020; official code github.com/kohpangwei/group_DRO,
`loss.py: LossComputer.compute_robust_loss`).

Online group weights q over the G training groups (q starts uniform). Per batch, with group_loss
the mean loss of each group's samples in the batch (0 for a group absent from the batch):

    adjusted = group_loss + C / sqrt(n_g)        (group adjustment, C = 0: none)
    q <- q * exp(eta * adjusted);  q <- q / sum(q)
    loss = sum_g q_g * group_loss_g

and strong L2 on the weights (the paper's point: without it a network that fits every training
group leaves DRO nothing to weight). The official code's `normalize_loss` option (adjusted /
sum(adjusted)) is kept as `normalize_loss`, off by default as there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from diffinf_ray.baselines.base import Batch, MethodBase, MethodError
from diffinf_ray.baselines.registry import COMMON_OPTIONS, option_defaults
from diffinf_ray.fairness.options import GROUP_METHOD_OPTIONS


def group_mean_losses(per_sample: torch.Tensor, groups: torch.Tensor, num_groups: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss per group (0 where a group has no sample), sample count per group)."""
    counts = torch.bincount(groups, minlength=num_groups).to(per_sample.dtype)
    sums = torch.zeros(num_groups, dtype=per_sample.dtype, device=per_sample.device)
    sums = sums.index_add(0, groups, per_sample)
    return sums / counts.clamp(min=1), counts


class GroupDROLoss:
    """The robust loss and its online weights q (module docstring). `group_counts`: n_g, the
    training-set size of each group (for the adjustment C / sqrt(n_g))."""

    def __init__(self, group_counts: Sequence[float], step_size: float = 0.01,
                 adjustment: float = 0.0, normalize_loss: bool = False):
        counts = torch.as_tensor(list(group_counts), dtype=torch.float32)
        if counts.ndim != 1 or len(counts) < 1 or bool((counts <= 0).any()):
            raise MethodError(f"group_dro: every training group needs samples, got {counts}")
        self.counts = counts
        self.step_size = float(step_size)
        self.adjustment = float(adjustment)
        self.normalize_loss = bool(normalize_loss)
        self.q = torch.full((len(counts),), 1.0 / len(counts))

    def update(self, group_loss: torch.Tensor) -> torch.Tensor:
        """q <- normalise(q * exp(eta * adjusted group_loss)); returns the new q."""
        adjusted = group_loss.detach().to(self.q.device, torch.float32)
        if self.adjustment:
            adjusted = adjusted + self.adjustment / torch.sqrt(self.counts.to(adjusted.device))
        if self.normalize_loss:
            adjusted = adjusted / adjusted.sum()
        q = self.q * torch.exp(self.step_size * adjusted)
        self.q = q / q.sum()
        return self.q

    def __call__(self, per_sample: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Update q from this batch and return sum_g q_g * group_loss_g."""
        group_loss, _ = group_mean_losses(per_sample, groups, len(self.counts))
        q = self.update(group_loss).to(group_loss.device)
        return group_loss @ q

    def to(self, device) -> GroupDROLoss:
        self.q, self.counts = self.q.to(device), self.counts.to(device)
        return self


class GroupMethodBase(MethodBase):
    """A MethodBase (baselines/base.py) whose batches also carry "group": int64 (B,), the
    sample's group index in 0..G-1; `group_counts` are the training-set counts n_g."""

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Its keys in fairness/options.py with their defaults, after the common ones."""
        return {**option_defaults(COMMON_OPTIONS), **option_defaults(GROUP_METHOD_OPTIONS[cls.name])}

    def __init__(self, num_classes: int, group_counts: Sequence[int],
                 cfg: Mapping[str, Any] | None, model_factory, lr: float):
        super().__init__(num_classes, int(sum(group_counts)), cfg, model_factory, lr)
        self.group_counts = [int(c) for c in group_counts]
        self.net = model_factory()
        self._nets = [self.net]
        self._optimizers = [self._make_optimizer(self.net.parameters())]

    def _groups(self, batch: Batch) -> torch.Tensor:
        if "group" not in batch:
            raise MethodError(f"{self.name}: batches need a 'group' column")
        g = batch["group"].to(self.device).long()
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= len(self.group_counts)):
            raise MethodError(f"{self.name}: group must be in 0..{len(self.group_counts) - 1}")
        return g

    def _loss(self, per_sample: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        return per_sample.mean()

    def training_step(self, batch: Batch, epoch: int, step: int) -> dict[str, float]:
        x, y = self._xy(batch)
        groups = self._groups(batch)
        self.net.train()
        logits = self.net(x)
        loss = self._loss(F.cross_entropy(logits, y, reduction="none"), groups)
        return self._single_step(loss, logits, y)


class GroupDRO(GroupMethodBase):
    name = "group_dro"

    def __init__(self, num_classes, group_counts, cfg, model_factory, lr):
        super().__init__(num_classes, group_counts, cfg, model_factory, lr)
        c = self.config
        self.robust = GroupDROLoss(group_counts, c["step_size"], c["adjustment"],
                                   c["normalize_loss"])

    def _loss(self, per_sample, groups):
        return self.robust(per_sample, groups)

    def to(self, device):
        super().to(device)
        self.robust.to(self.device)
        return self

    def _extra_state(self) -> dict[str, Any]:
        return {"q": self.robust.q.detach().cpu()}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.robust.q = torch.as_tensor(state["q"]).to(self.device)
