"""Benchmark the diffusion autoencoder: UNet training throughput and the differentiable decode.

For each image size it measures (medians over --repeats, after one warm-up):
- train fwd+bwd: one UNet forward + backward of the eps-MSE with weight gradients (training),
  reported as images/s;
- input fwd+bwd: one UNet forward + backward to the inputs only, weights frozen (what one step
  of latent optimisation costs);
- decode S (ck / no ck): `decode(z, x_T, steps=S)` forward + backward to z and x_T, with and
  without per-step gradient checkpointing, and its ratio to S x (input fwd+bwd).
  Checkpointing recomputes each step's forward once in backward, so its ratio is about
  (2F + B) / (F + B) for forward cost F and backward cost B;
- saved MB: bytes autograd keeps for backward during the decode (device independent).

    python benchmarks/autoencoder.py --device cpu --threads 1 --batch 1 --steps 5
    python benchmarks/autoencoder.py --device cuda --batch 8 --sizes 64 128 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from diffinf_ray.diffae.autoencoder import decode, saved_tensor_bytes
from diffinf_ray.diffae.model import DiffAEModel, preset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, clock=time.perf_counter,
                   warmup: int = 1) -> float:
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


def saved_megabytes(fn) -> float:
    return saved_tensor_bytes(fn) / 2**20

def bench_size(name: str, size: int, batch: int, steps: int, repeats: int, device: torch.device,
               clock=time.perf_counter):
    torch.manual_seed(0)
    config = replace(preset(name), image_size=size)
    model = DiffAEModel(config).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    z0 = torch.randn(batch, config.z_dim, device=device)

    model.train().requires_grad_(True)

    def train_fwd_bwd():
        model.zero_grad(set_to_none=True)
        (model(x, t, z0) - x).square().mean().backward()

    train_s = median_seconds(train_fwd_bwd, device, repeats, clock)

    model.eval().requires_grad_(False)
    x_in = x.clone().requires_grad_(True)
    z_in = z0.clone().requires_grad_(True)

    def input_fwd_bwd():
        model(x_in, t, z_in).square().mean().backward()

    input_s = median_seconds(input_fwd_bwd, device, repeats, clock)

    def decode_fwd_bwd(use_checkpoint: bool):
        def run():
            decode(model, z_in, x_in, steps=steps, checkpoint=use_checkpoint).square().mean().backward()
        return run

    decode_ck = median_seconds(decode_fwd_bwd(True), device, repeats, clock)
    decode_full = median_seconds(decode_fwd_bwd(False), device, repeats, clock)
    mb_ck = saved_megabytes(lambda: decode(model, z_in, x_in, steps=steps, checkpoint=True))
    mb_full = saved_megabytes(lambda: decode(model, z_in, x_in, steps=steps, checkpoint=False))
    return {
        "size": size,
        "train_img_s": batch / train_s,
        "train_s": train_s,
        "input_s": input_s,
        "decode_ck_s": decode_ck,
        "decode_full_s": decode_full,
        "ratio_ck": decode_ck / (steps * input_s),
        "ratio_full": decode_full / (steps * input_s),
        "ratio_ck_vs_train": decode_ck / (steps * train_s),
        "mb_ck": mb_ck,
        "mb_full": mb_full,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps S of the decode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default=None,
        help="wall: elapsed time (default on cuda); cpu: this process's CPU time, summed over "
             "threads (default on cpu: robust when other jobs share the cores)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    clock_name = args.clock or ("wall" if device.type == "cuda" else "cpu")
    if clock_name == "cpu" and device.type == "cuda":
        parser.error("--clock cpu does not measure GPU work; use wall")
    clock = time.perf_counter if clock_name == "wall" else time.process_time

    print(f"preset={args.preset} device={device} batch={args.batch} S={args.steps} "
          f"repeats={args.repeats} threads={torch.get_num_threads()} clock={clock_name} (medians)")
    header = (f"{'px':>4} {'train img/s':>11} {'train f+b s':>11} {'input f+b s':>11} "
              f"{'decode ck s':>11} {'ck/(S*in)':>9} {'decode s':>9} {'nock/(S*in)':>11} "
              f"{'ck/(S*train)':>12} {'saved MB ck':>11} {'saved MB':>9}")
    print(header)
    for size in args.sizes:
        r = bench_size(args.preset, size, args.batch, args.steps, args.repeats, device, clock)
        print(f"{r['size']:>4} {r['train_img_s']:>11.2f} {r['train_s']:>11.3f} {r['input_s']:>11.3f} "
              f"{r['decode_ck_s']:>11.3f} {r['ratio_ck']:>9.2f} {r['decode_full_s']:>9.3f} "
              f"{r['ratio_full']:>11.2f} {r['ratio_ck_vs_train']:>12.2f} {r['mb_ck']:>11.1f} "
              f"{r['mb_full']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
