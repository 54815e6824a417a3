"""(label, group) cells: the unit the generators are fitted on and synthesis balances.

In:  a manifest folder's rows of one split: sample_id, image (PNG bytes), label, group.
     `group` is whatever the data names it (synthfaces' skin-tone group, or the biased split's
     (label, spurious) cell); a cell is the pair (label, group) either way, so a group column
     that already holds the label gives one cell per group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from diffinf_ray.storage import Location

COLUMNS = ("sample_id", "image", "label", "group")


@dataclass(frozen=True, order=True)
class Cell:
    label: int
    group: str

    @property
    def name(self) -> str:
        """A file- and id-safe name: y<label>-<group with unsafe characters as '_'>."""
        return f"y{self.label}-{re.sub(r'[^A-Za-z0-9._=+]', '_', self.group)}"


@dataclass
class CellRows:
    """The rows of one cell, in sample_id order."""

    cell: Cell
    sample_ids: list[str]
    images: list[bytes]


def read_cells(manifest: Location, split: str = "train") -> dict[Cell, CellRows]:
    """Every (label, group) cell of `split`, sorted; rows without a group are refused."""
    from diffinf_ray.datasets import check_manifest, read_split

    check_manifest(manifest, "fairness generators", COLUMNS)
    df = read_split(manifest, split, ["image", "label", "group"])
    if df["group"].isna().any():
        raise ValueError(f"{manifest.display}: {int(df['group'].isna().sum())} {split} rows "
                         "have no group; the generators need one per row")
    return cells_of(df["sample_id"].tolist(), df["image"].tolist(),
                    df["label"].to_numpy(), df["group"].astype(str).tolist())


def cells_of(sample_ids, images, labels, groups) -> dict[Cell, CellRows]:
    """Rows grouped into cells (the order of rows within a cell is kept)."""
    out: dict[Cell, CellRows] = {}
    for sid, image, label, group in zip(sample_ids, images, labels, groups, strict=True):
        cell = Cell(int(label), str(group))
        out.setdefault(cell, CellRows(cell, [], [])).sample_ids.append(str(sid))
        out[cell].images.append(image)
    return dict(sorted(out.items()))


def to_tensor(images: list[bytes]):
    """PNG bytes -> float32 torch (N, 3, H, W) in [-1, 1]."""
    import torch

    from diffinf_ray.data.images import to_tensor_batch

    return torch.from_numpy(np.ascontiguousarray(to_tensor_batch(images)))
