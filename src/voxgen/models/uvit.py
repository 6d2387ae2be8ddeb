"""`model.name=uvit`: U-ViT in 3D.

U-ViT (Bao et al., CVPR 2023, "All are Worth Words: A ViT Backbone for Diffusion Models")
treats everything as tokens: the model time becomes one token prepended to the 3D patch
tokens, a learnable positional embedding is added, and a plain stack of pre-norm
transformer blocks attends over all tokens at once (no hierarchy, no adaLN). Long skip
connections join the first half of the stack to the second, as in a UNet: block i of
`in_blocks` feeds block (depth//2 - 1 - i) of `out_blocks`, which concatenates the two
and projects back with a linear layer. A final norm and linear map each token to a
patch, the patches are folded back into a volume and a 3x3x3 convolution smooths the
patch seams (the paper's "conv" option, which it found to improve samples).

Details that reproduce the seeds' profiled parameter counts (shared/reference/
hdit_uvit_params.csv, every U-ViT row to rounding), all as in the paper unless noted:
- qkv projections without bias (the paper's `qkv_bias=False`);
- the time token comes from DiT's embedder (256 sinusoidal features -> Linear -> SiLU ->
  Linear), not the paper's identity / 4x MLP;
- the token head predicts p^3 * in_channels values per token (the paper's `patch_dim` is
  built from the input channels) and the final conv maps in_channels -> out_channels
  (the paper's maps in -> in, since its in and out are equal).
Conditions enter as extra input channels (see `mode`), so there is no class token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import VectorEmbedding, add_vector, checkpoint_each
from voxgen.models.transformer import Attention, Mlp, token_stem, transformer_options, unpatchify


@dataclass(frozen=True)
class UViTSize:
    hidden: int
    depth: int  # in_blocks + mid_block + out_blocks = 2 * (depth // 2) + 1
    heads: int
    mlp_ratio: float = 4.0


# Table 1 of Bao et al. (2023).
VARIANTS = {
    "S": UViTSize(hidden=512, depth=13, heads=8),
    "S-Deep": UViTSize(hidden=512, depth=17, heads=8),
    "M": UViTSize(hidden=768, depth=17, heads=12),
    "L": UViTSize(hidden=1024, depth=21, heads=16),
}


def uvit_size(variant: str, hidden_size: int | None = None, depth: int | None = None) -> UViTSize:
    """The S/S-Deep/M/L size, with `model.hidden_size` / `model.depth` overriding it when set.

    The head count stays the variant's, so an overriding width must divide by it; the
    depth must be odd because the stack is symmetric around one middle block.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"model.variant={variant!r} is not a U-ViT variant; use one of {', '.join(VARIANTS)}")
    size = VARIANTS[variant]
    for key, value in (("model.hidden_size", hidden_size), ("model.depth", depth)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    hidden = size.hidden if hidden_size is None else hidden_size
    if hidden % size.heads:
        raise ConfigError(f"model.hidden_size={hidden} is not divisible by the {size.heads} heads of U-ViT variant {variant}")
    depth = size.depth if depth is None else depth
    if depth % 2 == 0:
        raise ConfigError(f"model.depth={depth} must be odd for U-ViT (in blocks, one middle block, as many out blocks)")
    return UViTSize(hidden=hidden, depth=depth, heads=size.heads, mlp_ratio=size.mlp_ratio)


class UViTBlock(nn.Module):
    """Pre-norm transformer block: x (B, N, C) [, skip (B, N, C)] -> (B, N, C).

    A block of the second half first fuses the long skip from its mirror block of the
    first half: concatenation then a linear layer, which the paper found better than
    adding the two (its Table 6 / Figure 2 ablation).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attention: str, qk_norm: bool, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kind=attention, qkv_bias=False, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, N, 2C) -> (B, N, C)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT3D(nn.Module):
    """f(x, t[, vector]): x (B, C_in, D, H, W), t (B,) model time in [0, 1000], vector (B, K) when
    built with vector_size > 0 -> (B, C_out, D, H, W).

    `shape` [D, H, W] fixes the token grid (D/p, H/p, W/p) and so the size of the
    learnable positional embedding, (1, 1 + N, hidden): one time token plus N patches.
    """

    extras = 1  # tokens before the patch tokens: the time token

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        shape: Sequence[int],
        patch: int,
        size: UViTSize,
        attention: str = "sdpa",
        qk_norm: bool = False,
        vector_size: int = 0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.patch = patch
        hidden = size.hidden
        self.grid, self.patch_embed, self.time_embed = token_stem(in_channels, hidden, shape, patch)
        tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + tokens, hidden))
        half = size.depth // 2
        self.in_blocks = nn.ModuleList(UViTBlock(hidden, size.heads, size.mlp_ratio, attention, qk_norm) for _ in range(half))
        self.mid_block = UViTBlock(hidden, size.heads, size.mlp_ratio, attention, qk_norm)
        self.out_blocks = nn.ModuleList(
            UViTBlock(hidden, size.heads, size.mlp_ratio, attention, qk_norm, skip=True) for _ in range(half)
        )
        self.norm = nn.LayerNorm(hidden)
        self.decoder_pred = nn.Linear(hidden, patch**3 * in_channels)
        self.final_layer = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.initialize_weights()
        # The vector's embedding joins the time token (U-ViT has no time embedding to modulate).
        self.vector_embed = VectorEmbedding(vector_size, hidden) if vector_size else None

    def transformer_blocks(self) -> list[UViTBlock]:
        """Every transformer block, first half, middle, second half."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The paper's initialisation; parameters on the meta device are skipped.

        Linear weights and the positional embedding ~ truncated N(0, 0.02), biases 0,
        LayerNorm at identity; convolutions keep PyTorch's default. Meta tensors hold no
        data, so skipping them keeps `build_on_meta` of 1.3M-token models instantaneous.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear) and not module.weight.is_meta:
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and not module.weight.is_meta:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
        h = self.patch_embed(x)  # (B, N, C)
        time_token = add_vector(self.time_embed(t), self.vector_embed, vector).to(h.dtype)[:, None]  # (B, 1, C)
        h = torch.cat([time_token, h], dim=1) + self.pos_embed  # (B, 1 + N, C)
        skips = []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        h = self.mid_block(h)
        for block in self.out_blocks:
            h = block(h, skips.pop())  # deepest in-block output meets the first out-block
        h = self.decoder_pred(self.norm(h))  # (B, 1 + N, p^3 C_in)
        h = h[:, self.extras :]  # (B, N, p^3 C_in): drop the time token
        volume = unpatchify(h, self.grid, self.patch, self.in_channels)  # (B, C_in, D, H, W)
        return self.final_layer(volume)  # (B, C_out, D, H, W)


def build_uvit(
    cfg, *, in_channels: int, out_channels: int, shape: Sequence[int], grad_checkpointing: bool, vector_size: int = 0
) -> nn.Module:
    """The factory of `uvit` (registered in `voxgen.models`)."""
    options = transformer_options(cfg, qk_norm_default=False)  # null: off, as in the U-ViT paper
    size = uvit_size(cfg.variant, cfg.hidden_size, cfg.depth)
    model = UViT3D(in_channels=in_channels, out_channels=out_channels, shape=shape, size=size, vector_size=vector_size, **options)
    if grad_checkpointing:
        checkpoint_each(model.transformer_blocks())
    return model
