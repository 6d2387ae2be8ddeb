"""`model.name=video_unet`: the conditional 3D UNet denoiser of seed 003 (CT enhancement, "video-to-video").

The seed treats a CT stack as a video: its slices (D, the seed's T) are frames that are never
downsampled; only H and W halve from level to level. The network follows the seed's "U-Net
Architecture" drawing and "U-Net Dimensions" table:

    t (B,) -> sinusoid -> MLP -> t_emb (B, E), E = 8 * channels[0] (1024 at the seed's 128)
    conv_in                                    (B, C_in, T, H, W) -> (B, C0, T, H, W)
    encoder level l: num_res_blocks x ResBlock(C_l, t_emb) [+ SpatialTransformer3D]
                     -> keep skip_l -> Downsample C_l -> C_{l+1}, stride (1, 2, 2)  (not after the last level)
    middle:          ResBlock, TemporalAttention (along T only), ResBlock at the last width
    decoder level l (last to first): concat skip_l -> ResBlock(C_prev + C_l -> C_l), more ResBlocks(C_l)
                     [+ SpatialTransformer3D] -> Upsample (1, 2, 2) (not after level 0)
                     level 0 has one ResBlock more than the others (the seed's "final" level has 3)
    conv_out                                   (B, C0, T, H, W) -> (B, C_out, T, H, W)

At the seed's widths [128, 256, 512, 512] the decoder's first ResBlocks are 1024->512, 1024->512,
768->256 and 384->128, exactly the table's "Decoder+Skip" rows.

Choices the seed leaves open, made here:
- heads: 8 in every attention, as the seed draws it ("heads=8"); `model.num_head_channels` is
  not read (so each head's width is C/8: 32 at 256 channels, 64 at 512);
- the spatial transformer is the standard pre-norm block (LayerNorm -> attention -> residual,
  LayerNorm -> 4x GELU feed-forward -> residual); the seed draws one residual around the chain;
- the temporal attention is LayerNorm -> attention over the T tokens of each (h, w) column ->
  residual, with no feed-forward (the seed draws none);
- Downsample is a 3x3x3 convolution with stride (1, 2, 2); Upsample is nearest-neighbour (1, 2, 2)
  then a 3x3x3 convolution; the time MLP reads 256 sinusoidal features, as DiT's does;
- conv_out follows the last ResBlock directly, as drawn, and starts at zero (as MONAI's and ADM's
  output convolutions), so the untrained network predicts 0.
The denoiser's input is the noisy target latent concatenated with the source latent: the task
builds it, this network only takes `in_channels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import VectorEmbedding, add_vector, check_divisible, checkpoint_each
from voxgen.models.transformer import Attention, Mlp, TimestepEmbedder
from voxgen.models.unet import res_blocks

HEADS = 8  # the seed's "heads=8", at every spatial and temporal attention
EMBED_MULT = 8  # time embedding width / channels[0]: the seed's 1024 for 128


def per_channel(emb: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C, 1, ..., 1) broadcastable against `like` (B, C, *spatial), of any rank."""
    return emb[(...,) + (None,) * (like.ndim - 2)]


