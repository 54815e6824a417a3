"""The distribution a generator draws its semantic codes z from.

A DiffAE decodes (z, x_T, label) to an image; to *sample* it needs a z. The official DiffAE
trains a second, latent DDIM on z for that. We fit a diagonal Gaussian to the z = E(x) of the
images a generator was fitted on (its cell, or its k-means cluster) instead: no extra network to
train per group, nothing learnt beyond the first two moments (so it cannot memorise the few
images of a small group), and it is exactly what the official code's z normalisation
(`conds_mean` / `conds_std`) assumes of z. Its cost: correlations between z dimensions are
dropped, so samples are less varied and less coherent than a latent DDIM's would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_STD = 1e-4  # a dimension constant over a tiny set still gets some spread


@dataclass(frozen=True)
class ZPrior:
    mean: np.ndarray  # (d,)
    std: np.ndarray  # (d,)
    count: int  # images it was fitted on

    @classmethod
    def fit(cls, z: np.ndarray, spread_from: ZPrior | None = None) -> ZPrior:
        """Per-dimension mean and unbiased std of z (N, d); N >= 2, or N = 1 with `spread_from`,
        a wider prior (the cell's label) that lends its std: at severity 0.99 a minority cell
        or a k-means cluster can hold one image, whose code is then the mean."""
        z = np.asarray(z, dtype=np.float64)
        if z.ndim == 2 and len(z) == 1 and spread_from is not None:
            return cls(z[0], spread_from.std.copy(), 1)
        if z.ndim != 2 or len(z) < 2:
            raise ValueError(f"a z prior needs at least 2 codes (N, d), got shape {z.shape}"
                             + ("" if spread_from is None else " and 1 with a prior to lend "
                                "its spread"))
        return cls(z.mean(0), np.maximum(z.std(0, ddof=1), MIN_STD), len(z))

    def sample(self, n: int, generator=None):
        """(n, d) float32 torch codes; `generator` a torch.Generator (CPU) for reproducibility."""
        import torch

        eps = torch.randn((n, len(self.mean)), generator=generator)
        return (torch.from_numpy(self.mean).float() + eps * torch.from_numpy(self.std).float())

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "count": self.count}

    @classmethod
    def from_dict(cls, data: dict) -> ZPrior:
        return cls(np.asarray(data["mean"], dtype=np.float64),
                   np.asarray(data["std"], dtype=np.float64), int(data["count"]))
