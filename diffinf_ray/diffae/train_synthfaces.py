"""Train a family diffusion autoencoder on synthfaces in one process (no Ray), and measure it.

    python -m diffinf_ray.diffae.train_synthfaces train --out DIR [--steps N ...]
    python -m diffinf_ray.diffae.train_synthfaces export --out DIR --step N --dest FOLDER

    python -m diffinf_ray.diffae.train_synthfaces pixel --out DIR       (the pixel probe alone)

`train` draws `--num-faces` synthfaces (age task, 32 px; cached in DIR/faces.npz), splits them
by identity (synthfaces' train / val / test), and trains `--preset` (diffae/family.py) on the
train split with the issue's testbed recipe: Adam, EMA, assigned labels that are the true age
bin with `--label-noise` of them flipped (uniformly to another bin), label dropout
`--cond-drop` (null label); the EMA decay warms up as min(decay, (1 + step) / (10 + step)).
Every `--log-every` steps it measures the EMA model and appends a
row to DIR/log.jsonl:

- reconstruction by inversion on `--recon-images` test-split faces at S = `--recon-steps`
  (diffae.quality.reconstruction_metrics: the project's encode/decode; MSE/SSIM on [0, 1]
  images, also with a random x_T, which shows what z alone carries);
- a linear probe on z = E(x) (frozen encoder), fit on `--probe-train` train-split faces and
  scored on the test split, i.e. on people never seen in training: true age bin, true
  expression; identity retrieval top-1 among the test faces. The same on raw pixels is
  measured once (DIR/pixel_probe.json; by `train` first, or with `--no-pixel-probe` by the
  `pixel` command in a second process, as it takes minutes of CPU at 6000 faces) and repeated
  in every row once it exists.

`--device cuda` trains and measures on a GPU (the probes stay on the CPU); `--max-minutes`
ends a run early, measured and checkpointed, for a fixed time budget. `--init MODEL` starts a
new run from saved family weights (a shipped name such as synthfaces32_diffae, or a folder
written by `export`; sha256 checked) instead of from scratch: the network and its EMA both
start there (the EMA without warm-up, as it already is an average) and Adam starts afresh.
The model's config must equal the one `--preset` / `--overrides` build.

Checkpoints: DIR/checkpoint.pt (model, EMA, Adam, step, RNG states; `torch.load(
weights_only=True)`), rewritten at every log step, so `train` on the same DIR resumes; the EMA
weights of every logged step are kept as DIR/ema/step_NNNNNNNN.safetensors.

`export` writes the EMA weights of a logged step, with z statistics over the train-split faces
(diffae.family.save_family), to DEST: model.safetensors + config.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from diffinf_ray.diffae.family import build_family, compute_z_stats, family_config, save_family
from diffinf_ray.diffae.official import BeatGANsAutoencModel, config_from_json
from diffinf_ray.diffae.probes import probe_accuracy, retrieval_top1
from diffinf_ray.diffae.training import EMA, train_step
from diffinf_ray.diffae.weights import state_dict_from_bytes, state_dict_to_bytes

AGE_BINS = ((0.0, 18.0), (25.0, 40.0), (50.0, 80.0))
NUM_AGE_CLASSES = len(AGE_BINS)


# -- data -----------------------------------------------------------------------------------------

def make_faces(num_faces: int, num_identities: int, seed: int = 0, resolution: int = 32) -> dict:
    """synthfaces (age task): images (N, H, W, 3) uint8, identity, age_bin, expression (ints),
    split ('train' / 'val' / 'test', by identity)."""
    from diffinf_ray.data.synthfaces import (
        SynthFacesSpec,
        label_of,
        render,
        sample_factors,
        split_of,
    )

    spec = SynthFacesSpec(task="age", resolution=resolution, seed=seed,
                          num_identities=num_identities, age_bins=AGE_BINS, with_masks=False)
    images = np.empty((num_faces, resolution, resolution, 3), np.uint8)
    identity, age_bin, expression, split = [], [], [], []
    for i in range(num_faces):
        f = sample_factors(spec, i)
        images[i] = render(f, resolution, False)[0]
        identity.append(f.identity.index)
        age_bin.append(label_of(spec, f))
        expression.append(f.expression)
        split.append(split_of(spec, f.identity.index))
    return {"images": images, "identity": np.asarray(identity), "age_bin": np.asarray(age_bin),
            "expression": np.asarray(expression), "split": np.asarray(split)}


def load_or_make_faces(path: Path, num_faces: int, num_identities: int, seed: int) -> dict:
    """`make_faces`, cached at `path` (.npz) for the same arguments."""
    key = np.asarray([num_faces, num_identities, seed])
    if path.exists():
        with np.load(path) as cached:
            if np.array_equal(cached["key"], key):
                return {k: cached[k] for k in cached.files if k != "key"}
    faces = make_faces(num_faces, num_identities, seed)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, key=key, **faces)
    tmp.replace(path)
    return faces


def noisy_labels(true: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """`true` with a `rate` share flipped uniformly to one of the other classes."""
    rng = np.random.default_rng(seed)
    flip = rng.random(len(true)) < rate
    shift = rng.integers(1, num_classes, len(true))
    return np.where(flip, (true + shift) % num_classes, true)


def to_model_images(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


class Splits:
    """Index sets: train (training and probe fitting), test (held-out people)."""

    def __init__(self, faces: dict, probe_train: int, recon_images: int, seed: int):
        rng = np.random.default_rng(seed)
        self.train = np.flatnonzero(faces["split"] == "train")
        self.test = np.flatnonzero(faces["split"] == "test")
        self.probe_train = np.sort(rng.permutation(self.train)[:probe_train])
        self.recon = np.sort(rng.permutation(self.test)[:recon_images])


# -- measuring ------------------------------------------------------------------------------------

def _probe_row(train_x, test_x, faces: dict, splits: Splits, prefix: str) -> dict:
    tr, te = splits.probe_train, splits.test
    row = {}
    for target in ("age_bin", "expression"):
        row[f"{prefix}_{target}"] = probe_accuracy(train_x, faces[target][tr], test_x,
                                                   faces[target][te])
    row[f"{prefix}_identity_top1"] = retrieval_top1(test_x, faces["identity"][te], train_x)
    return row


def pixel_probe(faces: dict, splits: Splits) -> dict:
    flat = faces["images"].reshape(len(faces["images"]), -1).astype(np.float32) / 255.0
    return _probe_row(flat[splits.probe_train], flat[splits.test], faces, splits, "pixel")


def write_pixel_probe(out: Path, faces: dict, splits: Splits) -> dict:
    row = pixel_probe(faces, splits)
    tmp = out / "pixel_probe.json.tmp"
    tmp.write_text(json.dumps(row))
    tmp.replace(out / "pixel_probe.json")
    return row


@torch.no_grad()
def _encode_all(model: BeatGANsAutoencModel, images: np.ndarray, batch: int = 256) -> np.ndarray:
    device = next(model.parameters()).device
    return torch.cat([model.encode(to_model_images(images[i:i + batch]).to(device)).cpu()
                      for i in range(0, len(images), batch)]).numpy()


def measure(model: BeatGANsAutoencModel, faces: dict, labels: np.ndarray, splits: Splits,
            recon_steps: Sequence[int]) -> dict:
    """z probes and reconstruction of the (EMA) `model`, in eval mode."""
    from diffinf_ray.diffae.quality import reconstruction_metrics

    model.eval()
    row = _probe_row(_encode_all(model, faces["images"][splits.probe_train]),
                     _encode_all(model, faces["images"][splits.test]), faces, splits, "z")
    x = to_model_images(faces["images"][splits.recon])
    y = torch.as_tensor(labels[splits.recon], dtype=torch.long)
    for r in reconstruction_metrics(model, x, y, recon_steps, batch_size=len(x)):
        s = r["steps"]
        for key in ("mse", "ssim", "mse_random_xT", "ssim_random_xT"):
            row[f"{key}_S{s}"] = r[key]
    return row


# -- training -------------------------------------------------------------------------------------

def _ema_model(ema: EMA, config, device: torch.device) -> BeatGANsAutoencModel:
    model = BeatGANsAutoencModel(config).to(device)
    ema.copy_to(model)
    return model.eval()


def _save_checkpoint(out: Path, model, ema, opt, step, gen, args) -> None:
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
             "step": step, "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "config": json.dumps(asdict(model.config)), "args": json.dumps(vars(args))}
    tmp = out / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out / "checkpoint.pt")
    ema_dir = out / "ema"
    ema_dir.mkdir(exist_ok=True)
    (ema_dir / f"step_{step:08d}.safetensors").write_bytes(
        state_dict_to_bytes(ema.state_dict(), metadata={"config": state["config"]}))


def _build(args) -> BeatGANsAutoencModel:
    overrides = json.loads(args.overrides) if args.overrides else {}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    classes = NUM_AGE_CLASSES if args.label_conditioning else 0
    return build_family(family_config(args.preset, num_classes=classes, **overrides))


def _prepare(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    faces = load_or_make_faces(Path(args.data_cache or out / "faces.npz"), args.num_faces,
                               args.num_identities, args.seed)
    labels = noisy_labels(faces["age_bin"], args.label_noise, NUM_AGE_CLASSES, args.seed + 1)
    splits = Splits(faces, args.probe_train, args.recon_images, args.seed + 2)
    return out, faces, labels, splits


def _init_from(model: BeatGANsAutoencModel, name_or_folder: str) -> None:
    """Load saved family weights (not their z statistics) into the freshly built `model`."""
    from diffinf_ray.diffae.family import load_family

    saved = load_family(name_or_folder)
    if replace(saved.config, z_stats=False) != replace(model.config, z_stats=False):
        raise ValueError(f"--init {name_or_folder}: its config {asdict(saved.config)} differs "
                         f"from the one --preset/--overrides build {asdict(model.config)}")
    state = {k: v for k, v in saved.state_dict().items() if k not in ("conds_mean", "conds_std")}
    model.load_state_dict(state, strict=True)


def _log(out: Path, row: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def train(args) -> dict:
    """The training loop (resumes from DIR/checkpoint.pt); returns the last logged row."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out, faces, labels, splits = _prepare(args)
    model = _build(args).to(device)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 3)
    step = 0
    if (out / "checkpoint.pt").exists():
        ck = torch.load(out / "checkpoint.pt", weights_only=True, map_location=device)
        model.load_state_dict(ck["model"])
        ema.shadow = {k: v.clone() for k, v in ck["ema"].items()}
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["generator"].cpu())
        torch.set_rng_state(ck["torch_rng"].cpu())
        step = int(ck["step"])
        args.init = args.init or json.loads(ck["args"]).get("init", "")  # keeps the EMA rule
        print(f"resumed from step {step}", flush=True)
    elif args.init:
        _init_from(model, args.init)
        ema = EMA(model, args.ema_decay)
        print(f"initialised from {args.init}", flush=True)
    pixel_file = out / "pixel_probe.json"
    if args.pixel_probe and not pixel_file.exists():
        write_pixel_probe(out, faces, splits)
    train_idx = torch.as_tensor(splits.train)
    images = to_model_images(faces["images"]).to(device)
    y = torch.as_tensor(labels, dtype=torch.long).to(device)
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    started, losses, row = time.time(), [], {}
    while step < args.steps:
        # EMA warm-up (as diffusers' EMAModel): short CPU runs would otherwise keep the init;
        # not after --init, whose weights already are an average worth keeping
        ema.decay = args.ema_decay if args.init else min(args.ema_decay, (1 + step) / (10 + step))
        idx = train_idx[torch.randint(len(train_idx), (args.batch_size,), generator=gen)].to(device)
        losses.append(train_step(model, opt, images[idx], y[idx] if args.label_conditioning
                                 else None, ema=ema, grad_clip=1.0, generator=gen,
                                 cond_drop_prob=args.cond_drop))
        step += 1
        out_of_time = deadline is not None and time.time() > deadline
        if step % args.log_every == 0 or step == args.steps or out_of_time:
            train_seconds = time.time() - started
            row = {"step": step, "loss": float(np.mean(losses)),
                   "steps_per_second": len(losses) / train_seconds}
            t0 = time.time()
            row.update(measure(_ema_model(ema, model.config, device), faces, labels, splits,
                               args.recon_steps))
            if pixel_file.exists():  # measured once (here or by the `pixel` command)
                row.update(json.loads(pixel_file.read_text()))
            row["eval_seconds"] = time.time() - t0
            row["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            _save_checkpoint(out, model, ema, opt, step, gen, args)
            _log(out, row)
            started, losses = time.time(), []
            if out_of_time:
                print(f"stopped at step {step}: --max-minutes {args.max_minutes} reached "
                      f"(run again to resume)", flush=True)
                break
    return row


def export(args) -> dict:
    """EMA weights of step `args.step` + z stats over the train split -> `args.dest`."""
    torch.set_num_threads(args.threads)
    out, faces, _, splits = _prepare(args)
    device = torch.device(args.device)
    data = (out / "ema" / f"step_{args.step:08d}.safetensors").read_bytes()
    from diffinf_ray.diffae.official import _safetensors_metadata

    config = config_from_json(_safetensors_metadata(data)["config"])
    model = BeatGANsAutoencModel(config)
    model.load_state_dict(state_dict_from_bytes(data, "ema"), strict=True)
    mean, std = compute_z_stats(model.to(device),
                                to_model_images(faces["images"][splits.train]).to(device))
    model, mean, std = model.cpu(), mean.cpu(), std.cpu()
    dtype = torch.float16 if args.half else torch.float32
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    measured = next((r for r in rows if r["step"] == args.step), None)
    extra = {"training": {"step": args.step, "data": f"synthfaces age task, 32 px, "
                          f"{args.num_faces} faces, {args.num_identities} identities, seed "
                          f"{args.seed}", "z_stats_images": int(len(splits.train)),
                          "measured": measured, **_init_record(out)}}
    return save_family(model, args.dest, z_mean=mean, z_std=std, dtype=dtype, extra=extra)


def _init_record(out: Path) -> dict:
    """{"init": ...} when the run in `out` started from saved weights (--init), else {}."""
    if not (out / "checkpoint.pt").exists():
        return {}
    ck = torch.load(out / "checkpoint.pt", weights_only=True, map_location="cpu")
    init = json.loads(ck["args"]).get("init")
    return {"init": init} if init else {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffinf_ray.diffae.train_synthfaces",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("train", "export", "pixel"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl)")
        s.add_argument("--preset", default="synthfaces32")
        s.add_argument("--overrides", default="", help='JSON, e.g. {"model_channels": 32}')
        s.add_argument("--num-faces", type=int, default=12000)
        s.add_argument("--num-identities", type=int, default=2400)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--data-cache", default="", help="faces .npz (default DIR/faces.npz)")
        s.add_argument("--label-noise", type=float, default=0.3)
        s.add_argument("--no-label-conditioning", dest="label_conditioning",
                       action="store_false")
        s.add_argument("--probe-train", type=int, default=3000)
        s.add_argument("--recon-images", type=int, default=48)
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    t = sub.choices["train"]
    t.add_argument("--steps", type=int, default=20000)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--cond-drop", type=float, default=0.1)
    t.add_argument("--log-every", type=int, default=500)
    t.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop (measured and checkpointed) after this much wall time; 0: no limit")
    t.add_argument("--recon-steps", type=int, nargs="+", default=[10, 20])
    t.add_argument("--init", default="",
                   help="start from saved family weights (shipped name or exported folder)")
    t.add_argument("--no-pixel-probe", dest="pixel_probe", action="store_false",
                   help="leave the pixel probe to the `pixel` command (run it alongside)")
    e = sub.choices["export"]
    e.add_argument("--step", type=int, required=True)
    e.add_argument("--dest", required=True)
    e.add_argument("--half", action="store_true", help="store float16 (half the size)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        train(args)
    elif args.command == "pixel":
        torch.set_num_threads(args.threads)
        out, faces, _, splits = _prepare(args)
        print(json.dumps(write_pixel_probe(out, faces, splits)))
    else:
        manifest = export(args)
        print(json.dumps({"dest": args.dest, **manifest["files"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
