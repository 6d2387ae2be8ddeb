"""Pieces shared by every model family: shape checks and gradient checkpointing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

from voxgen.errors import ConfigError

_CHECKPOINTED: dict[type, type] = {}


def check_divisible(shape: Sequence[int], factor: int, why: str = "", *, by: str | None = None, what: str = "data.shape") -> None:
    """ConfigError naming the first axis of `shape` [D, H, W] whose size `factor` does not divide.

    The message is "{what} {axis}={size} is not divisible by {by}{why}": `by` says where the
    factor comes from (default: its value, e.g. "model.patch_size=8" or "2^3"), and `why`
    is appended as written, so it brings its own separator (" for a 4-level UNet",
    ": wdm halves it ...", " (HDiT ...)"). Every family checks its shape here, before any
    layer is built, so a bad shape is one line naming the key rather than a reshape error
    deep inside a forward pass.
    """
    if factor < 1:
        raise ValueError(f"factor {factor} must be at least 1")  # callers check their config first
    for axis, size in zip("DHW", shape):
        if size % factor:
            raise ConfigError(f"{what} {axis}={size} is not divisible by {factor if by is None else by}{why}")


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


def checkpoint_each(modules: Iterable[nn.Module]) -> None:
    """`enable_checkpointing` on every module: each one is a recompute unit of its own.

    Families pass their repeated blocks (transformer blocks, UNet levels), so backward keeps
    the activations between blocks and recomputes one block at a time.
    """
    for module in modules:
        enable_checkpointing(module)


class VectorEmbedding(nn.Module):
    """A condition vector (B, K) -> (B, width), added to a network's time embedding (FiLM through
    the embedding: every block that the time modulates is modulated by the vector too).

    The last layer starts at zero, so a network starts out ignoring the vector, as the zero
    convolutions of a ControlNet start it out ignoring its control. Networks build it after
    their own initialisation, so the weights a seed gives the rest of the network do not depend
    on whether there is a vector.
    """

    def __init__(self, size: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(size, width), nn.SiLU(), nn.Linear(width, width))
        if not self.mlp[-1].weight.is_meta:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, vector: torch.Tensor) -> torch.Tensor:
        return self.mlp(vector)


def add_vector(embedding: torch.Tensor, vector_embed: VectorEmbedding | None, vector: torch.Tensor | None) -> torch.Tensor:
    """The time embedding (B, E) plus the vector's embedding when the network takes one; a vector
    given to a network built without one (or the reverse) is an error, not silently ignored."""
    if (vector_embed is None) != (vector is None):
        raise ValueError("the network takes a condition vector exactly when it was built with vector_size > 0")
    if vector_embed is None:
        return embedding
    return embedding + vector_embed(vector).to(embedding.dtype)
