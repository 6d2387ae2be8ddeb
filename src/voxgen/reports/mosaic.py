"""Slice mosaics: axial, coronal and sagittal mid-slices of volumes, as one picture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from voxgen.reports import save_png


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of a (D, H, W) RAS volume, shown upright.

    D is the inferior->superior axis, H posterior->anterior, W left->right (RAS).
    """
    d, h, w = volume.shape
    axial = volume[d // 2]  # (H, W): rows posterior->anterior
    coronal = volume[:, h // 2, :]  # (D, W): rows inferior->superior
    sagittal = volume[:, :, w // 2]  # (D, H)
    # Flip rows so anterior / superior is at the top, as radiologists view them.
    return [axial[::-1], coronal[::-1], sagittal[::-1]]


def mosaic_array(volumes: Sequence[np.ndarray], value_range=(-1.0, 1.0)) -> np.ndarray:
    """One grey image (rows = volumes, columns = the three planes), scaled to [0, 1]."""
    lo, hi = value_range
    rows = []
    for volume in volumes:
        planes = [np.clip((p - lo) / (hi - lo), 0.0, 1.0) for p in mid_slices(np.asarray(volume, dtype=np.float32))]
        height = max(p.shape[0] for p in planes)
        padded = [np.pad(p, ((0, height - p.shape[0]), (0, 1)), constant_values=0.0) for p in planes]
        rows.append(np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 1), (0, width - r.shape[1])), constant_values=0.0) for r in rows]
    return np.concatenate(rows, axis=0)


def save_mosaic(
    path: str | Path,
    volumes: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    value_range=(-1.0, 1.0),
    overlays: Sequence[np.ndarray | None] | None = None,
) -> Path:
    """Write a PNG with one row per volume: axial | coronal | sagittal mid-slices.

    `overlays` are optional masks (same shape as each volume) drawn in red.
    The file appears whole or not at all.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(volumes)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for row, volume in enumerate(volumes):
        planes = mid_slices(np.asarray(volume, dtype=np.float32))
        masks = mid_slices(np.asarray(overlays[row]) > 0) if overlays is not None and overlays[row] is not None else None
        for col, plane in enumerate(planes):
            ax = axes[row][col]
            ax.imshow(plane, cmap="gray", vmin=value_range[0], vmax=value_range[1], interpolation="nearest")
            if masks is not None and masks[col].any():
                ax.contour(masks[col], levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(["axial", "coronal", "sagittal"][col], fontsize=9)
        if titles is not None:
            axes[row][0].set_ylabel(titles[row], fontsize=8)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)
