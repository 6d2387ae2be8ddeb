"""Each rank's GPU memory in a torchrun job (DDP or FSDP), read from the one-process trace.

The trainer runs the same `train_step` on every rank; what changes per rank is where the
parameters, gradients and optimizer state live and what the collectives allocate. So the
planner does not trace anything new: it replays the allocation log of the traced step
(`voxgen.memory.planner.Trace`) with each allocation resized for the rank, and with the
buffers of the collectives inserted where the trainer holds them (docs/distributed.md,
"Planning memory per rank and host memory"):

- DDP (`DistributedDataParallel(gradient_as_bucket_view=True)`): every rank holds the whole
  model, its gradients and AdamW state. The gradients live in DDP's buckets (flat buffers of
  25 MiB, the first 1 MiB), allocated when DDP wraps the model and kept for the whole run, so
  they are held in the forward too, where one process frees them between steps
  (`zero_grad(set_to_none=True)`). With bucket views there is no second copy of them.
- FSDP (`fully_shard` on `voxgen.training.distributed.fsdp_units`, then the root):
  parameters, gradients and AdamW state, and the optimizer's temporaries, are 1/N per rank.
  On top, from the first forward op to the optimizer step, each rank holds the units in
  flight: the root's parameters (not resharded after forward), the unit computing, the one
  prefetched and the flat all-gather buffer it is gathered into before being copied out (the
  largest unit counted for each). From the first backward op it also holds the unsharded
  gradients of the unit computing and of the root (reduce-scattered at the end of backward),
  the reduce-scatter input of two units (the one being reduced and the previous one still in
  flight) and one output. These are upper bounds: they do not all coexist at one moment.
- Activations and kernel workspaces are the one-process step's: the batch is per rank.
- NCCL's own buffers are taken from the GPU outside the caching allocator: `NCCL_BYTES` is
  taken off the memory the allocator can use.
"""

from __future__ import annotations

import dataclasses
import math

from voxgen.memory.allocator import replay
from voxgen.memory.planner import (
    ERRORS,
    FITS,
    PARTS,
    Plan,
    Trace,
    band,
    cublas_events,
    error_class,
    usable_bytes,
    verdict,
)
from voxgen.memory.tracker import block_bytes

# NCCL's communicator buffers (a FIFO per channel and peer, 4 MiB for the simple protocol, up to
# 32 channels over NVLink): reported at about 1-1.6 GB per GPU with one communicator
# (NVIDIA/nccl issues 864 and 1685). Not measured by voxgen: an allowance.
NCCL_BYTES = 2**30
# DDP's default bucket_cap_mb and its first bucket (torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES).
DDP_BUCKET_BYTES = 25 * 2**20
DDP_FIRST_BUCKET_BYTES = 2**20


@dataclasses.dataclass
class _Block:
    """A buffer of the collectives: held from `start` (a log index) to `stop` (None: always)."""

    key: int
    nbytes: int
    part: str
    phase: str
    label: str
    start: int
    stop: int | None


@dataclasses.dataclass
class _StepSpan:
    start: int  # first log entry of the step
    backward: int  # first log entry of its backward
    optimizer: int  # first log entry of its optimizer update


@dataclasses.dataclass
class _Peak:
    bytes: int = 0
    parts: dict = dataclasses.field(default_factory=dict)
    key: int | None = None  # the allocation that made it


