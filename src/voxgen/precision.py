"""Precision policy: which autocast a forward pass runs under.

`training.precision` names the policy; `autocast_policy(name)` turns it into a function
device -> context manager that the step and the samplers enter around the network. The
memory planner traces on `meta` tensors, for which torch has no autocast, so it hands in
its own policy (CUDA's casting rules, `voxgen.memory.cuda_emulation`) in place of this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

Autocast = Callable[[torch.device], AbstractContextManager]
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
# Low-precision types of the mixed policies.
MIXED_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def _no_autocast(device: torch.device) -> AbstractContextManager:
    return contextlib.nullcontext()


def autocast_policy(precision: str) -> Autocast:
    """`fp32`: no autocast; `bf16-mixed` / `fp16-mixed`: torch.autocast to bfloat16 / float16 on the
    tensors' device (fp16 also needs a gradient scaler: `gradient_scaler`)."""
    if precision == "fp32":
        return _no_autocast
    dtype = MIXED_DTYPES[precision]
    return lambda device: torch.autocast(device_type=device.type, dtype=dtype)


def gradient_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16-mixed: a dynamic loss scaler (float16's range would flush small gradients to zero);
    None for the other policies, whose gradients need none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
