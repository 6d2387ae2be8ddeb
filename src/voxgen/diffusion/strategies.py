"""Training strategies: how data is noised, what the model predicts, how time is drawn.

Every strategy has the `Strategy` interface the training step and the samplers rely on.

Rectified flow (voxgen's convention, never flipped; see docs/conventions.md):
    x_t = (1 - t) x0 + t * noise,  t in [0, 1], t = 0 is data,
    the model predicts the velocity  v = noise - x0  and sees model time 1000 t;
    sampling integrates dx/dt = v from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from voxgen.diffusion.shapes import append_dims
from voxgen.errors import ConfigError


class Strategy(Protocol):
    """How data is noised, what the network predicts and how time is drawn."""

    name: str
    # Probability per sample of training with the null (all-zero) condition (classifier-free guidance).
    cond_dropout: float
    # The sampler `sample.solver: null` stands for (voxgen.diffusion.samplers).
    default_sampler: str

    def sample_time(self, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """(B,) training times."""

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t of data x0 (B, C, D, H, W) and noise of the same shape at times t (B,)."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to predict."""

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) times as the network sees them."""

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss."""


class RectifiedFlow:
    """Rectified flow / linear interpolant (Liu et al. 2022; Lipman et al. 2022)."""

    name = "rflow"
    default_sampler = "euler"
    model_time_scale = 1000.0

    def __init__(
        self, time_sampling: str = "logit-normal", logit_mean: float = 0.0, logit_std: float = 1.0, cond_dropout: float = 0.0
    ):
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.cond_dropout = cond_dropout

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


def ddpm_betas(num_timesteps: int, schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """(T,) float64 betas. linear: evenly from beta_start to beta_end (Ho et al. 2020);
    cosine: beta_t = 1 - f(t + 1) / f(t) with f(t) = cos^2(pi/2 (t/T + s) / (1 + s)), s = 0.008,
    capped at 0.999 so the last steps do not divide by ~0 (Nichol & Dhariwal 2021, eq. 17)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return torch.clamp(1.0 - f[1:] / f[:-1], max=0.999)
    raise ConfigError(f"ddpm.schedule={schedule!r} is not one of linear, cosine")


class DDPM:
    """Discrete-time DDPM (Ho et al. 2020): x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for integer
    timesteps t in [0, T), ab_t = prod_{i <= t} (1 - beta_i); the model predicts eps and sees
    the index t as its time; the loss is the MSE on eps with t drawn uniformly ("L_simple")."""

    name = "ddpm"
    # Deterministic DDIM (eta 0): the DDPM counterpart of the flow's Euler default.
    default_sampler = "ddim"

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cond_dropout: float = 0.0,
    ):
        self.num_timesteps = num_timesteps
        self.schedule = schedule
        self.betas = ddpm_betas(num_timesteps, schedule, beta_start, beta_end)  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) float64
        self.cond_dropout = cond_dropout

    def sample_time(self, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """(B,) integer timesteps, uniform on {0, ..., T - 1}."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The schedule stays float64 until it is indexed, then meets the volume's dtype.
        ab = append_dims(self.alphas_cumprod.to(x0.device)[t], x0.ndim)
        return ab.sqrt().to(x0.dtype) * x0 + (1.0 - ab).sqrt().to(x0.dtype) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.mean((prediction.float() - target.float()) ** 2)


def rectified_flow(cfg) -> RectifiedFlow:
    return RectifiedFlow(cfg.rflow.time_sampling, cfg.rflow.logit_mean, cfg.rflow.logit_std, cfg.training.cond_dropout)


def ddpm(cfg) -> DDPM:
    d = cfg.ddpm
    return DDPM(d.num_timesteps, d.schedule, d.beta_start, d.beta_end, cfg.training.cond_dropout)


STRATEGIES = {"rflow": rectified_flow, "ddpm": ddpm}


def build_strategy(cfg) -> Strategy:
    return STRATEGIES[cfg.strategy](cfg)


def logit_normal_density(t: float, mean: float = 0.0, std: float = 1.0) -> float:
    """Density of the logit-normal time distribution at t (documentation and tests)."""
    logit = math.log(t / (1.0 - t))
    return math.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
