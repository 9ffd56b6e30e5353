"""Selecting and running sets of attacks (the rows of the reproduce and audit reports)."""

from __future__ import annotations

import numpy as np

from medadv.data import ImageSet


def stratified_subset(data: ImageSet, n: int, seed: int) -> ImageSet:
    """A seeded subset of ``n`` images keeping the class proportions (all images if n >= len)."""
    if n >= len(data):
        return data
    rng = np.random.default_rng(seed)
    picked = []
    for cls in (0, 1):
        idx = np.flatnonzero(data.labels == cls)
        k = int(round(n * len(idx) / len(data)))
        picked.append(rng.permutation(idx)[:k])
    return data.subset(np.sort(np.concatenate(picked)))
