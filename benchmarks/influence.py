"""Self-influence throughput: our one-pass scorer against a plain backward, a per-sample loop and
Captum TracInCP, on one model, one batch and the same inputs.

    python benchmarks/influence.py [--resolution 64] [--batch 32] [--checkpoints 2]
                                   [--device cpu|cuda] [--repeats 3] [--threads 2]
                                   [--captum-batch 1] [--dtype float32|float64]

Rows (throughput = samples x checkpoints per second, by wall clock and by CPU time of this
process; medians over repeats that interleave the methods, after one warm-up each):
  a  plain batched forward + backward of the summed loss, no per-sample work (the floor)
  b  SelfInfluenceScorer (diffinf_ray.influence.grad_norms)
  c  naive loop: one forward + backward per sample, full gradients
  d  Captum TracInCP(reduction='none', sample_wise_grads_per_batch=False)
     .self_influence(outer_loop_by_checkpoints=True), loading the same checkpoint files.
     Its batch_size is --captum-batch (default 1, its fastest setting here: it runs one
     backward per sample through the graph of the whole Captum batch, so a Captum batch of
     size m costs about m times more per sample).
Targets on a CPU box: b/a >= 0.5, b/d >= 5. Prints only; writes no results file.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.influence.grad_norms import SelfInfluenceScorer, naive_per_sample_grad_sq_norms
from diffinf_ray.models.checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_dir_name,
    load_into,
    parse,
    to_bytes,
)
from diffinf_ray.models.classifier import build_classifier


def make_checkpoints(root: Path, count: int, num_classes: int, resolution: int) -> list[Path]:
    """`count` checkpoints with random weights, non-trivial BN statistics and distinct lrs."""
    paths = []
    for t in range(count):
        torch.manual_seed(100 + t)
        model = build_classifier(num_classes).train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(8, 3, resolution, resolution) * 1.5 + 0.2)
        path = root / checkpoint_dir_name(t + 1) / CHECKPOINT_FILE
        path.parent.mkdir(parents=True)
        path.write_bytes(to_bytes({
            "model_state": model.state_dict(), "epoch": t + 1,
            "learning_rate": 1e-4 * 0.5 ** t, "architecture": model.architecture(),
        }))
        paths.append(path)
    return paths


def timed_once(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--captum-batch", type=int, default=1, help="Captum's batch_size")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    from captum.influence import TracInCP  # test/benchmark dependency only

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_checkpoints(Path(tmp), args.checkpoints, args.classes, args.resolution)
        ckpts = [parse(p.read_bytes(), str(p)) for p in paths]
        lrs = [c.learning_rate for c in ckpts]
        models = [c.build_model().to(device, dtype) for c in ckpts]
        torch.manual_seed(0)
        images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device,
                            dtype=dtype) * 2 - 1
        labels = torch.randint(0, args.classes, (args.batch,), device=device)

        def plain():
            for model in models:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(images), labels, reduction="sum").backward()

        scorer = SelfInfluenceScorer(Path(tmp).as_posix(), device=device, dtype=dtype)

        def ours():
            return scorer(images, labels)["score"]

        def naive():
            return sum(lr * naive_per_sample_grad_sq_norms(m, images, labels).double()
                       for m, lr in zip(models, lrs, strict=True)).cpu().numpy()

        captum_model = build_classifier(args.classes).to(device, dtype).eval()

        def load(model: nn.Module, path: str) -> float:
            ckpt = parse(Path(path).read_bytes(), path)
            load_into(model, ckpt)
            model.eval()
            return ckpt.learning_rate

        tracin = TracInCP(
            captum_model, torch.utils.data.TensorDataset(images, labels), [str(p) for p in paths],
            checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=args.captum_batch, sample_wise_grads_per_batch=False,
        )

        def captum():
            return tracin.self_influence(outer_loop_by_checkpoints=True).double().cpu().numpy()

        work = args.batch * args.checkpoints
        print(f"device={args.device} threads={torch.get_num_threads()} resolution={args.resolution} "
              f"batch={args.batch} checkpoints={args.checkpoints} dtype={args.dtype} "
              f"repeats={args.repeats} (median)", flush=True)
        methods = [
            ("a", "plain batched fwd+bwd", plain), ("b", "SelfInfluenceScorer", ours),
            ("c", "naive per-sample loop", naive),
            ("d", f"Captum TracInCP (batch {args.captum_batch})", captum),
        ]
        results = {key: fn() for key, _, fn in methods}  # warm-up; keeps each method's scores
        # Repeats interleave the methods, so load from other jobs on a shared box hits all alike.
        times: dict[str, list[tuple[float, float]]] = {key: [] for key, _, _ in methods}
        for r in range(args.repeats):
            for key, _, fn in methods:
                times[key].append(timed_once(fn, device))
            print(f"   repeat {r + 1} (wall s): "
                  + "  ".join(f"{k} {v[-1][0]:.3f}" for k, v in times.items()), flush=True)

    wall = {key: statistics.median(t[0] for t in times[key]) for key in times}
    cpu = {key: statistics.median(t[1] for t in times[key]) for key in times}
    # CPU seconds: on a shared, oversubscribed box the wall clock mostly measures other jobs
    print(f"{'':2} {'method':30} {'wall s':>8} {'samples*ckpts/s':>16} {'CPU s':>8} "
          f"{'samples*ckpts/CPU s':>20}")
    for key, label, _ in methods:
        print(f"{key:2} {label:30} {wall[key]:8.3f} {work / wall[key]:16.1f} {cpu[key]:8.3f} "
              f"{work / cpu[key]:20.1f}")
    for name, t in (("wall", wall), ("CPU", cpu)):
        print(f"{name:>4}: b/a = {t['a'] / t['b']:.2f} (target >= 0.5)   b/c = {t['c'] / t['b']:.1f}"
              f"   b/d = {t['d'] / t['b']:.1f} (target >= 5)")
    ours_scores = results["b"]
    for key in ("c", "d"):
        ref = results[key]
        diff = np.abs(ours_scores - ref) / np.abs(ref)
        print(f"relative difference b vs {key}: max {diff.max():.2e}, median {np.median(diff):.2e}")
    if dtype == torch.float32:
        print("(float32: a ReLU input within ~1e-7 of zero can flip sign between a batched and a "
              "per-sample forward and move that sample's score; compare with --dtype float64)")


if __name__ == "__main__":
    main()
