"""Edit stage: the generative correction of every high-influence training sample, as a Ray Data
actor pool (METHOD.md stage 6).

In:  manifest_noisy/ train rows (sample_id, image, label) whose influence/influence.parquet
     `is_high` is set; the frozen models of earlier stages: autoencoder/ (model.json; not
     read by `oracle_repair`, which draws the face again), checkpoints/ (the last classifier:
     g(x)), predictor/ (h_w), lossnets/ (F_id, parser, perceptual distance).
Out: edits/edits.parquet   one row per edited sample: sample_id, label, image (PNG of the
                           edit), image_original (PNG), loss_total, loss_id, loss_struct,
                           loss_perc, loss_pixel, loss_si, lpips (the perceptual distance of
                           lossnets.json to the original), identity_similarity (cosine, F_id),
                           p_high_before, p_high_after, iterations, reconstruction_mse, attempts,
                           gate_prediction (int; -1: gate disabled), gate_confidence (the gate
                           classifier's softmax probability of the label), gate_accepted (bool)
     edits/quarantine.parquet  rows that failed `edit.max_attempts` times, with the reason
                               (manifest.QUARANTINE_SCHEMA); high-influence rows = edits +
                               quarantined, always.
The gate (edit/gate.py, `edit.gate`): after the editor, the removal stage's last classifier
(removal/checkpoints/; trained without the high-influence rows, it never guided an edit) judges
each edit as saved (PNG-rounded); refine falls a rejected row back to removal or to its
original. `edit.gate.enabled: false` accepts every edit and loads no gate classifier.
     edits/z_directions.npz    `edit.method: guided` with guided.alpha > 0 only: the z mean,
                               std and unit class directions (edit/guided.ZDirections), fitted
                               once on the driver on the unflagged train rows of manifest_noisy
                               with their assigned labels, before the actors start.
The editor is `edit.method` (edit/methods.py): `latent` (edit/editor.py, latent optimisation
through the differentiable decode) or `guided` (edit/guided.py, gradient-free: null-label
partial inversion, label-guided decode, closest of `guided.candidates`; needs a
label-conditional autoencoder) or, on synthfaces, `oracle_repair` (edit/oracle_repair.py: the
face drawn again showing its label, everything else kept; the ceiling for any editor). All give
the same columns; `guided` and `oracle_repair` have iterations 0.
Each actor loads every frozen model once (from a local or s3:// run root), on a GPU when
`edit.use_gpu` (`edit.gpus_per_actor` < 1 packs several actors on one GPU). An exception while
editing a batch is retried up to `edit.max_attempts` times, then each row of the batch is tried
alone, so one bad row cannot sink its batch; an actor that dies (OOM, preemption) is restarted
by Ray Data and its batch re-run (Ray Data's defaults: max_restarts=-1, max_task_retries=-1).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from diffinf_ray.artifacts import (
    AUTOENCODER_FOLDER,
    AUTOENCODER_RECORD,
    EDITS_FOLDER,
    EDITS_QUARANTINE,
    EDITS_TABLE,
    classifier_checkpoint,
    high_influence_ids,
    load_edit_losses,
    load_run_autoencoder,
    load_run_predictor,
    removal_checkpoint,
)
from diffinf_ray.config import Config
from diffinf_ray.datasets import check_manifest, split_dataset, synthfaces_spec
from diffinf_ray.edit.methods import edit_method
from diffinf_ray.run_root import RunRoot
from diffinf_ray.stage_registry import config_for_stage

log = logging.getLogger(__name__)

STAGE_FOLDER = EDITS_FOLDER
MANIFEST_COLUMNS = ("sample_id", "split", "image", "label")
DIRECTIONS_FILE = "z_directions.npz"
RESULT_COLUMNS = ("loss_total", "loss_id", "loss_struct", "loss_perc", "loss_pixel", "loss_si",
                  "p_high_before", "p_high_after", "iterations", "reconstruction_mse")


def build_editor(cfg: Config, root: RunRoot, device: str, directions=None):
    """The editor core of `edit.method` (edit/methods.py) over the frozen models of a run root.

    A method that needs the class directions in z gets `directions` when given, else the ones
    run_edit saved under edits/, else (no run_edit before: a benchmark) ones fitted here."""
    from diffinf_ray.diffae.autoencoder import DiffusionAutoencoder
    from diffinf_ray.edit.methods import EditorParts
    from diffinf_ray.models.checkpoint import load_checkpoint

    section = cfg.edit
    method = edit_method(section.method)
    model = autoencoder = None  # a method that draws the face again edits without one
    if method.needs_autoencoder:
        model = load_run_autoencoder(root, map_location=device).to(device)
        autoencoder = DiffusionAutoencoder(model, encode_steps=section.encode_steps,
                                           decode_steps=section.decode_steps,
                                           checkpoint=section.checkpoint, steps=section.steps)
    classifier = load_checkpoint(classifier_checkpoint(root)).build_model().to(device)
    predictor = load_run_predictor(root).to(device)
    losses, _ = load_edit_losses(cfg, root, device)
    if method.needs_directions(section) and directions is None:
        directions = run_directions(cfg, root, device, model)
    synthfaces = synthfaces_spec(cfg) if cfg.data.source == "synthfaces" else None
    parts = EditorParts(autoencoder, classifier, predictor, losses, device, synthfaces)
    return method.build(parts, section, directions)


# -- the class directions in z of `guided` -------------------------------------------------------
# Fitted once, on the driver, by run_edit and saved as edits/z_directions.npz, which every actor
# reads (as it reads the other frozen models from the run root): one fit per run instead of one
# per actor, the same directions for every actor and every restart of one, and the file stays
# with the edits as the record of what moved z.


def directions_location(root: RunRoot):
    return root.child(STAGE_FOLDER, DIRECTIONS_FILE)


def encode_training_rows(cfg: Config, root: RunRoot, model, device: str):
    """(z (N, d), labels (N,)) of the train rows of manifest_noisy that are not flagged
    high-influence, encoded batch-wise by the autoencoder's semantic encoder E, streamed, in
    sample_id order (Ray Data's block order varies; the fit should not)."""
    import torch

    from diffinf_ray.data.images import to_tensor_batch

    rows = split_dataset(root.noisy_manifest, "train", ["sample_id", "image", "label"],
                         exclude_ids=high_influence_ids(root))
    ids, zs, labels = [], [], []
    with torch.no_grad():
        for batch in rows.iter_batches(batch_size=cfg.edit.batch_size * 4,
                                       batch_format="numpy"):
            x = torch.from_numpy(to_tensor_batch(list(batch["image"]))).to(device)
            zs.append(model.encode(x).float().cpu().numpy())
            labels.append(batch["label"].astype(np.int64))
            ids.append(batch["sample_id"].astype(str))
    if not zs:
        raise ValueError("edit: no unflagged training rows to fit the class directions on")
    order = np.argsort(np.concatenate(ids), kind="stable")
    return np.concatenate(zs)[order], np.concatenate(labels)[order]


def fit_run_directions(cfg: Config, root: RunRoot, device: str = "cpu", model=None):
    """The class directions of `guided` (edit/guided.fit_class_directions) fitted on the run's
    unflagged training rows with their assigned (noisy) labels."""
    from diffinf_ray.edit.guided import fit_class_directions

    if model is None:
        model = load_run_autoencoder(root, map_location=device).to(device).eval()
    num_classes = int(getattr(getattr(model, "config", None), "num_classes", 0) or 0)
    if num_classes == 0:
        raise ValueError("edit.method 'guided' needs a label-conditional autoencoder "
                         "(num_classes > 0); this one has no label path")
    z, labels = encode_training_rows(cfg, root, model, device)
    log.info("edit: fitting class directions on %d training rows", len(labels))
    return fit_class_directions(z, labels, num_classes, seed=cfg.edit.seed)


def run_directions(cfg: Config, root: RunRoot, device: str = "cpu", model=None):
    """The directions run_edit saved for this run, or (when there are none) fitted now."""
    from diffinf_ray.edit.guided import ZDirections

    saved = directions_location(root)
    if saved.exists():
        return ZDirections.load(saved)
    log.warning("edit: no %s in the run root; fitting the class directions here", DIRECTIONS_FILE)
    return fit_run_directions(cfg, root, device, model)


def build_gate(cfg: Config, root: RunRoot, device: str):
    """The edit gate (edit/gate.py) of `edit.gate`, with the removal stage's last classifier
    (none loaded when the gate is disabled)."""
    from diffinf_ray.edit.gate import EditGate, GateSettings
    from diffinf_ray.models.checkpoint import load_checkpoint

    settings = GateSettings.from_section(cfg.edit.gate)
    classifier = None
    if settings.enabled:  # settings.classifier == "removal", the one choice so far
        classifier = load_checkpoint(removal_checkpoint(root)).build_model()
    return EditGate(settings, classifier, device)


def add_gate_columns(gate, out: dict[str, np.ndarray], parts) -> None:
    """The gate's verdict on each edited row of an actor's `out` batch, on the edit as saved
    (PNG-rounded, what refine puts in place); `parts` as in `EditActor.__call__`. Rows
    whose edit failed stay rejected (-1, NaN, False): they are quarantined anyway."""
    n = len(out["sample_id"])
    columns = {"gate_prediction": np.full(n, -1, np.int32), "gate_confidence": np.full(n, np.nan),
               "gate_accepted": np.zeros(n, dtype=bool)}
    for rows, r, _, _ in parts:
        if r is None:
            continue
        saved = to_uint8(np.asarray(r["edited"])) / 127.5 - 1.0
        verdict = gate(saved, np.asarray(out["label"])[rows], out["identity_similarity"][rows])
        for name, values in verdict.columns().items():
            columns[name][rows] = values
    out.update(columns)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] as the 8-bit values their PNGs hold."""
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_png_batch(images: np.ndarray) -> list[bytes]:
    """(B, 3, H, W) float in [-1, 1] -> PNG bytes per image (rounded to uint8)."""
    from diffinf_ray.data.images import encode_png

    pixels = to_uint8(images)
    return [encode_png(p.transpose(1, 2, 0)) for p in pixels]


class EditActor:
    """Ray Data actor: rows (sample_id, image, label) -> edit rows (module docstring), with the
    editor of `edit.method` and the gate of `edit.gate`."""

    def __init__(self, config: dict, root: RunRoot):
        # `root` travels pickled, so a sweep trial's root (sweep.SharedRunRoot) keeps reading
        # the stages it shares with the base run
        import torch

        self.cfg = config_for_stage(Config.model_validate(config), "edit")
        self.device = "cuda" if self.cfg.edit.use_gpu and torch.cuda.is_available() else "cpu"
        self.editor = build_editor(self.cfg, root, self.device)
        self.gate = build_gate(self.cfg, root, self.device)
        self.by_id = edit_method(self.cfg.edit.method).needs_sample_ids

    def _edit(self, images: list[bytes], labels: np.ndarray, ids) -> dict[str, np.ndarray]:
        import torch

        from diffinf_ray.data.images import to_tensor_batch

        x = torch.from_numpy(to_tensor_batch(images))
        y = torch.from_numpy(labels.astype(np.int64))
        return self.editor.edit(x, y, list(ids)) if self.by_id else self.editor.edit(x, y)

    def _attempt(self, images, labels, ids) -> tuple[dict | None, int, str | None]:
        error = None
        for attempt in range(1, self.cfg.edit.max_attempts + 1):
            try:
                return self._edit(images, labels, ids), attempt, None
            except Exception as err:  # noqa: BLE001 - any failure is retried, then recorded
                error = f"{type(err).__name__}: {err}"
                log.warning("edit attempt %d of %d rows failed: %s", attempt, len(images), error)
        return None, self.cfg.edit.max_attempts, error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, labels, ids = list(batch["image"]), batch["label"], batch["sample_id"]
        n = len(images)
        result, attempts, error = self._attempt(images, labels, ids)
        if result is not None:
            parts = [(np.arange(n), result, attempts, None)]
        else:  # one row at a time, so only the rows that fail are quarantined
            parts = []
            for i in range(n):
                r, a, e = self._attempt(images[i:i + 1], labels[i:i + 1], ids[i:i + 1])
                parts.append((np.array([i]), r, attempts + a, e))
        out = {"sample_id": batch["sample_id"], "label": batch["label"],
               "image_original": batch["image"],
               "image": np.empty(n, dtype=object), "error": np.empty(n, dtype=object),
               "attempts": np.zeros(n, dtype=np.int32)}
        for name in RESULT_COLUMNS:
            out[name] = np.full(n, np.nan)
        for rows, r, a, e in parts:
            out["attempts"][rows] = a
            if r is None:
                out["error"][rows] = e
                continue
            pngs = to_png_batch(np.asarray(r["edited"]))
            for j, row in enumerate(rows):
                out["image"][row] = pngs[j]
            for name in RESULT_COLUMNS:
                out[name][rows] = np.asarray(r[name], dtype=np.float64)
        out["lpips"] = out["loss_perc"].copy()
        out["identity_similarity"] = 1.0 - out["loss_id"]
        add_gate_columns(self.gate, out, parts)
        return out


def high_influence_rows(root: RunRoot):
    """A Ray Dataset of the train rows flagged high-influence (sample_id, image, label)."""
    flagged = high_influence_ids(root)
    if not flagged:
        raise ValueError("the high-influence set is empty; nothing to edit (influence.tau?)")
    ds = split_dataset(root.noisy_manifest, "train", ["sample_id", "image", "label"],
                       include_ids=frozenset(flagged))
    return ds, len(flagged)


def edit_dataset(cfg: Config, root: RunRoot, rows, actor_cls=None):
    """Map the edit actors (`EditActor` unless given) over a Ray Dataset of
    (sample_id, image, label) rows."""
    import ray

    section = cfg.edit
    return rows.map_batches(
        actor_cls or EditActor,
        fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "root": root},
        compute=ray.data.ActorPoolStrategy(size=section.actors),
        num_cpus=cfg.ray.data_actor_cpus,
        num_gpus=section.gpus_per_actor if section.use_gpu else 0,
        batch_size=section.batch_size,
        batch_format="numpy",
    )


def gate_summary(cfg: Config, edits) -> dict:
    """Counts of the gate's verdicts on the edits (a pandas frame of edits.parquet rows); what
    becomes of a rejected row (edit.gate.fallback) is the refine stage's, in its summary."""
    accepted = int(np.asarray(edits["gate_accepted"], dtype=bool).sum())
    return {"gate_enabled": cfg.edit.gate.enabled, "gate_accepted": accepted,
            "gate_fallen_back": len(edits) - accepted}
