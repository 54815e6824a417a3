"""A noisy-label method (diffinf_ray/baselines) trained by the Ray Train harness
(models/harness.py): `MethodCore`, its part of a training run (the epoch contract of
baselines/base.py, checkpoints in the one classifier format plus method_state.pt for resume,
gradient averaging over several workers), and `method_loop`, the function every Ray Train
worker runs. The baselines stage fits each configured method with it; the fairness methods
(fairness/ray_train.py) reuse the core with another `build_method`.
"""

from __future__ import annotations

from pathlib import Path

from diffinf_ray.config import TrainSection
from diffinf_ray.models.checkpoint import CHECKPOINT_FILE, ClassifierCheckpoint, classifier_payload
from diffinf_ray.models.harness import random_hflip

METHOD_STATE_FILE = "method_state.pt"


def checkpoint_members(model) -> list:
    """The classifiers a method's `eval_model()` predicts with (one, or the members whose
    logits it averages), for the classifier checkpoint format."""
    from diffinf_ray.models.classifier import AttributeClassifier

    if isinstance(model, AttributeClassifier):
        return [model]
    # a wrapper (a logit average, ProMix's dual-head net) names the networks it predicts with
    members = getattr(model, "checkpoint_members", None)
    if members is None:
        raise TypeError(f"cannot store a {type(model).__name__} as a classifier checkpoint")
    return [c for member in members() for c in checkpoint_members(member)]


def method_payload(method, epoch: int, lr: float) -> dict:
    """checkpoint.pt for the method's test-time network, in the one classifier format."""
    return classifier_payload(checkpoint_members(method.eval_model()), epoch, lr,
                              method=method.name)


def average_gradients_before_step(method) -> None:
    """Data parallelism for a method's own optimisers: each averages its parameters' gradients
    over the workers (one flat all-reduce) before it steps. A parameter without a gradient on
    this worker counts as zero, so every worker reduces the same buffer."""
    import torch
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = dist.get_world_size()

    def hook(optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = g

    # MethodBase keeps its optimisers here (the NoisyLabelMethod protocol has no accessor)
    for optimizer in method._optimizers:
        optimizer.register_step_pre_hook(hook)


class MethodCore:
    """A noisy-label method's part of a training run (`harness.EpochCore`): the epoch contract
    of baselines/base.py (scan pass without augmentation, on_epoch_start, training steps with
    flip augmentation, on_epoch_end); its full state in method_state.pt for resume."""

    def __init__(self, loop_config: dict, worker):
        import torch

        from diffinf_ray.models.classifier import build_classifier

        self.train = train = TrainSection.model_validate(loop_config["train"])
        self.seed, self.worker = loop_config["seed"], worker
        num_classes = loop_config["num_classes"]
        torch.manual_seed(self.seed)  # the same initial weights on every worker
        self.method = self.build_method(
            loop_config, lambda: build_classifier(num_classes, train.head_hidden))
        self.method.to(worker.device)
        if worker.world > 1:
            average_gradients_before_step(self.method)

    def build_method(self, loop_config: dict, model_factory):
        """The method this core trains (a noisy-label one here; fairness/ray_train.py builds a
        fairness method instead)."""
        from diffinf_ray.baselines import build_method

        return build_method(loop_config["method"], loop_config["num_classes"],
                            loop_config["num_samples"], loop_config["options"], model_factory,
                            self.train.lr)

    def restore(self, ckpt: ClassifierCheckpoint, directory: Path) -> None:
        import torch

        path = directory / METHOD_STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"baselines: {ckpt.source} has no {METHOD_STATE_FILE} "
                                    "beside it; delete the method's checkpoints to start over")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.method.load_state_dict(saved["method"])

    def _batches(self, shard, epoch: int, augment: bool):
        """A fresh pass over the shard: shuffled and flipped for training, plain for a scan."""
        bs, device = self.train.batch_size, self.worker.device
        if not augment:
            return shard.iter_torch_batches(batch_size=bs, device=device)

        def augmented():
            for batch in shard.iter_torch_batches(batch_size=bs, device=device,
                                                  local_shuffle_buffer_size=4 * bs,
                                                  local_shuffle_seed=self.seed + epoch):
                if self.train.augment:
                    batch["image"] = random_hflip(batch["image"])
                yield batch
        return augmented()

    def train_epoch(self, shard, epoch: int, lr: float) -> dict[str, float]:
        import torch

        from diffinf_ray.baselines.base import run_epoch

        torch.manual_seed(self.seed + 1000 * epoch + self.worker.rank)  # per epoch and worker
        self.method.set_lr(lr)
        return run_epoch(self.method, lambda: self._batches(shard, epoch, True), epoch,
                         scan_batches=lambda: self._batches(shard, epoch, False))

    def eval_model(self):
        return self.method.eval_model()

    def checkpoint_files(self, epoch: int, lr: float) -> dict[str, dict]:
        return {CHECKPOINT_FILE: method_payload(self.method, epoch, lr),
                METHOD_STATE_FILE: {"epoch": epoch, "method": self.method.state_dict()}}

    def describe(self, m: dict[str, float]) -> str:
        # every metric the method reports: loss, and e.g. the selected share (kept_fraction,
        # chosen_fraction) and its clean share (label_precision)
        return " ".join(f"train_{k} {v:.4f}" for k, v in sorted(m.items()))


def method_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the method's core through the harness."""
    from diffinf_ray.models.harness import TrainWorker, run_epochs

    worker = TrainWorker.current(f"baselines:{loop_config['method']}")
    core = MethodCore(loop_config, worker)
    run_epochs(core, worker, core.train)
