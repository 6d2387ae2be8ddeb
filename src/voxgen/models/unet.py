"""`model.name=unet`: MONAI's DiffusionModelUNet in 3D behind voxgen's interface."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import enable_checkpointing
from voxgen.models.registry import register


def check_unet_shape(channels: Sequence[int], shape: Sequence[int]) -> None:
    """Each of the len(channels) - 1 downsamplings halves every axis: sizes must divide."""
    factor = 2 ** (len(channels) - 1)
    for axis, size in zip("DHW", shape):
        if size % factor:
            raise ConfigError(
                f"data.shape {axis}={size} is not divisible by 2^{len(channels) - 1} "
                f"for a {len(channels)}-level UNet"
            )


def res_blocks(value) -> int | list[int]:
    """`model.num_res_blocks` as MONAI takes it: one count for every level, or a list per level."""
    return value if isinstance(value, int) else [int(v) for v in value]


class UNet(nn.Module):
    """f(x, t): x (B, C_in, D, H, W), t (B,) model time -> (B, C_out, D, H, W)."""

    def __init__(self, net: DiffusionModelUNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, timesteps=t)


@register("unet", "MONAI DiffusionModelUNet (3D), channels/attention_levels/num_res_blocks per level")
def build_unet(cfg, *, in_channels: int, out_channels: int, shape: Sequence[int], grad_checkpointing: bool) -> nn.Module:
    channels = list(cfg.channels)
    check_unet_shape(channels, shape)
    for c in channels:
        if c % cfg.norm_num_groups:
            raise ConfigError(f"model.channels entry {c} is not divisible by model.norm_num_groups={cfg.norm_num_groups}")
    for c, attn in zip(channels, cfg.attention_levels):
        if attn and c % cfg.num_head_channels:
            raise ConfigError(f"model.channels entry {c} is not divisible by model.num_head_channels={cfg.num_head_channels}")
    net = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        attention_levels=list(cfg.attention_levels),
        num_res_blocks=res_blocks(cfg.num_res_blocks),
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups,
        use_flash_attention=cfg.attention == "sdpa",
    )
    if grad_checkpointing:
        for block in [*net.down_blocks, net.middle_block, *net.up_blocks]:
            enable_checkpointing(block)
    return UNet(net)
