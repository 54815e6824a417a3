"""Per-sample squared gradient norms without per-sample gradients, and TracIn self-influence.

For a batch (x_i, y_i) and a classifier with parameters theta, `per_sample_grad_sq_norms`
returns ||d loss_i / d theta||^2 for every sample i, where loss_i is the cross-entropy of
sample i alone, in ONE forward and ONE backward pass over the batch:

- the model runs in eval mode (batch norm uses its running statistics, dropout is off), so
  sample i's gradient does not depend on the rest of the batch;
- the backward pass is of the SUM of per-sample losses, so the gradient reaching a layer's
  output for sample i is exactly d loss_i / d output_i (no 1/B factor);
- each trainable layer turns its input a_i and output gradient g_i into the squared norm of its
  own per-sample parameter gradient (INFLUENCE_NOTES 2.3); the squared total is the sum over
  layers:
    Linear, input (B, d):   ||dW||^2 = ||a_i||^2 ||g_i||^2,   ||db||^2 = ||g_i||^2
    Linear, input (B, T, d) and Conv2d (U_i = unfold(a_i), d x T; G_i, p x T):
        ghost        ||dW||^2 = <U_i^T U_i, G_i^T G_i>     when 2 T^2 <= d p   (the mixed rule)
        materialise  ||dW||^2 = ||G_i U_i^T||^2             otherwise; one layer at a time
        bias         ||db||^2 = ||sum_t G_i[:, t]||^2
    BatchNorm (eval):        dgamma_i = sum_spatial(x_hat * g_i), dbeta_i = sum_spatial(g_i)
- only output gradients are needed, so the backward stops at the output of the first selected
  layer to run (`_backward_targets`): the (batch-summed) weight gradients of a plain backward
  and the first layer's input gradient are never computed; nothing accumulates into `.grad`.

Output gradients are captured by a tensor hook registered on each layer's output inside its
forward hook. torchvision's ResNet applies `ReLU(inplace=True)` to batch-norm outputs; a hook
registered before that in-place op receives the gradient w.r.t. the value before it, which is
the batch norm's own output gradient (module full-backward hooks do not cope with this).

TracIn self-influence (METHOD.md stage 3) is `I_self(i) = sum_t eta_t ||grad loss_i(theta_t)||^2`
over saved checkpoints t with learning rates eta_t: `self_influence_scores` on plain
(model-or-state-dict, learning-rate) pairs, `SelfInfluenceScorer` on saved classifier checkpoints
(load once, then call per batch, the shape of a Ray Data actor).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from diffinf_ray.models.checkpoint import (
    CheckpointError,
    ClassifierCheckpoint,
    load_all,
    load_checkpoint,
    load_into,
)
from diffinf_ray.models.classifier import build_classifier
from diffinf_ray.storage import Location

ConvMode = Literal["auto", "ghost", "materialize"]
CONV_MODES = ("auto", "ghost", "materialize")
SUPPORTED_MODULES = (nn.Linear, nn.Conv2d, _BatchNorm)
_STOCK_FORWARDS = (nn.Linear.forward, nn.Conv2d.forward, _BatchNorm.forward)

# Temporaries of one hook (unfolded input, Gram matrices, per-sample gradients) are computed in
# batch chunks of at most this many floats, so memory stays bounded at high resolution.
_CHUNK_FLOATS = 1 << 25


class GradNormError(ValueError):
    """A model, layer selection or batch that per-sample gradient norms cannot handle."""


@dataclass
class GradNormResult:
    """Per-sample results of one forward/backward. Shapes: B = batch size."""

    sq_norms: Tensor  # (B,) squared gradient norm over all selected parameters (model's dtype)
    per_layer: dict[str, Tensor]  # module name -> (B,) its parameters' share of `sq_norms`
    losses: Tensor  # (B,) per-sample cross-entropy
    conv_branches: dict[str, str] = field(default_factory=dict)  # name -> "ghost"|"materialize"
    margins: Tensor | None = None  # (B,) logit of the label minus the largest other logit


# -- per-layer formulas -------------------------------------------------------------------------


def use_ghost(d: int, p: int, t: int) -> bool:
    """The mixed rule (Bu et al. 2022): ghost norm when its T x T Grams are no larger than a
    per-sample d x p gradient."""
    return 2 * t * t <= d * p


def _chunks(batch: int, floats_per_sample: int) -> Iterable[slice]:
    step = max(1, _CHUNK_FLOATS // max(1, floats_per_sample))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def _weight_sq_norm(unfolded: Tensor, grads: Tensor, ghost: bool) -> Tensor:
    """Per-sample ||G_i U_i^T||_F^2 for U (B, d, T) and G (B, p, T), without forming all of them.

    ghost: <U^T U, G^T G> (two B x T x T Grams); else one layer's B x p x d gradients, chunked.
    """
    b, d, t = unfolded.shape
    p = grads.shape[1]
    out = unfolded.new_empty(b)
    for s in _chunks(b, 2 * t * t if ghost else p * d + d * t):
        u, g = unfolded[s], grads[s]
        if ghost:
            gram_u = torch.bmm(u.transpose(1, 2), u)
            gram_g = torch.bmm(g.transpose(1, 2), g)
            out[s] = (gram_u * gram_g).sum(dim=(1, 2))
        else:
            per_sample = torch.bmm(g, u.transpose(1, 2))
            out[s] = per_sample.pow(2).sum(dim=(1, 2))
    return out


def _conv_unfold(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The (B, C_in k_h k_w, H_out W_out) patches that `module` multiplies by its weight."""
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": PyTorch pads the extra element of an odd total on the right/bottom
            pads = []
            for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = (0, 0)
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                    stride=module.stride)


