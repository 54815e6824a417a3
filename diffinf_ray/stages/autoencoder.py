"""Autoencoder stage: train the diffusion autoencoder with Ray Train (or import one), export its
weights, and measure how well it reconstructs held-out images.

In:  manifest_noisy/ rows of the train split: image, label (the assigned label, which
     conditions the decoder when `autoencoder.label_conditioning`); and the first
     `autoencoder.quality_images` rows (by sample_id) of `autoencoder.quality_split`, which
     training never sees, for the quality report.
Out: <run root>/autoencoder/
       checkpoints/step_NNNNNNNN/autoencoder_state.pt
                  Ray Train checkpoints (`torch.load(weights_only=True)`): model_state,
                  ema_state, optimizer_state, step, epoch, learning_rate, resumed_from_step,
                  model_config; written on rank 0 by the harness (models/harness.py).
                  Written every `checkpoint_every` steps (or epochs) and at the end, with the
                  metrics step, epoch, resumed_from_step, loss, steps_per_second; the last
                  `keep_checkpoints` are kept.
       weights/   config.json + model.safetensors + ema.safetensors (`diffae.weights`), from the
                  last checkpoint; not written when the model is imported.
       model.json the weights later stages load: {source (trained | imported), format (diffinf |
                  official), uri, configured_uri (imported: the URI as written in the config),
                  in_run_root (trained: "autoencoder/weights", so the run root can move), sha256
                  of the file loaded (EMA), step, config}.
                  `artifacts.load_run_autoencoder(root)` loads them.
       quality.json  reconstruction by inversion at each S of `quality_steps` (MSE, SSIM, LPIPS
                  or "LPIPS unavailable: <reason>"), the same with a random x_T, and the layout
                  of the interpolation grid (`diffae.quality`).
       z_interpolation.png  rows: pairs (A, B) of held-out images; columns: A, decodes of
                  lerp(z_A, z_B, a) with A's x_T fixed for a in [0, 1], B.

With `autoencoder.weights_uri` nothing is trained: the weights are read, checked against
`weights_sha256`, loaded, recorded in model.json and measured like trained ones.

Resume: Ray Train V2 restores a run from (storage_path=<run root>/autoencoder,
name="checkpoints"); the loop then continues from the latest checkpoint's step (model, EMA and
Adam state), so a crashed run does not start from zero. (`diffinf run` clears the stage's
outputs when its settings change, `steps` included; `train_autoencoder` called on the same
folder with more steps continues instead.)

Mixed precision: with `mixed_precision` and a GPU, the forward pass runs under bf16 autocast
(the loss, backward, optimiser and EMA stay float32); on a CPU it is off.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from diffinf_ray.artifacts import AUTOENCODER_FOLDER, AUTOENCODER_RECORD, load_autoencoder_model
from diffinf_ray.config import AutoencoderSection, Config, ConfigError
from diffinf_ray.datasets import check_manifest, decode_for_training, read_split, split_dataset
from diffinf_ray.models.harness import (
    Placement,
    TrainWorker,
    cpu_state,
    fit,
    random_hflip,
)
from diffinf_ray.run_root import RunRoot
from diffinf_ray.storage import Location, StorageOptions, display_uri

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "autoencoder_state.pt"
STAGE_FOLDER = AUTOENCODER_FOLDER
MODEL_RECORD = AUTOENCODER_RECORD
MANIFEST_COLUMNS = ("sample_id", "split", "image", "label")


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def data_image_size(cfg: Config) -> int:
    """Side in pixels of the manifest's images (what ingest wrote)."""
    if cfg.data.source == "synthfaces":
        return cfg.data.synthfaces.resolution
    return cfg.data.image_size


def autoencoder_config(cfg: Config, num_classes: int):
    """The DiffAEConfig to train: the preset with `overrides`, at the data's resolution, with
    one label per class when `label_conditioning`. Errors name the config key."""
    from diffinf_ray.diffae.model import preset

    section = cfg.autoencoder
    size = data_image_size(cfg)
    overrides = dict(section.overrides)
    if "num_classes" in overrides:
        raise ConfigError("autoencoder.overrides.num_classes: set by autoencoder."
                          "label_conditioning (the data's classes), not by an override")
    if overrides.get("image_size", size) != size:
        raise ConfigError(f"autoencoder.overrides.image_size={overrides['image_size']}: the "
                          f"autoencoder trains at the data's resolution ({size} px)")
    overrides["image_size"] = size
    overrides["num_classes"] = num_classes if section.label_conditioning else 0
    try:
        return preset(section.preset, **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"autoencoder.preset={section.preset!r} with autoencoder.overrides="
                          f"{section.overrides}: {err}") from err


