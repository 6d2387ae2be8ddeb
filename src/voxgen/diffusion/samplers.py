"""Samplers: pure functions `(model, x, timesteps, *, cond, generator, callback) -> x`.

`model(x, t, cond)` returns the velocity dx/dt for x (B, C, D, H, W) at times t (B,) in [0, 1].
`timesteps` is a float64 grid from 1 (noise) to 0 (data), built by `time_grid`.
"""

from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) float64 times from 1 to 0. shift > 1 spends more steps near t = 1
    (the time shift of Esser et al. 2024: t' = s t / (1 + (s - 1) t))."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


def euler(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor, *, cond=None, generator=None, callback=None) -> torch.Tensor:
    """First-order Euler integration of dx/dt = v(x, t) along `timesteps`."""
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        v = model(x, torch.full((x.shape[0],), float(t), device=x.device), cond)
        x = x + (t_next - t).item() * v.to(x.dtype)
        if callback is not None:
            callback(i, x)
    return x


SAMPLERS = {"euler": euler}
