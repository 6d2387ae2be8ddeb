"""Paired pixel metrics on volumes: PSNR, SSIM and MS-SSIM with 3D windows.

All take `pred` and `target` as tensors (B, C, D, H, W) of the same shape and return one value
per volume, (B,) float64. `data_range` is always explicit: a model-space image in [-1, 1] has
data_range = 2. The SSIM window is 3D (a separable Gaussian of `win_size` voxels per axis), as
in Wang et al. 2004 extended to volumes; the statistics use population (not sample) covariance,
which is what scikit-image's `structural_similarity(..., use_sample_covariance=False)` does.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        raise VolumeTooSmall(
            f"{metric}: volumes {list(shape)} are smaller than the {win_size}-voxel window (minimum {win_size} voxels per axis)"
        )


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    data_range: float,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """(B,) mean SSIM over the voxels where the whole 3D window fits (no padding) and over channels."""
    from monai.metrics.regression import compute_ssim_and_cs

    pred, target = _check_pair(pred, target, "SSIM")
    data_range = _check_range(data_range, "SSIM")
    _check_window(pred.shape[2:], win_size, "SSIM")
    size, sigmas = _window(win_size, sigma)
    ssim_map, _ = compute_ssim_and_cs(
        pred.float(), target.float(), spatial_dims=3, kernel_size=size, kernel_sigma=sigmas, data_range=data_range, k1=k1, k2=k2
    )
    return ssim_map.reshape(len(pred), -1).mean(dim=1).double().cpu().numpy()


def ms_ssim_min_size(win_size: int = 11, scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """Smallest edge (voxels) a volume needs for MS-SSIM: the window must fit after scales - 1 halvings."""
    return int(win_size) * 2 ** (int(scales) - 1)


def ms_ssim_scales(shape: Sequence[int], win_size: int = 11) -> int:
    """Number of scales (1..5) MS-SSIM uses on volumes of spatial `shape` (D, H, W) with its default
    weights: the largest s for which min(shape) >= win_size * 2^(s - 1), so that the window still fits
    after s - 1 halvings (floor halving keeps that true: n >= w 2^k implies floor(n / 2^k) >= w).
    176 voxels give 5 scales with the 11-voxel window, 160 give 4, 11 give 1.

    Raises VolumeTooSmall when not even one scale fits (min(shape) < win_size).
    """
    shape = [int(n) for n in shape]
    if min(shape) < win_size:
        raise VolumeTooSmall(
            f"MS-SSIM: volumes {shape} are smaller than the {win_size}-voxel window: "
            f"every axis needs at least {win_size} voxels for one scale"
        )
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and min(shape) >= ms_ssim_min_size(win_size, scales + 1):
        scales += 1
    return scales


def ms_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    data_range: float,
    win_size: int = 11,
    sigma: float = 1.5,
    weights: Sequence[float] | None = None,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """(B,) multi-scale SSIM (Wang et al. 2003) with 3D windows: contrast-structure at every scale,
    full SSIM at the coarsest, each to the power of its weight; volumes are halved by 2x2x2
    average pooling between scales.

    Without `weights`, the scales are the first `ms_ssim_scales(shape, win_size)` of the five, with
    the Wang et al. weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) cut to that many and
    renormalised to sum to 1 (what users of MONAI and pytorch-msssim do by passing fewer weights):
    all five, as published, on volumes of at least 176 voxels per axis with the 11-voxel window, 4 on the seeds'
    160 x 256 x 256 volumes, and a single one (the mean SSIM, floored at 0) down to the window itself. Values with
    fewer scales are not comparable with five-scale values. Explicit `weights` are used as given,
    one scale each, without renormalisation, and volumes too small for that many scales raise
    VolumeTooSmall naming the minimum size (`ms_ssim_min_size`).

    MONAI's `compute_ms_ssim` computes the same thing, but its size check divides by
    (scales - 1)^2 instead of 2^(scales - 1) and so rejects volumes that fit (or accepts ones that
    do not) unless there are exactly 3 or 5 scales; hence the loop here over MONAI's per-scale
    `compute_ssim_and_cs`, which is exact.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    pred, target = _check_pair(pred, target, "MS-SSIM")
    data_range = _check_range(data_range, "MS-SSIM")
    size, sigmas = _window(win_size, sigma)
    shape = list(pred.shape[2:])
    if weights is None:
        scales = ms_ssim_scales(shape, win_size)
        weights = MS_SSIM_WEIGHTS[:scales]
        if scales < len(MS_SSIM_WEIGHTS):
            # Only when cut: the published five sum to 1.0001, and five scales must give the value
            # MONAI's and pytorch-msssim's defaults give.
            weights = [w / sum(weights) for w in weights]
    if len(weights) < 1:
        raise VoxgenError("MS-SSIM: needs at least one scale weight")
    minimum = ms_ssim_min_size(win_size, len(weights))
    if min(shape) < minimum:
        raise VolumeTooSmall(
            f"MS-SSIM: volumes {shape} are too small for {len(weights)} scales with a "
            f"{win_size}-voxel window: every axis needs at least {minimum} voxels"
        )
    x, y = pred.float(), target.float()  # MONAI computes in float32 whatever it is given
    factors = []
    for scale in range(len(weights)):
        ssim_map, cs_map = compute_ssim_and_cs(
            x, y, spatial_dims=3, kernel_size=size, kernel_sigma=sigmas, data_range=data_range, k1=k1, k2=k2
        )
        last = scale == len(weights) - 1
        value = (ssim_map if last else cs_map).reshape(len(x), -1).mean(dim=1)
        # relu as in MONAI and pytorch-msssim: a negative term to a fractional power is undefined.
        factors.append(torch.relu(value))
        if not last:
            x, y = torch.nn.functional.avg_pool3d(x, 2), torch.nn.functional.avg_pool3d(y, 2)
    w = torch.tensor(weights, dtype=torch.float64)
    return torch.prod(torch.stack(factors).double() ** w[:, None], dim=0).cpu().numpy()