def rank_plan(trace: Trace, one_gpu: Plan, world_size: int, sharding: str) -> Plan:
    """The plan of each rank of `world_size` processes sharing the model by `sharding`; `one_gpu`
    (the one-process plan of the same trace) is kept in the result's `one_gpu`."""
    sizes, parts_of, places = _rank_sizes(trace, world_size, sharding)
    blocks, collectives = _collective_blocks(trace, world_size, sharding, _step_spans(trace))
    for block in blocks:
        sizes[block.key], parts_of[block.key], places[block.key] = block.nbytes, block.part, (block.phase, block.label)
    log, first_end = _rank_log(trace.tracker.log, sizes, blocks, trace.first_step_events)
    first, first_required, steady, steady_required = _scan(log, parts_of, trace.tracker.transients, first_end)
    cublas = trace.cublas_bytes
    events = [*cublas_events(), *log] if cublas else log
    first_replay = replay(events[: first_end + len(events) - len(log)], one_gpu.gpu_memory_bytes)
    full_replay = replay(events, one_gpu.gpu_memory_bytes)
    required = max(first_required, steady_required) + cublas
    for peak in (first, steady):
        peak.parts["other"] += cublas
    outside = NCCL_BYTES if trace.device == "cuda" else 0
    error = ERRORS[error_class(one_gpu.attention_tokens, steady.parts, steady.bytes + cublas)]
    band_bytes = band(max(full_replay.peak_reserved, required), error)
    judged = verdict(band_bytes, one_gpu.gpu_memory_bytes, outside)
    phase, where = places.get(steady.key, ("forward", ""))
    return dataclasses.replace(
        one_gpu,
        peak_bytes=steady.bytes + cublas,
        peak_bytes_first_step=first.bytes + cublas,
        required_bytes=required,
        fits=judged == FITS,
        breakdown=steady.parts,
        peak_phase=phase,
        peak_module=where,
        breakdown_first_step=first.parts,
        reserved_bytes=full_replay.peak_reserved,
        reserved_bytes_first_step=first_replay.peak_reserved,
        allocator_oom=full_replay.oom,
        verdict=judged,
        band_bytes=band_bytes,
        error_class=error.name,
        usable_bytes=usable_bytes(one_gpu.gpu_memory_bytes, outside),
        world_size=world_size,
        sharding=sharding,
        one_gpu=_one_gpu_figures(one_gpu),
        collectives={**collectives, "nccl_bytes": outside},
    )


def _one_gpu_figures(plan: Plan) -> dict:
    keys = ("peak_bytes", "peak_bytes_first_step", "required_bytes", "reserved_bytes", "breakdown", "band_bytes", "verdict")
    return {k: getattr(plan, k) for k in keys}


def _rank_sizes(trace: Trace, world_size: int, sharding: str) -> tuple[dict, dict, dict]:
    """Bytes each traced allocation has on a rank, its part of the breakdown, and (phase, where)
    it was made."""
    ids, tracker = trace.ids, trace.tracker
    gradients, optimizer, trainable = ids["all gradients"], ids["optimizer"], ids["trainable"]
    sizes, parts_of, places = {}, {}, {}
    for key, alloc in tracker.allocations.items():
        transient = key in tracker.transients
        if key in ids["parameters"]:
            part = "parameters"
        elif key in gradients:
            part = "gradients"
        elif key in optimizer:
            part = "optimizer"
        else:
            part = "activations" if alloc.phase in ("forward", "backward") and not transient else "other"
        nbytes = alloc.bytes
        # Gradient clipping's and AdamW's temporaries are per parameter: sharded with them.
        update_temporary = alloc.phase == "optimizer" and not transient
        if sharding == "ddp" and part == "gradients":
            nbytes = 0  # views into DDP's buckets (`_collective_blocks`)
        elif sharding == "fsdp" and (key in trainable or part in ("gradients", "optimizer") or update_temporary):
            nbytes = block_bytes(math.ceil(nbytes / world_size))
        sizes[key], parts_of[key] = nbytes, part
        places[key] = (alloc.phase, alloc.where)
    return sizes, parts_of, places


def _step_spans(trace: Trace) -> list[_StepSpan]:
    """Where each traced step, its backward and its optimizer update start in the log."""
    marks, log_end = trace.tracker.phase_marks, len(trace.tracker.log)
    starts = [i for i, phase in marks if phase == "forward"]
    spans = []
    for start, stop in ((starts[0], trace.first_step_events), (trace.first_step_events, log_end)):
        inside = [(i, phase) for i, phase in marks if start <= i < stop]
        backward = next((i for i, phase in inside if phase == "backward"), stop)
        # The update follows the last return from backward (the phase can flip back and forth).
        optimizer = max((i for i, phase in inside if phase == "optimizer" and i >= backward), default=stop)
        spans.append(_StepSpan(start, backward, optimizer))
    return spans


