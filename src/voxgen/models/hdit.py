"""`model.name=hdit`: a hierarchical (hourglass) DiT for volumes.

The hourglass idea is Crowson et al. 2024, "Scalable High-Resolution Pixel-Space Image
Synthesis with Hourglass Diffusion Transformers": most blocks run on merged, coarse tokens,
so a fine patch size stays affordable. The blocks are DiT blocks with adaLN-Zero (Peebles &
Xie 2023, "Scalable Diffusion Models with Transformers"), shared with `dit.py`; the skips are U-ViT's long skips
(Bao et al. 2023, "All are Worth Words"): concatenate, then a linear map back to the width.

`model.level_depths` has odd length 2L + 1: L encoder levels, a middle, L decoder levels.

    patch embed (p^3 voxels -> 1 token) + learnable position table of level 0
    encoder level l:  depth[l] blocks -> keep skip -> TokenMerge 2x2x2 (8x fewer tokens)
                      + learnable position table of level l + 1
    middle:           depth[L] blocks on the coarsest grid
    decoder level l:  TokenSplit 2x2x2 -> Linear(concat(x, skip)) -> depth[2L - l] blocks
    final adaLN layer -> (p^3 C_out) per token -> unpatchify

The width is the variant's DiT width at every level (S/B/L/XL = 384/768/1024/1152, or
`model.hidden_size`). Position tables start at 3D sin-cos features and are learned. This
design reproduces the parameter counts of the profiled reference models to 0.1%.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import VectorEmbedding, add_vector, check_divisible, checkpoint_each
from voxgen.models.dit import VARIANTS, DiTBlock, DiTSize, FinalLayer, dit_size
from voxgen.models.transformer import (
    check_patch_size,
    fill_sincos_3d,
    init_dit_weights,
    token_stem,
    transformer_options,
    unpatchify,
)


def group_2x2x2(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, d h w, C) tokens in D-major order on `grid` -> (B, d/2 h/2 w/2, 8 C), one row per 2x2x2 cell."""
    b, _, c = x.shape
    d, h, w = grid
    x = x.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, d/2, h/2, w/2, 2, 2, 2, C)
    return x.reshape(b, (d // 2) * (h // 2) * (w // 2), 8 * c)


def ungroup_2x2x2(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Inverse of `group_2x2x2`: (B, d/2 h/2 w/2, 8 C) -> (B, d h w, C) on the fine `grid`."""
    b = x.shape[0]
    d, h, w = grid
    c = x.shape[-1] // 8
    x = x.view(b, d // 2, h // 2, w // 2, 2, 2, 2, c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, d/2, 2, h/2, 2, w/2, 2, C)
    return x.reshape(b, d * h * w, c)


class TokenMerge(nn.Module):
    """(B, N, C) on `grid` -> (B, N/8, C): each 2x2x2 cell's 8 tokens, concatenated, mapped linearly.

    No bias, as in the hourglass paper: a learned position table follows at once.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(8 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        return self.proj(group_2x2x2(x, grid))  # (B, N/8, C)


class TokenSplit(nn.Module):
    """(B, N/8, C) -> (B, N, C) on the fine `grid`; the skip is fused by U-ViT's concat + linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 8 * dim, bias=False)
        self.skip = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        x = ungroup_2x2x2(self.proj(x), grid)  # (B, N, C)
        return self.skip(torch.cat([x, skip], dim=-1))  # (B, N, 2C) -> (B, N, C)


class HDiT(nn.Module):
    """f(x, t[, vector]): x (B, C_in, D, H, W), t (B,) model time, vector (B, K) when built with
    vector_size > 0 -> (B, C_out, D, H, W).

    `grids[l]` is the token grid of level l: (D, H, W) / (patch * 2^l).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        shape: Sequence[int],
        patch: int,
        size: DiTSize,
        level_depths: Sequence[int],
        attention: str = "sdpa",
        qk_norm: bool = True,
        vector_size: int = 0,
    ):
        super().__init__()
        dim, levels = size.hidden, len(level_depths) // 2
        self.patch, self.out_channels = patch, out_channels
        grid0, self.patch_embed, self.t_embedder = token_stem(in_channels, dim, shape, patch)
        self.grids = [tuple(g // 2**level for g in grid0) for level in range(levels + 1)]

        def stage(depth: int) -> nn.ModuleList:
            return nn.ModuleList(DiTBlock(dim, size.heads, size.mlp_ratio, attention, qk_norm) for _ in range(depth))

        # One learned absolute position table per resolution: merged tokens mix 8 positions,
        # so each level is told again where its (coarser) tokens sit.
        self.pos_embeds = nn.ParameterList(nn.Parameter(torch.zeros(1, g[0] * g[1] * g[2], dim)) for g in self.grids)
        self.down = nn.ModuleList(stage(level_depths[level]) for level in range(levels))
        self.merges = nn.ModuleList(TokenMerge(dim) for _ in range(levels))
        self.middle = stage(level_depths[levels])
        # Indexed by level: up[l] and splits[l] bring tokens back to grids[l].
        self.splits = nn.ModuleList(TokenSplit(dim) for _ in range(levels))
        self.up = nn.ModuleList(stage(level_depths[2 * levels - level]) for level in range(levels))
        self.final = FinalLayer(dim, patch, out_channels)
        self.initialize_weights()
        self.vector_embed = VectorEmbedding(vector_size, dim) if vector_size else None

    def transformer_blocks(self) -> list[DiTBlock]:
        """Every transformer block: encoder levels, middle, decoder levels (each by level index, finest first)."""
        return [b for s in [*self.down, self.middle, *self.up] for b in s]

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation (`init_dit_weights`); meta tensors are skipped (1M-token tables)."""
        init_dit_weights(
            self, patch_embed=self.patch_embed, time_embedder=self.t_embedder, blocks=self.transformer_blocks(), final=self.final
        )
        # Learned tables start at the fixed sin-cos features, as dit.py's: neighbours start alike.
        for table, grid in zip(self.pos_embeds, self.grids):
            fill_sincos_3d(table, grid)

    def forward(self, x: torch.Tensor, t: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
        c = add_vector(self.t_embedder(t), self.vector_embed, vector)  # (B, C)
        tokens = self.patch_embed(x) + self.pos_embeds[0]  # (B, N0, C)
        skips = []
        for level, stage in enumerate(self.down):
            for block in stage:
                tokens = block(tokens, c)
            skips.append(tokens)
            tokens = self.merges[level](tokens, self.grids[level]) + self.pos_embeds[level + 1]  # (B, N_l / 8, C)
        for block in self.middle:
            tokens = block(tokens, c)
        for level in reversed(range(len(self.up))):
            tokens = self.splits[level](tokens, skips.pop(), self.grids[level])  # (B, N_l, C)
            for block in self.up[level]:
                tokens = block(tokens, c)
        out = self.final(tokens, c)  # (B, N0, p^3 C_out)
        return unpatchify(out, self.grids[0], self.patch, self.out_channels)  # (B, C_out, D, H, W)


def check_hdit_config(cfg, shape: Sequence[int]) -> None:
    """ConfigError for an unknown variant, a flat-DiT key, bad depths, or a shape the hierarchy cannot tile."""
    variant, level_depths, patch = cfg.variant, cfg.level_depths, cfg.patch_size
    if variant not in VARIANTS:
        raise ConfigError(f"model.variant={variant!r} is not an HDiT variant; use one of {', '.join(VARIANTS)}")
    if cfg.depth is not None:
        raise ConfigError(f"model.depth={cfg.depth} is for flat DiT/SiT; HDiT's depths are model.level_depths")
    depths = list(level_depths)
    if len(depths) % 2 == 0:
        raise ConfigError(
            f"model.level_depths={depths} has even length {len(depths)}; HDiT needs 2L+1 entries "
            "(L encoder levels, a middle, L decoder levels)"
        )
    if any(d < 0 for d in depths):
        raise ConfigError(f"model.level_depths={depths} has a negative depth")
    check_patch_size(patch)
    levels = len(depths) // 2
    # Each of the `levels` merges halves every axis of the patch grid, so the grid must halve that often.
    check_divisible(
        shape,
        patch * 2**levels,
        f" (HDiT with model.level_depths={depths} merges tokens {levels} times)",
        by=f"model.patch_size * 2^{levels} = {patch * 2**levels}",
    )


def build_hdit(
    cfg, *, in_channels: int, out_channels: int, shape: Sequence[int], grad_checkpointing: bool, vector_size: int = 0
) -> nn.Module:
    """The factory of `hdit` (registered in `voxgen.models`)."""
    check_hdit_config(cfg, shape)
    options = transformer_options(cfg, qk_norm_default=True)  # null: on, as DiT's blocks
    size = dit_size(cfg.variant, cfg.hidden_size)  # DiT's S/B/L/XL, width overridable by model.hidden_size
    model = HDiT(
        in_channels=in_channels,
        out_channels=out_channels,
        shape=shape,
        size=size,
        level_depths=list(cfg.level_depths),
        vector_size=vector_size,
        **options,
    )
    if grad_checkpointing:
        checkpoint_each(model.transformer_blocks())
    return model
