"""Training strategies: how data is noised, what the model predicts, how time is drawn.

Every strategy has the `Strategy` interface the training step and the samplers rely on.

Rectified flow (voxgen's convention, never flipped; see docs/conventions.md):
    x_t = (1 - t) x0 + t * noise,  t in [0, 1], t = 0 is data,
    the model predicts the velocity  v = noise - x0  and sees model time 1000 t;
    sampling integrates dx/dt = v from t = 1 (noise) to t = 0 (data).

DDPM predicts eps, v or x0 (`ddpm.prediction`). Either strategy can weight its loss per sample
with min-SNR-gamma (Hang et al. 2023, `training.min_snr_gamma`, 0 = off): the weight makes the
loss, read as an error on x0, weigh min(SNR(t), gamma); docs/training.md derives each weight.
The loss can also weight voxels (`training.tumour_weight`, voxgen.diffusion.tumour_weight).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from voxgen.diffusion.shapes import append_dims
from voxgen.draws import Draws
from voxgen.errors import ConfigError


class Strategy(Protocol):
    """How data is noised, what the network predicts and how time is drawn."""

    name: str
    # Probability per sample of training with the mode's null condition (classifier-free guidance).
    cond_dropout: float
    # The sampler `sample.solver: null` stands for (voxgen.diffusion.samplers).
    default_sampler: str

    def sample_time(self, draws: Draws) -> torch.Tensor:
        """(B,) training times, one from each sample's generator."""

    def noisier(self, t: torch.Tensor, shift: float) -> torch.Tensor:
        """Training times `shift` (a fraction of the time axis) closer to the noise (SDA)."""

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t of data x0 (B, C, D, H, W) and noise of the same shape at times t (B,)."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """What the network is trained to predict for x0 and noise at times t (B,) (a target that
        does not depend on time, such as eps or the flow's velocity, needs no t)."""

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) times as the network sees them."""

    def x0_from(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean data a prediction implies for x_t at training times t (B,)."""

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        t: torch.Tensor | None = None,
        voxel_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar float32 loss; t (B,), the training times, for a loss weighted per sample;
        voxel_weight (B, 1, D, H, W), for a loss weighted per voxel (`training.tumour_weight`)."""


def _check_min_snr_gamma(gamma: float) -> float:
    if not gamma >= 0:
        raise ConfigError(f"training.min_snr_gamma={gamma} must be at least 0 (0 disables min-SNR weighting; the paper uses 5)")
    return float(gamma)


def mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    voxel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 scalar: the mean squared error, or with `weight` (B,) the batch mean of weight
    times each sample's mean squared error (for equal weights 1 the same number up to rounding).

    With `voxel_weight` w (B, 1, D, H, W), broadcast over the channels, each sample's error is
    the weighted mean `sum(w err^2) / sum(w)` instead (`voxgen.diffusion.tumour_weight`)."""
    if weight is None and voxel_weight is None:
        return torch.mean((prediction.float() - target.float()) ** 2)
    err = (prediction.float() - target.float()) ** 2  # (B, C, D, H, W)
    if voxel_weight is None:
        per_sample = err.flatten(1).mean(dim=1)  # (B,)
    else:
        w = voxel_weight.to(err.device, torch.float32).expand_as(err)
        per_sample = (w * err).flatten(1).sum(dim=1) / w.flatten(1).sum(dim=1)  # (B,)
    if weight is None:
        return torch.mean(per_sample)
    return torch.mean(weight.to(per_sample.device, torch.float32) * per_sample)


class WeightedLoss:
    """The loss both strategies share: the MSE of the prediction, weighted per sample by the
    strategy's `min_snr_weight(t)` when `min_snr_gamma` > 0 and per voxel by `voxel_weight`."""

    min_snr_gamma: float = 0.0

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        t: torch.Tensor | None = None,
        voxel_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weight = None if self.min_snr_gamma == 0 else self.min_snr_weight(_times(t))
        return mse(prediction, target, weight, voxel_weight)