def _collective_blocks(trace: Trace, world_size: int, sharding: str, spans: list[_StepSpan]) -> tuple[list[_Block], dict]:
    """The buffers DDP or FSDP add on a rank, and their summary for the plan's `collectives`."""
    if sharding == "ddp":
        grads = sum(p.numel() * p.element_size() for p in trace.model.parameters() if p.requires_grad)
        sizes = _buckets(grads)
        blocks = [_Block(-10 - i, size, "gradients", "forward", "DDP gradient bucket", 0, None) for i, size in enumerate(sizes)]
        return blocks, {"gradient_buckets_bytes": grads, "buckets": len(blocks)}
    from voxgen.training.distributed import unit_params

    itemsize = next(trace.model.parameters()).element_size()
    counts = unit_params(trace.model, trace.cfg.training.fsdp_unit_params)
    root, units = counts[-1] * itemsize, sorted((c * itemsize for c in counts[:-1]), reverse=True)
    largest, second = (units + [0, 0])[:2]
    forward = [
        (root, "parameters", "FSDP root unit, gathered"),
        (largest, "parameters", "FSDP unit computing, gathered"),
        (second, "parameters", "FSDP unit prefetched, gathered"),
        (largest, "parameters", "FSDP all-gather buffer"),
    ]
    backward = [
        (root, "gradients", "FSDP root unit gradients, unsharded"),
        (largest, "gradients", "FSDP unit gradients, unsharded"),
        (largest, "gradients", "FSDP reduce-scatter input"),
        (largest, "gradients", "FSDP reduce-scatter input, previous unit"),
        (block_bytes(math.ceil(largest / world_size)), "gradients", "FSDP reduce-scatter output"),
    ]
    blocks = []
    for span in spans:
        for phase, terms, start in (("forward", forward, span.start), ("backward", backward, span.backward)):
            for nbytes, part, label in terms:
                if nbytes:
                    blocks.append(_Block(-10 - len(blocks), nbytes, part, phase, label, start, span.optimizer))
    summary = {
        "units": len(units),
        "unit_params": counts[:-1],
        "root_params": counts[-1],
        "forward_in_flight_bytes": sum(n for n, _, _ in forward),
        "backward_in_flight_bytes": sum(n for n, _, _ in forward + backward),
    }
    return blocks, summary


def _buckets(nbytes: int) -> list[int]:
    """DDP's bucket sizes for `nbytes` of gradients: the first 1 MiB, then 25 MiB each."""
    sizes, first = [], min(nbytes, DDP_FIRST_BUCKET_BYTES)
    if first:
        sizes.append(first)
    left = nbytes - first
    while left > 0:
        sizes.append(min(left, DDP_BUCKET_BYTES))
        left -= sizes[-1]
    return sizes


def _rank_log(log: list, sizes: dict, blocks: list[_Block], mark: int) -> tuple[list[tuple[int, int]], int]:
    """The traced log with each allocation resized for the rank and the collectives' buffers
    allocated and freed at their log indices; and where log index `mark` falls in it."""
    at: dict[int, list] = {}
    for block in blocks:
        at.setdefault(block.start, []).append((block.key, block.nbytes))
        if block.stop is not None:
            at.setdefault(block.stop, []).append((block.key, -block.nbytes))
    out, marked = [], None
    for index, (key, nbytes) in enumerate(log):
        if index == mark:
            marked = len(out)
        out += at.get(index, ())
        if sizes[key]:
            out.append((key, sizes[key] if nbytes > 0 else -sizes[key]))
    out += at.get(len(log), ())
    return out, len(out) if marked is None else marked


def _scan(log, parts_of: dict, preferred: dict, first_end: int) -> tuple[_Peak, int, _Peak, int]:
    """Peaks of the rank log in the first step (entries before `first_end`) and the steady one:
    with cuDNN's preferred workspaces (and the breakdown there), and with the required ones."""
    live, parts = 0, dict.fromkeys(PARTS, 0)
    peaks, required, step = [_Peak(), _Peak()], [0, 0], 0
    for index, (key, nbytes) in enumerate(log):
        if index == first_end:
            step = 1  # the steady step starts with what is alive (as the tracker's reset_peak)
            peaks[1], required[1] = _Peak(live, dict(parts)), live
        live += nbytes
        parts[parts_of[key]] += nbytes
        if nbytes <= 0:
            continue
        required[step] = max(required[step], live)
        want = preferred.get(key, nbytes) - nbytes  # a larger workspace where memory allows
        if live + want > peaks[step].bytes:
            snapshot = dict(parts)
            snapshot["other"] += want
            peaks[step] = _Peak(live + want, snapshot, key)
    return peaks[0], required[0], peaks[1], required[1]
