"""Which parts of a task's model train, and at which rate: `training.phases` and `training.lr_multipliers`.

A part is a module of the task's model, by its path (`translate`: `vae` and `unet`; the diffusion
UNet's `net.down_blocks`): the parameters whose names start with it. A phase
keeps some parts frozen for a number of optimizer steps or epochs (seed 003: the VAE frozen for
the first epoch, then everything trains); a frozen part takes no gradients, so AdamW leaves its
weights and moments untouched, bit for bit. The phase in force is a function of the step alone,
so a resumed run freezes what the uninterrupted one froze at that step. Learning-rate
multipliers become optimizer parameter groups (seed 003: the VAE at 0.1x the UNet's rate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from voxgen.errors import ConfigError


@dataclass(frozen=True)
class Phase:
    end: int | None  # the first optimizer step after the phase; None: it lasts to the end of training
    frozen: frozenset[str]


def within(name: str, part: str) -> bool:
    """Whether parameter `name` belongs to the module at path `part`."""
    return name.startswith(part + ".")


def _check_parts(names, model: nn.Module, key: str) -> None:
    """ConfigError unless every name is the path of a module of `model` with trainable parameters."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    unknown = [n for n in names if not any(within(name, n) for name in trainable)]
    if unknown:
        tops = list(dict.fromkeys(name.split(".", 1)[0] for name in trainable))
        raise ConfigError(
            f"{key} names {', '.join(map(repr, unknown))}: the parts of this task's model are {', '.join(tops)} "
            "(or a module path below one of them, e.g. net.down_blocks)"
        )


def schedule(cfg, model: nn.Module, steps_per_epoch: int) -> list[Phase]:
    """`training.phases` as Phases with their end steps (an epoch is `steps_per_epoch` optimizer
    steps); [] when none are set. ConfigError for a part the model does not have."""
    phases, start = [], 0
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    for i, phase in enumerate(cfg.training.phases):
        _check_parts(phase.frozen, model, f"training.phases[{i}].frozen")
        if all(any(within(name, part) for part in phase.frozen) for name in trainable):
            frozen = ", ".join(phase.frozen)
            raise ConfigError(f"training.phases[{i}] freezes every part of the model ({frozen}): nothing would train")
        length = phase.steps if phase.steps is not None else None if phase.epochs is None else phase.epochs * steps_per_epoch
        end = None if length is None else start + length
        phases.append(Phase(end, frozenset(phase.frozen)))
        if end is None:
            break
        start = end
    return phases


def frozen_at(phases: list[Phase], step: int) -> frozenset[str]:
    """The parts frozen at optimizer step `step` (from 0): those of the first phase not yet over;
    after the last phase, none."""
    for phase in phases:
        if phase.end is None or step < phase.end:
            return phase.frozen
    return frozenset()


def freeze(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str], frozen: frozenset[str]) -> None:
    """Let exactly the optimizer's parameters outside the `frozen` parts take gradients. Parameters
    the optimizer does not hold (frozen for good, like a ControlNet's base) are left alone."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.requires_grad_(not any(within(names[p], part) for part in frozen))


def parameter_groups(model: nn.Module, multipliers) -> list[dict]:
    """The model's trainable parameters as optimizer groups, one per learning-rate multiplier
    (`training.lr_multipliers`, by part; the innermost part a parameter is in decides; 1 for
    the rest), each carrying its `lr_multiplier`."""
    multipliers = dict(multipliers)
    _check_parts(list(multipliers), model, "training.lr_multipliers")
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = [part for part in multipliers if within(name, part)]
            multiplier = float(multipliers[max(parts, key=len)]) if parts else 1.0
            groups.setdefault(multiplier, []).append(p)
    return [{"params": params, "lr_multiplier": m} for m, params in groups.items()]
