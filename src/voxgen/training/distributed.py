"""Training over the processes of a torchrun job (docs/distributed.md).

torchrun starts one process per GPU (or CPU worker) and tells each its place through the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). `World` is that place; a plain
`voxgen train` is a world of one and never touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from voxgen.checkpoint import Part, Writers


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The one process that writes files every process would otherwise write alike."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """This process's place in a torchrun job; a world of one outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def fsdp_units(model: nn.Module, min_params: int) -> list[nn.Module]:
    """The submodules that become their own FSDP unit, children before parents (the order
    fully_shard must be applied in).

    A module is a unit once it holds `min_params` parameters that no unit below it holds; what
    no unit takes (small layers, the stem, the head) stays with the root, which is always
    sharded last and is not in the list. A unit's parameters are gathered whole only while it
    computes, so the largest unit bounds the memory a rank needs beyond its shard.
    """
    units: list[nn.Module] = []

    def remaining(module: nn.Module) -> int:
        own = sum(p.numel() for p in module.parameters(recurse=False))
        left = own + sum(remaining(child) for child in module.children())
        # A container without a forward (ModuleList) cannot be a unit: its parameters go up.
        computes = type(module).forward is not nn.Module.forward
        if module is not model and computes and left >= min_params:
            units.append(module)
            return 0
        return left

    remaining(model)
    return units


def unit_params(model: nn.Module, min_params: int) -> list[int]:
    """Parameter counts of each FSDP unit as it is gathered, the root's remainder last: what a
    rank holds unsharded while that unit computes."""
    units = fsdp_units(model, min_params)
    inside: set[int] = set()
    counts = []
    for unit in units:
        params = [p for p in unit.parameters() if id(p) not in inside]
        inside.update(id(p) for p in params)
        counts.append(sum(p.numel() for p in params))
    counts.append(sum(p.numel() for p in model.parameters() if id(p) not in inside))
    return counts


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(world: World, device: torch.device):
    """torch.distributed set up for this process for the duration of training (nothing for a world of one)."""
    if not world.distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), rank=world.rank, world_size=world.size)
    try:
        yield
        # Leave together: torchrun stops the other workers once one has exited, and a worker
        # still finishing its last lines would be cut off by its SIGTERM.
        dist.barrier()
    finally:
        dist.destroy_process_group()


class Ranks:
    """The small collectives the trainer needs to keep every rank's decisions the same; each is
    the identity in a world of one. Values travel as float64 on the training device (NCCL only
    moves GPU tensors)."""

    def __init__(self, world: World, device: torch.device):
        self.world = world
        self.device = device

    def _tensor(self, values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float64, device=self.device).reshape(-1)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the ranks (a scalar loss: the global batch's mean loss)."""
        if not self.world.distributed:
            return value
        total = value.detach().to(torch.float64).clone()
        dist.all_reduce(total)
        return total / self.world.size

    def max(self, value: float) -> float:
        if not self.world.distributed:
            return value
        t = self._tensor([value])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    def from_main(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank: numbers that steer decisions (validation losses for the
        collapse guard) must be the same everywhere, even where kernels differ in the last bit."""
        if not self.world.distributed:
            return values
        t = self._tensor(values)
        dist.broadcast(t, src=0)
        return t.tolist()

    def all_ok(self, ok: bool) -> bool:
        """True when every rank is ok: a failure on one rank (a checkpoint write) stops them all."""
        return self.max(0.0 if ok else 1.0) == 0.0

    def barrier(self) -> None:
        if self.world.distributed:
            dist.barrier()

    def gather(self, value) -> list | None:
        """Every process's `value` (any picklable object) on the first, in rank order; None on the others."""
        if not self.world.distributed:
            return [value]
        out = [None] * self.world.size if self.world.main else None
        dist.gather_object(value, out, dst=0)
        return out

    def writers(self) -> Writers:
        """The processes as writers of one checkpoint (the checkpoint store's view of them)."""
        return Writers(self.world.rank, self.world.size, self.gather, self.all_ok)


def shard(model: nn.Module, min_params: int, device: torch.device) -> None:
    """Shard `model` in place over the job's processes with PyTorch's fully_shard (FSDP2): each
    unit of `fsdp_units`, then the root. Every parameter becomes a DTensor split along its first
    dimension; a unit is gathered whole only while it computes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in fsdp_units(model, min_params):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP's sharded parameters and their state). Nothing is one
    unless torch.distributed.tensor was imported (fully_shard imports it), and importing it only
    to ask would add 0.7 s to the start of every command."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_slices(tensors: dict[str, torch.Tensor], world: World) -> tuple[dict[str, torch.Tensor], dict[str, Part]]:
    """(this process's tensors, where its slices sit in the whole ones) for the checkpoint
    store: a DTensor sharded along dim 0 (FSDP's layout: torch.chunk of the rows, the first
    processes taking one row more) contributes its rows as flat elements of the whole tensor.
    Other tensors are the same on every process and pass as they are."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, Part] = {}
    for name, tensor in tensors.items():
        if not is_dtensor(tensor):
            out[name] = tensor
            continue
        from torch.distributed.tensor import Shard

        if tuple(tensor.placements) != (Shard(0),):
            raise ValueError(f"{name}: sharded as {tensor.placements}, not along its first dimension")
        rows = tensor.shape[0]
        chunk = -(-rows // world.size)
        first = min(world.rank * chunk, rows)
        mine = tensor.to_local()
        if mine.shape[0] != min(chunk, rows - first):
            raise ValueError(f"{name}: process {world.rank} holds {mine.shape[0]} of {rows} rows, not torch.chunk's share")
        if mine.numel():
            out[name] = mine
            parts[name] = Part(first * (tensor.numel() // rows), tuple(tensor.shape))
    return out, parts


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a checkpoint laid out as `target` is: this process's slice of it, as
    a DTensor, when `target` is sharded; `full` itself otherwise."""
    if not is_dtensor(target):
        return full
    full = full.to(device=target.device, dtype=target.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