def _half_to_float(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _LayerRecorder:
    """Hooks of one trainable module: capture its input in forward, turn its output gradient
    into per-sample squared norms in backward, then drop the input."""

    def __init__(self, name: str, module: nn.Module, conv_mode: ConvMode, run_order: list):
        self.name = name
        self.run_order = run_order  # shared: recorders in the order their modules ran
        self.module = module
        self.conv_mode = conv_mode
        self.weight = _trainable(module, "weight")
        self.bias = _trainable(module, "bias")
        self.input: Tensor | None = None
        self.input_version = 0
        self.output: Tensor | None = None
        self.output_version = 0
        self.calls = 0
        self.sq_norm: Tensor | None = None
        self.branch: str | None = None
        self.handle = module.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, inputs: tuple, output) -> None:
        self.calls += 1
        if self.calls > 1:
            raise GradNormError(
                f"module {self.name!r} ran twice in one forward pass; a reused (weight-tied) "
                "layer's per-sample gradient is a sum over uses, which layer-wise norms cannot give"
            )
        if not isinstance(output, Tensor) or not output.requires_grad:
            raise GradNormError(f"module {self.name!r}: its output carries no gradient")
        if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
            raise GradNormError(
                f"batch norm {self.name!r} normalises with batch statistics (train mode or "
                "track_running_stats=False), so per-sample gradients depend on the batch"
            )
        self.run_order.append(self)
        self.input = inputs[0]
        self.input_version = inputs[0]._version
        self.output = output
        self.output_version = output._version
        # Registered before any in-place op on `output` (e.g. torchvision's ReLU(inplace=True)),
        # so the hook receives the gradient w.r.t. this module's own output.
        output.register_hook(self._backward)

    def _backward(self, grad: Tensor) -> None:
        x = self.input
        if x is None:  # a second pass over the same graph: already recorded
            return None
        if x._version != self.input_version:
            raise GradNormError(
                f"the input of module {self.name!r} was modified in place after the module ran"
            )
        with torch.no_grad():
            self.sq_norm = self._sq_norm(_half_to_float(x.detach()), _half_to_float(grad))
        self.input = None  # free the activation as soon as it has been used
        return None

    def _sq_norm(self, x: Tensor, g: Tensor) -> Tensor:
        module = self.module
        b = x.shape[0]
        if isinstance(module, nn.Linear):
            if x.dim() == 2:
                g_sq = g.pow(2).sum(1)
                total = x.pow(2).sum(1) * g_sq if self.weight else torch.zeros_like(g_sq)
                return total + g_sq if self.bias else total
            # (B, ..., d): a sequence of T positions sharing the weight
            u = x.reshape(b, -1, x.shape[-1]).transpose(1, 2)
            gg = g.reshape(b, -1, g.shape[-1]).transpose(1, 2)
            return self._unfolded_sq_norm(u, gg)
        if isinstance(module, nn.Conv2d):
            u = _conv_unfold(module, x) if self.weight else None
            gg = g.reshape(b, g.shape[1], -1)
            return self._unfolded_sq_norm(u, gg)
        # batch norm in eval mode: y = gamma * x_hat + beta, x_hat from the running statistics
        dims = tuple(range(2, g.dim()))
        g_sum = g.sum(dims) if dims else g
        total = g_sum.pow(2).sum(1) if self.bias else g.new_zeros(b)
        if self.weight:
            shape = (1, -1) + (1,) * len(dims)
            invstd = torch.rsqrt(module.running_var.to(g.dtype) + module.eps).reshape(shape)
            centred_g = (x - module.running_mean.to(g.dtype).reshape(shape)).mul_(g)
            dgamma = (centred_g.sum(dims) if dims else centred_g) * invstd.reshape(1, -1)
            total = total + dgamma.pow(2).sum(1)
        return total

    def _unfolded_sq_norm(self, u: Tensor | None, g: Tensor) -> Tensor:
        """u (B, d, T) or None when the weight is frozen, g (B, p, T)."""
        total = g.sum(2).pow(2).sum(1) if self.bias else g.new_zeros(g.shape[0])
        if u is not None:
            d, t = u.shape[1], u.shape[2]
            ghost = {"auto": use_ghost(d, g.shape[1], t), "ghost": True,
                     "materialize": False}[self.conv_mode]
            self.branch = "ghost" if ghost else "materialize"
            total = total + _weight_sq_norm(u, g, ghost)
        return total

    def remove(self) -> None:
        self.handle.remove()
        self.input = None
        self.output = None


