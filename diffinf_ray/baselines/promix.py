"""`promix`: ProMix (Xiao, Wang, Zhou, Cheng, Yang & Ding, IJCAI 2023, "ProMix: Combating Label
Noise via Maximizing Clean Sample Utility"; code Justherozen/ProMix, `Train_promix.py`,
`utils/utils.py`). A faithful but simplified version; what is simplified is listed at the end.

Two peer networks, each with a primary head h and an auxiliary pseudo head h_AP on the shared
backbone. After `pretrain_epochs` of plain cross-entropy warm-up, every epoch:

1. Scan (the repo's `eval_train`): each network, in eval mode, computes the cross-entropy of
   every training sample. Class-wise small-loss selection (CSS): within each given class j,
   the network keeps its ceil(rho * N / K) smallest-loss samples (capped at the class size, at
   least 1), N the number of training samples. Each network uses its OWN selection.
   rho = rho_start + (rho_end - rho_start) * min(e / rampup_epochs, 1).
2. Per batch, matched high-confidence selection (MHCS): a sample is also selected when the
   network's probability of its given label exceeds tau. In the last `lga_epochs` epochs, label
   guessing by agreement (LGA) adds samples both networks predict confidently (max p > tau) and
   identically, up to `lga_threshold` of the batch (the most confident first); those take the
   predicted (debiased) class as their label.
3. Losses per network, on the selected set D_l with its (given or guessed) labels:
     primary head:  CE(z + a_out log pi) + w * mixup-CE,
     pseudo head:   CE(z_ap + a_out log pi) + w * mixup-CE + beta * CE on the unselected D_u
                    against sharpened debiased pseudo-labels
                    sharpen(softmax(z - a_pl log pi_u), T) from the primary head.
   z + a log pi is the debiased-margin (logit-adjusted) loss; softmax(z - a log pi) the debiased
   pseudo-label; pi (selected) and pi_u (unselected) are per-network EMAs (momentum m) of the
   mean predicted distribution, starting uniform. Mixup: lambda ~ Beta(4, 4), folded to
   max(lambda, 1 - lambda), within the selected set.
   w = min(e / rampup_epochs, 1); beta = beta_max * min(e / (2 rampup_epochs), 1), and, as in
   the repo's code, beta is set to 0 from epoch 2 * rampup_epochs on (`beta_cutoff`).
   Both networks' losses are summed and one optimiser steps over both networks.
Test-time prediction: the mean of the two primary heads' logits (the repo's "Acc Mean").
e is the repo's 0-based epoch (e = epoch - 1 here).

Defaults and sources (`run.sh`, CIFAR-10 symmetric noise, and `Train_promix.py` arguments):
- rho_start = rho_end = 0.5 (CIFAR-10 sym-50% and asym-40%; the repo uses 0.7 at sym-20%);
- tau 0.99 (CIFAR-10; 0.95 for CIFAR-100); pretrain_epochs 10 (CIFAR-10);
- rampup_epochs 50 (`--warmup_ep`); lga_epochs 250 (`--start_expand`, of 600 epochs: set it
  in proportion for shorter runs); lga_threshold 0.9 (`--threshold`);
- debias_output 0.8, debias_pl 0.8, bias_momentum 0.9999, temperature 0.5 (sharpening);
- mixup_alpha 4.0; beta_max 0.1; beta_cutoff True;
- confidence_penalty False (the repo adds a negative-entropy penalty in warm-up only for
  asymmetric noise);
- epochs: required (the total, for the LGA window).

Model requirement: the pseudo head is a freshly initialised copy of the model's `head`, applied
to `model.features(x)`; the model must satisfy model(x) == model.head(model.features(x)) (as
`AttributeClassifier` does). `pseudo_head=False` drops the pseudo head and its losses.

Simplified versus the paper / repo (deliberate, for this project's pipeline):
- no strong augmentation (RandAugment): the consistency losses between weak and strong views
  (the primary and pseudo heads' `loss_cr`, and the strong-view half of the D_u loss) are left
  out; the loop's own augmentation (if any) is the only view;
- no FMix term (only mixup);
- the scan uses the images as the loop passes them (the repo uses test-time transforms);
- the loss of the pseudo head on D_u uses the same view as its target (the repo adds a second,
  strongly augmented view);
- the selection share per class is rho * N / K as in the repo (not rho * class size), so for
  imbalanced classes small classes are capped at their size;
- the repo min-max normalises the scan losses first; that does not change the per-class
  ranking and is skipped;
- empty selected / unselected sets contribute zero loss (the repo would produce NaN).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.baselines.base import (
    Batch,
    LogitAverage,
    MethodBase,
    MethodError,
    ceil_count,
    linear_rampup,
    mixup_coefficient,
    soft_cross_entropy,
)
from diffinf_ray.baselines.registry import method_defaults


class DualHeadNet(nn.Module):
    """A model from the factory plus a freshly initialised copy of its head (the pseudo head)."""

    def __init__(self, base: nn.Module, pseudo_head: bool = True):
        super().__init__()
        self.base = base
        self.pseudo_head: nn.Module | None = None
        if pseudo_head:
            head = getattr(base, "head", None)
            if not callable(getattr(base, "features", None)) or not isinstance(head, nn.Module):
                raise MethodError("promix: the pseudo head needs a model with `features(x)` and a "
                                  "`head` module (model(x) == head(features(x))); "
                                  "or set pseudo_head=False")
            self.pseudo_head = copy.deepcopy(head)
            for module in self.pseudo_head.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.base(images)

    def checkpoint_members(self) -> list[nn.Module]:
        """Predicts with its primary head, forward == base(x): the base is its checkpoint."""
        return [self.base]

    def both(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(primary logits, pseudo-head logits or None) from one backbone pass."""
        if self.pseudo_head is None:
            return self.base(images), None
        feats = self.base.features(images)
        return self.base.head(feats), self.pseudo_head(feats)


