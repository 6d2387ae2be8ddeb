"""Mask metrics: Dice, HD95, lesion counts and sizes.

Masks are always thresholded before anything is compared: a generated mask is a soft value, and
comparing soft values with binary masks measures nothing (a bug the seeds' evaluation had).
`binarize` is the one place that decides: model space ({-1, 1}, soft values in [-1, 1]) is
thresholded at 0; probability space ([0, 1], e.g. after a sigmoid) at 0.5. The two are the same
threshold, since model = 2 p - 1.

Masks are (N, D, H, W) arrays (or (D, H, W) for one); `spacing` is the voxel size along (D, H, W)
in mm, so HD95 is in mm and lesion volumes in mm^3.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from voxgen.errors import VoxgenError

THRESHOLDS = {"model": 0.0, "probability": 0.5}
# 26-connectivity (faces, edges and corners), as in the lesion-wise BraTS 2023 metrics: two voxels
# touching only at a corner belong to the same lesion.
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


def binarize(masks, space: str = "model") -> np.ndarray:
    """bool array: masks > 0 (space="model") or > 0.5 (space="probability")."""
    if space not in THRESHOLDS:
        raise VoxgenError(f"mask space must be one of {', '.join(THRESHOLDS)}, got '{space}'")
    masks = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    return masks > THRESHOLDS[space]


def _batch(pred, target, space: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    pred, target = binarize(pred, space), binarize(target, space)
    if pred.shape != target.shape:
        raise VoxgenError(f"{metric}: masks {pred.shape} and {target.shape} differ in shape")
    if pred.ndim == 3:
        pred, target = pred[None], target[None]
    if pred.ndim != 4:
        raise VoxgenError(f"{metric}: masks must be (N, D, H, W), got shape {pred.shape}")
    return pred, target


def dice(pred, target, space: str = "model") -> np.ndarray:
    """(N,) Dice 2|A & B| / (|A| + |B|) per mask pair; 1 when both are empty (they agree)."""
    from monai.metrics import compute_dice

    p, t = _batch(pred, target, space, "Dice")
    value = compute_dice(
        torch.from_numpy(p[:, None]).float(), torch.from_numpy(t[:, None]).float(), include_background=True, ignore_empty=False
    )
    return value.reshape(-1).double().numpy()


def hd95(pred, target, spacing: Sequence[float] = (1.0, 1.0, 1.0), space: str = "model") -> np.ndarray:
    """(N,) 95th-percentile Hausdorff distance in mm per mask pair (MONAI's definition): the larger
    of the two directed 95th percentiles of distances between boundary voxels. 0 when both masks
    are empty, +inf when exactly one is."""
    from monai.metrics import compute_hausdorff_distance

    p, t = _batch(pred, target, space, "HD95")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise VoxgenError(f"HD95: spacing must be three positive sizes (D, H, W) in mm, got {spacing}")
    out = np.empty(len(p))
    for i, (a, b) in enumerate(zip(p, t)):
        if not a.any() or not b.any():
            out[i] = 0.0 if a.any() == b.any() else np.inf
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[i] = float(
                compute_hausdorff_distance(
                    torch.from_numpy(a[None, None]),
                    torch.from_numpy(b[None, None]),
                    include_background=True,
                    percentile=95,
                    spacing=spacing,
                )
            )
    return out


@dataclass(frozen=True)
class Lesions:
    """Connected components of one mask: sizes in voxels and mm^3, largest first."""

    voxels: np.ndarray
    mm3: np.ndarray

    @property
    def count(self) -> int:
        return len(self.voxels)


def lesions(mask, spacing: Sequence[float] = (1.0, 1.0, 1.0), space: str = "model") -> Lesions:
    """The lesions of one mask (D, H, W): 26-connected components of the thresholded mask."""
    m = binarize(mask, space)
    if m.ndim != 3:
        raise VoxgenError(f"lesions: a mask must be (D, H, W), got shape {m.shape}")
    labels, count = ndimage.label(m, structure=CONNECTIVITY)
    sizes = np.sort(np.bincount(labels.ravel(), minlength=count + 1)[1:])[::-1]
    return Lesions(sizes, sizes * float(np.prod(spacing)))


@dataclass(frozen=True)
class LesionStats:
    """Lesion statistics of a set of masks."""

    counts: np.ndarray  # (N,) lesions per mask
    sizes_mm3: np.ndarray  # every lesion of every mask

    @property
    def mean_count(self) -> float:
        return float(self.counts.mean()) if len(self.counts) else float("nan")

    @property
    def median_size_mm3(self) -> float:
        return float(np.median(self.sizes_mm3)) if len(self.sizes_mm3) else float("nan")


def lesion_stats(masks, spacing: Sequence[float] = (1.0, 1.0, 1.0), space: str = "model") -> LesionStats:
    """Counts and sizes of the lesions of masks (N, D, H, W)."""
    found = [lesions(m, spacing, space) for m in masks]
    sizes = np.concatenate([f.mm3 for f in found]) if found else np.zeros(0)
    return LesionStats(np.array([f.count for f in found], dtype=np.float64), sizes)
