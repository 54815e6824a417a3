"""Does one config and seed give one classifier? Two fresh processes, each with its own local Ray:
ingest + noise (a new manifest each time, written in whatever order Ray Data's tasks finished)
and one `train_classifier` fit; then the largest difference between the two final weight sets.

    python benchmarks/reproducibility.py                              # the 32 px age config
    python benchmarks/reproducibility.py --config jobs/configs/tiny.yaml train.epochs=1
    python benchmarks/reproducibility.py train.cache_decoded_images=false   # the streamed path

Prints, per process, how many places the noisy manifest's rows leave sample order (a measure
of how differently the two manifests were written), and at the end the max |w1 - w2| over
every tensor of the last checkpoint: 0.0 when a seed reproduces its model. Figures:
benchmarks/RESULTS.md ("Reproducible fits").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CONFIG = "jobs/configs/autoencoder_synthfaces32.yaml"


def one_fit(config: str, overrides: list[str], out: str) -> None:
    """Ingest, noise and one fit in this process; the last checkpoint's weights -> `out`."""
    import pyarrow.dataset as pads
    import ray
    import torch

    from diffinf_ray.config import load_config
    from diffinf_ray.models.checkpoint import list_checkpoints, load_checkpoint
    from diffinf_ray.models.training import train_classifier
    from diffinf_ray.pipeline import open_run_root, run_pipeline
    from diffinf_ray.storage import Location

    tmp = tempfile.mkdtemp(prefix="reproducibility_")
    cfg = load_config(config, [f"run.root={tmp}/run", "stages=[ingest,noise]", *overrides])
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=f"{tmp}/ray", log_to_driver=False)
    try:
        run_pipeline(cfg)
        root = open_run_root(cfg)
        ids = pads.dataset(root.noisy_manifest.path).to_table(columns=["sample_id"])
        ids = ids.column(0).to_pylist()
        breaks = sum(1 for a, b in zip(ids, ids[1:], strict=False) if b < a)
        print(f"  manifest rows out of sample order at {breaks} places", flush=True)
        fit = Location(f"{tmp}/fit")
        train_classifier(cfg, root.noisy_manifest, fit, len(cfg.class_names))
        torch.save(load_checkpoint(list_checkpoints(fit)[-1]).model_state, out)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--one", metavar="OUT", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    if args.one:
        one_fit(args.config, args.overrides, args.one)
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"fit{i}.pt") for i in (1, 2)]
        for i, out in enumerate(outs, start=1):
            print(f"process {i}:", flush=True)
            subprocess.run([sys.executable, __file__, "--config", args.config, "--one", out,
                            *args.overrides], check=True)
        a, b = (torch.load(o, weights_only=True) for o in outs)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"max |w1 - w2| over the last checkpoint: {diff:.3g} "
          f"({'reproduced' if diff == 0 else 'NOT reproduced'})")


if __name__ == "__main__":
    main()
