"""Samplers for DDPM models (strategy `ddpm`): ancestral DDPM, DDIM, DPM-Solver++(2M).

They keep voxgen's sampler signature `(model, x, timesteps, *, cond, generator, callback)`
and take the noise schedule as one more keyword, `alphas_cumprod` ((T,) float64, from
`voxgen.diffusion.strategies.DDPM`), bound by `voxgen.diffusion.samplers.prepare` because
it has no default (a sampler's keywords with defaults are its options), and what the network
predicts, `prediction` (`ddpm.prediction`: eps, v or x0), which `prepare` binds from the
strategy too (its default, eps, keeps direct calls short; it is not a user setting). The
schedule is data, not state: the samplers stay pure.

- `model(x, t, cond)` returns the prediction (eps, v or x0) for x (B, C, D, H, W) at timestep
  indices t (B,) (the network sees the index itself as its time); `_eps_and_x0` turns it
  into (eps, x0), the one place that knows the prediction types.
- `timesteps` is a float64 tensor of decreasing indices from `ddpm_grid`, ending with -1,
  which stands for clean data (alpha_bar = 1). A sampler takes one step per interval and
  evaluates the model once per step.

With q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I), every step first estimates
x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t). Predictions are not clipped to [-1, 1]:
latent and wavelet spaces have no such range.
"""

from __future__ import annotations

import math

import torch

from voxgen.diffusion.noise import randn_like


def ddpm_grid(steps: int, num_timesteps: int) -> torch.Tensor:
    """(steps + 1,) float64 indices: `steps` evenly spaced from T - 1 down to 0, then -1 (data).

    This is round(linspace(T - 1, 0, steps)), the "linspace" spacing of Lin et al. 2024
    ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2). Like their
    "trailing" spacing (and unlike "leading") it starts at the last timestep, so the first step
    sees the noise level the model was trained on at the end of the schedule; the two differ
    in where the remaining steps fall (as indices here, trailing ends at T / steps - 1, linspace at 0).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps} must be in [1, {num_timesteps}] for a {num_timesteps}-step DDPM schedule")
    indices = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round()
    return torch.cat([indices, torch.tensor([-1.0], dtype=torch.float64)])


def _alpha_bar(alphas_cumprod: list[float], index: float) -> float:
    return 1.0 if index < 0 else alphas_cumprod[int(index)]


def _eps_and_x0(model, x, index: float, ab: float, cond, prediction: str = "eps") -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) at timestep `index` from the model's output, which is `prediction`:
    with alpha = sqrt(ab), sigma = sqrt(1 - ab) and x = alpha x0 + sigma eps,
        eps: x0 = (x - sigma eps) / alpha
        x0:  eps = (x - alpha x0) / sigma
        v = alpha eps - sigma x0:  x0 = alpha x - sigma v,  eps = sigma x + alpha v."""
    t = torch.full((x.shape[0],), index, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    out = model(x, t, cond).to(x.dtype)
    if prediction == "eps":
        return out, (x - math.sqrt(1.0 - ab) * out) / math.sqrt(ab)
    alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
    if prediction == "x0":
        return (x - alpha * out) / sigma, out
    if prediction == "v":
        return sigma * x + alpha * out, alpha * x - sigma * out
    raise ValueError(f"prediction={prediction!r} is not one of eps, v, x0")


def ddpm(
    model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    cond=None,
    generator=None,
    callback=None,
    alphas_cumprod: torch.Tensor,
    prediction: str = "eps",
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020): x_s ~ q(x_s | x_t, x0_hat), the Gaussian posterior
    with variance (1 - ab_s) / (1 - ab_t) * beta. On a subsequence of the schedule beta is the
    respaced 1 - ab_t / ab_s (Nichol & Dhariwal 2021), so any number of steps works."""
    ab = alphas_cumprod.tolist()
    grid = timesteps.tolist()
    for i in range(len(grid) - 1):
        ab_t, ab_s = _alpha_bar(ab, grid[i]), _alpha_bar(ab, grid[i + 1])
        _, x0 = _eps_and_x0(model, x, grid[i], ab_t, cond, prediction)
        beta = 1.0 - ab_t / ab_s
        mean = (math.sqrt(ab_s) * beta / (1.0 - ab_t)) * x0 + (math.sqrt(1.0 - beta) * (1.0 - ab_s) / (1.0 - ab_t)) * x
        variance = (1.0 - ab_s) / (1.0 - ab_t) * beta
        x = mean + math.sqrt(variance) * randn_like(x, generator) if variance > 0 else mean
        if callback is not None:
            callback(i, x)
    return x


def ddim(
    model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    cond=None,
    generator=None,
    callback=None,
    alphas_cumprod: torch.Tensor,
    prediction: str = "eps",
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z
    with sigma = eta * sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)); eta = 0 is the
    deterministic ODE-like sampler, eta = 1 has the ancestral sampler's variance."""
    ab = alphas_cumprod.tolist()
    grid = timesteps.tolist()
    for i in range(len(grid) - 1):
        ab_t, ab_s = _alpha_bar(ab, grid[i]), _alpha_bar(ab, grid[i + 1])
        eps, x0 = _eps_and_x0(model, x, grid[i], ab_t, cond, prediction)
        sigma = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1.0 - ab_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback(i, x)
    return x


def dpmpp_2m(
    model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    cond=None,
    generator=None,
    callback=None,
    alphas_cumprod: torch.Tensor,
    prediction: str = "eps",
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2): a second-order multistep
    solver of the diffusion ODE in the data-prediction form, in log-SNR time
    lambda = log(alpha / sigma). With h = lambda_s - lambda_t and r = h_prev / h:
        D = (1 + 1 / (2 r)) x0_t - x0_prev / (2 r),   x_s = (sigma_s / sigma_t) x - alpha_s expm1(-h) D.
    The first step is first order (no history); so is the step into timestep 0: on a grid that
    is even in timestep index its log-SNR step is several times the previous one, and the
    extrapolation 1 / (2 r) would amplify the error of x0_prev (DPM-Solver's "lower order
    final"). The last step, to clean data, returns x0."""
    ab = alphas_cumprod.tolist()
    grid = timesteps.tolist()
    x0_prev, h_prev = None, None
    for i in range(len(grid) - 1):
        ab_t, ab_s = _alpha_bar(ab, grid[i]), _alpha_bar(ab, grid[i + 1])
        _, x0 = _eps_and_x0(model, x, grid[i], ab_t, cond, prediction)
        if ab_s >= 1.0:
            x = x0  # sigma_s = 0: the data-prediction update lands on x0 exactly
        else:
            alpha_t, sigma_t = math.sqrt(ab_t), math.sqrt(1.0 - ab_t)
            alpha_s, sigma_s = math.sqrt(ab_s), math.sqrt(1.0 - ab_s)
            h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)
            if x0_prev is None or i == len(grid) - 3:  # first step, or the step into timestep 0
                d = x0
            else:
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x = (sigma_s / sigma_t) * x - (alpha_s * math.expm1(-h)) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x)
    return x
