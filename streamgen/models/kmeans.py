"""k-means quantizer: features -> nearest centroid index (discrete units)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class KMeansQuantizer(nn.Module):
    def __init__(self, centroids: Tensor):
        super().__init__()
        if centroids.dim() != 2 or centroids.shape[0] < 1:
            raise ValueError(f"centroids must be [K, D] with K >= 1, got {tuple(centroids.shape)}")
        if not centroids.is_meta and not torch.isfinite(centroids).all():  # (a skeleton's centroids have no values)
            raise ValueError("centroids contain NaN or inf")
        self.register_buffer("centroids", centroids.float().clone())  # [K, D]

    @property
    def num_units(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def forward(self, feats: Tensor) -> Tensor:
        """feats [..., D] -> units [...] (long). argmin_k |x - c_k|^2 = argmin_k |c_k|^2 - 2 x.c_k,
        computed in fp32 whatever the features' dtype."""
        if feats.shape[-1] != self.dim:
            raise ValueError(f"features have size {feats.shape[-1]}, centroids {self.dim}")
        x = feats.reshape(-1, self.dim).float()
        c = self.centroids
        dist = (c * c).sum(-1)[None, :] - 2.0 * (x @ c.T)  # [N, K]
        return dist.argmin(-1).reshape(feats.shape[:-1])

    def distance(self, feats: Tensor) -> Tensor:
        """feats [..., D] -> the Euclidean distance to the nearest centroid [...] (how well the codebook fits)."""
        x = feats.float()
        return torch.cdist(x.reshape(-1, self.dim), self.centroids).min(-1).values.reshape(feats.shape[:-1])


def dedup(units: Tensor) -> tuple[Tensor, Tensor]:
    """Collapse runs of a repeated unit: [5,5,7,7,7,5] -> units [5,7,5], durations [2,3,1]."""
    if units.dim() != 1:
        raise ValueError(f"dedup takes a 1-D unit sequence, got shape {tuple(units.shape)}")
    out, counts = torch.unique_consecutive(units, return_counts=True)
    return out, counts


def dedup_continuing(frame_units: Tensor, previous: int | None) -> tuple[Tensor, Tensor]:
    """De-duplicate the next chunk of a stream's frame units: (units, index of each one's first
    frame in the chunk). A run that continues the previous chunk's last unit is not repeated.
    (On the host, in numpy: a few units per session and tick, where torch's per-operator cost is most
    of the time.)"""
    u = frame_units.cpu().numpy()
    starts = np.ones(len(u), dtype=bool)
    starts[1:] = u[1:] != u[:-1]
    if previous is not None and len(u) and u[0] == previous:
        starts[0] = False
    idx = np.flatnonzero(starts)
    return torch.from_numpy(u[idx]), torch.from_numpy(idx)
