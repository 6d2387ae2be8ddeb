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

from voxgen.draws import Draws
from voxgen.tasks import Task
from voxgen.training.phases import parameter_groups


@dataclass
class StepResult:
    loss: float
    grad_norm: float  # total norm before clipping; nan when backward was skipped
    applied: bool = True  # False: the optimiser did not move (refused by `accept`, or an fp16 overflow)
    overflow: bool = False  # fp16-mixed: the gradients overflowed at the scaler's scale (it lowers it)


def micro_batches(batch: dict, draws, accumulate: int) -> list[tuple[dict, object]]:
    """A process's batch of accumulate x B items, with its draws, as `accumulate` micro-batches of B
    in order (item i of micro-batch k is item k B + i of the batch, and draws row k B + i)."""
    if accumulate == 1:
        return [(batch, draws)]
    size = len(next(v for v in batch.values() if torch.is_tensor(v))) // accumulate
    parts = []
    for k in range(accumulate):
        rows = slice(k * size, (k + 1) * size)
        micro = {key: value[rows] for key, value in batch.items()}
        parts.append((micro, draws.part(rows.start, rows.stop) if isinstance(draws, Draws) else draws))
    return parts


def train_step(
    task: Task,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    draws,
    grad_clip: float,
    accept: Callable[[float, float], bool] | None = None,
    step: int = 0,
    mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    accumulate: int = 1,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One optimisation step of `task` (the `step`-th, from 0): forward, loss, backward, gradient
    clipping, update. `draws`: the batch's random draws (`voxgen.draws.Draws`; a generator seeds
    them, None draws from torch's global generator).

    `accumulate` > 1 splits the batch into that many micro-batches (`micro_batches`), each with its
    own forward and backward; the gradient is that of their mean loss, as one batch would give,
    with one micro-batch's activations in memory at a time.

    `accept(loss, grad_norm) -> bool` (e.g. `Guards.accept`) is asked once per step, after the
    total gradient norm is known; when it refuses, the gradients are dropped and the optimiser
    is not stepped (weights, moments and its step count stay as they were). A non-finite loss is
    put to `accept` before backward, with grad_norm nan, so a refused one costs no backward.

    `scaler` (fp16-mixed) scales the loss before backward and unscales the gradients before
    clipping; gradients that overflow at its scale skip the step without asking `accept` (the
    scaler lowers its scale: an overflow is its business, not a sign of divergence).

    `mean` averages a value over the processes of a distributed run (`Ranks.mean`): the loss the
    guard judges and the result reports is the global batch's, so every process decides alike.
    The gradient norm is the same on every process already (the gradients are averaged).
    """
    mean = mean or (lambda value: value)
    optimizer.zero_grad(set_to_none=True)
    parts = micro_batches(batch, draws, accumulate)
    total = 0.0
    for micro, micro_draws in parts:
        loss = task.loss(micro, micro_draws, step) / len(parts)
        if accept is not None:
            # One host read before backward; only taken with a guard, so the planner's trace
            # (accept=None) is the same as before.
            value = float(mean(loss.detach())) * len(parts)
            if not math.isfinite(value):
                if not accept(value, float("nan")):
                    optimizer.zero_grad(set_to_none=True)
                    return StepResult(value, float("nan"), applied=False)
                accept = None  # the guard has spoken for this step; do not ask (and count) twice
        (loss if scaler is None else scaler.scale(loss)).backward()
        total = total + loss.detach()
    loss_value = float(mean(total))
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = _full(torch.nn.utils.clip_grad_norm_(task.model.parameters(), grad_clip if grad_clip > 0 else float("inf")))
    if scaler is not None and not math.isfinite(float(grad_norm)):
        scaler.step(optimizer)  # finds the overflow recorded by unscale_ and does not step
        scaler.update()
        return StepResult(loss_value, float(grad_norm), applied=False, overflow=True)
    if accept is not None and not accept(loss_value, float(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()  # closes the step unscale_ opened
        return StepResult(loss_value, float(grad_norm), applied=False)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return StepResult(loss_value, float(grad_norm))


def _full(value: torch.Tensor) -> torch.Tensor:
    """A sharded model's (FSDP) gradient norm is a DTensor: its value on every rank."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def step_network(model: nn.Module, cfg, wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> nn.Module:
    """The network as the training steps run it: `training.channels_last` (its weights in the
    channels-last-3d layout, in place) and `training.tf32` (TF32 for float32 matmuls and
    convolutions), then `wrap` (the trainer's DDP wrapper), then `training.compile`
    (torch.compile of the whole). The checkpoint, the EMA and the optimiser keep `model` itself."""
    t = cfg.training
    if t.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    if t.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    network = wrap(model)
    return torch.compile(network) if t.compile else network


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over the parameters that train, one group per learning-rate multiplier
    (`training.lr_multipliers`; voxgen.training.phases). A frozen part of the network (a
    ControlNet's base UNet) gets no moments, so neither the optimiser's memory nor its
    checkpointed state carry it. The trainer sets each group's lr to the schedule's times its
    `lr_multiplier` at every step."""
    return torch.optim.AdamW(
        parameter_groups(model, cfg.training.lr_multipliers),
        lr=cfg.training.lr,
        betas=tuple(cfg.training.betas),
        weight_decay=cfg.training.weight_decay,
        # The fused kernel (one launch for every tensor; on CPUs too: 5 ms against 16 ms a step for
        # the quickstart's UNet on two cores); None leaves torch's choice.
        fused=True if cfg.training.fused_optimizer else None,
    )