# -- the Ray Train loop -----------------------------------------------------------------------

def bf16_autocast(net, raw, device_type: str = "cuda"):
    """`net` with its forward under bf16 autocast and float32 outputs, so the loss, backward,
    optimiser and EMA stay float32. `.module` is `raw` (the unwrapped model), where
    `train_step` points the EMA."""
    import torch
    from torch import nn

    class BF16Autocast(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self._raw = [raw]  # in a list, so the raw model is not registered a second time

        @property
        def module(self) -> nn.Module:
            return self._raw[0]

        def forward(self, *args, **kwargs):
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                out = self.net(*args, **kwargs)
            return out.float()

    return BF16Autocast()


def _step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class AutoencoderCore:
    """The autoencoder's part of a training run through the harness: the model (its weights,
    EMA and Adam state restored from the latest checkpoint), bf16 autocast, flip augmentation,
    EMA warm-up, and a loop counted in steps or epochs with a checkpoint every
    `checkpoint_every` of them and at the end."""

    def __init__(self, loop_config: dict, worker: TrainWorker):
        import torch

        from diffinf_ray.diffae.model import DiffAEConfig, DiffAEModel
        from diffinf_ray.diffae.schedule import NoiseSchedule
        from diffinf_ray.diffae.training import EMA

        self.section = section = AutoencoderSection.model_validate(loop_config["autoencoder"])
        self.config = DiffAEConfig.from_dict(loop_config["model_config"])
        self.seed, self.worker = loop_config["seed"], worker
        torch.manual_seed(self.seed)  # the same initial weights on every worker
        model = DiffAEModel(self.config)
        resumed = self._resumed_payload()
        self.step = self.epoch = 0
        if resumed is not None:
            model.load_state_dict(resumed["model_state"])
            self.step, self.epoch = int(resumed["step"]), int(resumed["epoch"])
        self.model = worker.prepare_model(model)  # to the device; DDP when several
        self.raw = getattr(self.model, "module", self.model)
        self.ema = EMA(self.raw, section.ema_decay)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=section.lr)
        if resumed is not None:
            self.ema.shadow = {k: v.to(worker.device) for k, v in resumed["ema_state"].items()}
            self.optimizer.load_state_dict(resumed["optimizer_state"])
        self.net = self.model
        if section.mixed_precision and worker.device.type == "cuda":
            self.net = bf16_autocast(self.model, self.raw, worker.device.type)
        self.schedule = NoiseSchedule.linear()
        self.resumed_from = self.step
        self.by_steps = section.steps is not None
        self.total = section.steps if self.by_steps else section.epochs
        self.window = {"loss": 0.0, "steps": 0, "since": time.perf_counter()}  # per checkpoint
        self.shown = {"loss": 0.0, "steps": 0, "since": time.perf_counter()}  # per log line

    def _resumed_payload(self) -> dict | None:
        """The latest checkpoint's payload (checked to be of this model config), or None."""
        import torch

        checkpoint = self.worker.resume_from()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            payload = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        if payload["model_config"] != self.config.to_dict():
            raise ValueError(f"{checkpoint.path}: checkpoint of another model config; delete "
                             "the autoencoder/checkpoints folder to start over")
        self.worker.log(f"resuming after step {payload['step']} (epoch {payload['epoch']}) "
                        f"from {checkpoint.path}")
        return payload

    def done(self) -> bool:
        return (self.step if self.by_steps else self.epoch) >= self.total

    def save(self) -> None:
        """Report the window's metrics with a checkpoint (rank 0 writes it)."""
        seconds = time.perf_counter() - self.window["since"]
        metrics = {"step": self.step, "epoch": self.epoch, "resumed_from_step": self.resumed_from,
                   "loss": self.window["loss"] / max(1, self.window["steps"]),
                   "steps_per_second": self.window["steps"] / max(seconds, 1e-9)}
        self.window.update(loss=0.0, steps=0, since=time.perf_counter())
        files = None
        if self.worker.rank == 0:
            files = {CHECKPOINT_FILE: {
                "model_state": cpu_state(self.raw),
                "ema_state": {k: v.detach().cpu() for k, v in self.ema.state_dict().items()},
                "optimizer_state": self.optimizer.state_dict(),
                "step": self.step, "epoch": self.epoch, "learning_rate": self.section.lr,
                "resumed_from_step": self.resumed_from,
                "model_config": self.config.to_dict(),
            }}
        self.worker.report(metrics, files, checkpoint_dir_name(self.step))
        self.worker.log(f"checkpoint at step {self.step}: loss {metrics['loss']:.4f}")

    def train_batch(self, batch, generator) -> None:
        """One optimiser step (with its EMA update), counted and logged."""
        from diffinf_ray.diffae.training import train_step

        section = self.section
        images = batch["image"]
        if section.augment:
            images = random_hflip(images, generator)
        labels = batch["label"] if self.config.num_classes > 0 else None
        if section.ema_warmup:
            self.ema.decay = min(section.ema_decay, (1 + self.step) / (10 + self.step))
        loss = train_step(self.net, self.optimizer, images, labels, self.schedule, ema=self.ema,
                          grad_clip=section.grad_clip, generator=generator,
                          cond_drop_prob=section.cond_drop_prob)
        self.step += 1
        for window in (self.window, self.shown):
            window["loss"] += loss
            window["steps"] += 1
        if self.step % section.log_every == 0 and self.worker.rank == 0:
            shown = self.shown
            rate = shown["steps"] / max(time.perf_counter() - shown["since"], 1e-9)
            where = (f"{self.step}/{self.total}" if self.by_steps
                     else f"{self.step} (epoch {self.epoch}/{self.total})")
            self.worker.log(f"step {where} loss {shown['loss'] / shown['steps']:.4f} "
                            f"{rate:.2f} steps/s")
            shown.update(loss=0.0, steps=0, since=time.perf_counter())

    def run_epoch(self, shard) -> None:
        """One pass over the worker's shard (cut short at `steps`), checkpointing on time."""
        import torch

        self.epoch += 1
        generator = torch.Generator().manual_seed(_step_seed(self.seed, self.worker.rank,
                                                             self.step))
        bs, batches = self.section.batch_size, 0
        for batch in shard.iter_torch_batches(batch_size=bs, device=self.worker.device,
                                              local_shuffle_buffer_size=4 * bs,
                                              local_shuffle_seed=self.seed + self.epoch):
            batches += 1
            self.train_batch(batch, generator)
            every = self.section.checkpoint_every
            if self.by_steps and (self.step % every == 0 or self.step == self.total):
                self.save()
            if self.by_steps and self.step >= self.total:
                break
        if batches == 0:
            raise ValueError("the train split gave this worker no images; "
                             "check the manifest's train split and autoencoder.num_workers")
        if not self.by_steps and (self.epoch % self.section.checkpoint_every == 0
                                  or self.epoch == self.total):
            self.save()


