"""The training step: ONE function used by the trainer and by the memory planner.

`train_step` runs the task's loss (forward under the task's precision policy), backward,
clipping and the optimiser update, whatever the task (`voxgen.tasks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from voxgen.tasks import Task


@dataclass
class StepResult:
    loss: float
    grad_norm: float  # total norm before clipping; nan when backward was skipped
    applied: bool = True  # False: `accept` refused the step and the optimiser did not move


def train_step(
    task: Task,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    generator,
    grad_clip: float,
    accept: Callable[[float, float], bool] | None = None,
    step: int = 0,
) -> StepResult:
    """One optimisation step of `task` (the `step`-th, from 0): forward, loss, backward, gradient
    clipping, update.

    `accept(loss, grad_norm) -> bool` (e.g. `Guards.accept`) is asked once per step, after the
    total gradient norm is known; when it refuses, the gradients are dropped and the optimiser
    is not stepped (weights, moments and its step count stay as they were). A non-finite loss is
    put to `accept` before backward, with grad_norm nan, so a refused one costs no backward.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss(batch, generator, step)
    if accept is not None:
        # One host read before backward; only taken with a guard, so the planner's trace
        # (accept=None) is the same as before.
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            if not accept(loss_value, float("nan")):
                return StepResult(loss_value, float("nan"), applied=False)
            accept = None  # the guard has spoken for this step; do not ask (and count) twice
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(task.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if accept is not None and not accept(loss_value, float(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, float(grad_norm), applied=False)
    optimizer.step()
    return StepResult(float(loss.detach()), float(grad_norm))


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over the parameters that train: a frozen part of the network (a ControlNet's base
    UNet) gets no moments, so neither the optimiser's memory nor its checkpointed state carry it."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.training.lr,
        betas=tuple(cfg.training.betas),
        weight_decay=cfg.training.weight_decay,
    )
