"""`diffinf diagnose-labels`: does the run's autoencoder change what the oracle sees when only
the label changes? (diffae/label_sensitivity.py on a run's own parts)

In:  the autoencoder stage (its model.json: trained or imported weights) and the judges stage
     (attribute oracle, and its synthfaces draw's test split: people neither the autoencoder nor
     the oracle trained on, clean labels); both, and what they need, are run first when not
     done, exactly as `diffinf run` would (resumable, skipped when done).
Out: <run root>/diagnostics/label_sensitivity.json   the result (confusion tables per
     inversion depth and guidance scale) with the settings used; the tables are printed.
     <run root>/diagnostics/label_sensitivity_<depth>.png   per inversion depth ('full' or k),
     what the oracle was shown for the first GRID_IMAGES faces: original, null-label
     reconstruction, then one decode per (scale, class).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffinf_ray.config import Config
from diffinf_ray.ledger import provenance
from diffinf_ray.stage_registry import STAGES, upstream_stages

log = logging.getLogger(__name__)
DIAGNOSTICS_FOLDER = "diagnostics"
RESULT_FILE = "label_sensitivity.json"
NEEDED = ("autoencoder", "judges")
GRID_IMAGES = 8


def _test_images(root, count: int, seed: int):
    """(images (N, 3, H, W) in [-1, 1], clean labels) of `count` faces of the judges' test split."""
    import torch

    from diffinf_ray.artifacts import judges_root
    from diffinf_ray.data.images import to_tensor_batch
    from diffinf_ray.datasets import read_split

    test = read_split(judges_root(root).manifest, "test", ["image", "label"])
    if len(test) == 0:
        raise ValueError("the judges' draw has no test split to diagnose with")
    pick = np.sort(np.random.default_rng(seed).permutation(len(test))[:count])
    images = torch.from_numpy(to_tensor_batch(list(test["image"].iloc[pick])))
    return images, test["label"].to_numpy()[pick].astype(np.int64)


def _oracle_classifier(oracle):
    import torch

    @torch.no_grad()
    def classify(x):
        return torch.cat([oracle(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]).numpy()

    return classify


def run_label_diagnostic(cfg: Config, *, images: int = 96, scales: Sequence[float] = (1, 3, 5),
                         depths: Sequence[int | None] = (None,), steps: int | None = None,
                         seed: int = 0) -> dict:
    """Run the needed stages, then the diagnostic; write and return its result. `steps`
    defaults to the edit's decode steps (what an edit would use)."""
    import torch

    from diffinf_ray.artifacts import load_judges, load_run_autoencoder
    from diffinf_ray.data.images import encode_png
    from diffinf_ray.diffae.label_sensitivity import label_sensitivity, label_sensitivity_grid
    from diffinf_ray.pipeline import open_run_root, run_pipeline

    wanted = set(NEEDED).union(*(upstream_stages(s) for s in NEEDED))
    run_pipeline(cfg, stages=[s for s in STAGES if s in wanted])
    root = open_run_root(cfg)
    model = load_run_autoencoder(root)
    oracle, _, judges_report = load_judges(root)
    x, y = _test_images(root, images, seed)
    steps = steps or cfg.edit.decode_steps or cfg.edit.steps
    log.info("label sensitivity: %d judges' test faces, S = %d, scales %s, depths %s",
             len(x), steps, list(scales), list(depths))
    torch.manual_seed(seed)
    result = label_sensitivity(model, x, y, _oracle_classifier(oracle), len(cfg.class_names),
                               scales=scales, steps=steps, depths=depths)
    result.update(class_names=list(cfg.class_names), seed=seed,
                  oracle_test_accuracy=judges_report["attribute_oracle"]["test_accuracy"],
                  # where the figures came from, so a copy kept elsewhere still says so
                  **provenance(Path(__file__).resolve().parent))
    root.child(DIAGNOSTICS_FOLDER, RESULT_FILE).write_json(result)
    result["written_to"] = root.child(DIAGNOSTICS_FOLDER, RESULT_FILE).uri
    result["grids"] = []
    for depth in depths:
        grid = label_sensitivity_grid(model, x[:GRID_IMAGES], len(cfg.class_names),
                                      scales=scales, steps=steps, depth=depth)
        name = f"label_sensitivity_{'full' if depth is None else depth}.png"
        root.child(DIAGNOSTICS_FOLDER, name).write_bytes(encode_png(grid))
        result["grids"].append(root.child(DIAGNOSTICS_FOLDER, name).uri)
    return result
