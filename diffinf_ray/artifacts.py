"""What finished stages leave in the run root, loaded for the stages after them: the baseline
classifier's last checkpoint (and the removal stage's), the high-influence set, the frozen
predictor h_w, the autoencoder, the edit-loss networks, the edits and the judges.

Each loader names the stage to run when its output is missing. The folder names below are the
run-root layout (run_root.py lists the rest); the stage that writes a folder uses the same name.
"""

from __future__ import annotations

import numpy as np

from diffinf_ray.run_root import RunRoot
from diffinf_ray.storage import Location, StorageOptions

INFLUENCE_FOLDER = "influence"
INFLUENCE_TABLE = "influence.parquet"
REMOVAL_FOLDER = "removal"
PREDICTOR_FOLDER = "predictor"
AUTOENCODER_FOLDER = "autoencoder"
AUTOENCODER_RECORD = "model.json"
LOSSNETS_FOLDER = "lossnets"
LOSSNETS_RECORD = "lossnets.json"
EDITS_FOLDER = "edits"
EDITS_TABLE = "edits.parquet"
EDITS_QUARANTINE = "quarantine.parquet"
JUDGES_FOLDER = "judges"


# -- train and influence ----------------------------------------------------------------------

def classifier_checkpoint(root: RunRoot) -> Location:
    """The baseline classifier's last checkpoint: g(x) for h_w and for the editor."""
    from diffinf_ray.models.checkpoint import list_checkpoints

    found = list_checkpoints(root.checkpoints)
    if not found:
        raise FileNotFoundError(f"no checkpoints under {root.checkpoints.display}; run the train "
                                "stage first")
    return found[-1]


def removal_checkpoint(root: RunRoot) -> Location:
    """The removal stage's last checkpoint: the classifier trained without the high-influence
    rows, which never guided an edit (the edit gate's, edit/gate.py)."""
    from diffinf_ray.models.checkpoint import list_checkpoints

    folder = root.child(REMOVAL_FOLDER, "checkpoints")
    found = list_checkpoints(folder)
    if not found:
        raise FileNotFoundError(f"no checkpoints under {folder.display}; run the removal stage "
                                "first (the edit gate's classifier), or set "
                                "edit.gate.enabled=false")
    return found[-1]


def read_influence(root: RunRoot, columns: list[str] | None = None):
    """influence/influence.parquet of a finished influence stage (a pyarrow Table)."""
    return root.child(INFLUENCE_FOLDER, INFLUENCE_TABLE).read_table(columns=columns)


def high_influence_ids(root: RunRoot) -> frozenset:
    """The sample_ids the influence stage flagged high-influence (`is_high`)."""
    table = read_influence(root, ["sample_id", "is_high"])
    ids = np.asarray(table.column("sample_id").to_pylist(), dtype=object)
    return frozenset(ids[np.asarray(table.column("is_high").to_pylist(), dtype=bool)].tolist())


# -- predictor and autoencoder ----------------------------------------------------------------

def load_run_predictor(root: RunRoot):
    """The frozen h_w of a finished predictor stage."""
    from diffinf_ray.edit.predictor import load_predictor

    return load_predictor(root.child(PREDICTOR_FOLDER))


def recorded_location(record: dict, root: RunRoot) -> Location:
    """Where a record (autoencoder/model.json, a lossnets.json entry) says a network's weights
    are. A network the run trained is named by its folder in the run root (`in_run_root`), so a
    run root can be copied or moved and a sweep trial reads it through its own root. An imported
    one is at its `uri` (resolved where the stage ran); when that local file is gone (a run root
    reused from another checkout or machine) at its `configured_uri` as written in the config,
    resolved from this process's working directory, as the config's own paths are (Ray's
    workers share the driver's, or the job's working_dir). The sha256 is checked on load either
    way. Records written before these keys existed load from `uri` alone."""
    if record.get("in_run_root"):
        return root.child(*record["in_run_root"].split("/"))
    location = Location(record["uri"], root.options)
    configured = record.get("configured_uri")
    if configured and location.is_local and not location.exists():
        elsewhere = Location(configured, root.options)
        if elsewhere.exists():
            return elsewhere
    return location


def load_autoencoder_model(record: dict, options: StorageOptions | None = None,
                           map_location: str = "cpu", location: Location | None = None):
    """The model a model.json record names (at `location` when given: `recorded_location`),
    its sha256 checked, in eval mode."""
    location = location or Location(record["uri"], options)
    if record["format"] == "official":
        from diffinf_ray.diffae.official import load_official

        return load_official(location, sha256=record["sha256"], map_location=map_location)
    from diffinf_ray.diffae.weights import load_autoencoder

    return load_autoencoder(location, sha256=record["sha256"], map_location=map_location)