def classwise_small_loss(losses: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor,
                         rho: float, num_classes: int) -> torch.Tensor:
    """CSS: per class j, the ceil(rho * N / K) smallest-loss samples among those seen with label
    j (capped at their number, at least 1); N = number of seen samples. Boolean mask back."""
    selected = torch.zeros_like(seen, dtype=torch.bool)
    n = int(seen.sum())
    per_class = ceil_count(rho, n / num_classes)
    for j in range(num_classes):
        members = torch.nonzero(seen & (labels == j)).flatten()
        if members.numel() == 0:
            continue
        k = max(min(per_class, members.numel()), 1)
        order = torch.sort(losses[members], stable=True).indices
        selected[members[order[:k]]] = True
    return selected


def label_guessing(chosen: torch.Tensor, score1: torch.Tensor, score2: torch.Tensor,
                   match: torch.Tensor, tau: float, threshold: float) -> torch.Tensor:
    """LGA (repo `label_guessing`): when fewer than `threshold` of the batch is chosen, also
    choose the samples both networks predict identically with max probability > tau, up to
    int(B * threshold) chosen in all, the most confident (mean of the two scores) first."""
    batch = chosen.shape[0]
    out = chosen.clone()
    if chosen.sum().item() / batch >= threshold:
        return out
    cand = (score1 > tau) & (score2 > tau) & match & ~chosen
    cand_idx = torch.nonzero(cand).flatten()
    room = int(batch * threshold) - int(chosen.sum())
    if cand_idx.numel() > room:
        mean_score = (score1 + score2)[cand_idx] / 2
        order = torch.sort(-mean_score, stable=True).indices
        cand[cand_idx[order[room:]]] = False
    out |= cand
    return out


