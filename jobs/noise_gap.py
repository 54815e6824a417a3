"""Recipe: the accuracy that label noise costs (the gap the rest of DiffInf must recover).

Trains the same classifier on clean labels and on noisy labels (same data, same seed) and prints
clean-test accuracy / macro AUROC / linear kappa / ECE for both:

    python -m jobs.noise_gap --config jobs/configs/demo.yaml --task age --rate 0.3
    python -m jobs.noise_gap --config jobs/configs/demo.yaml --task expression --rate 0.2

Each condition is a normal pipeline run under <run.root>/<task>_clean and <task>_noisy<rate>,
so finished conditions are skipped when the command is repeated.
"""

from __future__ import annotations

import argparse
import json
import sys

from diffinf_ray.config import load_config
from diffinf_ray.pipeline import open_run_root, run_pipeline
from diffinf_ray.run_lease import run_leases

NOISE_GAP_STAGES = ["ingest", "noise", "train", "evaluate"]  # whatever the config's stages say


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--task", choices=["age", "expression"], required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    base = load_config(args.config, args.overrides)
    rows = {}
    for name, rate in (("clean", 0.0), (f"noisy{args.rate:g}", args.rate)):
        cfg = load_config(args.config, [*args.overrides, f"data.task={args.task}",
                                        f"noise.rate={rate}",
                                        f"run.root={base.run.root}/{args.task}_{name}"])
        with run_leases([open_run_root(cfg).base]):  # one writer per run root
            rows[name] = run_pipeline(cfg, stages=NOISE_GAP_STAGES)["evaluate"]
    print(f"\n{args.task}: clean-test metrics (train.epochs={base.train.epochs}, "
          f"{base.data.synthfaces.num_samples} samples, {base.data.synthfaces.resolution} px)")
    print("| labels | accuracy | AUROC | kappa (linear) | ECE |")
    print("|---|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['accuracy']:.2f} | {m['auroc_macro_ovr']:.2f} | "
              f"{m['kappa_linear']:.3f} | {m['ece']:.4f} |")
    print(json.dumps({k: {m: v[m] for m in ("accuracy", "auroc_macro_ovr", "kappa_linear", "ece")}
                      for k, v in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
