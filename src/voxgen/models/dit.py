"""`model.name=dit` and `model.name=sit`: a 3D Diffusion Transformer.

DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") on volumes: 3D
patches become tokens, a stack of adaLN-Zero transformer blocks conditioned on the model
time, a final adaLN layer, and the tokens are folded back into a volume. SiT (Ma et al.
2024, "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable
Interpolant Transformers") is the same network trained with an interpolant instead of
DDPM; in voxgen the training objective comes from `strategy`, so `sit` is the same
factory under a second name (with `strategy=rflow` it is the SiT set-up).

Differences from the 2D paper model, on purpose:
- no class embedding: volume conditions enter as extra input channels, a condition vector
  (size bins, ScoreAug's transform) as an embedding added to the time embedding (see `mode`);
- the positional embedding is a learnable (1, N, hidden) parameter initialised with 3D
  sin-cos features, as in the seeds' profiled model (their parameter counts include it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import VectorEmbedding, add_vector, checkpoint_each
from voxgen.models.transformer import (
    Attention,
    Mlp,
    fill_sincos_3d,
    init_dit_weights,
    modulate,
    token_stem,
    transformer_options,
    unpatchify,
)


@dataclass(frozen=True)
class DiTSize:
    hidden: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


# Table 1 of Peebles & Xie (2023).
VARIANTS = {
    "S": DiTSize(hidden=384, depth=12, heads=6),
    "B": DiTSize(hidden=768, depth=12, heads=12),
    "L": DiTSize(hidden=1024, depth=24, heads=16),
    "XL": DiTSize(hidden=1152, depth=28, heads=16),
}


def dit_size(variant: str, hidden_size: int | None = None, depth: int | None = None) -> DiTSize:
    """The S/B/L/XL size, with `model.hidden_size` / `model.depth` overriding it when set.

    The head count stays the variant's, so an overriding width must divide by it.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"model.variant={variant!r} is not a DiT variant; use one of {', '.join(VARIANTS)}")
    size = VARIANTS[variant]
    for key, value in (("model.hidden_size", hidden_size), ("model.depth", depth)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    hidden = size.hidden if hidden_size is None else hidden_size
    if hidden % size.heads:
        raise ConfigError(f"model.hidden_size={hidden} is not divisible by the {size.heads} heads of variant {variant}")
    return DiTSize(hidden=hidden, depth=size.depth if depth is None else depth, heads=size.heads, mlp_ratio=size.mlp_ratio)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: x (B, N, C), c (B, C) -> (B, N, C).

    The conditioning regresses shift, scale and a gate for both the attention and the MLP
    branch; the regression is zero-initialised so every block starts as the identity,
    which the DiT paper found to train best of its conditioning variants.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attention: str, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, kind=attention, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, C)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN then a linear map to one patch per token: (B, N, C) -> (B, N, p^3 * C_out)."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch**3 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, C)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p^3 C_out)


class DiT3D(nn.Module):
    """f(x, t[, vector]): x (B, C_in, D, H, W), t (B,) model time in [0, 1000], vector (B, K) when
    built with vector_size > 0 (added to the time embedding) -> (B, C_out, D, H, W).

    `shape` [D, H, W] fixes the token grid (D/p, H/p, W/p) and so the size of the
    learnable positional embedding.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        shape: Sequence[int],
        patch: int,
        size: DiTSize,
        attention: str = "sdpa",
        qk_norm: bool = True,
        vector_size: int = 0,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.patch = patch
        self.grid, self.x_embedder, self.t_embedder = token_stem(in_channels, size.hidden, shape, patch)
        tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, size.hidden))
        # `blocks` is the ModuleList itself (not an accessor): parameter names such as
        # blocks.0.attn.qkv.weight key checkpoints and the seeds' tables.
        self.blocks = nn.ModuleList(
            DiTBlock(size.hidden, size.heads, size.mlp_ratio, attention, qk_norm) for _ in range(size.depth)
        )
        self.final_layer = FinalLayer(size.hidden, patch, out_channels)
        self.initialize_weights()
        self.vector_embed = VectorEmbedding(vector_size, size.hidden) if vector_size else None

    def transformer_blocks(self) -> list[DiTBlock]:
        """Every transformer block, input side first."""
        return list(self.blocks)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation (`init_dit_weights`); positions start at 3D sin-cos features."""
        init_dit_weights(
            self, patch_embed=self.x_embedder, time_embedder=self.t_embedder, blocks=self.blocks, final=self.final_layer
        )
        fill_sincos_3d(self.pos_embed, self.grid)

    def forward(self, x: torch.Tensor, t: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
        h = self.x_embedder(x) + self.pos_embed  # (B, N, C)
        c = add_vector(self.t_embedder(t), self.vector_embed, vector)  # (B, C)
        for block in self.blocks:
            h = block(h, c)  # (B, N, C)
        h = self.final_layer(h, c)  # (B, N, p^3 C_out)
        return unpatchify(h, self.grid, self.patch, self.out_channels)  # (B, C_out, D, H, W)


def build_dit(
    cfg, *, in_channels: int, out_channels: int, shape: Sequence[int], grad_checkpointing: bool, vector_size: int = 0
) -> nn.Module:
    """The factory of `dit` and `sit` (registered in `voxgen.models`)."""
    options = transformer_options(cfg, qk_norm_default=True)  # null: on, as in the profiled seed DiT
    size = dit_size(cfg.variant, cfg.hidden_size, cfg.depth)
    model = DiT3D(in_channels=in_channels, out_channels=out_channels, shape=shape, size=size, vector_size=vector_size, **options)
    if grad_checkpointing:
        checkpoint_each(model.transformer_blocks())
    return model
