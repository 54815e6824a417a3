"""Probe the guided edit's decode on a finished synthfaces run: what each candidate shows, and
what guidance does step by step. Judged by the run's independent judges, like
benchmarks/edit_settings.py, but with the decode loop written out so that settings the editor
does not offer can be tried:

    python benchmarks/guided_probe.py --config jobs/configs/demo.yaml --root runs/demo \\
        candidates --scale 20 --count 4           # oracle hits of each candidate vs the closest
    python benchmarks/guided_probe.py --config jobs/configs/demo.yaml --root runs/demo \\
        decode 25:all:0 20:-2:0 25:all:0.7        # scale:guided steps:CFG rescale

`decode` specs: `all` guides every decode step, `-k` leaves the last k steps unguided; a
rescale phi > 0 applies diffusers' `rescale_noise_cfg` (Lin et al. 2024) to the guided eps.
The editor's settings (t0, steps, alpha) come from the config and --set overrides. One JSON
line per setting: oracle share on corrupted / clean rows, identity above the EER threshold,
median fine-detail energy ratio edit / original (edit_settings.hf_energy), pixel MSE.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np


def _edit_settings():
    spec = importlib.util.spec_from_file_location(
        "edit_settings", Path(__file__).with_name("edit_settings.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> list[dict]:
    import torch

    from diffinf_ray.artifacts import load_judges
    from diffinf_ray.config import load_config
    from diffinf_ray.data.images import to_tensor_batch
    from diffinf_ray.diffae.autoencoder import invert, predict_eps
    from diffinf_ray.diffae.labels import NULL_LABEL
    from diffinf_ray.diffae.schedule import ddim_step
    from diffinf_ray.ledger import provenance
    from diffinf_ray.pipeline import open_run_root
    from diffinf_ray.stages.edit import build_editor, to_png_batch
    from diffinf_ray.stages.oracle import _embed, _predict

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--set", action="append", default=[], help="edit.guided overrides, key=value")
    ap.add_argument("--threads", type=int, default=2)
    sub = ap.add_subparsers(dest="mode", required=True)
    cand = sub.add_parser("candidates")
    cand.add_argument("--scale", type=float, required=True)
    cand.add_argument("--count", type=int, default=4)
    dec = sub.add_parser("decode")
    dec.add_argument("specs", nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    edit_settings = _edit_settings()

    overrides = [f"run.root={args.root}", "edit.method=guided",
                 *(f"edit.{kv}" if kv.startswith("steps=") else f"edit.guided.{kv}"
                   for kv in args.set)]
    if args.mode == "candidates":
        overrides += [f"edit.guided.scale={args.scale}", f"edit.guided.candidates={args.count}"]
    cfg = load_config(args.config, overrides)
    root = open_run_root(cfg)
    rows = edit_settings.flagged_training_rows(root)
    x = torch.from_numpy(to_tensor_batch(list(rows.image)))
    y = torch.as_tensor(rows.label.to_numpy(np.int64))
    corrupted = rows.is_corrupted.fillna(False).to_numpy(bool)
    attribute, embedder, judges = load_judges(root)
    eer = judges["identity_oracle"]["threshold_at_eer"]
    reference = _embed(embedder, rows.image.to_numpy())
    detail_before = edit_settings.hf_energy(x.numpy())
    editor = build_editor(cfg, root, "cpu")
    model, s = editor.autoencoder.model, editor.settings
    origin = {**provenance(Path(__file__).resolve().parent),
              "config": args.config, "run_root": args.root, "t0": s.t0, "steps": s.steps,
              "alpha": s.alpha, "rows": len(rows), "corrupted_rows": int(corrupted.sum())}

    def judge(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        pngs = np.array(to_png_batch(images.numpy()), dtype=object)
        return (_predict(attribute, pngs) == y.numpy(),
                (_embed(embedder, pngs) * reference).sum(1))

    with torch.no_grad():
        z = model.encode(x)
        z_edit = editor.directions.shift(z, y, s.alpha) if s.alpha > 0 else z
        x_t0 = invert(model, x, z, torch.full_like(y, NULL_LABEL), s.steps,
                      editor.autoencoder.schedule, checkpoint=False, depth=s.depth)
    results = []
    if args.mode == "candidates":
        abar, noise = editor.noise_level(), editor.sdedit_noise(x)
        hits, sims, dist = [], [], []
        with torch.no_grad():
            ref = editor.losses.reference(x)
            for c in range(s.candidates):
                start = editor.candidate_start(c, x, x_t0, abar, noise)
                out = editor._decode(z_edit, start, y, s.scale).clamp(-1, 1)
                dist.append(editor.losses.combine(editor.losses.terms(out, ref)).numpy())
                h, sim = judge(out)
                hits.append(h)
                sims.append(sim)
        hits, sims, dist = np.stack(hits, 1), np.stack(sims, 1), np.stack(dist, 1)
        closest = hits[np.arange(len(hits)), dist.argmin(1)]
        results.append({"mode": "candidates", "scale": s.scale, **origin,
                        "per_candidate_corrupted": hits[corrupted].mean(0).round(3).tolist(),
                        "per_candidate_clean": hits[~corrupted].mean(0).round(3).tolist(),
                        "per_candidate_identity_eer": (sims > eer).mean(0).round(3).tolist(),
                        "closest_corrupted": float(closest[corrupted].mean()),
                        "closest_clean": float(closest[~corrupted].mean()),
                        "closest_is_candidate_0": float((dist.argmin(1) == 0).mean()),
                        "any_candidate_corrupted": float(hits[corrupted].any(1).mean())})
    else:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            rescale_noise_cfg,
        )

        steps = list(editor.autoencoder.schedule.sampling_steps(s.steps, s.depth))
        for spec in args.specs:
            scale, guided, phi = spec.split(":")
            scale, phi = float(scale), float(phi)
            guided = len(steps) if guided == "all" else len(steps) + int(guided)
            with torch.no_grad():
                xs = x_t0
                for i, step in enumerate(steps):
                    g = scale if i < guided else 1.0
                    eps = predict_eps(model, xs, step.timestep, z_edit, y, g)
                    if phi > 0 and g != 1.0:
                        eps = rescale_noise_cfg(
                            eps, predict_eps(model, xs, step.timestep, z_edit, y, 1.0), phi)
                    xs = ddim_step(xs, eps, step.abar_from, step.abar_to)
                out = xs.clamp(-1, 1)
            h, sim = judge(out)
            results.append({
                "mode": "decode", "scale": scale, "guided_steps": guided,
                "decode_steps": len(steps), "rescale": phi, **origin,
                "oracle_corrupted": float(h[corrupted].mean()),
                "oracle_clean": float(h[~corrupted].mean()),
                "identity_retention_at_eer": float((sim > eer).mean()),
                "hf_energy_ratio_median": float(np.median(edit_settings.hf_energy(out.numpy())
                                                          / detail_before)),
                "pixel_mse": float(((out - x) / 2).pow(2).mean())})
    for r in results:
        print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    main()
