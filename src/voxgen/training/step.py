"""The training step: ONE function used by the trainer and by the memory planner.

`build_parts(cfg, device)` turns a config into the pieces a step needs; `train_step`
runs forward under the configured precision, the loss, backward, clipping and the
optimiser update.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from voxgen.diffusion.modes import Mode, build_mode
from voxgen.diffusion.spaces import build_space
from voxgen.diffusion.strategies import build_strategy
from voxgen.models.registry import build_model


@dataclass
class Parts:
    model: nn.Module
    strategy: object
    mode: Mode
    space: object
    precision: str


def network_channels(cfg, mode: Mode, space) -> tuple[int, int]:
    """(in, out) channels: the config's when given, else derived from mode and space."""
    derived_in, derived_out = mode.channels(space)
    in_ch = cfg.model.in_channels if cfg.model.in_channels is not None else derived_in
    out_ch = cfg.model.out_channels if cfg.model.out_channels is not None else derived_out
    return in_ch, out_ch


def build_parts(cfg, device: torch.device | str = "cpu") -> Parts:
    mode, space, strategy = build_mode(cfg), build_space(cfg), build_strategy(cfg)
    in_ch, out_ch = network_channels(cfg, mode, space)
    model = build_model(cfg.model, in_ch, out_ch, space.shape(cfg.data.shape), cfg.training.grad_checkpointing)
    return Parts(model.to(device), strategy, mode, space, cfg.training.precision)


def autocast(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        if device.type == "meta":
            # The memory planner traces this step on meta tensors that stand for CUDA ones;
            # torch.autocast has no meta device, so CUDA's casting policy is applied by the planner.
            from voxgen.memory.cuda_emulation import cuda_autocast

            return cuda_autocast(torch.bfloat16)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_loss(parts: Parts, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
    """Scalar loss of one batch {modality: (B, 1, D, H, W)}; noise and times from `generator`."""
    x0, cond = parts.mode.split(batch)
    z0 = parts.space.encode(x0)  # (B, C, D', H', W')
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    t = parts.strategy.sample_time(z0.shape[0], generator, z0.device)  # (B,)
    x_t = parts.strategy.interpolate(z0, noise, t)
    with autocast(parts.precision, z0.device):
        prediction = parts.model(parts.mode.model_input(x_t, cond), parts.strategy.model_time(t))
    return parts.strategy.loss(prediction, parts.strategy.target(z0, noise))


@dataclass
class StepResult:
    loss: float
    grad_norm: float


def train_step(parts: Parts, optimizer: torch.optim.Optimizer, batch: dict, generator, grad_clip: float) -> StepResult:
    """One optimisation step: forward, loss, backward, gradient clipping, update."""
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss(parts, batch, generator)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    return StepResult(float(loss.detach()), float(grad_norm))


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.training.lr, betas=tuple(cfg.training.betas), weight_decay=cfg.training.weight_decay
    )
