"""The parts one training step and one sampler need, built once from a config.

`Parts` holds the network, the strategy, the mode, the space, the network's geometry and the
precision policy. The geometry (`NetworkShape`: channels in and out, the grid the network sees) is
worked out here and nowhere else; the trainer, the samplers, the planner, the profiler and
config validation all read it from `Parts.network`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from voxgen.diffusion.modes import Mode, build_mode
from voxgen.diffusion.spaces import Space, build_space
from voxgen.diffusion.strategies import Strategy, build_strategy
from voxgen.errors import ConfigError
from voxgen.models.registry import build_model
from voxgen.precision import Autocast, autocast_policy


@dataclass(frozen=True)
class NetworkShape:
    """What the network sees: (B, in_channels, *shape) -> (B, out_channels, *shape).

    `data_in` and `data_out` are the channels the mode gives in the space; `in_channels` and
    `out_channels` equal them unless `model.in_channels` / `model.out_channels` override them
    (presets of spaces voxgen cannot train in yet, planned on their channel counts).
    """

    in_channels: int
    out_channels: int
    shape: tuple[int, int, int]  # [D', H', W'] in the model's space
    data_in: int
    data_out: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, D', H', W') of one generated volume in the model's space, what a sampler starts from."""
        return (self.out_channels, *self.shape)


def network_of(cfg, mode: Mode, space: Space) -> NetworkShape:
    """The network geometry of `cfg`: derived from mode and space, overridden by the config's channels."""
    data_in, data_out = mode.channels(space)
    in_ch = cfg.model.in_channels if cfg.model.in_channels is not None else data_in
    out_ch = cfg.model.out_channels if cfg.model.out_channels is not None else data_out
    return NetworkShape(in_ch, out_ch, space.shape(cfg.data.shape), data_in, data_out)


@dataclass
class Parts:
    model: nn.Module
    strategy: Strategy
    mode: Mode
    space: Space
    network: NetworkShape
    # device -> context manager entered around every forward (voxgen.precision).
    autocast: Autocast


def require_data_channels(cfg) -> None:
    """ConfigError unless the network of `cfg` takes the channels real data gives (training).

    Channel overrides that differ from the mode and space describe a network for another
    space (the seeds' latent presets): it can be planned, but a batch of real volumes does not
    fit it. Checked before the network is built.
    """
    mode, space = build_mode(cfg), build_space(cfg)
    net = network_of(cfg, mode, space)
    if (net.in_channels, net.out_channels) != (net.data_in, net.data_out):
        raise ConfigError(
            f"model.in_channels={net.in_channels} and model.out_channels={net.out_channels} do not match the "
            f"{net.data_in} -> {net.data_out} channels of mode {mode.name!r} in space={space.name}: this config "
            "describes a network for another space; it can be planned (voxgen plan) but not trained on these "
            "volumes (set both to null to derive them from mode and space)"
        )


def build_parts(cfg, device: torch.device | str = "cpu", model: nn.Module | None = None) -> Parts:
    """Everything a step needs; the network is built on the CPU (or under the caller's device
    context) and moved to `device`. `model` replaces the registry's network (a network from
    elsewhere, planned by `voxgen plan --factory`)."""
    mode, space, strategy = build_mode(cfg), build_space(cfg), build_strategy(cfg)
    network = network_of(cfg, mode, space)
    if model is None:
        model = build_model(cfg.model, network.in_channels, network.out_channels, network.shape, cfg.training.grad_checkpointing)
    return Parts(model.to(device), strategy, mode, space, network, autocast_policy(cfg.training.precision))
