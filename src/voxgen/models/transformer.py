"""Transformer pieces shared by the token families (DiT/SiT, HDiT, U-ViT).

Tokens are (B, N, C). Volumes become tokens by 3D patches: (B, C, D, H, W) ->
(B, D/p * H/p * W/p, C') in D-major order, and back.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from voxgen.errors import ConfigError


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


def token_grid(shape: Sequence[int], patch: int, what: str = "data.shape") -> tuple[int, int, int]:
    """(D/p, H/p, W/p), or a ConfigError naming the axis that does not divide."""
    for axis, size in zip("DHW", shape):
        if size % patch:
            raise ConfigError(f"{what} {axis}={size} is not divisible by model.patch_size={patch}")
    return tuple(int(s) // patch for s in shape)


class PatchEmbed(nn.Module):
    """(B, C, D, H, W) -> (B, N, dim) with a stride-p Conv3d."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


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