def matched_high_confidence(probs: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """MHCS: the network's probability of the given label exceeds tau."""
    return probs.gather(1, labels[:, None]).squeeze(1) > tau


def _mean(values: torch.Tensor) -> torch.Tensor:
    """Mean, or a zero that keeps the graph when empty."""
    return values.sum() / max(1, values.numel())


class ProMix(MethodBase):
    name = "promix"

    @classmethod
    def run_options(cls, given, epochs, noise_rate):
        warmup = given.get("pretrain_epochs", method_defaults(cls.name)["pretrain_epochs"])
        if warmup is None or warmup < epochs:
            return given, []
        return given, [f"promix: pretrain_epochs {warmup} >= train.epochs {epochs}, so ProMix "
                       "only warms up (two networks, plain cross-entropy) and never selects "
                       "clean samples; set baselines.options.promix.pretrain_epochs lower"]

    def __init__(self, num_classes, num_samples, cfg, model_factory, lr):
        super().__init__(num_classes, num_samples, cfg, model_factory, lr)
        self.epochs = int(self._required("epochs"))
        c = self.config
        for key in ("rho_start", "rho_end"):
            if not 0.0 < c[key] <= 1.0:
                raise MethodError(f"promix: {key} must be in (0, 1], got {c[key]}")
        self.net1 = DualHeadNet(model_factory(), c["pseudo_head"])
        self.net2 = DualHeadNet(model_factory(), c["pseudo_head"])
        self._nets = [self.net1, self.net2]
        self._optimizers = [self._make_optimizer(
            [{"params": self.net1.parameters()}, {"params": self.net2.parameters()}])]
        k, n = num_classes, num_samples
        self.pi = [torch.full((k,), 1.0 / k) for _ in range(2)]
        self.pi_unrel = [torch.full((k,), 1.0 / k) for _ in range(2)]
        self.selected = [torch.zeros(n, dtype=torch.bool) for _ in range(2)]
        self.scan_loss = [torch.full((n,), float("inf")) for _ in range(2)]
        self.scan_label = torch.full((n,), -1, dtype=torch.long)
        self.selection_epoch = 0
        self._eval = LogitAverage(self._nets)

    # -- schedule
    def rho(self, epoch: int) -> float:
        c = self.config
        ramp = linear_rampup(epoch - 1, c["rampup_epochs"])
        return c["rho_start"] + (c["rho_end"] - c["rho_start"]) * ramp

    def needs_scan(self, epoch: int) -> bool:
        return epoch > self.config["pretrain_epochs"]

    def scan_batch(self, batch: Batch, epoch: int) -> None:
        x, y = self._xy(batch)
        idx = self._index(batch)
        with torch.no_grad():
            for k, net in enumerate(self._nets):
                net.eval()
                self.scan_loss[k][idx] = F.cross_entropy(net(x), y, reduction="none")
            self.scan_label[idx] = y

    def on_epoch_start(self, epoch: int) -> None:
        if not self.needs_scan(epoch):
            return
        seen = self.scan_label >= 0
        if not bool(seen.any()):
            raise MethodError(f"promix: epoch {epoch} needs a scan of the training set first "
                              "(scan_batch over every sample; run_epoch does it)")
        rho = self.rho(epoch)
        for k in range(2):
            self.selected[k] = classwise_small_loss(self.scan_loss[k], self.scan_label, seen,
                                                    rho, self.num_classes)
            self.scan_loss[k].fill_(float("inf"))
        self.scan_label.fill_(-1)
        self.selection_epoch = epoch

    # -- training
    def _warmup_step(self, x, y) -> dict[str, float]:
        opt = self._optimizers[0]
        loss = x.new_zeros(())
        for net in self._nets:
            net.train()
            logits = net(x)
            loss = loss + F.cross_entropy(logits, y)
            if self.config["confidence_penalty"]:
                p = F.softmax(logits, dim=1)
                loss = loss + (p * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()), "chosen_fraction": 1.0}

    def _mixup_loss(self, net: DualHeadNet, x, targets, pi, head: str) -> torch.Tensor:
        # one chosen row mixes with itself (no mixup at all), and BatchNorm cannot train on a
        # batch of one: seen at 32 px when a batch held a single selected row
        if x.shape[0] < 2:
            return x.new_zeros(())
        lam = mixup_coefficient(self.config["mixup_alpha"])
        perm = torch.randperm(x.shape[0]).to(x.device)
        x_mix = lam * x + (1 - lam) * x[perm]
        t_mix = lam * targets + (1 - lam) * targets[perm]
        primary, pseudo = net.both(x_mix) if head == "pseudo" else (net(x_mix), None)
        logits = pseudo if head == "pseudo" else primary
        logits = logits + self.config["debias_output"] * torch.log(pi)
        return _mean(soft_cross_entropy(logits, t_mix))

    def training_step(self, batch: Batch, epoch: int, step: int) -> dict[str, float]:
        x, y = self._xy(batch)
        if epoch <= self.config["pretrain_epochs"]:
            return self._warmup_step(x, y)
        if self.selection_epoch != epoch:
            raise MethodError(f"promix: no selection for epoch {epoch}; call scan_batch over the "
                              "training set and on_epoch_start first (run_epoch does it)")
        idx = self._index(batch)
        c = self.config
        e = epoch - 1
        w = linear_rampup(e, c["rampup_epochs"])
        beta = c["beta_max"] * linear_rampup(e, 2 * c["rampup_epochs"]) if c["debias_pl"] else 1.0
        if c["beta_cutoff"] and e >= 2 * c["rampup_epochs"] and beta < 1:
            beta = 0.0
        y1h = F.one_hot(y, self.num_classes).float()
        a_out, a_pl = c["debias_output"], c["debias_pl"]

        outs = []
        for net in self._nets:
            net.train()
            outs.append(net.both(x))
        px, debias_px_unrel, chosen, pseudo_labels = [], [], [], []
        with torch.no_grad():
            for k in range(2):
                logits = outs[k][0].detach()
                px.append(F.softmax(logits, dim=1))
                debias_px = F.softmax(logits - a_pl * torch.log(self.pi[k]), dim=1)
                debias_px_unrel.append(F.softmax(logits - a_pl * torch.log(self.pi_unrel[k]), dim=1))
                pred = F.one_hot(debias_px.argmax(dim=1), self.num_classes).float()
                w_x = self.selected[k][idx] | matched_high_confidence(px[k], y, c["tau"])
                pseudo_labels.append(torch.where(w_x[:, None], y1h, pred))
                chosen.append(w_x)
            if e > self.epochs - c["lga_epochs"]:
                score1, cls1 = px[0].max(dim=1)
                score2, cls2 = px[1].max(dim=1)
                match = cls1 == cls2
                chosen = [label_guessing(ch, score1, score2, match, c["tau"], c["lga_threshold"])
                          for ch in chosen]

        total = x.new_zeros(())
        for k, net in enumerate(self._nets):
            primary, pseudo = outs[k]
            ch = torch.nonzero(chosen[k]).flatten()
            un = torch.nonzero(~chosen[k]).flatten()
            log_pi = torch.log(self.pi[k])
            pl = pseudo_labels[k][ch]
            loss_ce = _mean(soft_cross_entropy((primary + a_out * log_pi)[ch], pl))
            loss_mix = self._mixup_loss(net, x[ch], pl, self.pi[k], "primary")
            total = total + loss_ce + w * loss_mix
            if pseudo is not None:
                loss_ce_ph = _mean(soft_cross_entropy((pseudo + a_out * log_pi)[ch], pl))
                loss_mix_ph = self._mixup_loss(net, x[ch], pl, self.pi[k], "pseudo")
                sharp = debias_px_unrel[k] ** (1.0 / c["temperature"])
                sharp = sharp / sharp.sum(dim=1, keepdim=True)
                unrel_logits = pseudo + a_out * torch.log(self.pi_unrel[k])
                loss_unrel = _mean(soft_cross_entropy(unrel_logits[un], sharp[un]))
                total = total + beta * loss_unrel + loss_ce_ph + w * loss_mix_ph
            with torch.no_grad():  # moving-average class priors of D_l and D_u
                m = c["bias_momentum"]
                if ch.numel():
                    self.pi[k] = m * self.pi[k] + (1 - m) * px[k][ch].mean(dim=0)
                if un.numel():
                    self.pi_unrel[k] = m * self.pi_unrel[k] + (1 - m) * px[k][un].mean(dim=0)

        opt = self._optimizers[0]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        metrics = {"loss": float(total.detach()),
                   "chosen_fraction": float(chosen[0].float().mean()), "w": w, "beta": beta}
        metrics.update(self._label_precision(batch, torch.nonzero(chosen[0]).flatten().cpu()))
        return metrics

    def eval_model(self):
        return self._eval

    def _extra_state(self):
        return {"pi": [p.clone() for p in self.pi], "pi_unrel": [p.clone() for p in self.pi_unrel],
                "selected": [s.clone() for s in self.selected],
                "selection_epoch": self.selection_epoch}

    def _load_extra_state(self, state):
        self.pi = [p.clone().to(self.device) for p in state["pi"]]
        self.pi_unrel = [p.clone().to(self.device) for p in state["pi_unrel"]]
        self.selected = [s.clone().to(self.device) for s in state["selected"]]
        self.selection_epoch = int(state["selection_epoch"])
