"""Rectified-flow samplers: pure functions `(model, x, timesteps, *, cond, generator, callback, **settings) -> x`.

`model(x, t, cond)` returns the velocity dx/dt
for x (B, C, D, H, W) at times t (B,) in [0, 1]; `timesteps` is a float64 grid from 1 (noise)
to 0 (data), built by `time_grid`. Fixed-step solvers (euler, midpoint, heun2, heun3, rk4)
take one step per grid interval; adaptive solvers (bosh3, fehlberg2, dopri5, dopri8, through
torchdiffeq) only use the grid's end points and choose their own steps; `restart` adds
forward-noise/re-integrate cycles (Xu et al. 2023) to a Heun integration.

DDPM samplers (strategy `ddpm`, see `voxgen.diffusion.ddpm_samplers`) keep the same
signature: there `model` returns the noise eps and `timesteps` holds integer timestep indices.

`callback(i, x)` is called after step i of the main grid. `generator` (see
`voxgen.diffusion.noise`) feeds the stochastic samplers; deterministic ones ignore it.
Their registry, `voxgen.diffusion.samplers.SAMPLERS`, reads each one's settings from its keyword arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from voxgen.diffusion.noise import randn_like

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) float64 times from 1 to 0. shift > 1 spends more steps near t = 1
    (the time shift of Esser et al. 2024: t' = s t / (1 + (s - 1) t))."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


def _times(x: torch.Tensor, t: float) -> torch.Tensor:
    """(B,) copies of time t; at least float32 so that bf16 volumes do not round the time."""
    return torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


# ---- explicit Runge-Kutta methods ---------------------------------------------------------


@dataclass(frozen=True)
class Tableau:
    """Butcher tableau of an explicit Runge-Kutta method: stage i evaluates at t + c[i] h
    and x + h sum_j a[i][j] k_j; the step is x + h sum_i b[i] k_i."""

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]


EULER = Tableau(a=((),), b=(1.0,), c=(0.0,))
MIDPOINT = Tableau(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5))
HEUN2 = Tableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0))
# Heun's third-order method (Heun 1900; Butcher, "Numerical Methods for ODEs", table 233(I)).
HEUN3 = Tableau(a=((), (1 / 3,), (0.0, 2 / 3)), b=(0.25, 0.0, 0.75), c=(0.0, 1 / 3, 2 / 3))
RK4 = Tableau(a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6), c=(0.0, 0.5, 0.5, 1.0))


def _rk_step(model: Velocity, x: torch.Tensor, t: float, h: float, tableau: Tableau, cond) -> torch.Tensor:
    """One step of `tableau` from t to t + h (h < 0 when integrating towards data)."""
    ks: list[torch.Tensor] = []
    for a_i, c_i in zip(tableau.a, tableau.c):
        x_i = x
        for a_ij, k in zip(a_i, ks):
            if a_ij:  # zero coefficients cost no memory traffic
                x_i = x_i + (h * a_ij) * k
        ks.append(model(x_i, _times(x, t + c_i * h), cond).to(x.dtype))
    for b_i, k in zip(tableau.b, ks):
        if b_i:
            x = x + (h * b_i) * k
    return x


def _integrate(model, x, timesteps, tableau, cond, callback, first_index: int = 0) -> torch.Tensor:
    # Step sizes are taken from the float64 grid as Python floats, so the grid's precision
    # (not the volume's) decides where the model is evaluated.
    grid = timesteps.tolist()
    for i in range(len(grid) - 1):
        x = _rk_step(model, x, grid[i], grid[i + 1] - grid[i], tableau, cond)
        if callback is not None:
            callback(first_index + i, x)
    return x


def euler(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor, *, cond=None, generator=None, callback=None) -> torch.Tensor:
    """First-order Euler integration of dx/dt = v(x, t) along `timesteps` (1 evaluation per step)."""
    return _integrate(model, x, timesteps, EULER, cond, callback)


def midpoint(
    model: Velocity, x: torch.Tensor, timesteps: torch.Tensor, *, cond=None, generator=None, callback=None
) -> torch.Tensor:
    """Explicit midpoint method: second order, 2 evaluations per step."""
    return _integrate(model, x, timesteps, MIDPOINT, cond, callback)


def heun2(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor, *, cond=None, generator=None, callback=None) -> torch.Tensor:
    """Heun's method (explicit trapezoid): second order, 2 evaluations per step, including the step into t = 0.

    EDM's deterministic sampler (Karras et al. 2022, Algorithm 1) is Heun's method too, but it
    takes a plain Euler step into the last grid point; this one applies the correction there as well.
    """
    return _integrate(model, x, timesteps, HEUN2, cond, callback)


def heun3(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor, *, cond=None, generator=None, callback=None) -> torch.Tensor:
    """Heun's third-order Runge-Kutta method: 3 evaluations per step."""
    return _integrate(model, x, timesteps, HEUN3, cond, callback)


