"""Training strategies: how data is noised, what the model predicts, how time is drawn.

Rectified flow (voxgen's convention, never flipped; see docs/conventions.md):
    x_t = (1 - t) x0 + t * noise,  t in [0, 1], t = 0 is data,
    the model predicts the velocity  v = noise - x0  and sees model time 1000 t;
    sampling integrates dx/dt = v from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

import math

import torch

from voxgen.diffusion.shapes import append_dims


class RectifiedFlow:
    """Rectified flow / linear interpolant (Liu et al. 2022; Lipman et al. 2022)."""

    name = "rflow"
    model_time_scale = 1000.0

    def __init__(self, time_sampling: str = "logit-normal", logit_mean: float = 0.0, logit_std: float = 1.0):
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def sample_time(self, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """(B,) times in (0, 1): uniform, or logit-normal (Esser et al. 2024), which favours mid times."""
        if self.time_sampling == "uniform":
            return torch.rand(batch, generator=generator, device=device)
        normal = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * normal)

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = append_dims(t, x0.ndim).to(x0.dtype)
        return (1.0 - t) * x0 + t * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.model_time_scale

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.mean((prediction.float() - target.float()) ** 2)


def rectified_flow(cfg) -> RectifiedFlow:
    return RectifiedFlow(cfg.rflow.time_sampling, cfg.rflow.logit_mean, cfg.rflow.logit_std)


STRATEGIES = {"rflow": rectified_flow}


def build_strategy(cfg) -> RectifiedFlow:
    return STRATEGIES[cfg.strategy](cfg)


def logit_normal_density(t: float, mean: float = 0.0, std: float = 1.0) -> float:
    """Density of the logit-normal time distribution at t (documentation and tests)."""
    logit = math.log(t / (1.0 - t))
    return math.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
