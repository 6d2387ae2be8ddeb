"""Generate volumes from a trained model: noise per seed -> sampler -> decoded volumes."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from voxgen.diffusion.samplers import SAMPLERS, time_grid


def velocity_fn(parts) -> Callable:
    """The model as a velocity field v(x, t, cond) with t in [0, 1], for the samplers."""

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        from voxgen.training.step import autocast

        with autocast(parts.precision, x.device):
            out = parts.model(parts.mode.model_input(x, cond), parts.strategy.model_time(t))
        return out.float()

    return velocity


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device) -> torch.Tensor:
    """(N, *shape) noise, one CPU generator per seed: results do not depend on batch size or device."""
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


@torch.no_grad()
def generate(
    parts,
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    cond: torch.Tensor | None = None,
    steps: int = 25,
    solver: str = "euler",
    batch_size: int = 4,
    shift: float = 1.0,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sample len(seeds) volumes; `latent_shape` is (C, D, H, W) in the model's space and
    `cond` (N, K, D, H, W) the conditions in model space. Returns decoded (N, C', D, H, W)."""
    parts.model.eval()
    device = next(parts.model.parameters()).device
    sampler = SAMPLERS[solver]
    grid = time_grid(steps, shift)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        x = initial_noise(chunk, latent_shape, device)
        c = cond[start : start + len(chunk)].to(device) if cond is not None else None
        x = sampler(velocity_fn(parts), x, grid, cond=c)
        out.append(parts.space.decode(x).cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out)
