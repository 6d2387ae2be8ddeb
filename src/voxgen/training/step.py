"""The training step: ONE function used by the trainer and by the memory planner.

`train_step` runs forward under the parts' precision policy, the loss, backward, clipping and
the optimiser update (`voxgen.diffusion.parts.build_parts` makes the parts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from voxgen.diffusion.modes import drop_conditions
from voxgen.diffusion.parts import Parts


def prediction_and_target(parts: Parts, batch: dict, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's prediction for one batch {modality: (B, 1, D, H, W)} and the strategy's
    target for it, both (B, C, D', H', W'); noise and times from `generator`.

    In training mode, conditions are replaced by the null condition with probability
    `parts.strategy.cond_dropout` per sample (classifier-free guidance); evaluation mode keeps
    them, so validation losses compare the conditional model across steps.
    """
    x0, cond = parts.mode.split(batch)
    z0 = parts.space.encode(x0)  # (B, C, D', H', W')
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    t = parts.strategy.sample_time(z0.shape[0], generator, z0.device)  # (B,)
    if cond is not None and parts.strategy.cond_dropout > 0 and parts.model.training:
        # Drawn after noise and times: runs without dropout keep their random streams.
        cond = drop_conditions(cond, parts.strategy.cond_dropout, generator)
    x_t = parts.strategy.interpolate(z0, noise, t)
    with parts.autocast(z0.device):
        prediction = parts.model(parts.mode.model_input(x_t, cond), parts.strategy.model_time(t))
    return prediction, parts.strategy.target(z0, noise)


def compute_loss(parts: Parts, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
    """Scalar loss of one batch (see `prediction_and_target`)."""
    return parts.strategy.loss(*prediction_and_target(parts, batch, generator))


@dataclass
class StepResult:
    loss: float
    grad_norm: float  # total norm before clipping; nan when backward was skipped
    applied: bool = True  # False: `accept` refused the step and the optimiser did not move


def train_step(
    parts: Parts,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    generator,
    grad_clip: float,
    accept: Callable[[float, float], bool] | None = None,
) -> StepResult:
    """One optimisation step: forward, loss, backward, gradient clipping, update.

    `accept(loss, grad_norm) -> bool` (e.g. `Guards.accept`) is asked once per step, after the
    total gradient norm is known; when it refuses, the gradients are dropped and the optimiser
    is not stepped (weights, moments and its step count stay as they were). A non-finite loss is
    put to `accept` before backward, with grad_norm nan, so a refused one costs no backward.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss(parts, batch, generator)
    if accept is not None:
        # One host read before backward; only taken with a guard, so the planner's trace
        # (accept=None) is the same as before.
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            if not accept(loss_value, float("nan")):
                return StepResult(loss_value, float("nan"), applied=False)
            accept = None  # the guard has spoken for this step; do not ask (and count) twice
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if accept is not None and not accept(loss_value, float(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, float(grad_norm), applied=False)
    optimizer.step()
    return StepResult(float(loss.detach()), float(grad_norm))


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.training.lr, betas=tuple(cfg.training.betas), weight_decay=cfg.training.weight_decay
    )
