"""Spaces the model works in. `pixel` is the identity; latent, space-to-depth and wavelet
spaces share the `Space` interface: encode (B, C, D, H, W) -> (B, C', D', H', W') and decode back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class Space(Protocol):
    """What the step, the samplers and the planner need of a space."""

    name: str

    def channels(self, data_channels: int) -> int:
        """Channels in this space of `data_channels` data channels."""

    def shape(self, data_shape: Sequence[int]) -> tuple[int, int, int]:
        """[D', H', W'] in this space of a data volume [D, H, W]."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, C', D', H', W')."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C', D', H', W') -> (B, C, D, H, W)."""


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


def build_space(cfg) -> Space:
    return SPACES[cfg.space](cfg)
