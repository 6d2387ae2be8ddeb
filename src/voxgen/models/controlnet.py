"""`model.name=controlnet`: a frozen UNet steered by a ControlNet (Zhang et al. 2023).

The ControlNet is MONAI's: a trainable copy of the base UNet's encoder (and middle block) that
also reads the condition, whose outputs pass through zero-initialised 1x1 convolutions and are
added to the base UNet's skip connections and middle block. At initialisation those
convolutions are zero, so the controlled network computes exactly what the base computes.

This module only builds the network from the base UNet's model section; reading the stage-1
run (its config and weights) is `voxgen.diffusion.controlnet`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ControlNet
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import checkpoint_each
from voxgen.models.unet import UNet, build_unet, res_blocks


class ControlledUNet(nn.Module):
    """f(x, t): x (B, G + K, D, H, W) = [x_t, condition] (the mode's model input), t (B,) model
    time -> (B, G, D, H, W), the frozen base UNet's prediction for x_t with the ControlNet's
    residuals (computed from x_t, t and the condition) added.

    The base never trains: its parameters do not require gradients and it stays in eval mode
    whatever `train()` says. Gradients still flow through it (its decoder consumes the
    residuals), but none accumulate in it.
    """

    def __init__(self, base: UNet, controlnet: ControlNet, generated_channels: int, conditioning_scale: float = 1.0):
        super().__init__()
        self.base = base.requires_grad_(False).eval()
        self.controlnet = controlnet
        self.generated_channels = generated_channels
        self.conditioning_scale = conditioning_scale

    def train(self, mode: bool = True) -> ControlledUNet:
        super().train(mode)
        self.base.eval()
        return self

    def copy_encoder(self) -> None:
        """Initialise the ControlNet from the base: every tensor whose name and shape the two share
        (input convolution, time embedding, down and middle blocks), as MONAI's tutorials do with
        load_state_dict(strict=False). The zero convolutions and the conditioning embedding's
        output stay zero, so the output stays the base's."""
        own = self.controlnet.state_dict()
        shared = {k: v for k, v in self.base.net.state_dict().items() if k in own and own[k].shape == v.shape}
        self.controlnet.load_state_dict(shared, strict=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t, cond = x[:, : self.generated_channels], x[:, self.generated_channels :]
        down, mid = self.controlnet(x_t, timesteps=t, controlnet_cond=cond, conditioning_scale=self.conditioning_scale)
        return self.base.net(x_t, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid)


def build_controlled_unet(
    base_cfg,
    *,
    generated_channels: int,
    condition_channels: int,
    shape: Sequence[int],
    grad_checkpointing: bool,
    conditioning_channels: Sequence[int],
    conditioning_scale: float,
) -> ControlledUNet:
    """The controlled network for a base UNet described by `base_cfg` (the stage-1 run's model
    section), generating G = `generated_channels` from a K = `condition_channels` condition on a
    grid of `shape`. The base has fresh weights here: load the stage-1 weights into `.base`, then
    call `copy_encoder()` again."""
    widths = [int(c) for c in conditioning_channels]
    if len(widths) != 1 or widths[0] < 1:
        raise ConfigError(
            f"controlnet.conditioning_channels={widths} must be one positive width: the condition arrives on the "
            "network's own grid, and each further entry would halve it"
        )
    if not condition_channels:
        raise ConfigError("model.name=controlnet needs a mode with a condition (mode=bravo: the tumour mask)")
    base = build_unet(
        base_cfg,
        in_channels=generated_channels,
        out_channels=generated_channels,
        shape=shape,
        grad_checkpointing=grad_checkpointing,
    )
    controlnet = ControlNet(
        spatial_dims=3,
        in_channels=generated_channels,
        num_res_blocks=res_blocks(base_cfg.num_res_blocks),
        channels=list(base_cfg.channels),
        attention_levels=list(base_cfg.attention_levels),
        norm_num_groups=base_cfg.norm_num_groups,
        num_head_channels=base_cfg.num_head_channels,
        conditioning_embedding_in_channels=condition_channels,
        conditioning_embedding_num_channels=widths,
        use_flash_attention=base_cfg.attention == "sdpa",
    )
    if grad_checkpointing:
        checkpoint_each([*controlnet.down_blocks, controlnet.middle_block])
    model = ControlledUNet(base, controlnet, generated_channels, conditioning_scale)
    model.copy_encoder()
    return model
