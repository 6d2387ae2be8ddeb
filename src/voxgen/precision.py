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
PRECISIONS = ("fp32", "bf16-mixed")


def _no_autocast(device: torch.device) -> AbstractContextManager:
    return contextlib.nullcontext()


def _bf16_autocast(device: torch.device) -> AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def autocast_policy(precision: str) -> Autocast:
    """`fp32`: no autocast; `bf16-mixed`: torch.autocast to bfloat16 on the tensors' device."""
    return {"fp32": _no_autocast, "bf16-mixed": _bf16_autocast}[precision]
