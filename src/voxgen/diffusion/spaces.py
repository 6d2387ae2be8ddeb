"""Spaces the model works in. `pixel` is the identity; latent, space-to-depth and wavelet
spaces share this interface: encode (B, C, D, H, W) -> (B, C', D', H', W') and decode back."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PixelSpace:
    name = "pixel"

    def channels(self, data_channels: int) -> int:
        return data_channels

    def shape(self, data_shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(int(s) for s in data_shape)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


SPACES = {"pixel": lambda cfg: PixelSpace()}


def build_space(cfg) -> PixelSpace:
    return SPACES[cfg.space](cfg)
