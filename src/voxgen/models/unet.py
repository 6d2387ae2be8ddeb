"""`model.name=unet`: MONAI's DiffusionModelUNet in 3D behind voxgen's interface."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import VectorEmbedding, check_divisible, checkpoint_each


def res_blocks(value) -> int | list[int]:
    """`model.num_res_blocks` as MONAI takes it: one count for every level, or a list per level."""
    return value if isinstance(value, int) else [int(v) for v in value]


class UNet(nn.Module):
    """f(x, t[, vector]): x (B, C_in, D, H, W), t (B,) model time, vector (B, K) when built with
    one -> (B, C_out, D, H, W).

    The vector enters through MONAI's class-embedding slot, whose output is added to the time
    embedding; the slot's lookup table is replaced by a `VectorEmbedding` of a float vector.
    """

    def __init__(self, net: DiffusionModelUNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
        if (self.net.num_class_embeds is None) != (vector is None):
            raise ValueError("the network takes a condition vector exactly when it was built with vector_size > 0")
        return self.net(x, timesteps=t, class_labels=vector)


def build_unet(
    cfg, *, in_channels: int, out_channels: int, shape: Sequence[int], grad_checkpointing: bool, vector_size: int = 0
) -> nn.Module:
    """The factory of `unet` (registered in `voxgen.models`); `wdm` builds its inner UNet with it too."""
    channels = list(cfg.channels)
    downsamplings = len(channels) - 1  # each halves every axis
    check_divisible(shape, 2**downsamplings, f" for a {len(channels)}-level UNet", by=f"2^{downsamplings}")
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
        num_class_embeds=vector_size or None,
    )
    if vector_size:
        net.class_embedding = VectorEmbedding(vector_size, net.time_embed[-1].out_features)
    if grad_checkpointing:
        checkpoint_each([*net.down_blocks, net.middle_block, *net.up_blocks])
    return UNet(net)
