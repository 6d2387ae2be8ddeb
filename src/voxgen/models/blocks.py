"""Pieces shared by model families."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

_CHECKPOINTED: dict[type, type] = {}


def _replay_function_modes():
    """`context_fn` of checkpoint: the recompute runs under the torch-function modes of the forward.

    torch.utils.checkpoint restores autocast and RNG state for the recompute, but not
    torch-function modes, which are off while autograd runs backward. A tool that traces the
    step under such a mode (the memory planner's GPU emulation) needs them again; in training
    no mode is active and both contexts do nothing.
    """
    modes = _get_current_function_mode_stack()

    @contextlib.contextmanager
    def recompute():
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            yield

    return contextlib.nullcontext(), recompute()


def _checkpointed_class(cls: type) -> type:
    def forward(self, *args, **kwargs):
        parent = super(subclass, self).forward
        if torch.is_grad_enabled():
            return checkpoint(parent, *args, use_reentrant=False, context_fn=_replay_function_modes, **kwargs)
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