def load_run_autoencoder(root: RunRoot, map_location: str = "cpu"):
    """The autoencoder of a finished autoencoder stage (for the stages after it)."""
    record = root.child(AUTOENCODER_FOLDER, AUTOENCODER_RECORD).read_json()
    return load_autoencoder_model(record, root.options, map_location,
                                  recorded_location(record, root))


# -- lossnets ---------------------------------------------------------------------------------

def load_identity(record: dict, options, device: str = "cpu", location: Location | None = None):
    """The identity network a lossnets.json `identity` record names (a self-trained one at
    `location` when given: `recorded_location`)."""
    if record["kind"] == "arcface_onnx":
        from diffinf_ray.edit.identity import load_arcface_onnx

        return load_arcface_onnx(record["uri"], record["sha256"], options).to(device)
    from diffinf_ray.edit.identity import load_identity_embedder

    return load_identity_embedder(location or Location(record["uri"], options)).to(device)


def load_parsing(record: dict | None, options, device: str = "cpu",
                 location: Location | None = None):
    """The face parser a lossnets.json `parsing` record names (None: no structure loss; a
    self-trained one at `location` when given: `recorded_location`)."""
    if record is None:
        return None
    if record["kind"] == "bisenet":
        from diffinf_ray.edit.parsing import load_bisenet

        return load_bisenet(record["uri"], record["sha256"], options,
                            num_classes=record["num_classes"]).to(device)
    from diffinf_ray.edit.parsing import load_parser

    return load_parser(location or Location(record["uri"], options)).to(device)


def perceptual_distance(cfg, identity_net, options, device: str = "cpu"):
    """The perceptual distance of the lossnets section (LPIPS or its stated fallback)."""
    from diffinf_ray.edit.perceptual import load_perceptual

    section = cfg.lossnets
    return load_perceptual(net=section.lpips_net, backbone_uri=section.lpips_backbone_uri,
                           backbone_sha256=section.lpips_backbone_sha256,
                           fallback=section.perceptual_fallback, identity_net=identity_net,
                           device=device, storage_options=options)


def load_edit_losses(cfg, root: RunRoot, device: str = "cpu"):
    """(EditLosses, perceptual distance name) from a finished lossnets stage."""
    from diffinf_ray.config import ConfigError
    from diffinf_ray.edit.editor import loss_weights_from_section
    from diffinf_ray.edit.losses import EditLosses

    record = root.child(LOSSNETS_FOLDER, LOSSNETS_RECORD).read_json()
    identity = load_identity(record["identity"], root.options, device,
                             recorded_location(record["identity"], root))
    parsing = load_parsing(record["parsing"], root.options, device,
                           record["parsing"] and recorded_location(record["parsing"], root))
    perceptual = perceptual_distance(cfg, identity, root.options, device)
    losses = EditLosses(identity, parsing, perceptual, loss_weights_from_section(cfg.edit))
    if "struct" in losses.missing():
        raise ConfigError("the structure loss needs lossnets.parsing_uri (a BiSeNet "
                          "face-parsing checkpoint) or a `mask` column to train a parser on; "
                          "or set edit.loss_terms.struct=0")
    if losses.missing():
        raise ConfigError(f"edit.loss_terms weighs {losses.missing()}, whose networks the "
                          "lossnets stage did not provide; set their weights to 0")
    return losses, perceptual.name


# -- edits and judges -------------------------------------------------------------------------

def read_edits(root: RunRoot, columns: list[str] | None = None):
    """edits/edits.parquet of a finished edit stage (a pyarrow Table; a file or a folder of
    parts, in no particular row order)."""
    return root.child(EDITS_FOLDER, EDITS_TABLE).read_table(columns=columns)


def edit_quarantine_rows(root: RunRoot) -> int:
    """How many high-influence rows the edit stage quarantined (0 when it wrote none)."""
    quarantined = root.child(EDITS_FOLDER, EDITS_QUARANTINE)
    return quarantined.read_table().num_rows if quarantined.exists() else 0


def judges_root(root: RunRoot) -> RunRoot:
    """The judges stage's own run root (its draw's manifest, checkpoints, ...)."""
    return RunRoot(root.child(JUDGES_FOLDER).uri, root.options)


def load_judges(root: RunRoot):
    """(attribute oracle, identity oracle, judges report) of a finished `judges` stage."""
    from diffinf_ray.edit.identity import load_identity_embedder
    from diffinf_ray.models.checkpoint import list_checkpoints, load_checkpoint

    jroot = judges_root(root)
    checkpoints = list_checkpoints(jroot.checkpoints)
    if not checkpoints or not jroot.child("report.json").exists():
        raise FileNotFoundError(f"no finished judges under {jroot.uri}: the oracle stage needs "
                                "the judges stage (add `judges` to `stages`)")
    report = jroot.child("report.json").read_json()
    attribute = load_checkpoint(checkpoints[-1]).build_model().eval()
    embedder = load_identity_embedder(jroot.child("identity")).eval()
    return attribute, embedder, report
