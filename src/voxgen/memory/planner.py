"""The memory planner: what one training step of a config needs, without a GPU.

Built on the meta device: no weights are allocated, so a multi-billion-parameter model
plans on a laptop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from voxgen.diffusion.modes import build_mode
from voxgen.diffusion.spaces import build_space
from voxgen.models.registry import build_on_meta, count_parameters
from voxgen.training.step import network_channels


@dataclass
class Plan:
    model: str
    params: int
    in_channels: int
    out_channels: int
    shape: list[int]

    def to_json(self) -> dict:
        return asdict(self)


def plan(cfg) -> Plan:
    mode, space = build_mode(cfg), build_space(cfg)
    in_ch, out_ch = network_channels(cfg, mode, space)
    shape = list(space.shape(cfg.data.shape))
    model = build_on_meta(cfg.model, in_ch, out_ch, shape)
    return Plan(cfg.model.name, count_parameters(model), in_ch, out_ch, shape)