class ResBlock(nn.Module):
    """ResBlockWithTimeEmbed as the seed draws it: x (B, C_in, T, H, W), emb (B, E) -> (B, C_out, T, H, W).

    GN -> SiLU -> Conv3d -> GN -> + SiLU(Linear(emb)) -> SiLU -> Conv3d, plus the input (through a
    1x1x1 convolution when the width changes: the decoder's first block of each level).
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.time = nn.Linear(embed_dim, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, T, H, W)
        h = self.norm2(h) + per_channel(F.silu(self.time(emb)), h)
        h = self.conv2(F.silu(h))
        return h + self.skip(x)  # (B, C_out, T, H, W)


class SpatialTransformer3D(nn.Module):
    """Self-attention over all T*H*W voxels of a level, then a feed-forward: (B, C, T, H, W) -> same."""

    def __init__(self, channels: int, attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = Attention(channels, HEADS, kind=attention)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = Mlp(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, T*H*W, C)
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(x.shape)  # (B, C, T, H, W)


class TemporalAttention(nn.Module):
    """Self-attention along the slice axis only: each (h, w) column's T voxels attend to each other.

    (B, C, T, H, W) -> same. Columns never exchange information here, so this is the block that
    couples slices at the coarsest level without the cost of attention over all voxels.
    """

    def __init__(self, channels: int, attention: str):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = Attention(channels, HEADS, kind=attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)  # (B*H*W, T, C)
        tokens = tokens + self.attn(self.norm(tokens))
        return tokens.view(b, h, w, t, c).permute(0, 4, 3, 1, 2)  # (B, C, T, H, W)


class Downsample(nn.Module):
    """Halve H and W, keep every slice: (B, C_in, T, H, W) -> (B, C_out, T, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=(1, 2, 2), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C_out, T, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W, keep every slice: (B, C, T, H, W) -> (B, C, T, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))  # (B, C, T, 2H, 2W)


