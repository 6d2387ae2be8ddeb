"""A tiny voxgen UNet and a learnable batch for training tests on the CPU (seconds)."""

from __future__ import annotations

import torch

from voxgen.config import compose
from voxgen.diffusion.parts import build_parts
from voxgen.training.step import make_optimizer, train_step

SHAPE = (8, 8, 8)
TINY_UNET = [
    "model.channels=[8,16]",
    "model.attention_levels=[false,false]",
    "model.num_head_channels=8",
    "model.norm_num_groups=4",
    "training.lr=2e-3",
    "training.batch_size=4",
    f"data.shape={list(SHAPE)}",
]


def tiny_cfg(*overrides):
    return compose([], [*TINY_UNET, *overrides])


def learnable_batch(batch: int = 4, seed: int = 0) -> dict:
    """{bravo, seg} (B, 1, 8, 8, 8): a smooth blob whose brightness follows the mask."""
    g = torch.Generator().manual_seed(seed)
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    blob = torch.exp(-(zz**2 + yy**2 + xx**2) * 2)
    seg = torch.where(torch.rand(batch, 1, *SHAPE, generator=g) > 0.7, 1.0, -1.0)
    bravo = (blob * 1.5 - 0.7).expand(batch, 1, *SHAPE) + 0.3 * seg
    return {"bravo": bravo.clamp(-1, 1), "seg": seg}


def train_losses(cfg, steps: int, seed: int = 0) -> list[float]:
    """Losses of `steps` training steps on one fixed batch."""
    torch.manual_seed(seed)
    parts = build_parts(cfg)
    optimizer = make_optimizer(parts.model, cfg)
    batch = learnable_batch()
    generator = torch.Generator().manual_seed(seed)
    return [train_step(parts, optimizer, batch, generator, grad_clip=1.0).loss for _ in range(steps)]