def _trainable(module: nn.Module, name: str) -> bool:
    param = module._parameters.get(name)
    return param is not None and param.requires_grad


def _check_supported(name: str, module: nn.Module) -> None:
    own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if not own:
        return
    label = name or "<root>"
    if not isinstance(module, SUPPORTED_MODULES):
        raise GradNormError(
            f"module {label!r} ({type(module).__name__}) has trainable parameters {own} that "
            "per-sample gradient norms do not support (Linear, Conv2d and BatchNorm only); "
            "freeze them (requires_grad=False) or leave the module out with `layers=`"
        )
    if set(own) - {"weight", "bias"} or type(module).forward not in _STOCK_FORWARDS:
        raise GradNormError(
            f"module {label!r} ({type(module).__name__}) changes its parameters or forward; "
            "the closed-form per-sample norms hold only for the stock Linear/Conv2d/BatchNorm"
        )
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise GradNormError(f"conv {label!r}: groups={module.groups} is not supported (only 1)")
        if module.padding_mode != "zeros":
            raise GradNormError(
                f"conv {label!r}: padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
            )


def selected_modules(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Modules owning trainable parameters, in registration order; `layers` restricts them to
    the named modules and their descendants. Unsupported trainable modules raise."""
    named = dict(model.named_modules())
    if layers is not None:
        if isinstance(layers, str):
            raise GradNormError("`layers` must be a list of module names, not a string")
        unknown = [name for name in layers if name not in named]
        if unknown:
            raise GradNormError(f"unknown layer names {unknown}; modules are e.g. {list(named)[1:6]}")
    chosen: dict[str, nn.Module] = {}
    for name, module in named.items():
        if layers is not None and not any(
            name == sel or sel == "" or name.startswith(sel + ".") for sel in layers
        ):
            continue
        _check_supported(name, module)
        if _trainable(module, "weight") or _trainable(module, "bias"):
            chosen[name] = module
    if not chosen:
        raise GradNormError(f"no trainable parameters selected (layers={layers})")
    return chosen


def _check_batch(images: Tensor, labels: Tensor) -> None:
    if images.dim() < 1 or images.shape[0] == 0:
        raise GradNormError("empty batch: need at least one image")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise GradNormError(
            f"labels must have shape ({images.shape[0]},) to match the images, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise GradNormError(f"labels must be integer class indices, got {labels.dtype}")


def _backward_targets(first: _LayerRecorder, run_order: list[_LayerRecorder]) -> list[Tensor]:
    """Where the single backward may stop. Only the selected layers' output gradients are
    needed, so it stops at the outputs of the first selected layer to run and of the layers
    reading the same input (ResNet's downsample branch); their tensor hooks still fire there.
    Neither weight gradients nor those layers' input gradients are computed. Every other
    selected layer must lie between the loss and these outputs (true of chain-like models such
    as ResNets; `compute_grad_sq_norms` raises a clear error otherwise)."""
    siblings = [r for r in run_order if r.input is first.input]
    if all(r.output._version == r.output_version for r in siblings):
        return [r.output for r in siblings]
    if first.input.requires_grad:  # an output was changed in place: stop at the input
        return [first.input]
    return [p for p in first.module.parameters(recurse=False) if p.requires_grad]


# -- public API ---------------------------------------------------------------------------------


def compute_grad_sq_norms(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    layers: Sequence[str] | None = None,
    conv_mode: ConvMode = "auto",
) -> GradNormResult:
    """Per-sample squared gradient norms of the cross-entropy, with the details.

    images: (B, ...) model input on the model's device; labels: (B,) integer classes.
    conv_mode: "auto" applies the mixed rule per layer; "ghost"/"materialize" force a branch.
    The model runs in eval mode; each module's train/eval flag is restored afterwards.
    """
    if conv_mode not in CONV_MODES:
        raise GradNormError(f"conv_mode must be one of {CONV_MODES}, got {conv_mode!r}")
    labels = torch.as_tensor(labels)
    _check_batch(images, labels)
    modules = selected_modules(model, layers)
    labels = labels.to(images.device).long()
    if labels.min() < 0:
        raise GradNormError(f"labels must be >= 0, got {int(labels.min())}")

    modes = {m: m.training for m in model.modules()}
    run_order: list[_LayerRecorder] = []
    recorders = [_LayerRecorder(name, m, conv_mode, run_order) for name, m in modules.items()]
    try:
        model.eval()
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            logits = model(x)
            if logits.dim() != 2 or logits.shape[0] != images.shape[0]:
                raise GradNormError(f"model output must be (B, classes) logits, got {tuple(logits.shape)}")
            if int(labels.max()) >= logits.shape[1]:
                raise GradNormError(
                    f"label {int(labels.max())} out of range for {logits.shape[1]} classes"
                )
            losses = F.cross_entropy(_half_to_float(logits), labels, reduction="none")
            missing = [r.name for r in recorders if not r.calls]
            if missing:
                raise GradNormError(f"selected modules {missing} did not run in the forward pass")
            first = run_order[0]
            targets = _backward_targets(first, run_order)
            for r in recorders:
                r.output = None
            torch.autograd.grad(losses.sum(), targets)
        unreached = [r.name for r in recorders if r.sq_norm is None]
        if unreached:
            raise GradNormError(
                f"modules {unreached} are not between the loss and the first selected module to "
                f"run, {first.name!r}; select a different set of `layers`"
            )
    finally:
        for r in recorders:
            r.remove()
        for m, training in modes.items():
            m.training = training
    per_layer = {r.name: r.sq_norm for r in recorders}
    total = torch.stack(list(per_layer.values())).sum(0)
    branches = {r.name: r.branch for r in recorders if r.branch is not None}
    return GradNormResult(total, per_layer, losses.detach(), branches,
                          _assigned_label_margins(logits.detach(), labels))


def _assigned_label_margins(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) logit of each row's label minus its largest other logit (Pleiss et al.'s margin)."""
    logits = _half_to_float(logits)
    assigned = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return assigned - others.max(dim=1).values


def per_sample_grad_sq_norms(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    layers: Sequence[str] | None = None,
    per_layer: bool = False,
    conv_mode: ConvMode = "auto",
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """(B,) ||d CE(model(x_i), y_i) / d theta||^2 over the trainable parameters of `layers`
    (module names; None = all), in one forward and one backward, model in eval mode.
    With `per_layer=True` also returns {module name: (B,) share}; the shares sum to the total."""
    result = compute_grad_sq_norms(model, images, labels, layers=layers, conv_mode=conv_mode)
    return (result.sq_norms, result.per_layer) if per_layer else result.sq_norms


def naive_per_sample_grad_sq_norms(
    model: nn.Module, images: Tensor, labels: Tensor, layers: Sequence[str] | None = None
) -> Tensor:
    """The slow reference: one forward and one backward per sample (eval mode), full gradients."""
    params = [p for m in selected_modules(model, layers).values()
              for p in m.parameters(recurse=False) if p.requires_grad]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        out = []
        with torch.enable_grad():
            for i in range(images.shape[0]):
                loss = F.cross_entropy(model(images[i:i + 1]), labels[i:i + 1].long())
                grads = torch.autograd.grad(loss, params)
                out.append(sum(g.pow(2).sum() for g in grads))
    finally:
        for m, training in modes.items():
            m.training = training
    return torch.stack(out)


def self_influence_scores(
    checkpoints: Sequence[tuple[nn.Module | dict[str, Tensor], float]],
    images: Tensor,
    labels: Tensor,
    *,
    model: nn.Module | None = None,
    layers: Sequence[str] | None = None,
    per_checkpoint: bool = False,
    conv_mode: ConvMode = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """TracIn self-influence `sum_t lr_t ||grad loss_i(theta_t)||^2`, (B,) float64.

    checkpoints: (model, learning rate) or (state_dict, learning rate) pairs; state dicts are
    loaded into `model` (required then; its weights are overwritten). Images go to each model's
    device. With `per_checkpoint=True` also returns the unweighted (B, T) squared norms, so that
    `score = norms @ lrs`.
    """
    if not checkpoints:
        raise GradNormError("no checkpoints given")
    columns = []
    lrs = []
    for index, (weights, lr) in enumerate(checkpoints):
        if isinstance(weights, nn.Module):
            net = weights
        elif model is None:
            raise GradNormError(f"checkpoint {index} is a state dict: pass `model=` to load it into")
        else:
            model.load_state_dict(weights, strict=True)
            net = model
        if not float(lr) > 0:
            raise GradNormError(f"checkpoint {index}: learning rate must be > 0, got {lr!r}")
        device = next(net.parameters()).device
        norms = per_sample_grad_sq_norms(
            net, images.to(device), torch.as_tensor(labels).to(device), layers=layers,
            conv_mode=conv_mode,
        )
        columns.append(norms.double().cpu())
        lrs.append(float(lr))
    per_ckpt = torch.stack(columns, dim=1)
    scores = per_ckpt @ torch.tensor(lrs, dtype=torch.float64)
    return (scores, per_ckpt) if per_checkpoint else scores


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class SelfInfluenceScorer:
    """TracIn self-influence of batches under a fixed list of classifier checkpoints.

    Loads the checkpoints once (all must share one architecture; a file that does not fit, or
    lacks its learning rate, is a `CheckpointError` naming the file), then `scorer(images,
    labels)` returns numpy arrays:
        "score"           (B,)   float64  sum_t lr_t * ||grad||^2
        "per_checkpoint"  (B, T) float64  ||grad loss_i(theta_t)||^2, unweighted (lr = 1 variant)
        "per_checkpoint_last" (B, T) float64  the same over the output layer's parameters only
                                              (last-layer TracIn; the last selected layer)
        "loss"            (B, T) float32  per-sample cross-entropy at each checkpoint
        "margin"          (B, T) float64  logit of the label minus the largest other logit
    `checkpoints`: the run's `checkpoints/` folder (URI or Location, ordered by epoch), or a
    sequence of checkpoint files (URIs/Locations) or loaded `ClassifierCheckpoint`s.
    keep_models=True holds one model per checkpoint on `device`; False holds the weights on the
    CPU and reloads them into a single model per call (less device memory, a copy per call).
    dtype: the models' and images' floating type (float64 for exactness checks).
    """

    def __init__(
        self,
        checkpoints: str | Location | Sequence[str | Location | ClassifierCheckpoint],
        *,
        device: str | torch.device | None = None,
        layers: Sequence[str] | None = None,
        conv_mode: ConvMode = "auto",
        keep_models: bool = True,
        dtype: torch.dtype = torch.float32,
    ):
        ckpts = _load_checkpoints(checkpoints)
        self.device = torch.device(device or default_device())
        self.dtype = dtype
        self.layers = list(layers) if layers is not None else None
        self.conv_mode = conv_mode
        self.sources = [c.source for c in ckpts]
        self.epochs = [c.epoch for c in ckpts]
        self.learning_rates = np.array([c.learning_rate for c in ckpts], dtype=np.float64)
        arch = ckpts[0].architecture
        num_classes = arch.get("num_classes")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise CheckpointError(f"{ckpts[0].source}: architecture has no valid num_classes ({arch})")
        template = build_classifier(num_classes, arch.get("head_hidden", 256)).to(dtype)
        self.num_classes = num_classes
        # load_into checks each checkpoint's architecture against the model and names the file
        self._models: list[nn.Module] = []
        self._states: list[dict[str, Tensor]] = []
        for c in ckpts:
            if keep_models:
                net = copy.deepcopy(template)
                load_into(net, c)
                self._models.append(net.to(self.device, dtype).eval())
            else:
                load_into(template, c)
                self._states.append({k: v.detach().cpu().clone() for k, v in c.model_state.items()})
        if not keep_models:
            self._models.append(template.to(self.device, dtype).eval())
        selected_modules(self._models[0], self.layers)  # fail now, not on the first batch

    def __len__(self) -> int:
        return len(self.sources)

    def _model(self, t: int) -> nn.Module:
        if self._states:
            self._models[0].load_state_dict(self._states[t], strict=True)
            return self._models[0]
        return self._models[t]

    def __call__(self, images: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> dict[str, np.ndarray]:
        images = torch.as_tensor(images).to(self.device, self.dtype)
        labels = torch.as_tensor(labels)
        _check_batch(images, labels)
        labels = labels.to(self.device).long()
        norms, last, losses, margins = [], [], [], []
        for t in range(len(self)):
            result = compute_grad_sq_norms(
                self._model(t), images, labels, layers=self.layers, conv_mode=self.conv_mode
            )
            norms.append(result.sq_norms.double().cpu().numpy())
            # the last selected layer in module order: the classifier's output layer (head.2)
            last.append(list(result.per_layer.values())[-1].double().cpu().numpy())
            losses.append(result.losses.cpu().numpy())
            margins.append(result.margins.double().cpu().numpy())
        per_ckpt = np.stack(norms, axis=1)
        return {
            "score": per_ckpt @ self.learning_rates,
            "per_checkpoint": per_ckpt,
            "per_checkpoint_last": np.stack(last, axis=1),
            "loss": np.stack(losses, axis=1).astype(np.float32),
            "margin": np.stack(margins, axis=1),
        }


def _load_checkpoints(
    checkpoints: str | Location | Sequence[str | Location | ClassifierCheckpoint],
) -> list[ClassifierCheckpoint]:
    if isinstance(checkpoints, str | Location):
        folder = checkpoints if isinstance(checkpoints, Location) else Location(checkpoints)
        return load_all(folder)
    loaded = []
    for item in checkpoints:
        if isinstance(item, ClassifierCheckpoint):
            loaded.append(item)
        else:
            loaded.append(load_checkpoint(item if isinstance(item, Location) else Location(item)))
    if not loaded:
        raise CheckpointError("no checkpoints given")
    return loaded
