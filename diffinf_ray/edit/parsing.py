"""The face-parsing network P of L_struct = mean over pixels of KL(P(x_ref) || P(x)) (METHOD.md
stage 6): x (B, 3, H, W) RGB in [-1, 1] -> (B, R, H, W) region logits, differentiable w.r.t. x.

- `BiSeNet`: the layout of the public face-parsing checkpoint (zllrunning/face-parsing.PyTorch
  `model.py` + `resnet.py`, released as `79999_iter.pth`, 19 CelebAMask-HQ classes), with its
  parameter names, so that file loads with strict=True. `FaceParser` wraps it for our images
  (resize to 512 px, ImageNet mean/std on [0, 1] RGB as that repo's `test.py`, logits back at
  the input size). `load_bisenet(uri, sha256)` reads the file by URI, checks its sha256, loads
  it with `torch.load(weights_only=True)` and strictly.
- `SmallParser`: a small U-Net for the region masks of data sets that have them (synthfaces:
  `manifest.REGIONS`, 0 background .. 6 mouth), trained by `train_parser`; logits at the input
  resolution. `save_parser` / `load_parser`: safetensors + config.json (sha256 recorded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.diffae.weights import (
    load_state_strict,
    read_weights_folder,
    write_weights_folder,
)
from diffinf_ray.models.weights import WeightsError, load_verified_state_dict
from diffinf_ray.storage import Location, StorageOptions

# -- BiSeNet (zllrunning/face-parsing.PyTorch) --------------------------------------------------
# Module and attribute names below are the checkpoint's parameter names; do not rename them.

BISENET_CLASSES = 19
BISENET_INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chan, out_chan, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chan),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _basic_layer(in_chan: int, out_chan: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_chan, out_chan, stride),
                         *[BasicBlock(out_chan, out_chan) for _ in range(blocks - 1)])


class Resnet18(nn.Module):
    """ResNet-18 trunk without pooling/fc; returns the 1/8, 1/16 and 1/32 features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _basic_layer(64, 64, 2, 1)
        self.layer2 = _basic_layer(64, 128, 2, 2)
        self.layer3 = _basic_layer(128, 256, 2, 2)
        self.layer4 = _basic_layer(256, 512, 2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        feat32_sum = self.arm32(feat32) + F.interpolate(avg, feat32.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up  # 1/8, 1/8, 1/16


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, 1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """x (B, 3, H, W), ImageNet-normalised -> main logits (B, num_classes, H, W).

    As in that repo, the spatial path is replaced by the ResNet's 1/8 features (`ffm` fuses them
    with the context path); `conv_out16` / `conv_out32` are its training-time auxiliary heads,
    kept so the checkpoint loads strictly, and returned only with `aux=True`.
    """

    def __init__(self, num_classes: int = BISENET_CLASSES):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, num_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, num_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, num_classes)

    def forward(self, x: torch.Tensor, aux: bool = False):
        size = x.shape[2:]
        feat_res8, feat_cp8, feat_cp16 = self.cp(x)
        out = F.interpolate(self.conv_out(self.ffm(feat_res8, feat_cp8)), size, mode="bilinear",
                            align_corners=True)
        if not aux:
            return out
        out16 = F.interpolate(self.conv_out16(feat_cp8), size, mode="bilinear", align_corners=True)
        out32 = F.interpolate(self.conv_out32(feat_cp16), size, mode="bilinear", align_corners=True)
        return out, out16, out32


class FaceParser(nn.Module):
    """A BiSeNet on our images: x (B, 3, H, W) RGB in [-1, 1] -> logits (B, C, H, W).

    x -> [0, 1] -> resized to `input_size` (bilinear; antialiased when shrinking) -> ImageNet
    mean/std -> BiSeNet -> logits resized back to (H, W) (bilinear).
    """

    def __init__(self, net: BiSeNet, input_size: int = BISENET_INPUT_SIZE):
        super().__init__()
        self.net = net
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        target = (self.input_size, self.input_size)
        h = (x + 1.0) / 2.0
        if size != target:
            h = F.interpolate(h, size=target, mode="bilinear", align_corners=False,
                              antialias=min(size) > self.input_size)
        logits = self.net((h - self.mean) / self.std)
        if size != target:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def load_bisenet(uri: str, sha256: str | None, storage_options: StorageOptions | None = None,
                 num_classes: int = BISENET_CLASSES,
                 input_size: int = BISENET_INPUT_SIZE) -> FaceParser:
    """The face-parsing checkpoint at `uri` (local path or s3://; a plain state dict, optionally
    under "state_dict", or with DataParallel's "module." prefix), sha256-checked, loaded with
    `torch.load(weights_only=True)` and strict=True, as a frozen `FaceParser` in eval mode.
    WeightsError naming the file for a missing file, a wrong hash or keys that do not match."""
    where = Location(uri, storage_options).display
    if not sha256:
        raise WeightsError(f"{where}: give the parsing checkpoint's sha256 (checked before loading)")
    state = load_verified_state_dict(uri, sha256, storage_options)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    net = BiSeNet(num_classes)
    expected, given = set(net.state_dict()), set(state)
    missing = sorted(k for k in expected - given if not k.endswith("num_batches_tracked"))
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise WeightsError(
            f"{where}: not a BiSeNet face-parsing state dict (zllrunning/face-parsing.PyTorch "
            f"layout): {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}")
    try:
        # BatchNorm fills a missing num_batches_tracked itself (checkpoints of old PyTorch)
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches, e.g. another num_classes
        raise WeightsError(f"{where}: weights do not fit BiSeNet({num_classes}): {err}") from err
    return FaceParser(net, input_size).eval().requires_grad_(False)


# -- a small parser trained here ----------------------------------------------------------------

FORMAT = "diffinf-small-parser/1"
WEIGHTS_FILE = "model.safetensors"


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(min(8, c_out), c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.GroupNorm(min(8, c_out), c_out),
        nn.ReLU(inplace=True),
    )


class SmallParser(nn.Module):
    """x (B, 3, H, W) in [-1, 1] -> region logits (B, num_regions, H, W).

    A three-level U-Net (`channels` per level, 2x2 max-pool down, bilinear up to the skip's
    size, so any H, W >= 4 work); GroupNorm so train and eval behave alike.
    """

    def __init__(self, num_regions: int = 7, channels: Sequence[int] = (16, 32, 64)):
        super().__init__()
        self.num_regions, self.channels = int(num_regions), tuple(channels)
        c = self.channels
        self.down = nn.ModuleList([_double_conv(3, c[0])] + [
            _double_conv(c[i - 1], c[i]) for i in range(1, len(c))])
        self.up = nn.ModuleList([_double_conv(c[i] + c[i + 1], c[i]) for i in range(len(c) - 1)])
        self.head = nn.Conv2d(c[0], self.num_regions, 1)

    def config(self) -> dict:
        return {"num_regions": self.num_regions, "channels": list(self.channels)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, h = [], x
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        for i in reversed(range(len(self.up))):
            skip = skips[i]
            h = F.interpolate(h, size=skip.shape[2:], mode="bilinear", align_corners=False)
            h = self.up[i](torch.cat([skip, h], dim=1))
        return self.head(h)


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor,
                        num_regions: int) -> tuple[float, list[float | None]]:
    """(pixel accuracy, IoU per region: None for a region in neither pred nor target) of
    integer region maps."""
    pred, target = pred.reshape(-1), target.reshape(-1)
    accuracy = float((pred == target).float().mean())
    ious: list[float | None] = []
    for r in range(num_regions):
        p, t = pred == r, target == r
        union = int((p | t).sum())
        ious.append(int((p & t).sum()) / union if union else None)
    return accuracy, ious


def region_weights(masks: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Cross-entropy weights ~ frequency^-1/2, scaled so the average pixel weighs 1: eyes, brows
    and mouth cover a few percent of the pixels, and without this the parser neglects them,
    though they are what L_struct is there to keep in place."""
    freq = torch.bincount(masks.reshape(-1), minlength=num_regions).double()
    freq = freq / freq.sum()
    weights = (freq + 1e-4).rsqrt()
    return (weights / (freq * weights).sum()).float()


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch_size: int,
             device: torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def train_parser(
    images: torch.Tensor,
    masks: torch.Tensor,
    num_regions: int = 7,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.1,
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
    balance_regions: bool = True,
) -> tuple[SmallParser, dict]:
    """Train a `SmallParser` on (N, 3, H, W) images in [-1, 1] and (N, H, W) int64 region ids
    in [0, num_regions): per-pixel cross-entropy (`region_weights` when `balance_regions`), Adam
    with cosine decay, random horizontal flips (of image and mask). A seeded `val_fraction` of
    the images is held out; the report is {val_pixel_accuracy, val_mean_iou (over regions
    present; None without held-out images), val_iou_per_region, train_images, val_images,
    final_loss, epochs, seconds}. Deterministic for a seed on one machine and thread count; the
    returned model is frozen, in eval mode, on the CPU."""
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"expected (N, 3, H, W) images and (N, H, W) masks, got "
                         f"{tuple(images.shape)} and {tuple(masks.shape)}")
    masks = masks.long()
    if int(masks.min()) < 0 or int(masks.max()) >= num_regions:
        raise ValueError(f"mask ids span [{int(masks.min())}, {int(masks.max())}], outside "
                         f"[0, {num_regions})")
    start = time.perf_counter()
    device = torch.device(device)
    n = len(images)
    n_val = min(int(round(val_fraction * n)), n - 1)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    val_idx, train_idx = order[:n_val], order[n_val:]
    x_train, m_train = images[train_idx].float(), masks[train_idx]
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        model = SmallParser(num_regions).to(device)
    weights = region_weights(m_train, num_regions).to(device) if balance_regions else None
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = max(1, -(-len(x_train) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        flips = torch.rand(len(x_train), generator=gen) < 0.5
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            flip = flips[idx]
            x = torch.where(flip.view(-1, 1, 1, 1), x_train[idx].flip(-1), x_train[idx])
            m = torch.where(flip.view(-1, 1, 1), m_train[idx].flip(-1), m_train[idx])
            loss = F.cross_entropy(model(x.to(device)), m.to(device), weight=weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
        loss_value = total / max(len(perm), 1)
        log(f"parser epoch {epoch + 1}/{epochs}: cross-entropy {loss_value:.4f}")
    accuracy = miou = None
    ious: list[float | None] = []
    if n_val:
        pred = _predict(model, images[val_idx].float(), 256, device)
        accuracy, ious = segmentation_scores(pred, masks[val_idx], num_regions)
        present = [iou for iou in ious if iou is not None]
        miou = float(np.mean(present)) if present else None
    report = {
        "val_pixel_accuracy": accuracy,
        "val_mean_iou": miou,
        "val_iou_per_region": ious,
        "train_images": int(len(train_idx)),
        "val_images": int(n_val),
        "final_loss": loss_value,
        "epochs": int(epochs),
        "seconds": round(time.perf_counter() - start, 2),
    }
    log(f"parser: held-out pixel accuracy {accuracy}, mean IoU {miou} ({report['seconds']} s)")
    return model.cpu().eval().requires_grad_(False), report


def _folder(location_or_path: str | Location) -> Location:
    if isinstance(location_or_path, Location):
        return location_or_path
    return Location(str(location_or_path))


def save_parser(model: SmallParser, location_or_path: str | Location) -> dict:
    """Write <folder>/config.json ({format, config, files: {name: {sha256}}}) and
    <folder>/model.safetensors; returns the config written."""
    return write_weights_folder(_folder(location_or_path), model.state_dict(), FORMAT,
                                model.config(), WEIGHTS_FILE)


def load_parser(location_or_path: str | Location) -> SmallParser:
    """The model saved at the folder, frozen, in eval mode (weights' sha256 checked against
    config.json); WeightsError naming the file otherwise."""
    manifest, state, where = read_weights_folder(_folder(location_or_path), FORMAT, WEIGHTS_FILE)
    model = load_state_strict(SmallParser(**manifest["config"]), state, where)
    return model.eval().requires_grad_(False)
