"""Allocation bookkeeping for a step traced on meta tensors, as the CUDA caching allocator counts it.

A torch-dispatch mode sees every aten op below autograd (forward, backward and optimiser ops
alike). Each output storage it has not seen is an allocation; a weak reference on the storage
tells when Python and autograd have let go of it, which is when the caching allocator would
get the block back. `max_memory_allocated` counts block sizes: requests rounded up to 512 B.

An event log (allocation id, +/- bytes) is kept instead of snapshots so that the live set at the
peak can be rebuilt once, after the step, and split into parameters, gradients, optimiser
state, activations and other.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

from voxgen.memory.cuda_emulation import set_backward

BLOCK = 512  # CUDA caching allocator's rounding of every request (kMinBlockSize)


def block_bytes(nbytes: int) -> int:
    return 0 if nbytes == 0 else -(-nbytes // BLOCK) * BLOCK


@dataclass
class Peak:
    bytes: int = 0
    phase: str = ""
    where: str = ""
    event: int = -1  # index into the log just after the peak's allocation


# Materialised attention: a score or probability matrix (..., N, N) over at least this many
# tokens (and the gradients and copies of one). The planner's error differs for these (see
# voxgen.memory.planner's error classes), so they are told apart from other activations.
MIN_ATTENTION_TOKENS = 256


def attention_tokens(t: torch.Tensor) -> int:
    """N of a materialised attention matrix (3-D (B*heads, N, N) or 4-D (B, heads, N, N)); else 0."""
    if t.dim() in (3, 4) and t.shape[-1] == t.shape[-2] >= MIN_ATTENTION_TOKENS:
        return int(t.shape[-1])
    return 0


@dataclass
class _Allocation:
    bytes: int
    phase: str
    attention_tokens: int = 0  # N when the storage holds a materialised N x N attention matrix
    where: str = ""  # the module (forward) or autograd node (backward) that allocated it


class AllocationTracker(TorchDispatchMode):
    """Live bytes and the peak of everything allocated on meta tensors while active.

    `transient(nbytes, where)` counts a buffer that is not a tensor (a cuDNN workspace) as
    allocated and freed at once: it can only raise the peak. A kernel that prefers a larger
    buffer but runs with `nbytes` when the allocator cannot give more (cuDNN's convolutions)
    passes `preferred=`: that raises only `preferred_peak`, the peak of a GPU with room for it.
    `on_op(tracker, func, args, out)` is called after each op (where such allowances are added).
    """

    def __init__(self, on_op=None):
        super().__init__()
        self.live = 0
        self.peak = Peak()
        self.preferred_peak = Peak()  # with every kernel's preferred workspace (>= peak)
        self.phase = "forward"
        self.log: list[tuple[int, int]] = []  # (allocation id, signed bytes)
        self.allocations: dict[int, _Allocation] = {}
        self.module_stack: list[str] = []
        self.on_op = on_op
        self.phase_peaks: dict[str, int] = {}  # highest live bytes seen in each phase
        # (log index, phase) where each phase starts, so that the log can be read again by
        # phase (the per-rank plans of `voxgen.memory.ranks`).
        self.phase_marks: list[tuple[int, str]] = []
        # Allocation id of each logged transient -> its preferred size (>= its logged size).
        self.transients: dict[int, int] = {}
        self._ids: dict[int, int] = {}  # StorageImpl address -> allocation id while alive

    # -- bookkeeping ----------------------------------------------------------------------
    def register(self, t: torch.Tensor, phase: str | None = None) -> int | None:
        """Count `t`'s storage if not counted yet; returns its allocation id."""
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return None
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._ids:
            return self._ids[key]
        nbytes = block_bytes(storage.nbytes())
        alloc_id = len(self.allocations)
        self._ids[key] = alloc_id
        self.allocations[alloc_id] = _Allocation(nbytes, phase or self.phase, attention_tokens(t), self._where())
        weakref.finalize(storage, self._release, key, alloc_id, nbytes)
        self._change(alloc_id, nbytes)
        return alloc_id

    def storage_id(self, t: torch.Tensor) -> int | None:
        return self._ids.get(t.untyped_storage()._cdata) if isinstance(t, torch.Tensor) else None

    def transient(self, nbytes: int, where: str, attention_tokens: int = 0, preferred: int = 0) -> None:
        preferred = block_bytes(max(preferred, nbytes))
        if self.live + preferred > self.preferred_peak.bytes:
            self.preferred_peak = Peak(self.live + preferred, self.phase, where, len(self.log))
        nbytes = block_bytes(nbytes)
        if nbytes:
            # Logged as an allocation and its release, so the allocator replay sees the request.
            alloc_id = len(self.allocations)
            self.allocations[alloc_id] = _Allocation(nbytes, self.phase, attention_tokens, where)
            self.transients[alloc_id] = preferred
            self.log += [(alloc_id, nbytes), (alloc_id, -nbytes)]
        if nbytes and self.live + nbytes > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.live + nbytes
        if nbytes and self.live + nbytes > self.peak.bytes:
            self.peak = Peak(self.live + nbytes, self.phase, where, len(self.log))

    def _release(self, key: int, alloc_id: int, nbytes: int) -> None:
        if self._ids.get(key) == alloc_id:
            del self._ids[key]
        self._change(alloc_id, -nbytes)

    def _change(self, alloc_id: int, nbytes: int) -> None:
        self.live += nbytes
        self.log.append((alloc_id, nbytes))
        if self.live > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.live
        if self.live > self.peak.bytes:
            self.peak = Peak(self.live, self.phase, self._where(), len(self.log))
        if self.live > self.preferred_peak.bytes:
            self.preferred_peak = Peak(self.live, self.phase, self._where(), len(self.log))

    def _where(self) -> str:
        if self.phase == "backward":
            node = torch._C._current_autograd_node()
            return node.name() if node is not None else ""
        return self.module_stack[-1] if self.module_stack else ""

    def live_at(self, event: int) -> set[int]:
        """Allocation ids alive just after log entry `event` (exclusive upper bound)."""
        alive: set[int] = set()
        for alloc_id, nbytes in self.log[:event]:
            (alive.add if nbytes > 0 else alive.discard)(alloc_id)
        return alive

    def set_phase(self, phase: str) -> None:
        if phase != self.phase or not self.phase_marks:
            self.phase_marks.append((len(self.log), phase))
        self.phase = phase
        set_backward(phase == "backward")

    def reset_peak(self) -> None:
        self.peak = Peak(self.live, self.phase, self._where(), len(self.log))
        self.preferred_peak = self.peak
        self.phase_peaks = {}

    # -- dispatch -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch._C._current_graph_task_id() != -1:
            self.set_phase("backward")
        elif self.phase == "backward" and not self.module_stack:
            # Gradient clipping and the update follow backward. (Module forwards seen during
            # backward are checkpoint recomputes, where the graph task id can read -1.)
            self.set_phase("optimizer")
        out = func(*args, **(kwargs or {}))
        for t in tree_iter(out):
            if isinstance(t, torch.Tensor):
                self.register(t)
        if self.on_op is not None:
            self.on_op(self, func, args, out)
        return out


def track_modules(model: nn.Module, tracker: AllocationTracker):
    """Forward hooks that keep `tracker.module_stack` on the qualified name of the running module.

    Global hooks, so that checkpoint recomputes in backward (module forwards run from autograd's
    unpack hook) are attributed to their module too.
    """
    names = {m: name or type(model).__name__ for name, m in model.named_modules()}

    def pre(module, _args):
        if module in names:
            tracker.module_stack.append(names[module])

    def post(module, _args, _out):
        if module in names and tracker.module_stack:
            tracker.module_stack.pop()

    return (nn.modules.module.register_module_forward_pre_hook(pre), nn.modules.module.register_module_forward_hook(post))
