"""Edit methods by name: `edit.method` in the config picks one, the edit stage builds it.

    edit_method(name) -> EditMethod        an unknown name is a ValueError listing the choices
    method.build(parts, section, directions) -> editor with
        edit(images, labels, return_latents=False) -> dict   (editor.LatentEditor's outputs)

- `latent`: optimise z / x_T through the differentiable DDIM decode (editor.LatentEditor);
- `guided`: gradient-free, null-label partial inversion + label-guided decode + a class shift
  of z, the closest of a few candidates kept (guided.GuidedEditor). Needs the class directions
  in z (`needs_directions`), which the stage fits once per run.
- `oracle_repair` (synthfaces only): each flagged face drawn again with its label's attribute
  and everything else kept (oracle_repair.OracleRepairEditor): the ceiling for any editor.
  Edits by sample id (`needs_sample_ids`: `edit(images, labels, sample_ids)`).

Torch-free at import: config.py checks `edit.method` against `EDIT_METHODS`; a builder imports
its editor only when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EditorParts:
    """The frozen networks every method edits with (loaded once by the stage)."""

    autoencoder: Any  # diffae.autoencoder.DiffusionAutoencoder
    classifier: Any  # g(x)
    predictor: Any  # h_w
    losses: Any  # edit.losses.EditLosses
    device: str
    synthfaces: Any = None  # the run's data.synthfaces.SynthFacesSpec (synthetic data only)


@dataclass(frozen=True)
class EditMethod:
    name: str
    build: Callable[[EditorParts, Any, Any], Any]  # (parts, config.EditSection, directions)
    needs_directions: Callable[[Any], bool] = lambda section: False
    needs_labels: bool = False  # only for a label-conditional autoencoder
    needs_sample_ids: bool = False  # edit(images, labels, sample_ids)
    needs_autoencoder: bool = True  # False: the edit stage then neither reads nor loads it


def _build_latent(parts: EditorParts, section, directions=None):
    from diffinf_ray.edit.editor import EditSettings, LatentEditor

    return LatentEditor(parts.autoencoder, parts.classifier, parts.predictor, parts.losses,
                        w_si=section.w_si, settings=EditSettings.from_section(section),
                        device=parts.device)


def _build_guided(parts: EditorParts, section, directions=None):
    from diffinf_ray.edit.guided import GuidedEditor, GuidedSettings

    settings = GuidedSettings.from_section(section)
    return GuidedEditor(parts.autoencoder, parts.classifier, parts.predictor, parts.losses,
                        w_si=section.w_si, settings=settings,
                        directions=directions if settings.alpha > 0 else None,
                        device=parts.device)


def _build_oracle_repair(parts: EditorParts, section, directions=None):
    from diffinf_ray.edit.oracle_repair import OracleRepairEditor

    return OracleRepairEditor(parts.synthfaces, parts.classifier, parts.predictor, parts.losses,
                              w_si=section.w_si, seed=section.seed, device=parts.device)


EDIT_METHODS: dict[str, EditMethod] = {m.name: m for m in (
    EditMethod("latent", _build_latent),
    EditMethod("guided", _build_guided, needs_directions=lambda s: s.guided.alpha > 0,
               needs_labels=True),
    EditMethod("oracle_repair", _build_oracle_repair, needs_sample_ids=True,
               needs_autoencoder=False),
)}


def methods_needing_autoencoder() -> frozenset[str]:
    """The methods under which the edit stage reads the autoencoder stage (stage_registry)."""
    return frozenset(m.name for m in EDIT_METHODS.values() if m.needs_autoencoder)


def edit_method(name: str) -> EditMethod:
    """The registered method `name`."""
    if name not in EDIT_METHODS:
        raise ValueError(f"unknown edit method {name!r}; choose one of {', '.join(EDIT_METHODS)}")
    return EDIT_METHODS[name]
