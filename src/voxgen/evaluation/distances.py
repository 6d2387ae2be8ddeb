"""Distribution distances between sets of volumes that need no feature extractor.

- Intensity distance: the 1-D Wasserstein distance between the voxel intensities of the
  generated and the real volumes, inside a head mask derived from the real ones.
- Lesion-volume distance: the 1-D Wasserstein distance between the per-volume lesion
  volume fractions (voxels > 0 in model space / all voxels).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance

# In model space background is -1; anything clearly above it is head.
HEAD_THRESHOLD = -0.9


def head_mask(reals: np.ndarray, threshold: float = HEAD_THRESHOLD) -> np.ndarray:
    """(D, H, W) bool: voxels above background in at least half of the real volumes (N, D, H, W)."""
    return (np.asarray(reals) > threshold).mean(axis=0) >= 0.5


def intensity_w1(samples: np.ndarray, reals: np.ndarray, mask: np.ndarray | None = None) -> float:
    """W1 between voxel intensities of samples (N, D, H, W) and reals (M, D, H, W) inside `mask`."""
    mask = head_mask(reals) if mask is None else mask
    return float(wasserstein_distance(np.asarray(samples)[:, mask].ravel(), np.asarray(reals)[:, mask].ravel()))


def lesion_fractions(masks: np.ndarray) -> np.ndarray:
    """(N,) fraction of voxels > 0 in each mask (N, D, H, W) given in model space {-1, 1}."""
    masks = np.asarray(masks)
    return (masks > 0).reshape(len(masks), -1).mean(axis=1)


def lesion_fraction_w1(samples: np.ndarray, reals: np.ndarray) -> float:
    return float(wasserstein_distance(lesion_fractions(samples), lesion_fractions(reals)))
