"""Gaussian noise drawn per sample, so a sample depends on its own seed and not on its batch.

A sampler's `generator` is one of:
- a sequence of `torch.Generator`, one per sample of the batch (what `generate` passes:
  results then do not depend on batch size or device count, as with EDM's per-seed RNGs);
- a single `torch.Generator` for the whole batch;
- None: torch's global generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x (B, ...), in x's dtype and on x's device."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]} samples")
    # Each sample's noise is drawn on its generator's device (CPU for `generate`) and moved,
    # so the numbers are the same on every device.
    draws = [torch.randn(tuple(x.shape[1:]), generator=g, device=g.device) for g in generator]
    return torch.stack(draws).to(x.device, x.dtype)


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]