def _autoencoder_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the autoencoder's core through the harness."""
    core = AutoencoderCore(loop_config, TrainWorker.current("autoencoder"))
    shard = core.worker.dataset("train")
    if core.done():
        unit = "steps" if core.by_steps else "epochs"
        core.worker.log(f"already at step {core.step} (epoch {core.epoch}); {unit}={core.total}: "
                        "nothing to train")
    while not core.done():
        core.run_epoch(shard)


# -- driver side ------------------------------------------------------------------------------

def train_autoencoder(cfg: Config, manifest: Location, out: Location, model_config):
    """Fit the autoencoder on the train split of `manifest` with the harness (placed by the
    `autoencoder` section); Ray Train checkpoints go to `out`/checkpoints (resumed from
    there), the last `keep_checkpoints` kept. Returns the Ray Train `Result`."""
    section = cfg.autoencoder
    train = split_dataset(manifest, "train", ["image", "label"]).map_batches(decode_for_training)
    loop_config = {"autoencoder": section.model_dump(mode="json"),
                   "model_config": model_config.to_dict(), "seed": cfg.run.seed}
    result = fit(_autoencoder_loop, loop_config, {"train": train}, out.child("checkpoints"),
                 Placement.of(section), keep=section.keep_checkpoints,
                 cache=section.cache_decoded_images)
    if result.checkpoint is None:
        raise RuntimeError(f"{out.child('checkpoints').display}: training saved no checkpoint")
    return result