class RectifiedFlow(WeightedLoss):
    """Rectified flow / linear interpolant (Liu et al. 2022; Lipman et al. 2022)."""

    name = "rflow"
    default_sampler = "euler"
    model_time_scale = 1000.0

    def __init__(
        self,
        time_sampling: str = "logit-normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        cond_dropout: float = 0.0,
        min_snr_gamma: float = 0.0,
    ):
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.cond_dropout = cond_dropout
        self.min_snr_gamma = _check_min_snr_gamma(min_snr_gamma)

    def sample_time(self, draws: Draws) -> torch.Tensor:
        """(B,) times in (0, 1): uniform, or logit-normal (Esser et al. 2024), which favours mid times."""
        if self.time_sampling == "uniform":
            return draws.uniform()
        normal = draws.normal()
        return torch.sigmoid(self.logit_mean + self.logit_std * normal)

    def noisier(self, t: torch.Tensor, shift: float) -> torch.Tensor:
        """Times `shift` (a fraction of the time axis) closer to the noise, at most 1 (SDA)."""
        return (t + shift).clamp(max=1.0)

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = append_dims(t, x0.ndim).to(x0.dtype)
        return (1.0 - t) * x0 + t * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return noise - x0

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.model_time_scale

    def x0_from(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - t v (x_t = x0 + t (noise - x0))."""
        return x_t - append_dims(t, x_t.ndim).to(x_t.dtype) * prediction

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) float64 signal-to-noise ratio ((1 - t) / t)^2 of x_t at times t."""
        t = t.double()
        return ((1.0 - t) / t) ** 2

    def min_snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) float64 min-SNR-gamma weight of the velocity error at times t.

        x0_hat = x_t - t v_hat, so |x0 - x0_hat|^2 = t^2 |v - v_hat|^2; the velocity loss
        weighted by t^2 min(SNR, gamma) is the x0 loss weighted by min(SNR, gamma). With
        SNR = ((1 - t) / t)^2 that is min((1 - t)^2, gamma t^2), finite at t = 0 and t = 1.
        """
        t = t.double()
        return torch.minimum((1.0 - t) ** 2, self.min_snr_gamma * t**2)


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


def _times(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise ValueError("min-SNR weighting needs the training times t: call loss(prediction, target, t)")
    return t


# What a DDPM network predicts (`ddpm.prediction`): the noise, the velocity of Salimans & Ho
# 2022 (v = sqrt(ab) eps - sqrt(1 - ab) x0) or the data.
DDPM_PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> str:
    if prediction not in DDPM_PREDICTIONS:
        raise ConfigError(f"ddpm.prediction={prediction!r} is not one of {', '.join(DDPM_PREDICTIONS)}")
    return prediction


class DDPM(WeightedLoss):
    """Discrete-time DDPM (Ho et al. 2020): x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for integer
    timesteps t in [0, T), ab_t = prod_{i <= t} (1 - beta_i); the model sees the index t as its
    time and predicts eps (Ho et al.), v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 (Salimans & Ho
    2022) or x0; the loss is the MSE on that prediction with t drawn uniformly ("L_simple"),
    optionally weighted by min-SNR-gamma (Hang et al. 2023)."""

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
        prediction: str = "eps",
        min_snr_gamma: float = 0.0,
    ):
        self.num_timesteps = num_timesteps
        self.schedule = schedule
        self.betas = ddpm_betas(num_timesteps, schedule, beta_start, beta_end)  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) float64
        self.cond_dropout = cond_dropout
        self.prediction = check_prediction(prediction)
        self.min_snr_gamma = _check_min_snr_gamma(min_snr_gamma)

    def sample_time(self, draws: Draws) -> torch.Tensor:
        """(B,) integer timesteps, uniform on {0, ..., T - 1}."""
        return draws.integers(self.num_timesteps)

    def noisier(self, t: torch.Tensor, shift: float) -> torch.Tensor:
        """Timesteps round(shift T) closer to the noise, at most T - 1 (SDA)."""
        return (t + round(shift * self.num_timesteps)).clamp(max=self.num_timesteps - 1)

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The schedule stays float64 until it is indexed, then meets the volume's dtype.
        ab = append_dims(self.alphas_cumprod.to(x0.device)[t], x0.ndim)
        return ab.sqrt().to(x0.dtype) * x0 + (1.0 - ab).sqrt().to(x0.dtype) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        if t is None:
            raise ValueError("the v target depends on the timestep: call target(x0, noise, t)")
        ab = append_dims(self.alphas_cumprod.to(x0.device)[t], x0.ndim)
        return ab.sqrt().to(x0.dtype) * noise - (1.0 - ab).sqrt().to(x0.dtype) * x0

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def x0_from(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from the prediction, with alpha = sqrt(ab_t), sigma = sqrt(1 - ab_t): eps: (x_t - sigma eps) /
        alpha; v: alpha x_t - sigma v; x0: itself."""
        if self.prediction == "x0":
            return prediction
        ab = append_dims(self.alphas_cumprod.to(x_t.device)[t], x_t.ndim)
        alpha, sigma = ab.sqrt().to(x_t.dtype), (1.0 - ab).sqrt().to(x_t.dtype)
        if self.prediction == "eps":
            return (x_t - sigma * prediction) / alpha
        return alpha * x_t - sigma * prediction

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) float64 signal-to-noise ratio ab_t / (1 - ab_t) at timestep indices t."""
        ab = self.alphas_cumprod.to(t.device)[t]
        return ab / (1.0 - ab)

    def min_snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) float64 min-SNR-gamma weight of the prediction's error at timestep indices t
        (Hang et al. 2023, eq. 12 and its v form): min(SNR, gamma) / SNR for eps,
        min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0."""
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "v":
            return clipped / (snr + 1.0)
        return clipped


def rectified_flow(cfg) -> RectifiedFlow:
    r, t = cfg.rflow, cfg.training
    return RectifiedFlow(r.time_sampling, r.logit_mean, r.logit_std, t.cond_dropout, t.min_snr_gamma)


def ddpm(cfg) -> DDPM:
    d, t = cfg.ddpm, cfg.training
    return DDPM(d.num_timesteps, d.schedule, d.beta_start, d.beta_end, t.cond_dropout, d.prediction, t.min_snr_gamma)


STRATEGIES = {"rflow": rectified_flow, "ddpm": ddpm}


def build_strategy(cfg) -> Strategy:
    """The strategy of `cfg`. `ddpm.prediction` is checked whatever the strategy, as config
    validation checks `ddpm.schedule`: a typo is refused, not ignored until the strategy changes."""
    check_prediction(cfg.ddpm.prediction)
    return STRATEGIES[cfg.strategy](cfg)


def logit_normal_density(t: float, mean: float = 0.0, std: float = 1.0) -> float:
    """Density of the logit-normal time distribution at t (documentation and tests)."""
    logit = math.log(t / (1.0 - t))
    return math.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
