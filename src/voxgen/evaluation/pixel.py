"""Paired pixel metrics on volumes: PSNR, SSIM and MS-SSIM with 3D windows.

All take `pred` and `target` as tensors (B, C, D, H, W) of the same shape and return one value
per volume, (B,) float64. `data_range` is always explicit: a model-space image in [-1, 1] has
data_range = 2. The SSIM window is 3D (a separable Gaussian of `win_size` voxels per axis), as
in Wang et al. 2004 extended to volumes; the statistics use population (not sample) covariance,
which is what scikit-image's `structural_similarity(..., use_sample_covariance=False)` does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from voxgen.errors import VoxgenError

# Wang, Simoncelli & Bovik 2003: the exponents of the five scales of MS-SSIM.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


class VolumeTooSmall(VoxgenError):
    """A volume is smaller than a metric's window at its coarsest scale."""


def _check_pair(pred: torch.Tensor, target: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.ndim != 5:
        raise VoxgenError(f"{metric}: volumes must be (B, C, D, H, W), got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise VoxgenError(f"{metric}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return pred, target


def _check_range(data_range: float, metric: str) -> float:
    if not data_range or data_range <= 0:
        raise VoxgenError(f"{metric}: data_range must be a positive number (2 for images in [-1, 1]), got {data_range}")
    return float(data_range)


def psnr(pred: torch.Tensor, target: torch.Tensor, *, data_range: float) -> np.ndarray:
    """(B,) peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE), the MSE over all
    channels and voxels of each volume; identical volumes give +inf."""
    from monai.metrics import PSNRMetric

    pred, target = _check_pair(pred, target, "PSNR")
    data_range = _check_range(data_range, "PSNR")
    metric = PSNRMetric(max_val=data_range, reduction="none")
    # float64 so that the value is the formula's to the last digit, not float32's.
    return metric(pred.double(), target.double()).reshape(-1).cpu().numpy()


def _window(win_size: int, sigma: float, ndim: int = 3) -> tuple[tuple[int, ...], tuple[float, ...]]:
    if win_size < 1 or win_size % 2 == 0:
        raise VoxgenError(f"SSIM: win_size must be a positive odd number, got {win_size}")
    return (int(win_size),) * ndim, (float(sigma),) * ndim


def _check_window(shape: Sequence[int], win_size: int, metric: str) -> None:
    if min(shape) < win_size:
        raise VolumeTooSmall(f"{metric}: volumes {list(shape)} are smaller than the {win_size}-voxel window "
                             f"(minimum {win_size} voxels per axis)")


def ssim(pred: torch.Tensor, target: torch.Tensor, *, data_range: float, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """(B,) mean SSIM over the voxels where the whole 3D window fits (no padding) and over channels."""
    from monai.metrics.regression import compute_ssim_and_cs

    pred, target = _check_pair(pred, target, "SSIM")
    data_range = _check_range(data_range, "SSIM")
    _check_window(pred.shape[2:], win_size, "SSIM")
    size, sigmas = _window(win_size, sigma)
    ssim_map, _ = compute_ssim_and_cs(pred.float(), target.float(), spatial_dims=3, kernel_size=size,
                                      kernel_sigma=sigmas, data_range=data_range, k1=k1, k2=k2)
    return ssim_map.reshape(len(pred), -1).mean(dim=1).double().cpu().numpy()


def ms_ssim_min_size(win_size: int = 11, scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """Smallest edge (voxels) a volume needs for MS-SSIM: the window must fit after scales - 1 halvings."""
    return int(win_size) * 2 ** (int(scales) - 1)


def ms_ssim(pred: torch.Tensor, target: torch.Tensor, *, data_range: float, win_size: int = 11, sigma: float = 1.5,
            weights: Sequence[float] = MS_SSIM_WEIGHTS, k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """(B,) multi-scale SSIM (Wang et al. 2003) with 3D windows: contrast-structure at every scale,
    full SSIM at the coarsest, each to the power of its weight; volumes are halved by 2x2x2
    average pooling between scales.

    MONAI's `compute_ms_ssim` computes the same thing, but its size check divides by
    (scales - 1)^2 instead of 2^(scales - 1) and so rejects volumes that fit (or accepts ones that
    do not) unless there are exactly 3 or 5 scales; hence the loop here over MONAI's per-scale
    `compute_ssim_and_cs`, which is exact. Raises VolumeTooSmall naming the minimum size.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    pred, target = _check_pair(pred, target, "MS-SSIM")
    data_range = _check_range(data_range, "MS-SSIM")
    if len(weights) < 1:
        raise VoxgenError("MS-SSIM: needs at least one scale weight")
    minimum = ms_ssim_min_size(win_size, len(weights))
    shape = list(pred.shape[2:])
    if min(shape) < minimum:
        raise VolumeTooSmall(f"MS-SSIM: volumes {shape} are too small for {len(weights)} scales with a "
                             f"{win_size}-voxel window: every axis needs at least {minimum} voxels")
    size, sigmas = _window(win_size, sigma)
    x, y = pred.float(), target.float()  # MONAI computes in float32 whatever it is given
    factors = []
    for scale in range(len(weights)):
        ssim_map, cs_map = compute_ssim_and_cs(x, y, spatial_dims=3, kernel_size=size, kernel_sigma=sigmas,
                                               data_range=data_range, k1=k1, k2=k2)
        last = scale == len(weights) - 1
        value = (ssim_map if last else cs_map).reshape(len(x), -1).mean(dim=1)
        # relu as in MONAI and pytorch-msssim: a negative term to a fractional power is undefined.
        factors.append(torch.relu(value))
        if not last:
            x, y = torch.nn.functional.avg_pool3d(x, 2), torch.nn.functional.avg_pool3d(y, 2)
    w = torch.tensor(weights, dtype=torch.float64)
    return torch.prod(torch.stack(factors).double() ** w[:, None], dim=0).cpu().numpy()