def read_training_checkpoint(checkpoint) -> dict:
    """The payload of a Ray Train checkpoint of this stage (weights-only load)."""
    import torch

    with checkpoint.as_directory() as d:
        path = Path(d) / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint.path}: no {CHECKPOINT_FILE}")
        return torch.load(path, map_location="cpu", weights_only=True)


def export_weights(payload: dict, weights: Location) -> dict:
    """Write a training checkpoint's model and EMA weights with `save_autoencoder`; returns
    its manifest (config and the sha256 of each file)."""
    from diffinf_ray.diffae.model import DiffAEConfig, DiffAEModel
    from diffinf_ray.diffae.weights import save_autoencoder

    model = DiffAEModel(DiffAEConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["model_state"])
    weights.delete()  # no stale file from an earlier export survives next to the new ones
    return save_autoencoder(model, weights, ema_state=payload["ema_state"])


def _model_summary(model) -> dict:
    from dataclasses import asdict

    config = model.config  # DiffAEConfig or the official OfficialConfig: both dataclasses
    return {"config": asdict(config),
            "image_size": int(config.image_size),
            "num_classes": int(getattr(config, "num_classes", 0)),
            "parameters": sum(p.numel() for p in model.parameters())}


def import_autoencoder(cfg: Config, num_classes: int, options: StorageOptions) -> dict:
    """Verify and load `autoencoder.weights_uri`; the model.json record for it."""
    section = cfg.autoencoder
    location = Location(section.weights_uri, options)
    # uri: resolved here (absolute when local), so every worker reads the file this driver
    # checked; configured_uri: as written, which artifacts.recorded_location falls back to
    # when a run root made elsewhere is reused and the resolved path is gone
    record = {"source": "imported", "format": section.weights_format,
              "uri": location.path if location.is_local else location.uri,
              "configured_uri": section.weights_uri,
              "sha256": section.weights_sha256.lower(), "step": None}
    model = load_autoencoder_model(record, options)
    summary = _model_summary(model)
    if summary["num_classes"] not in (0, num_classes):
        raise ConfigError(f"autoencoder.weights_uri={section.weights_uri}: the model takes "
                          f"{summary['num_classes']} labels, the data has {num_classes} classes")
    return {**record, **summary}


# -- quality ----------------------------------------------------------------------------------

def held_out_rows(manifest: Location, split: str, count: int):
    """The first `count` rows of `split` by sample_id: a DataFrame (sample_id, image, label)."""
    index = read_split(manifest, split, [])
    chosen = index["sample_id"].tolist()[:count]
    if len(chosen) < 2:
        raise ValueError(f"{manifest.display}: split {split!r} has {len(chosen)} rows; the "
                         "autoencoder quality report needs at least 2 (autoencoder.quality_split)")
    return read_split(manifest, split, ["image", "label"], ids=chosen)