def _driver_device(cfg: Config) -> str:
    import torch

    return "cuda" if cfg.edit.use_gpu and torch.cuda.is_available() else "cpu"


def prepare_method(cfg: Config, root: RunRoot) -> None:
    """Driver-side work of `edit.method` before any actor starts: refuse a method the run's
    autoencoder cannot serve (here, not in every actor's constructor), and fit and save the
    class directions a method needs."""
    method = edit_method(cfg.edit.method)
    if method.needs_sample_ids and cfg.data.source != "synthfaces":
        raise ValueError(f"edit.method {method.name!r} needs data.source synthfaces: only there "
                         "is each image's drawing known")
    if method.needs_labels and root.child(AUTOENCODER_FOLDER, AUTOENCODER_RECORD).read_json().get(
            "num_classes", 1) == 0:
        raise ValueError(f"edit.method {method.name!r} needs a label-conditional autoencoder "
                         "(num_classes > 0, trained with label dropout); this run's has no label "
                         "path: use edit.method 'latent' or autoencoder.label_conditioning")
    if method.needs_directions(cfg.edit):
        fit_run_directions(cfg, root, _driver_device(cfg)).save(directions_location(root))


def run_edit(cfg: Config, root: RunRoot) -> dict:
    import pandas as pd

    from diffinf_ray.manifest import QUARANTINE_SCHEMA

    check_manifest(root.noisy_manifest, "edit", MANIFEST_COLUMNS)
    rows, expected = high_influence_rows(root)
    prepare_method(cfg, root)
    df = edit_dataset(cfg, root, rows).to_pandas()
    df["sample_id"] = df["sample_id"].astype(str)
    df = df.sort_values("sample_id", kind="stable").reset_index(drop=True)
    failed = df["error"].notna()
    ok = df[~failed].drop(columns="error")
    out = root.child(STAGE_FOLDER)
    ok = ok.astype({"label": np.int32, "attempts": np.int32, "iterations": np.int32,
                    "gate_prediction": np.int32, "gate_accepted": bool})
    # plain columns: no pandas metadata (Ray hands back Arrow-backed pandas dtypes)
    table = pa.Table.from_pandas(ok, preserve_index=False).replace_schema_metadata(None)
    out.child(EDITS_TABLE).write_table(table)
    quarantine = pd.DataFrame({"sample_id": df.loc[failed, "sample_id"],
                               "source": "edit", "stage": "edit",
                               "reason": df.loc[failed, "error"].astype(str)})
    out.child(EDITS_QUARANTINE).write_table(
        pa.Table.from_pandas(quarantine, schema=QUARANTINE_SCHEMA, preserve_index=False))
    if len(df) != expected:
        raise RuntimeError(f"edit: {expected} high-influence rows in, {len(df)} out "
                           f"({len(ok)} edited, {int(failed.sum())} quarantined)")
    summary = {"method": cfg.edit.method, "high_influence_rows": expected, "edited": len(ok),
               "quarantined": int(failed.sum()), **gate_summary(cfg, ok)}
    if len(ok):
        for name in ("lpips", "identity_similarity", "p_high_before", "p_high_after",
                     "loss_total", "iterations", "reconstruction_mse"):
            summary[f"mean_{name}"] = float(ok[name].mean())
        summary["share_p_high_below_stop"] = float((ok["p_high_after"] < cfg.edit.stop_p_high)
                                                   .mean())
    return summary