def rk4(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor, *, cond=None, generator=None, callback=None) -> torch.Tensor:
    """The classical fourth-order Runge-Kutta method: 4 evaluations per step."""
    return _integrate(model, x, timesteps, RK4, cond, callback)


# ---- adaptive solvers (torchdiffeq) -------------------------------------------------------


def _adaptive(method: str, model: Velocity, x: torch.Tensor, timesteps: torch.Tensor, cond, callback, tolerance: float):
    from torchdiffeq import odeint

    def velocity(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(y, _times(y, float(t)), cond).to(y.dtype)

    # Only the end points: the solver picks its own steps, and asking for the grid's inner
    # times would keep one volume per grid point in memory.
    ends = torch.stack([timesteps[0], timesteps[-1]]).to(torch.promote_types(x.dtype, torch.float32))
    # The error norm (torchdiffeq's RMS) runs over the whole batch, so the accepted steps
    # depend on which samples share a batch (to within the tolerance).
    out = odeint(velocity, x, ends, method=method, rtol=tolerance, atol=tolerance, options={"step_t": ends})[-1]
    if callback is not None:
        callback(0, out)
    return out


def _adaptive_sampler(method: str, order: int) -> Callable:
    def sampler(
        model: Velocity,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        cond=None,
        generator=None,
        callback=None,
        tolerance: float = 1e-3,
    ) -> torch.Tensor:
        return _adaptive(method, model, x, timesteps, cond, callback, tolerance)

    sampler.__name__ = method
    sampler.__doc__ = (
        f"torchdiffeq's adaptive `{method}` (order {order}) from timesteps[0] to timesteps[-1] with rtol = atol = tolerance."
    )
    return sampler


bosh3 = _adaptive_sampler("bosh3", 3)
fehlberg2 = _adaptive_sampler("fehlberg2", 2)
dopri5 = _adaptive_sampler("dopri5", 5)
dopri8 = _adaptive_sampler("dopri8", 8)


# ---- restart sampling ---------------------------------------------------------------------


def restart_jump(x: torch.Tensor, t_min: float, t_max: float, noise: torch.Tensor) -> torch.Tensor:
    """Forward-noise x_{t_min} to x_{t_max} of the same x0 (t_max > t_min), as the linear
    interpolant's forward process would.

    With x_{t_min} = (1 - t_min) x0 + t_min n, scaling by c = (1 - t_max) / (1 - t_min) gives
    (1 - t_max) x0 + c t_min n; adding independent noise of variance t_max^2 - (c t_min)^2
    (>= 0 because t / (1 - t) grows with t) makes the noise part N(0, t_max^2), so
        x_{t_max} = c x_{t_min} + sqrt(t_max^2 - (c t_min)^2) eps
    has exactly the law of (1 - t_max) x0 + t_max n'.
    """
    c = (1.0 - t_max) / (1.0 - t_min)
    std = math.sqrt(max(t_max**2 - (c * t_min) ** 2, 0.0))
    return c * x + std * noise


def restart(
    model: Velocity,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    cond=None,
    generator=None,
    callback=None,
    restarts: int = 2,
    t_min: float = 0.1,
    t_max: float = 0.3,
    restart_steps: int = 3,
) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes").

    Heun integrates the grid down to t_min (inserted into the grid); then `restarts` times,
    x is forward-noised back to t_max (`restart_jump`, fresh noise from `generator`) and
    re-integrated to t_min with `restart_steps` Heun steps; then the grid is finished to 0.
    The added noise contracts errors accumulated above t_min, at 2 * restart_steps
    evaluations per restart.
    """
    grid = timesteps.to(torch.float64)
    t_low = torch.tensor([t_min], dtype=torch.float64)
    before = torch.cat([grid[grid > t_min], t_low])
    after = torch.cat([t_low, grid[grid < t_min]])
    x = _integrate(model, x, before, HEUN2, cond, callback)
    inner = torch.linspace(t_max, t_min, restart_steps + 1, dtype=torch.float64)
    for _ in range(restarts):
        x = restart_jump(x, t_min, t_max, randn_like(x, generator))
        x = _integrate(model, x, inner, HEUN2, cond, None)
    return _integrate(model, x, after, HEUN2, cond, callback, first_index=len(before) - 1)