def measure_quality(record: dict, options: StorageOptions | None, images: list[bytes],
                    labels: list[int], section: dict, device: str = "cpu") -> tuple[dict, bytes]:
    """quality.json's numbers and the interpolation grid PNG for the model `record` names.

    `images`: encoded held-out images, resized to the model's size; `labels`: their assigned
    labels (used when the model takes labels)."""
    import torch

    from diffinf_ray.data.images import encode_png, to_tensor_batch
    from diffinf_ray.diffae.quality import (
        interpolation_grid,
        load_lpips,
        pair_indices,
        reconstruction_metrics,
    )

    q = AutoencoderSection.model_validate(section)
    started = time.perf_counter()
    model = load_autoencoder_model(record, options, map_location=device)
    size = int(model.config.image_size)
    x = torch.from_numpy(to_tensor_batch(images, size=size))
    y = torch.as_tensor(labels, dtype=torch.long)
    lpips = load_lpips(q.lpips_net, device)
    rows = reconstruction_metrics(model, x, y, q.quality_steps, lpips_metric=lpips.metric,
                                  batch_size=q.quality_batch_size)
    pairs = pair_indices(list(labels), q.interpolation_pairs)
    a = x[[i for i, _ in pairs]]
    b = x[[j for _, j in pairs]]
    grid, alphas = interpolation_grid(model, a, b, q.interpolation_columns, q.interpolation_steps)
    report = {
        "label_conditioning": getattr(model.config, "num_classes", 0) > 0,
        "image_size": size,
        "metric_range": "images in [0, 1]; MSE per pixel, SSIM Gaussian 11/1.5, LPIPS on [-1, 1]",
        "reconstruction": rows,
        "lpips": lpips.status,
        "interpolation": {
            "steps": q.interpolation_steps,
            "alphas": alphas,
            "pairs": [[int(i), int(j)] for i, j in pairs],
            "layout": "rows: pairs (A, B); columns: A, decode(lerp(z_A, z_B, alpha), x_T of A) "
                      "for each alpha (null label), B",
        },
        "device": device,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return report, encode_png(grid)


def run_quality(cfg: Config, manifest: Location, record: dict, out: Location,
                options: StorageOptions) -> dict:
    """Measure on held-out images in a Ray task (a GPU when `use_gpu`); write quality.json and
    z_interpolation.png under `out`."""
    import ray

    section = cfg.autoencoder
    rows = held_out_rows(manifest, section.quality_split, section.quality_images)
    if len(rows) < 2 * section.interpolation_pairs:
        raise ValueError(f"{manifest.display}: {len(rows)} {section.quality_split} rows, fewer "
                         f"than 2 x autoencoder.interpolation_pairs={section.interpolation_pairs}")
    use_gpu = section.use_gpu
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(measure_quality)
    report, png = ray.get(task.remote(
        record, options, [bytes(b) for b in rows["image"]], rows["label"].astype(int).tolist(),
        section.model_dump(mode="json"), "cuda" if use_gpu else "cpu"))
    ids = rows["sample_id"].tolist()
    labels = rows["label"].astype(int).tolist()
    report["split"] = section.quality_split
    report["sample_ids"] = ids
    report["labels"] = labels
    report["interpolation"]["file"] = "z_interpolation.png"
    report["interpolation"]["pairs"] = [
        {"a": ids[i], "b": ids[j], "label_a": labels[i], "label_b": labels[j]}
        for i, j in report["interpolation"]["pairs"]]
    report["model"] = {k: record.get(k) for k in ("source", "format", "sha256", "step")}
    report["model"]["uri"] = display_uri(record["uri"])
    out.child("quality.json").write_json(report)
    out.child("z_interpolation.png").write_bytes(png)
    return report


# -- the stage --------------------------------------------------------------------------------

def run_autoencoder(cfg: Config, root: RunRoot) -> dict:
    out = root.child(STAGE_FOLDER)
    num_classes = len(cfg.class_names)
    check_manifest(root.noisy_manifest, "autoencoder", MANIFEST_COLUMNS)
    if cfg.autoencoder.weights_uri:
        record = import_autoencoder(cfg, num_classes, root.options)
        log.info("autoencoder: using %s (sha256 %s), no training",
                 display_uri(record["uri"]), record["sha256"])
    else:
        from diffinf_ray.diffae.weights import EMA_WEIGHTS_FILE

        model_config = autoencoder_config(cfg, num_classes)
        result = train_autoencoder(cfg, root.noisy_manifest, out, model_config)
        payload = read_training_checkpoint(result.checkpoint)
        weights = out.child("weights")
        manifest = export_weights(payload, weights)
        # read back by its folder in the run root (artifacts.recorded_location); the URI is
        # for people: absolute when local, with the run root's query (endpoint) when on S3
        uri = weights.path if weights.is_local else weights.uri
        record = {"source": "trained", "format": "diffinf", "uri": uri,
                  "in_run_root": f"{STAGE_FOLDER}/weights",
                  "sha256": manifest["files"][EMA_WEIGHTS_FILE]["sha256"],
                  "step": int(payload["step"]), "epoch": int(payload["epoch"]),
                  "final_loss": (result.metrics or {}).get("loss"),
                  "config": manifest["config"], "image_size": model_config.image_size,
                  "num_classes": model_config.num_classes,
                  "parameters": sum(v.numel() for v in payload["model_state"].values())}
        del payload
    out.child(MODEL_RECORD).write_json(record)
    quality = run_quality(cfg, root.noisy_manifest, record, out, root.options)
    summary = {k: record.get(k) for k in ("source", "sha256", "step", "parameters")}
    summary["uri"] = display_uri(record["uri"])
    summary["reconstruction"] = {
        f"S{row['steps']}": {k: row[k] for k in ("mse", "ssim", "lpips")}
        for row in quality["reconstruction"]}
    summary["lpips"] = quality["lpips"]
    return summary
