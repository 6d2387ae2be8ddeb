"""Transformer pieces shared by the token families (DiT/SiT, HDiT, U-ViT).

Tokens are (B, N, C). Volumes become tokens by 3D patches: (B, C, D, H, W) ->
(B, D/p * H/p * W/p, C') in D-major order, and back.

Besides the layers, the families share their set-up here: `transformer_options` reads the
model section's common keys, `token_stem` checks the shape and builds the patch and time
embedders, `init_dit_weights` / `fill_sincos_3d` initialise the adaLN-Zero families. Every
family lists its blocks in `transformer_blocks()`, which its factory hands to
`blocks.checkpoint_each` for `training.grad_checkpointing`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.blocks import check_divisible


class Attention(nn.Module):
    """Multi-head self-attention; `kind` 'sdpa' uses fused kernels, 'naive' materialises (B, h, N, N).

    `qk_norm` LayerNorms queries and keys per head before the dot product, which bounds the
    attention logits (Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion
    Parameters"). It costs memory: under bf16 autocast the norms run in fp32 and save fp32
    copies of q and k, and the normalised q and k are new bf16 tensors the kernel keeps.
    """

    def __init__(self, dim: int, heads: int, kind: str = "sdpa", qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.kind = kind
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        head_dim = dim // heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, c/h)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kind == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, h, N, N)
            out = weights.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) model times -> (B, dim) sinusoidal features (cos first, as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Model time -> (B, dim) via sinusoidal features and a two-layer MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))


def check_patch_size(patch: int) -> None:
    """ConfigError unless `model.patch_size` is at least 1 (a patch of 0 voxels tiles nothing)."""
    if patch < 1:
        raise ConfigError(f"model.patch_size={patch} must be at least 1")


def token_grid(shape: Sequence[int], patch: int, what: str = "data.shape") -> tuple[int, int, int]:
    """(D/p, H/p, W/p), or a ConfigError naming the axis that does not divide."""
    check_divisible(shape, patch, by=f"model.patch_size={patch}", what=what)
    return tuple(int(s) // patch for s in shape)


class PatchEmbed(nn.Module):
    """(B, C, D, H, W) -> (B, N, dim) with a stride-p Conv3d."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


def token_stem(
    in_channels: int, dim: int, shape: Sequence[int], patch: int
) -> tuple[tuple[int, int, int], PatchEmbed, TimestepEmbedder]:
    """The start of every token family: (grid, patch embedder, time embedder).

    `grid` is (D/p, H/p, W/p) for `shape` [D, H, W] (a ConfigError if p does not divide);
    the patch embedder maps (B, C_in, D, H, W) -> (B, N, dim) and the time embedder
    (B,) -> (B, dim). They are built in this order, patch then time, as the families always
    have: the default initialisation draws from the RNG, so the order fixes the weights a
    seed gives.
    """
    grid = token_grid(shape, patch)
    return grid, PatchEmbed(in_channels, dim, patch), TimestepEmbedder(dim)


def transformer_options(cfg, *, qk_norm_default: bool) -> dict[str, Any]:
    """Keyword arguments every token family takes from the model section: patch, attention, qk_norm.

    `model.qk_norm` null means the family's own default (`qk_norm_default`): the families
    differ because the models they reproduce differ. The patch size is checked first, so it
    is the error a user sees before any other.
    """
    check_patch_size(cfg.patch_size)
    return {
        "patch": cfg.patch_size,
        "attention": cfg.attention,
        "qk_norm": qk_norm_default if cfg.qk_norm is None else cfg.qk_norm,
    }


def unpatchify(tokens: torch.Tensor, grid: Sequence[int], patch: int, channels: int) -> torch.Tensor:
    """(B, N, p^3 C) -> (B, C, D, H, W), inverse of a D-major patch order."""
    b = tokens.shape[0]
    d, h, w = grid
    x = tokens.view(b, d, h, w, patch, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, d, p, h, p, w, p)
    return x.reshape(b, channels, d * patch, h * patch, w * patch)


def sincos_embedding_3d(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """(N, dim) fixed 3D sin-cos position features, a third of the channels per axis.

    `dim` channels are split as evenly as possible over D, H, W in even-sized chunks; any
    remainder is zero. Computed in float64 and returned as float32.
    """
    per_axis = (dim // 3) // 2 * 2
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    parts = []
    for axis_coords in coords:
        half = per_axis // 2
        omega = 1.0 / 10_000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1))
        args = axis_coords.reshape(-1, 1) * omega[None]  # (N, half)
        parts += [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=1)
    pad = dim - emb.shape[1]
    return F.pad(emb, (0, pad)).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, C) * (1 + scale) + shift, with (B, C) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


@torch.no_grad()
def fill_sincos_3d(table: torch.Tensor, grid: Sequence[int]) -> None:
    """Write `sincos_embedding_3d(dim, grid)` into `table` (1, N, dim) one axis at a time.

    The full float64 computation holds several (N, dim / 6) temporaries: GBs at patch 2
    (N = 1.3M). Each axis's features depend on one coordinate, so a (size, dim) table per
    axis, broadcast over the other two axes, gives the same values in O(N dim) float32.
    A table on the meta device holds no data and is left as it is.
    """
    if table.is_meta:
        return
    dim = table.shape[-1]
    per_axis = (dim // 3) // 2 * 2  # sincos_embedding_3d's split: D, H, W chunks, then zeros
    view = table.view(*grid, dim)  # (d, h, w, dim)
    view.zero_()
    for axis, size in enumerate(grid):
        one_axis = [1, 1, 1]
        one_axis[axis] = size
        chunk = slice(axis * per_axis, (axis + 1) * per_axis)
        features = sincos_embedding_3d(dim, one_axis)[:, chunk]  # (size, per_axis)
        view[..., chunk] = features.view(*one_axis, per_axis).to(table.dtype)


@torch.no_grad()
def init_dit_weights(
    model: nn.Module, *, patch_embed: PatchEmbed, time_embedder: TimestepEmbedder, blocks: Iterable[nn.Module], final: nn.Module
) -> None:
    """DiT's initialisation (Peebles & Xie 2023), for DiT/SiT and HDiT; position tables are the caller's.

    Every Linear of `model` xavier-uniform with zero bias; the patch embedding likewise, as
    a Linear over the flattened p^3 C_in patch; the time MLP's weights N(0, 0.02). adaLN-Zero:
    the last Linear of each `adaLN_modulation` of `blocks` and `final` and `final.linear`
    start at zero, so every block is the identity and the network predicts 0 at step 0,
    which the DiT paper found to train best of its conditioning variants.

    Parameters on the meta device are skipped: they hold no data, and skipping them keeps
    `build_on_meta` of the largest models (over a million tokens) instantaneous. The order
    of the random draws (Linears in module order, patch embedding, time MLP) fixes the
    weights a seed gives.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.is_meta:
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = patch_embed.proj
    if not proj.weight.is_meta:
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
    for layer in time_embedder.mlp:
        if isinstance(layer, nn.Linear) and not layer.weight.is_meta:
            nn.init.normal_(layer.weight, std=0.02)
    zeroed = [final.linear, final.adaLN_modulation[-1], *(block.adaLN_modulation[-1] for block in blocks)]
    for layer in zeroed:
        if not layer.weight.is_meta:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
