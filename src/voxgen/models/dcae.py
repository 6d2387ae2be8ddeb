"""`model.name=dcae` (task=autoencoder): a 3D deep-compression autoencoder.

DC-AE (Chen et al. 2024, "Deep Compression Autoencoder for Efficient High-Resolution Diffusion
Models") reaches spatial factors of 32-128 by *residual autoencoding*: every resolution change has a
parameter-free shortcut that moves voxels into channels (space-to-channel, then averaging channel
groups down to the new width) or back (duplicating channels, then channel-to-space), and the
convolutions only learn a residual on top of it. Without the shortcut a deep stack of strided
convolutions has to learn the space-to-channel map itself, which is what makes high-factor plain
autoencoders hard to optimise.

Here in 3D with per-axis factors, by the rules of `voxgen.models.compression` (whose interface it
follows): stage i of the encoder halves an axis while that axis still needs halving, so
`factor=[1, 8, 8]` keeps the slices. The stem (1 -> width) and the decoder's output head
(width -> 1) carry shortcuts too (channel duplication / channel mean), so with every convolution zeroed
the whole network is the parameter-free map written in `DCAE3D.encode` / `DCAE3D.decode`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import checkpoint_each
from voxgen.models.compression import Triple, check_autoencoder_shape, check_factor, res_blocks_per_level, stage_strides

# ---------------------------------------------------------------------------------------------
# Parameter-free shortcuts
# ---------------------------------------------------------------------------------------------


def space_to_channel(x: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C*sD*sH*sW, D/sD, H/sH, W/sW), PyTorch's pixel_unshuffle order in 3D.

    Output channel c*r + (a*sH*sW + b*sW + k) holds input channel c at offset (a, b, k) of each block,
    r = sD*sH*sW: channel-major, then offsets in D, H, W order.
    """
    b, c, d, h, w = x.shape
    sd, sh, sw = stride
    x = x.reshape(b, c, d // sd, sd, h // sh, sh, w // sw, sw)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, C, sD, sH, sW, D', H', W')
    return x.reshape(b, c * sd * sh * sw, d // sd, h // sh, w // sw)  # (B, C r, D', H', W')


def channel_to_space(x: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """(B, C*sD*sH*sW, D, H, W) -> (B, C, D*sD, H*sH, W*sW): the exact inverse of `space_to_channel`."""
    b, cr, d, h, w = x.shape
    sd, sh, sw = stride
    c = cr // (sd * sh * sw)
    x = x.reshape(b, c, sd, sh, sw, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, D, sD, H, sH, W, sW)
    return x.reshape(b, c, d * sd, h * sh, w * sw)  # (B, C, D sD, H sH, W sW)


def average_channels(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """(B, C, ...) -> (B, out_channels, ...): mean of each run of C/out_channels consecutive channels."""
    b, c, *spatial = x.shape
    return x.reshape(b, out_channels, c // out_channels, *spatial).mean(dim=2)  # (B, C_out, ...)


def duplicate_channels(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """(B, C, ...) -> (B, out_channels, ...): each channel repeated out_channels/C times in place."""
    return x.repeat_interleave(out_channels // x.shape[1], dim=1)  # (B, C_out, ...)


# ---------------------------------------------------------------------------------------------
# Config checks (one-line ConfigErrors naming the keys)
# ---------------------------------------------------------------------------------------------


def check_dcae_config(channels: Sequence[int], norm_num_groups: int, latent_channels: int, factor: Sequence[int]) -> list[Triple]:
    """Validate a DC-AE's widths, latent channels and factor; return its stage strides.

    Every shortcut must be an exact regrouping of channels (no fractional groups), so the widths
    must fit the factors: a down-sampling stage from width a to b by r = sD*sH*sW needs b | a*r, the
    matching up-sampling stage a | b*r, and the latent channels must divide the deepest width.
    """
    factor = check_factor(factor, len(channels), "dcae")
    strides = stage_strides(factor, len(channels) - 1)
    for c in channels:
        if c < 1 or c % norm_num_groups:
            raise ConfigError(f"model.channels entry {c} is not divisible by model.norm_num_groups={norm_num_groups}")
    if latent_channels < 1 or channels[-1] % latent_channels:
        raise ConfigError(
            f"autoencoder.latent_channels={latent_channels} must divide model.channels[-1]={channels[-1]} "
            "(the encoder's output shortcut averages channel groups)"
        )
    for a, b, s in zip(channels[:-1], channels[1:], strides):
        r = math.prod(s)
        if (a * r) % b or (b * r) % a:
            raise ConfigError(
                f"model.channels {a} -> {b} with stride {list(s)} (autoencoder.factor={list(factor)}): the shortcuts regroup "
                f"{a}x{r} voxel-channels into {b} channels and {b}x{r} into {a}, so {b} must divide {a * r} "
                f"and {a} divide {b * r}"
            )
    return strides


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def _conv(in_channels: int, out_channels: int, stride: Sequence[int] = (1, 1, 1)) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=tuple(stride), padding=1)


def _res_blocks(width: int, count: int, norm_num_groups: int) -> nn.Sequential:
    """`count` pre-norm GroupNorm/SiLU residual blocks at `width` (MONAI's autoencoder block); 0 = identity."""
    return nn.Sequential(*[AEKLResBlock(3, width, norm_num_groups, 1e-6, width) for _ in range(count)])


class ResidualDown(nn.Module):
    """(B, C_in, D, H, W) -> (B, C_out, D/sD, H/sH, W/sW): strided conv + space-to-channel-and-average shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: Triple):
        super().__init__()
        self.stride, self.out_channels = stride, out_channels
        self.conv = _conv(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = average_channels(space_to_channel(x, self.stride), self.out_channels)  # (B, C_out, D', H', W')
        return self.conv(x) + shortcut


class ResidualUp(nn.Module):
    """(B, C_in, D, H, W) -> (B, C_out, D sD, H sH, W sW): nearest-upsample + conv, duplicate-then-channel-to-space shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: Triple):
        super().__init__()
        self.stride, self.out_channels = stride, out_channels
        self.conv = _conv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = math.prod(self.stride)
        shortcut = channel_to_space(duplicate_channels(x, self.out_channels * r), self.stride)  # (B, C_out, D sD, H sH, W sW)
        up = F.interpolate(x, scale_factor=self.stride, mode="nearest")  # (B, C_in, D sD, H sH, W sW)
        return self.conv(up) + shortcut


class Stem(nn.Module):
    """(B, C_in, ...) -> (B, C_out, ...): conv + channel duplication, so the input reaches the first level unchanged."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.conv = _conv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + duplicate_channels(x, self.out_channels)  # (B, C_out, ...)


class Head(nn.Module):
    """(B, C_in, ...) -> (B, C_out, ...): GroupNorm, SiLU, conv, plus the mean of C_in/C_out-channel groups."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int):
        super().__init__()
        self.out_channels = out_channels
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.conv = _conv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x))) + average_channels(x, self.out_channels)  # (B, C_out, ...)


class Encoder(nn.Module):
    """(B, 1, D, H, W) -> (B, latent_channels, D/fD, H/fH, W/fW)."""

    def __init__(
        self, channels: Sequence[int], num_res_blocks: Sequence[int], norm_num_groups: int, latent_channels: int, strides: list
    ):
        super().__init__()
        self.stem = Stem(1, channels[0])
        self.levels = nn.ModuleList()
        for i, (width, count) in enumerate(zip(channels, num_res_blocks)):
            level = [_res_blocks(width, count, norm_num_groups)]
            if i < len(strides):
                level.append(ResidualDown(width, channels[i + 1], strides[i]))
            self.levels.append(nn.Sequential(*level))
        self.head = Head(channels[-1], latent_channels, norm_num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (B, C_0, D, H, W)
        for level in self.levels:
            h = level(h)  # (B, C_i+1, D/s, H/s, W/s)
        return self.head(h)  # (B, latent, D/fD, H/fH, W/fW)


class Decoder(nn.Module):
    """(B, latent_channels, D/fD, H/fH, W/fW) -> (B, 1, D, H, W): the encoder mirrored."""

    def __init__(
        self, channels: Sequence[int], num_res_blocks: Sequence[int], norm_num_groups: int, latent_channels: int, strides: list
    ):
        super().__init__()
        self.stem = Stem(latent_channels, channels[-1])
        self.levels = nn.ModuleList()
        for i in reversed(range(len(channels))):
            level = [_res_blocks(channels[i], num_res_blocks[i], norm_num_groups)]
            if i > 0:
                level.append(ResidualUp(channels[i], channels[i - 1], strides[i - 1]))
            self.levels.append(nn.Sequential(*level))
        self.head = Head(channels[0], 1, norm_num_groups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stem(z)  # (B, C_L-1, D/fD, H/fH, W/fW)
        for level in self.levels:
            h = level(h)  # (B, C_i-1, D s, H s, W s)
        return self.head(h)  # (B, 1, D, H, W)


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


class DCAE3D(nn.Module):
    """Deterministic 3D DC-AE: (B, 1, D, H, W) <-> (B, latent_channels, D/fD, H/fH, W/fW).

    With every convolution zeroed the residual blocks are identities and only the shortcuts remain:
        encode(x) = avg_latent . (avg_{C_L-1} . s2c_{s_L-2}) ... (avg_{C_1} . s2c_{s_0}) . dup_{C_0} (x)
        decode(z) = avg_1 . (c2s_{s_0} . dup_{C_0 r_0}) ... (c2s_{s_L-2} . dup_{C_L-2 r_L-2}) . dup_{C_L-1} (z)
    (s2c/c2s: `space_to_channel`/`channel_to_space` by the stage's stride s_i with r_i voxels per block;
    avg/dup: `average_channels`/`duplicate_channels` to the subscripted width). Averaging, duplication and
    space-to-channel keep the channel mean (block-averaged), so the channel mean of encode(x) is x averaged
    over fD x fH x fW blocks; duplication and channel-to-space spread a value that is equal across channels
    over its block, so decode of a latent that is constant across channels is its nearest-neighbour upsampling.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_res_blocks: int | Sequence[int],
        norm_num_groups: int,
        latent_channels: int,
        factor: Sequence[int],
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        strides = check_dcae_config(channels, norm_num_groups, latent_channels, factor)
        num_res_blocks = res_blocks_per_level(num_res_blocks, len(channels))
        self.latent_channels = int(latent_channels)
        self.factor: Triple = tuple(factor)
        self.encoder = Encoder(channels, num_res_blocks, norm_num_groups, latent_channels, strides)
        self.decoder = Decoder(channels, num_res_blocks, norm_num_groups, latent_channels, strides)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, latent_channels, D/fD, H/fH, W/fW); deterministic (no sampling)."""
        check_autoencoder_shape(x.shape[2:], self.factor)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, d, h, w) -> (B, 1, d fD, h fH, w fW)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, D, H, W) -> (reconstruction (B, 1, D, H, W), regulariser 0: DC-AE has no KL or VQ term).

        `generator` is accepted for the shared autoencoder interface; a DC-AE draws no randomness.
        """
        return self.decode(self.encode(x)), x.new_zeros(())


def build_dcae(model_cfg, ae_cfg, *, grad_checkpointing: bool = False) -> DCAE3D:
    """DC-AE from `model.channels` / `num_res_blocks` / `norm_num_groups` and `autoencoder.latent_channels` / `factor`.

    `grad_checkpointing` recomputes each encoder and decoder level in backward (the full-resolution
    levels of a 160x256x256 volume dominate activation memory).
    """
    model = DCAE3D(
        channels=list(model_cfg.channels),
        num_res_blocks=model_cfg.num_res_blocks,
        norm_num_groups=int(model_cfg.norm_num_groups),
        latent_channels=int(ae_cfg.latent_channels),
        factor=list(ae_cfg.factor),
    )
    if grad_checkpointing:
        checkpoint_each([*model.encoder.levels, *model.decoder.levels])
    return model


# ---------------------------------------------------------------------------------------------
# The seeds' settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DCAESetting:
    """One DC-AE of the seeds: seed 002's experiment, factor [D, H, W], latent channels, widths per level."""

    experiment: str
    factor: Triple
    latent_channels: int
    channels: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    norm_num_groups: int = 32


# Seed 002, exp10_1..3 ("DC-AE 8x8x32, 4x4x128, 2x2x512"), read as the DC-AE paper's f32c32, f64c128
# and f128c512 on 256x256 slices: latent grids 8x8, 4x4, 2x2 in-plane. Depth is compressed 16x in all
# three (160 -> 10 latent slices; 16 divides 160), so every setting keeps the paper's constant ratio of
# voxels to latent values (16 * 32^2 / 32 = 16 * 64^2 / 128 = 16 * 128^2 / 512 = 512). No residual
# blocks at full resolution (as DC-AE's depth 0 at its first stage): a 128-wide block on 160x256x256
# voxels would hold gigabytes of activations per tensor.
SEED_COMPRESSIONS: dict[str, DCAESetting] = {
    "f32c32": DCAESetting("exp10_1", (16, 32, 32), 32, (128, 256, 512, 512, 512, 512), (0, 2, 2, 2, 2, 2)),
    "f64c128": DCAESetting("exp10_2", (16, 64, 64), 128, (128, 256, 512, 512, 512, 512, 512), (0, 2, 2, 2, 2, 2, 2)),
    "f128c512": DCAESetting("exp10_3", (16, 128, 128), 512, (128, 256, 512, 512, 512, 512, 512, 512), (0, 2, 2, 2, 2, 2, 2, 2)),
}
