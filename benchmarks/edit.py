"""Benchmark the editor: seconds per edited image and where they go.

Medians over --repeats (after one warm-up) of:
- encode: semantic code + the official DDIM inversion (`encode_steps` UNet forwards, by default
  --steps), per batch;
- decode f+b: the differentiable official decode (`decode_steps`, by default --steps;
  checkpointed unless --no-checkpoint) forward + backward to z and x_T;
- losses f+b: the loss networks (identity, parsing, perceptual, pixel) and h_w(g(x)) forward +
  backward to the image;
- UNet f+b: one UNet forward + backward to its inputs (x_t, z) at the batch, weights frozen;
- edit: `LatentEditor.edit` of the batch with stop_p_high = 0 (no sample stops early, so all
  K iterations run), and its ratio to K x S x (UNet f+b), the cost of the decode alone without
  recomputation (target <= 1.3).

All networks are random-init (timing only; the edits mean nothing). Stand-ins for the loss
networks, of about the real ones' cost: identity = ResNet-18 trunk (512-d; ArcFace R50/R100 costs
more), parsing = ResNet-18 trunk to layer3 + a 1x1 head to 19 regions (BiSeNet-like), perceptual =
LPIPS-alex with a random backbone (`pnet_rand`: no download). The classifier is the project's
ResNet-18 `AttributeClassifier`.

    python benchmarks/edit.py --preset tiny --image-size 64 --batch 8 --iterations 3 \
        --steps 5 --repeats 3 --threads 1
    python benchmarks/edit.py --device cuda --preset ffhq128 --image-size 128 --batch 16 \
        --iterations 20 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lpips
import torch
from torch import nn
from torchvision.models import resnet18

from diffinf_ray.diffae.autoencoder import DiffusionAutoencoder
from diffinf_ray.diffae.model import build_model
from diffinf_ray.edit.editor import EditSettings, LatentEditor
from diffinf_ray.edit.losses import EditLosses
from diffinf_ray.edit.predictor import InfluencePredictor
from diffinf_ray.models.classifier import AttributeClassifier

NUM_CLASSES = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, clock, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def _identity_standin() -> nn.Module:
    net = resnet18(weights=None)
    net.fc = nn.Identity()
    return net


def _parsing_standin(regions: int = 19) -> nn.Module:
    trunk = resnet18(weights=None)
    return nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1,
                         trunk.layer2, trunk.layer3, nn.Conv2d(256, regions, 1))


def _perceptual_standin() -> nn.Module:
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)

    class Distance(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, a, b):
            return self.net(a, b).reshape(-1)

    return Distance()


def build_editor(args, device: torch.device) -> LatentEditor:
    torch.manual_seed(0)
    model = build_model(args.preset, image_size=args.image_size, num_classes=NUM_CLASSES)
    losses = EditLosses(_identity_standin(), _parsing_standin(), _perceptual_standin())
    settings = EditSettings(optimize=args.optimize, iterations=args.iterations, lr=0.05,
                            encode_steps=args.encode_steps, decode_steps=args.decode_steps,
                            stop_p_high=0.0, checkpoint=not args.no_checkpoint, seed=0)
    return LatentEditor(DiffusionAutoencoder(model), AttributeClassifier(NUM_CLASSES),
                        InfluencePredictor(NUM_CLASSES), losses, 1.0, settings, device)


def bench(args, device: torch.device, clock) -> dict:
    editor = build_editor(args, device)
    model = editor.autoencoder.model
    s = editor.settings
    gen = torch.Generator().manual_seed(0)
    size, batch = args.image_size, args.batch
    x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
    y = (torch.arange(batch) % NUM_CLASSES).to(device)
    z0, x_T0 = editor.invert(x, y)
    ref = editor.losses.reference(x)
    z = z0.clone().requires_grad_(True)
    x_T = x_T0.clone().requires_grad_(True)
    x_img = x.clone().requires_grad_(True)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)

    def encode():
        editor.invert(x, y)

    def decode_fwd_bwd():
        editor.autoencoder.decode(z, x_T, y, steps=s.decode_steps,
                                  checkpoint=s.checkpoint).square().mean().backward()

    def losses_fwd_bwd():
        terms = editor.losses.terms(x_img, ref)
        p_high = editor.predictor.p_high(editor.classifier.features(x_img), y)
        (editor.losses.combine(terms) + p_high).sum().backward()

    def unet_fwd_bwd():
        model(x_T, t, z, y).square().mean().backward()

    def edit():
        editor.edit(x, y)

    r = {name: median_seconds(fn, device, args.repeats, clock)
         for name, fn in [("encode", encode), ("decode_fb", decode_fwd_bwd),
                          ("losses_fb", losses_fwd_bwd), ("unet_fb", unet_fwd_bwd),
                          ("edit", edit)]}
    k, steps = s.iterations, s.decode_steps
    r["ratio"] = r["edit"] / (k * steps * r["unet_fb"])
    # what the edit should cost from its parts: encode, K x (decode + losses) f+b, and the
    # final no-grad evaluation (about a third of one f+b)
    r["parts"] = r["encode"] + k * (r["decode_fb"] + r["losses_fb"]) + (
        r["decode_fb"] + r["losses_fb"]) / 3
    return r


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=3, help="K Adam steps")
    parser.add_argument("--steps", type=int, default=5, help="S DDIM steps (inversion, decode)")
    parser.add_argument("--decode-steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--encode-steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--optimize", choices=("z", "xT", "both"), default="both")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="keep every decode step's activations (faster, memory linear in S)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default=None,
                        help="wall (default on cuda) or this process's CPU time (default on cpu)")
    args = parser.parse_args(argv)
    args.decode_steps = args.decode_steps or args.steps
    args.encode_steps = args.encode_steps or args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    clock_name = args.clock or ("wall" if device.type == "cuda" else "cpu")
    if clock_name == "cpu" and device.type == "cuda":
        parser.error("--clock cpu does not measure GPU work; use wall")
    clock = time.perf_counter if clock_name == "wall" else time.process_time

    r = bench(args, device, clock)
    print(f"preset={args.preset} px={args.image_size} device={device} batch={args.batch} "
          f"K={args.iterations} S={args.decode_steps} encode_steps={args.encode_steps} "
          f"optimize={args.optimize} checkpoint={not args.no_checkpoint} "
          f"threads={torch.get_num_threads()} clock={clock_name} repeats={args.repeats} "
          f"(medians; random-init networks, timing only)")
    rows = [
        ("encode (per batch)", r["encode"]),
        ("decode f+b (per iteration)", r["decode_fb"]),
        ("losses f+b (per iteration)", r["losses_fb"]),
        ("UNet f+b (one step)", r["unet_fb"]),
        ("edit (whole batch)", r["edit"]),
        ("  sum of parts", r["parts"]),
        ("edit per image", r["edit"] / args.batch),
    ]
    print(f"{'part':<28} {'seconds':>9}")
    for name, value in rows:
        print(f"{name:<28} {value:>9.3f}")
    print(f"{'edit / (K*S*UNet f+b)':<28} {r['ratio']:>9.2f}   (target <= 1.3)")
    print(f"{'decode f+b / (S*UNet f+b)':<28} "
          f"{r['decode_fb'] / (args.decode_steps * r['unet_fb']):>9.2f}")


if __name__ == "__main__":
    main()
