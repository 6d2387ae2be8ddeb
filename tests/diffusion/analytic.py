"""Analytic models for sampler tests: Gaussian data, whose exact velocity and noise predictions
are known in closed form.

Data x0 ~ N(mu, sigma^2) per voxel, noise n ~ N(0, 1), independent.

Rectified flow, x_t = (1 - t) x0 + t n: x_t is Gaussian with mean m(t) = (1 - t) mu and variance
S(t) = (1 - t)^2 sigma^2 + t^2. The exact velocity is the regression of v = n - x0 on x_t:
    v(x, t) = E[v | x_t = x] = E[v] + Cov(v, x_t) / S(t) (x - m(t))
            = -mu + (t - (1 - t) sigma^2) / S(t) * (x - m(t)),
and since Cov(v, x_t) = S'(t) / 2, the ODE keeps (x - m(t)) / sqrt(S(t)) constant: the exact
solution from t = 1 (where m = 0, S = 1) to t = 0 is x0 = mu + sigma x1.

DDPM, x_t = sqrt(ab) x0 + sqrt(1 - ab) eps: x_t ~ N(sqrt(ab) mu, ab sigma^2 + 1 - ab) and
    E[eps | x_t = x] = sqrt(1 - ab) / (ab sigma^2 + 1 - ab) * (x - sqrt(ab) mu);
the deterministic (probability-flow) map keeps (x - sqrt(ab) mu) / sqrt(ab sigma^2 + 1 - ab) constant.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from voxgen.diffusion.modes import MODES
from voxgen.diffusion.parts import NetworkShape, Parts
from voxgen.diffusion.shapes import append_dims
from voxgen.diffusion.spaces import PixelSpace
from voxgen.diffusion.strategies import DDPM, RectifiedFlow
from voxgen.precision import autocast_policy


class GaussianFlow:
    def __init__(self, mu: float = 0.5, sigma: float = 0.8):
        self.mu, self.sigma = mu, sigma

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """Exact v(x, t) for x (B, ...) at times t (B,), computed in float64."""
        t = append_dims(t.to(torch.float64), x.ndim)
        variance = (1 - t) ** 2 * self.sigma**2 + t**2
        v = -self.mu + (t - (1 - t) * self.sigma**2) / variance * (x.double() - (1 - t) * self.mu)
        return v.to(x.dtype)

    def solution(self, x1: torch.Tensor) -> torch.Tensor:
        """The exact ODE solution at t = 0 from noise x1 at t = 1."""
        return self.mu + self.sigma * x1

    def marginal(self, t: float) -> tuple[float, float]:
        """(mean, std) of x_t."""
        return (1 - t) * self.mu, math.sqrt((1 - t) ** 2 * self.sigma**2 + t**2)


class GaussianEps:
    """The exact noise prediction of DDPM on Gaussian data, for schedule `alphas_cumprod`."""

    def __init__(self, alphas_cumprod: torch.Tensor, mu: float = 0.5, sigma: float = 0.8):
        self.ab, self.mu, self.sigma = alphas_cumprod, mu, sigma

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        ab = append_dims(self.ab[t.long()], x.ndim)
        scale = (1 - ab).sqrt() / (ab * self.sigma**2 + 1 - ab)
        return (scale * (x.double() - ab.sqrt() * self.mu)).to(x.dtype)

    def flow_map(self, x: torch.Tensor, index_from: int, index_to: int) -> torch.Tensor:
        """The exact probability-flow map from timestep index_from to index_to."""
        a, b = float(self.ab[index_from]), float(self.ab[index_to])
        z = (x - math.sqrt(a) * self.mu) / math.sqrt(a * self.sigma**2 + 1 - a)
        return math.sqrt(b) * self.mu + math.sqrt(b * self.sigma**2 + 1 - b) * z

    def posterior_mean(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """E[x0 | x_t = x] at timestep index."""
        a = float(self.ab[index])
        eps = self(x, torch.full((x.shape[0],), index))
        return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)


class AnalyticNetwork(nn.Module):
    """A "network" f(x, model_time) that returns an analytic prediction and counts its calls.
    `to_time` maps the network's time back to the sampler's (rflow: model_time / 1000)."""

    def __init__(self, fn, to_time=lambda model_time: model_time / 1000.0):
        super().__init__()
        self.fn, self.to_time = fn, to_time
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.calls = 0

    def forward(self, x: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fn(x, self.to_time(model_time.double()))


def analytic_parts(fn, strategy=None, to_time=None, sample_shape=(1, 2, 2, 2)) -> Parts:
    """Parts for `generate` around an analytic prediction, unconditional (mode seg), sampling
    volumes of `sample_shape` (C, D, H, W)."""
    strategy = strategy if strategy is not None else RectifiedFlow()
    if to_time is None:
        to_time = (lambda m: m) if isinstance(strategy, DDPM) else (lambda m: m / 1000.0)
    channels, *shape = sample_shape
    network = NetworkShape(channels, channels, tuple(shape), channels, channels)
    return Parts(AnalyticNetwork(fn, to_time), strategy, MODES["seg"], PixelSpace(), network, autocast_policy("fp32"))
