"""Broadcasting helper for tensors of any rank (2D, 3D, latent, ...)."""

from __future__ import annotations

import torch


def append_dims(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so per-sample `values` (B,) broadcast against a tensor of rank `ndim`."""
    missing = ndim - values.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a rank-{values.ndim} tensor to rank {ndim}")
    return values[(...,) + (None,) * missing]
