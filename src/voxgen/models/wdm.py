"""`model.name=wdm`: a UNet on the 8 Haar wavelet sub-bands of the volume.

WDM (Friedrich et al. 2024, "WDM: 3D Wavelet Diffusion Models for High-Resolution Medical
Image Synthesis") runs diffusion on the coefficients of a one-level 3D Haar transform:
every (2, 2, 2) block of voxels becomes 8 sub-band channels (LLL ... HHH), so the network
works at half the resolution on 8x the channels, with no attention at the large early
levels.

Here the transform is part of the network: f(x) = IDWT(UNet(DWT(x))). With the
orthonormal Haar transform this is the same model as diffusion in wavelet space: the DWT
is linear and orthogonal, so it maps x_t = (1 - t) x0 + t noise to the same interpolation of
the transformed data and transformed noise, the transformed Gaussian noise is again
standard Gaussian, and the MSE of a prediction is the same in both domains. Use it with
`space=pixel`; a wavelet *space* would transform a second time.

The UNet is MONAI's DiffusionModelUNet (see `voxgen.models.unet`) with the seeds' WDM
configurations, e.g. channels [64, 128, 128, 256, 256] (WDM's channel_mult 1,2,2,4,4 on
64), num_res_blocks 2, attention off or at the two deepest levels. For bravo (2 in, 1 out)
it sees 16 sub-band channels in and 8 out, as in the seeds' profiles, and reproduces their
parameter counts (74M, 77M, 268M, 279M, 639M).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import check_divisible
from voxgen.models.unet import build_unet

SUBBANDS = 8
_ROOT_HALF = 1.0 / math.sqrt(2.0)


def haar_dwt3d(x: torch.Tensor) -> torch.Tensor:
    """One-level orthonormal 3D Haar transform: (B, C, D, H, W) -> (B, 8 C, D/2, H/2, W/2).

    Channel 8 c + k holds sub-band k of input channel c, k = 4 i + 2 j + l with i, j, l
    the D, H, W bands (0 low, 1 high): k = 0 is LLL, the block average times 2^1.5.
    Written as sums and differences rather than a matmul so it stays exact under autocast.
    """
    b, c, d, h, w = x.shape
    y = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, C, 2, 2, 2, d, h, w)
    for axis in (2, 3, 4):
        even, odd = y.unbind(axis)
        y = torch.stack([(even + odd) * _ROOT_HALF, (even - odd) * _ROOT_HALF], dim=axis)  # low, high
    return y.reshape(b, c * SUBBANDS, d // 2, h // 2, w // 2)  # (B, 8C, d, h, w)


def haar_idwt3d(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `haar_dwt3d`: (B, 8 C, d, h, w) -> (B, C, 2 d, 2 h, 2 w)."""
    b, c8, d, h, w = z.shape
    y = z.reshape(b, c8 // SUBBANDS, 2, 2, 2, d, h, w)
    for axis in (2, 3, 4):
        low, high = y.unbind(axis)
        y = torch.stack([(low + high) * _ROOT_HALF, (low - high) * _ROOT_HALF], dim=axis)  # even, odd
    y = y.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, d, 2, h, 2, w, 2)
    return y.reshape(b, c8 // SUBBANDS, 2 * d, 2 * h, 2 * w)


class WaveletUNet(nn.Module):
    """f(x, t[, vector]): x (B, C_in, D, H, W), t (B,) model time, vector (B, K) when built with
    vector_size > 0 -> (B, C_out, D, H, W) via sub-bands."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
        bands = haar_dwt3d(x)  # (B, 8 C_in, D/2, H/2, W/2)
        return haar_idwt3d(self.unet(bands, t, vector))  # (B, 8 C_out, ...) -> (B, C_out, D, H, W)


def check_wdm_config(cfg, shape: Sequence[int]) -> None:
    """Shape divisible by the transform and the UNet; attention only at the two deepest levels."""
    levels = len(cfg.channels)
    factor = 2**levels  # one halving by the transform, levels - 1 inside the UNet
    check_divisible(
        shape,
        factor,
        f": wdm halves it once by the Haar transform and {levels - 1} times in a {levels}-level UNet",
        by=f"2^{levels}={factor}",
    )
    early = [i for i, on in enumerate(cfg.attention_levels) if on and i < levels - 2]
    if early:
        # The seeds' wavelet profiles: attention above the two deepest levels runs out of memory.
        raise ConfigError(
            f"model.attention_levels turns on attention at level(s) {early}; wdm allows it only at the two "
            f"deepest levels ({levels - 2} and {levels - 1})"
        )


def build_wdm(
    cfg, *, in_channels: int, out_channels: int, shape: Sequence[int], grad_checkpointing: bool, vector_size: int = 0
) -> nn.Module:
    """The factory of `wdm` (registered in `voxgen.models`)."""
    check_wdm_config(cfg, shape)
    half = tuple(int(s) // 2 for s in shape)  # [D/2, H/2, W/2]: the grid of the sub-bands
    unet = build_unet(
        cfg,
        in_channels=SUBBANDS * in_channels,
        out_channels=SUBBANDS * out_channels,
        shape=half,
        grad_checkpointing=grad_checkpointing,
        vector_size=vector_size,
    )
    return WaveletUNet(unet)
