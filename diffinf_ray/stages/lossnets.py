"""Lossnets stage: the frozen networks of the edit losses, loaded by URI or trained here.

In:  manifest/ train rows: image, identity (for a self-trained identity embedder), mask (for a
     self-trained parsing net); the lossnets section (lossnets.* URIs + sha256).
Out: lossnets/lossnets.json    what each loss term uses:
       identity   {kind: arcface_onnx, uri, sha256} or {kind: self_trained, uri, report}
       parsing    {kind: bisenet, uri, sha256, num_classes} or {kind: self_trained, uri, report}
       perceptual {name: the distance used (LPIPS or the stated fallback), net, backbone}
     lossnets/identity/, lossnets/parsing/   the self-trained weights (safetensors + config)
`artifacts.load_edit_losses(cfg, root)` rebuilds `edit.losses.EditLosses` from lossnets.json (in
each edit actor). Where no pretrained file is configured (this build box has none), the identity embedder
is trained on the `identity` column and the parser on the `mask` column of the train split, in
the driver: sized for small data sets (synthfaces); on large data give the pretrained files.
"""

from __future__ import annotations

import io

import numpy as np

from diffinf_ray.artifacts import (
    LOSSNETS_FOLDER,
    LOSSNETS_RECORD,
    load_identity,
    perceptual_distance,
)
from diffinf_ray.config import Config, ConfigError
from diffinf_ray.datasets import check_manifest, manifest_columns, read_split
from diffinf_ray.run_root import RunRoot

STAGE_FOLDER = LOSSNETS_FOLDER
RECORD = LOSSNETS_RECORD


def _decode_mask(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L"), dtype=np.int64)


def _identity_record(cfg: Config, root: RunRoot, log) -> dict:
    import torch

    section = cfg.lossnets
    if section.identity_onnx_uri:
        from diffinf_ray.edit.identity import load_arcface_onnx

        load_arcface_onnx(section.identity_onnx_uri, section.identity_onnx_sha256, root.options)
        return {"kind": "arcface_onnx", "uri": section.identity_onnx_uri,
                "sha256": section.identity_onnx_sha256.lower()}
    if "identity" not in manifest_columns(root.manifest):
        raise ConfigError("the identity loss needs lossnets.identity_onnx_uri (an ArcFace ONNX "
                          "file) or an `identity` column in the data to train an embedder on")
    from diffinf_ray.data.images import to_tensor_batch
    from diffinf_ray.edit.identity import save_identity_embedder, train_identity_embedder

    df = read_split(root.manifest, "train", ["image", "identity"]).dropna(subset=["identity"])
    if df["identity"].nunique() < 2:
        raise ConfigError("the identity column has fewer than 2 identities in the train split; "
                          "give lossnets.identity_onnx_uri")
    images = torch.from_numpy(to_tensor_batch(list(df["image"])))
    model, report = train_identity_embedder(
        images, df["identity"].astype(str).tolist(), embed_dim=section.identity_embed_dim,
        epochs=section.identity_epochs, lr=section.lr, batch_size=section.batch_size,
        seed=cfg.run.seed, log=log)
    out = root.child(STAGE_FOLDER, "identity")
    save_identity_embedder(model, out)
    return {"kind": "self_trained", "uri": out.uri, "in_run_root": f"{STAGE_FOLDER}/identity",
            "report": report, "note": "no ArcFace file configured: identity embedder trained on the identity column"}


def _parsing_record(cfg: Config, root: RunRoot, log) -> dict | None:
    import torch

    section = cfg.lossnets
    if section.parsing_uri:
        from diffinf_ray.edit.parsing import load_bisenet

        load_bisenet(section.parsing_uri, section.parsing_sha256, root.options,
                     num_classes=section.parsing_num_classes)
        return {"kind": "bisenet", "uri": section.parsing_uri,
                "sha256": section.parsing_sha256.lower(),
                "num_classes": section.parsing_num_classes}
    if "mask" not in manifest_columns(root.manifest):
        return None  # no parser: the edit stage refuses a structure loss (load_edit_losses)
    from diffinf_ray.data.images import to_tensor_batch
    from diffinf_ray.edit.parsing import save_parser, train_parser
    from diffinf_ray.manifest import REGIONS

    df = read_split(root.manifest, "train", ["image", "mask"]).dropna(subset=["mask"])
    images = torch.from_numpy(to_tensor_batch(list(df["image"])))
    masks = torch.from_numpy(np.stack([_decode_mask(m) for m in df["mask"]]))
    model, report = train_parser(images, masks, num_regions=len(REGIONS),
                                 epochs=section.parsing_epochs, lr=section.lr,
                                 batch_size=section.batch_size, seed=cfg.run.seed, log=log)
    out = root.child(STAGE_FOLDER, "parsing")
    save_parser(model, out)
    return {"kind": "self_trained", "uri": out.uri, "in_run_root": f"{STAGE_FOLDER}/parsing",
            "report": report, "note": "no face-parsing file configured: parser trained on the mask column"}


def run_lossnets(cfg: Config, root: RunRoot) -> dict:
    import logging

    log = logging.getLogger(__name__).info
    check_manifest(root.manifest, "lossnets", ("sample_id", "split", "image"))
    identity = _identity_record(cfg, root, log)
    parsing = _parsing_record(cfg, root, log)
    identity_net = load_identity(identity, root.options)
    perceptual = perceptual_distance(cfg, identity_net, root.options)
    record = {"identity": identity, "parsing": parsing,
              "perceptual": {"name": perceptual.name, "net": cfg.lossnets.lpips_net,
                             "backbone_uri": cfg.lossnets.lpips_backbone_uri}}
    root.child(STAGE_FOLDER, RECORD).write_json(record)
    return {"identity": identity["kind"], "parsing": parsing["kind"] if parsing else None,
            "perceptual": perceptual.name,
            "identity_report": identity.get("report"),
            "parsing_report": parsing.get("report") if parsing else None}
