"""The 3D autoencoder of seed 003 (CT enhancement, "video-to-video"): 8x in H and W, none in T.

The seed's "VAE Architecture" section and its building blocks, at its widths [128, 256, 512, 512]:

    encoder: conv_in (C_in -> 128)
             3 down blocks: num_res_blocks x ResBlock3D(C_i), Downsample C_i -> C_{i+1}
                            (Conv3d kernel (3, 4, 4), stride (1, 2, 2), padding 1 + GroupNorm + SiLU)
             middle: num_res_blocks x ResBlock3D(512)
             conv_out 1x1x1 (512 -> latent 4)                 (B, C_in, T, H, W) -> (B, 4, T, H/8, W/8)
    decoder: conv_in (4 -> 512), middle: num_res_blocks x ResBlock3D(512)
             3 up blocks: Upsample C_i -> C_{i-1} (ConvTranspose3d kernel (3, 4, 4), stride (1, 2, 2),
                          padding 1 + GroupNorm + SiLU), num_res_blocks x ResBlock3D(C_{i-1})
             conv_out kernel 3 (128 -> C_out)                 (B, 4, T, H/8, W/8) -> (B, C_out, T, H, W)

Despite the seed's name it is deterministic: the encoder's last convolution gives the latent
channels directly, with no mean / log-variance pair, no sampling and no KL term. The slices (T)
are never resampled: kernels of depth 3 with stride 1 and padding 1 keep T exactly.

It is not a registry family (the registry holds denoisers `f(x, t)`); the paired CT task builds
it from its own config section with `build_video_vae`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import check_divisible, checkpoint_each

# Depth 3 / stride 1 / padding 1 keeps T; 4 / 2 / 1 halves (or doubles) H and W exactly.
RESAMPLE_KERNEL, RESAMPLE_STRIDE, RESAMPLE_PADDING = (3, 4, 4), (1, 2, 2), (1, 1, 1)


class ResBlock3D(nn.Module):
    """The seed's ResBlock3D: Conv -> GN -> SiLU -> Conv -> GN, + input, SiLU. (B, C, T, H, W) -> same."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + x)


class DownsampleBlock(nn.Module):
    """(B, C_in, T, H, W) -> (B, C_out, T, H/2, W/2): strided Conv3d + GroupNorm + SiLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, RESAMPLE_KERNEL, RESAMPLE_STRIDE, RESAMPLE_PADDING)
        self.norm = nn.GroupNorm(groups, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))  # (B, C_out, T, H/2, W/2)


class UpsampleBlock(nn.Module):
    """(B, C_in, T, H, W) -> (B, C_out, T, 2H, 2W): ConvTranspose3d + GroupNorm + SiLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.conv = nn.ConvTranspose3d(in_channels, out_channels, RESAMPLE_KERNEL, RESAMPLE_STRIDE, RESAMPLE_PADDING)
        self.norm = nn.GroupNorm(groups, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))  # (B, C_out, T, 2H, 2W)


def res_stack(channels: int, count: int, groups: int) -> list[nn.Module]:
    return [ResBlock3D(channels, groups) for _ in range(count)]


class VideoEncoder(nn.Module):
    """(B, C_in, T, H, W) -> (B, latent, T, H / 2^(L-1), W / 2^(L-1)) for L = len(channels)."""

    def __init__(self, channels: Sequence[int], in_channels: int, latent_channels: int, num_res_blocks: int, groups: int):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        layers: list[nn.Module] = []
        for c, c_next in zip(channels[:-1], channels[1:]):
            layers += [*res_stack(c, num_res_blocks, groups), DownsampleBlock(c, c_next, groups)]
        self.down = nn.Sequential(*layers)
        self.middle = nn.Sequential(*res_stack(channels[-1], num_res_blocks, groups))
        self.conv_out = nn.Conv3d(channels[-1], latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, T, H, W)
        h = self.middle(self.down(h))  # (B, C_last, T, H/8, W/8)
        return self.conv_out(h)  # (B, latent, T, H/8, W/8)


