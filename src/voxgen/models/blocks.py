"""Pieces shared by model families."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    def forward(self, *args, **kwargs):
        parent = super(subclass, self).forward
        if torch.is_grad_enabled():
            return checkpoint(parent, *args, use_reentrant=False, **kwargs)
        return parent(*args, **kwargs)

    subclass = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})
    return subclass


def enable_checkpointing(module: nn.Module) -> None:
    """Recompute `module`'s activations in the backward pass instead of storing them.

    The module's class is swapped for a subclass whose forward runs under
    `torch.utils.checkpoint`, so parameter names, checkpoints and deep copies are the same
    with and without it.
    """
    cls = type(module)
    if cls.__name__.startswith("Checkpointed"):
        return
    if cls not in _CHECKPOINTED:
        _CHECKPOINTED[cls] = _checkpointed_class(cls)
    module.__class__ = _CHECKPOINTED[cls]