class Level(nn.Module):
    """One level's ResBlocks and optional spatial transformer: (B, C_in, T, H, W), emb -> (B, C_out, T, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, attn: bool, embed_dim: int, groups: int, attention: str):
        super().__init__()
        widths = [in_channels] + [out_channels] * blocks
        self.res = nn.ModuleList(ResBlock(a, b, embed_dim, groups) for a, b in zip(widths[:-1], widths[1:]))
        self.attn = SpatialTransformer3D(out_channels, attention) if attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x, emb)  # (B, C_out, T, H, W)
        return x if self.attn is None else self.attn(x)


class Middle(nn.Module):
    """The bottleneck: ResBlock -> TemporalAttention -> ResBlock, (B, C, T, H, W), emb -> same."""

    def __init__(self, channels: int, embed_dim: int, groups: int, attention: str):
        super().__init__()
        self.res1 = ResBlock(channels, channels, embed_dim, groups)
        self.attn = TemporalAttention(channels, attention)
        self.res2 = ResBlock(channels, channels, embed_dim, groups)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, emb)), emb)


class VideoUNet(nn.Module):
    """f(x, t[, vector]): x (B, C_in, T, H, W), t (B,) model time, vector (B, K) when built with
    vector_size > 0 (added to the time embedding) -> (B, C_out, T, H, W).

    T is kept at every level; H and W must divide by 2^(len(channels) - 1) (`build_video_unet` checks).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        attention_levels: Sequence[bool],
        num_res_blocks: Sequence[int],
        groups: int,
        attention: str = "sdpa",
        vector_size: int = 0,
    ):
        super().__init__()
        channels, last = list(channels), len(channels) - 1
        embed_dim = EMBED_MULT * channels[0]
        self.time_embed = TimestepEmbedder(embed_dim)
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.encoder = nn.ModuleList(
            Level(c, c, num_res_blocks[i], attention_levels[i], embed_dim, groups, attention) for i, c in enumerate(channels)
        )
        self.down = nn.ModuleList(Downsample(channels[i], channels[i + 1]) for i in range(last))
        self.middle = Middle(channels[-1], embed_dim, groups, attention)
        # decoder[j] is level i = last - j. Its input is the output of the level below (of the
        # middle block for the last level), width channels[i + 1], concatenated with skip i.
        self.decoder = nn.ModuleList(
            Level(
                channels[min(i + 1, last)] + channels[i],
                channels[i],
                num_res_blocks[i] + (i == 0),  # the seed's final level: one ResBlock more
                attention_levels[i],
                embed_dim,
                groups,
                attention,
            )
            for i in range(last, -1, -1)
        )
        self.up = nn.ModuleList(Upsample(channels[i]) for i in range(last, 0, -1))
        # The seed draws conv_out straight after the last ResBlock (no GroupNorm/SiLU before it).
        self.conv_out = nn.Conv3d(channels[0], out_channels, 3, padding=1)
        if not self.conv_out.weight.is_meta:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        self.vector_embed = VectorEmbedding(vector_size, embed_dim) if vector_size else None

    def checkpoint_units(self) -> list[nn.Module]:
        """The recompute units of `training.grad_checkpointing`: every ResBlock, attention and resampler."""
        units = [*self.down, *self.up, self.middle.res1, self.middle.attn, self.middle.res2]
        for level in [*self.encoder, *self.decoder]:
            units += [*level.res, *([level.attn] if level.attn is not None else [])]
        return units

    def forward(self, x: torch.Tensor, t: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
        emb = add_vector(self.time_embed(t), self.vector_embed, vector)  # (B, E)
        h = self.conv_in(x)  # (B, C0, T, H, W)
        skips = []
        for i, level in enumerate(self.encoder):
            h = level(h, emb)  # (B, C_i, T, H_i, W_i)
            skips.append(h)
            if i < len(self.down):
                h = self.down[i](h)  # (B, C_{i+1}, T, H_i/2, W_i/2)
        h = self.middle(h, emb)  # (B, C_last, T, H_last, W_last)
        for j, level in enumerate(self.decoder):
            h = level(torch.cat([h, skips.pop()], dim=1), emb)  # (B, C_i, T, H_i, W_i)
            if j < len(self.up):
                h = self.up[j](h)  # (B, C_i, T, 2 H_i, 2 W_i)
        return self.conv_out(h)  # (B, C_out, T, H, W)


def check_video_unet_config(cfg, shape: Sequence[int]) -> None:
    """ConfigError (one line naming the key) for a model section or shape [D, H, W] the network cannot take."""
    channels = list(cfg.channels)
    if not channels or min(channels) < 1:
        raise ConfigError(f"model.channels={channels} must be one or more positive widths")
    if len(cfg.attention_levels) != len(channels):
        raise ConfigError(f"model.attention_levels has {len(cfg.attention_levels)} entries, model.channels {len(channels)}")
    blocks = res_blocks(cfg.num_res_blocks)
    if isinstance(blocks, list) and len(blocks) != len(channels):
        raise ConfigError(f"model.num_res_blocks has {len(blocks)} entries, model.channels {len(channels)}")
    # The decoder's first ResBlock of a level is what narrows the concatenated skip back to the level's width.
    if min(blocks if isinstance(blocks, list) else [blocks]) < 1:
        raise ConfigError(f"model.num_res_blocks={cfg.num_res_blocks} must be at least 1 at every level for video_unet")
    halvings = len(channels) - 1
    # D (the slices) is never halved: it is checked as the factor itself, so only H and W can fail.
    why = f" for a {len(channels)}-level video_unet (it halves H and W, never D)"
    check_divisible((2**halvings, *shape[1:]), 2**halvings, why, by=f"2^{halvings}")
    for c in channels:
        if c % cfg.norm_num_groups:
            raise ConfigError(f"model.channels entry {c} is not divisible by model.norm_num_groups={cfg.norm_num_groups}")
    # The temporal attention at the last level and the spatial ones split the width into 8 heads.
    for c, attn in zip(channels, [*cfg.attention_levels[:-1], True]):
        if attn and c % HEADS:
            raise ConfigError(f"model.channels entry {c} is not divisible by the {HEADS} attention heads of video_unet")


def build_video_unet(
    cfg, *, in_channels: int, out_channels: int, shape: Sequence[int], grad_checkpointing: bool, vector_size: int = 0
) -> nn.Module:
    """The factory of `video_unet` (registered in `voxgen.models`)."""
    check_video_unet_config(cfg, shape)
    blocks = res_blocks(cfg.num_res_blocks)
    model = VideoUNet(
        in_channels=in_channels,
        out_channels=out_channels,
        channels=list(cfg.channels),
        attention_levels=[bool(a) for a in cfg.attention_levels],
        num_res_blocks=blocks if isinstance(blocks, list) else [blocks] * len(cfg.channels),
        groups=cfg.norm_num_groups,
        attention=cfg.attention,
        vector_size=vector_size,
    )
    if grad_checkpointing:
        checkpoint_each(model.checkpoint_units())
    return model