class VideoDecoder(nn.Module):
    """(B, latent, T, h, w) -> (B, C_out, T, h * 2^(L-1), w * 2^(L-1)) for L = len(channels)."""

    def __init__(self, channels: Sequence[int], out_channels: int, latent_channels: int, num_res_blocks: int, groups: int):
        super().__init__()
        self.conv_in = nn.Conv3d(latent_channels, channels[-1], 3, padding=1)
        self.middle = nn.Sequential(*res_stack(channels[-1], num_res_blocks, groups))
        layers: list[nn.Module] = []
        for c, c_next in zip(channels[:0:-1], channels[-2::-1]):  # 512->512, 512->256, 256->128 at the seed's widths
            layers += [UpsampleBlock(c, c_next, groups), *res_stack(c_next, num_res_blocks, groups)]
        self.up = nn.Sequential(*layers)
        self.conv_out = nn.Conv3d(channels[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.middle(self.conv_in(z))  # (B, C_last, T, h, w)
        h = self.up(h)  # (B, C0, T, 8h, 8w)
        return self.conv_out(h)  # (B, C_out, T, 8h, 8w)


class VideoVAE(nn.Module):
    """Deterministic 3D autoencoder: `encode` (B, C, T, H, W) -> (B, latent, T, H/8, W/8), `decode` back.

    `factor` is the downsampling per axis (T, H, W): (1, 8, 8) at the seed's four widths. H and W
    of the input must divide by factor[1]; `encode` raises a ConfigError naming the axis otherwise.
    """

    def __init__(self, channels: Sequence[int], in_channels: int, latent_channels: int, num_res_blocks: int, groups: int):
        super().__init__()
        halving = 2 ** (len(channels) - 1)
        self.factor = (1, halving, halving)
        self.latent_channels = latent_channels
        self.encoder = VideoEncoder(channels, in_channels, latent_channels, num_res_blocks, groups)
        self.decoder = VideoDecoder(channels, in_channels, latent_channels, num_res_blocks, groups)

    def check_shape(self, shape: Sequence[int], what: str = "video_vae input") -> None:
        """ConfigError unless H and W of `shape` [T, H, W] divide by the factor (T is never resampled)."""
        # T stands in as the factor itself, so only H and W can fail.
        check_divisible((self.factor[1], *shape[-2:]), self.factor[1], " (the video VAE halves H and W, never T)", what=what)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, latent, T, H/8, W/8)."""
        self.check_shape(x.shape[2:])
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent, T, h, w) -> (B, C, T, 8h, 8w)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))  # (B, C, T, H, W)


class PixelSpace(nn.Module):
    """No autoencoder (`channels` empty): `encode` and `decode` are the identity, so the paired
    diffusion runs on the input channels themselves. For CPU-size runs: an autoencoder trained
    from scratch for minutes reconstructs CT far less precisely than the noise it should remove
    (docs/results.md, CT enhancement), where the seed starts from a pretrained one."""

    factor = (1, 1, 1)

    def __init__(self, channels: int):
        super().__init__()
        self.latent_channels = channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def build_video_vae(
    channels: Sequence[int] = (128, 256, 512, 512),
    in_channels: int = 3,
    latent_channels: int = 4,
    num_res_blocks: int = 2,
    norm_num_groups: int = 32,
    grad_checkpointing: bool = False,
) -> VideoVAE | PixelSpace:
    """The seed-003 VAE; with `grad_checkpointing` every ResBlock3D and resampling block is a recompute
    unit. No channels: no autoencoder (PixelSpace, `in_channels` wide; `latent_channels` unused)."""
    channels = [int(c) for c in channels]
    if not channels:
        return PixelSpace(in_channels)
    if min(channels) < 1:
        raise ConfigError(f"video VAE channels={channels} must be positive widths (or none: no autoencoder)")
    for c in channels:
        if c % norm_num_groups:
            raise ConfigError(f"video VAE channels entry {c} is not divisible by norm_num_groups={norm_num_groups}")
    if num_res_blocks < 0:
        raise ConfigError(f"video VAE num_res_blocks={num_res_blocks} must be at least 0")
    vae = VideoVAE(channels, in_channels, latent_channels, num_res_blocks, norm_num_groups)
    if grad_checkpointing:
        blocks = (ResBlock3D, DownsampleBlock, UpsampleBlock)
        checkpoint_each([m for m in vae.modules() if isinstance(m, blocks)])
    return vae
