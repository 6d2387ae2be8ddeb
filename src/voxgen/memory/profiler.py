"""`voxgen profile`: the planner's training step measured on a CUDA GPU.

The protocol mirrors the planner's two traced steps: the parts are built on the GPU, then
`train_step` (the trainer's step: forward under the configured precision, loss, backward,
clipping, AdamW update) runs twice. The first step starts with a fresh optimiser (AdamW creates
its state inside it: the seeds' tables measured this); the second starts with the state alive
(steady state, what every later step needs). Before each step the allocator's peak statistics are
reset, so each step's `max_memory_allocated` includes what is alive when it starts (weights,
batch, optimiser state) and everything it allocates. `max_memory_reserved` adds the caching
allocator's cached and fragmented blocks.

An out-of-memory error is caught and reported as OOM with the stage it happened in; the GPU is
cleaned before the next configuration. cuDNN autotuning is left as configured (off by default),
as the planner's workspace allowance assumes.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from voxgen.errors import VoxgenError

OK = "OK"
STAGES = ("build", "first step", "steady step")


@dataclass
class Measurement:
    """Peaks of the two steps in bytes (None where the step did not complete) and the set-up."""

    status: str  # "OK" or "OOM (<stage>)"
    first_allocated: int | None = None
    first_reserved: int | None = None
    steady_allocated: int | None = None
    steady_reserved: int | None = None
    environment: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        build = torch.__version__ + ("" if torch.version.cuda else " (a CPU-only build)")
        raise VoxgenError(
            f"voxgen profile needs a CUDA GPU, and torch {build} sees none; `voxgen plan` predicts the same figures without one"
        )


def environment(device: torch.device | str = "cuda") -> dict:
    """GPU name and memory, torch, CUDA and cuDNN versions, cuDNN autotuning."""
    props = torch.cuda.get_device_properties(device)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "gpu": props.name,
        "gpu_memory_bytes": int(props.total_memory),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "cudnn": str(cudnn) if cudnn else "",
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


class CudaMemory:
    """The allocator statistics a measurement reads (a stand-in replaces it in CPU tests)."""

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> tuple[int, int]:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def measure(stages: Sequence[tuple[str, Callable[[], None], bool]], memory) -> tuple[str, dict[str, tuple[int, int]]]:
    """Run `stages` [(name, fn, measured)] in order; peaks (allocated, reserved) of measured ones.

    An out-of-memory error stops the run: the status is 'OOM (<stage>)'. The exception, whose
    traceback holds the frames (and tensors) of the failed stage, is dropped before returning so
    the caller can free the GPU.
    """
    peaks: dict[str, tuple[int, int]] = {}
    failed = None
    for name, fn, measured in stages:
        if measured:
            memory.reset_peak()
        try:
            fn()
        except torch.cuda.OutOfMemoryError:  # raised by the caching allocator
            failed = name
        if failed is not None:
            break
        if measured:
            peaks[name] = memory.peaks()
    return (OK if failed is None else f"OOM ({failed})"), peaks


class TrainingStep:
    """The trainer's step of `cfg` on `device`, set up as the profiler measures it: `build()`
    creates the task on the device, its optimiser and a random batch of the planner's shapes;
    each call runs one `train_step`; `close()` drops all of it."""

    def __init__(self, cfg, device: torch.device | str = "cuda"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.state: dict = {}

    def build(self) -> None:
        from voxgen.tasks import build_task
        from voxgen.training.step import make_optimizer

        cfg, device, state = self.cfg, self.device, self.state
        torch.manual_seed(cfg.run.seed)
        with device:  # weights are created on the GPU, not copied there from host memory
            state["parts"] = parts = build_task(cfg, device)
        parts.model.train()
        state["optimizer"] = make_optimizer(parts.model, cfg)
        state["generator"] = torch.Generator(device=device).manual_seed(cfg.run.seed)
        # The planner's batch shapes (one source of truth for channels per modality), filled for real.
        state["parts"], shapes = parts.meta_batch(cfg.training.batch_size * cfg.training.accumulate)
        state["batch"] = batch = {k: torch.randn(v.shape, device=device, generator=state["generator"]) for k, v in shapes.items()}
        # Prepared like training, on the random batch as its data set (a space fits its statistics
        # on it: the step costs the same with any numbers).
        items = [{**{m: t[i] for m, t in batch.items()}, "case": f"random_{i}"} for i in range(len(next(iter(batch.values()))))]
        state["parts"].prepare(items, items)

    @property
    def model(self) -> torch.nn.Module:
        return self.state["parts"].model

    def __call__(self) -> None:
        from voxgen.training.step import train_step

        train_step(
            self.state["parts"],
            self.state["optimizer"],
            self.state["batch"],
            self.state["generator"],
            self.cfg.training.grad_clip,
            step=self.cfg.training.steps,
            accumulate=self.cfg.training.accumulate,
        )

    def close(self) -> None:
        self.state.clear()


def profile(cfg, device: torch.device | str = "cuda", memory=None) -> Measurement:
    """Measure the first and the steady training step of `cfg` on `device`; see the module docstring."""
    device = torch.device(device)
    if device.type == "cuda":
        require_cuda()
    memory = memory or CudaMemory(device)
    env = environment(device) if device.type == "cuda" else {}
    step = TrainingStep(cfg, device)
    memory.release()
    try:
        status, peaks = measure([("build", step.build, False), ("first step", step, True), ("steady step", step, True)], memory)
    finally:
        step.close()
        memory.release()
    first = peaks.get("first step", (None, None))
    steady = peaks.get("steady step", (None, None))
    return Measurement(status, first[0], first[1], steady[0], steady[1], env)
