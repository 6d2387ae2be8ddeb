"""Host memory (resident set, RSS) of a `voxgen train` process, and of a node of them.

A training process holds in host memory, besides what Python and the imported libraries take
(`BASELINE_BYTES`, measured), the data cache (`data.cache`: every train and val case read,
decoded, as float32 volumes of `data.shape`), the batch being collated, its data-loader
workers, and at times a copy of the checkpoint: one shard of it while a checkpoint is written
from a GPU (the writer copies one shard at a time to the host for safetensors), the whole of
it while a run resumes (`load_latest` reads every tensor before loading them into the model).
On a GPU the CUDA runtime adds its libraries and context (`CUDA_RUNTIME_BYTES`); on a CPU run
(`training.device=cpu`) the step itself is in host memory: parameters, gradients, AdamW state,
activations (the step traced with a CPU's allocations, `planner.trace_step(device="cpu")`)
and the EMA copy of the weights. docs/memory.md, "Host memory", has the measurements.

Figures are per process (rank); a node holds `ranks_per_node` of them (`HostPlan.node_bytes`).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from voxgen.data.layout import case_folders
from voxgen.errors import DataError
from voxgen.memory.planner import GiB, Trace

MiB = 2**20
# Peak RSS of `voxgen train` on the CPU with a negligible model and data set (a UNet of 8
# channels on 16^3 phantoms, two steps): the interpreter, torch, MONAI, nibabel, TensorBoard and
# voxgen's code, torch's thread pools and what the trainer's bookkeeping, validation, sampling
# and checkpointing allocate. Measured by `benchmarks/host_memory.py --only baseline` (torch 2.13
# CPU, Python 3.11, OMP_NUM_THREADS=2: 559-587 MiB over three runs); more threads take more.
BASELINE_BYTES = 575 * MiB
# What CUDA adds to a process's host memory: the driver's context and the kernels of torch,
# cuBLAS and cuDNN loaded into host memory. Reported at 1.1-1.7 GB for torch processes
# (pytorch/pytorch issues 106511 and 113326); not measured by voxgen (no GPU here): an allowance.
CUDA_RUNTIME_BYTES = 2 * GiB
# A data-loader worker is forked from the trainer after the data cache is filled: it shares the
# cache and the libraries with it (copy-on-write) and owns what Python touches. Measured by
# `benchmarks/host_memory.py --only workers` (private memory, 20 workers: the trainer starts new
# ones every epoch): 9-10 MiB each; in another run of the same kind two of 20 reached 91 and 155
# MiB (a garbage collection in the worker touches the objects it shares). The largest is taken.
WORKER_BYTES = 160 * MiB
# DataLoader's default prefetch_factor: batches each worker has ready in shared memory.
PREFETCH_BATCHES = 2
FLOAT32 = 4


@dataclass
class HostPlan:
    """Host memory of one training process; bytes throughout."""

    device: str  # where the step runs: "cuda" or "cpu"
    world_size: int
    sharding: str
    # baseline, cuda_runtime, data_cache, batch, loader_workers, step (CPU: parameters, gradients,
    # AdamW state, activations), ema (CPU), checkpoint_write (one shard copied from the GPU),
    # checkpoint_resume (every tensor of the rank's checkpoint)
    parts: dict[str, int]
    # RSS of a process in each phase of a run: training, writing a checkpoint, resuming
    phases: dict[str, int]
    rank_bytes: int  # the most a process needs, in any phase, if it writes checkpoints
    reader_bytes: int  # the same for a process that only reads them (DDP's ranks but rank 0)
    data_cases: int | None  # train + val cases cached; None: data.root not found here
    notes: list[str] = field(default_factory=list)

    def node_bytes(self, ranks_per_node: int) -> int:
        """Host memory of a node running `ranks_per_node` processes, one of them a checkpoint writer."""
        return self.rank_bytes + (ranks_per_node - 1) * self.reader_bytes

    def to_json(self) -> dict:
        return asdict(self)


def host_plan(trace: Trace, world_size: int = 1, sharding: str = "ddp", device: str | None = None) -> HostPlan:
    """Host memory of each process of `trace`'s config run by `world_size` processes. `device`
    (default: training.device, "auto" read as a GPU run) is where the step runs."""
    cfg = trace.cfg
    device = device or ("cpu" if cfg.training.device == "cpu" else "cuda")
    volume = math.prod(cfg.data.shape) * FLOAT32 * len(trace.modalities)
    batch = cfg.training.batch_size * volume
    cases, notes = _cached_cases(cfg)
    share = world_size if sharding == "fsdp" and world_size > 1 else 1
    # FSDP: each process writes its own 1/N; every process reads the whole checkpoint when the
    # run resumes, before it takes its part (voxgen.training.state.load_module).
    checkpoint = _checkpoint_bytes(trace)
    parts = {
        "baseline": BASELINE_BYTES,
        "cuda_runtime": CUDA_RUNTIME_BYTES if device == "cuda" else 0,
        "data_cache": (cases or 0) * volume if cfg.data.cache else 0,
        "batch": batch,
        "loader_workers": cfg.data.num_workers * (WORKER_BYTES + PREFETCH_BATCHES * batch),
        "step": 0,
        "ema": 0,
        # The writer copies a GPU's tensors to the host one shard at a time; a CPU run's tensors are there already.
        "checkpoint_write": min(checkpoint // share, cfg.checkpoint.max_shard_bytes) if device == "cuda" else 0,
        "checkpoint_resume": checkpoint,
    }
    held = 0  # what a CPU run holds between steps: weights, gradients, AdamW state, EMA
    if device == "cpu":
        parts["step"], held = _cpu_step(trace, world_size, sharding)
        parts["ema"] = _state_bytes(trace)
        held += parts["ema"]
    common = parts["baseline"] + parts["cuda_runtime"] + parts["data_cache"] + parts["loader_workers"]
    phases = {
        "training": common + parts["batch"] + parts["step"] + parts["ema"],
        "checkpoint_write": common + held + parts["checkpoint_write"],
        # The checkpoint's tensors are read whole, then loaded into the model (on a CPU run, into
        # weights, EMA and AdamW state that are already there).
        "resume": common + checkpoint + held,
    }
    if not cfg.data.cache:
        notes = []
    if share == 1 and world_size > 1:
        notes.append("every rank is assumed to read the whole checkpoint when it resumes")
    reader = max(phases["training"], phases["resume"])
    return HostPlan(device, world_size, sharding, parts, phases, max(phases.values()), reader, cases, notes)


def _cached_cases(cfg) -> tuple[int | None, list[str]]:
    """Train + val cases in data.root (the trainer reads and caches both splits), or None."""
    try:
        return sum(len(case_folders(cfg.data.root, split)) for split in ("train", "val")), []
    except DataError as exc:
        return None, [f"data cache unknown and not counted ({exc})"]


def _state_bytes(trace: Trace) -> int:
    """Bytes of the network's state dict (weights and buffers): one copy of the model or its EMA."""
    return sum(t.numel() * t.element_size() for t in trace.model.state_dict().values())


def _checkpoint_bytes(trace: Trace) -> int:
    """Tensor bytes of a checkpoint: weights, EMA weights and AdamW's state (two moments like each
    trained parameter and a float32 step count each); the RNG states are a few KiB."""
    trained = [p for p in trace.model.parameters() if p.requires_grad]
    optimizer = sum(2 * p.numel() * p.element_size() + FLOAT32 for p in trained)
    return 2 * _state_bytes(trace) + optimizer


def _cpu_step(trace: Trace, world_size: int, sharding: str) -> tuple[int, int]:
    """(peak of a CPU step, what it holds between steps) of one process, from the step traced as
    a CPU allocates it; per rank when there are more than one."""
    from voxgen.memory.planner import plan_trace, trace_step

    cpu = trace if trace.device == "cpu" else trace_step(trace.cfg, trace.factory, device="cpu")
    planned = plan_trace(cpu, world_size=world_size, host=False)
    # After a step: the weights, their gradients (freed by the next step's zero_grad) and AdamW's state.
    ids = cpu.ids["parameters"] | cpu.ids["optimizer"] | cpu.ids["gradients"]
    held = sum(cpu.tracker.allocations[key].bytes for key in ids)
    share = world_size if sharding == "fsdp" else 1
    return max(planned.peak_bytes, planned.peak_bytes_first_step), held // share


@dataclass
class Measured:
    """What one process (and the children it waited for) used: `peak_rss_bytes` is its ru_maxrss."""

    returncode: int
    peak_rss_bytes: int
    output: str


# Runs argv[2:] in a child, waits for it and writes its exit code and ru_maxrss to the file argv[1].
# Linux records, when a process calls exec, the peak RSS of the memory image being replaced into
# the new program's ru_maxrss. A program started straight from a large caller (a pytest worker,
# a benchmark that has planned a model) would report the caller's peak if larger than its own;
# started from this launcher, a bare interpreter of a few MiB, it reports its own.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as error:
        print(f"{sys.argv[2]}: {error}", file=sys.stderr, flush=True)
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def measure_peak_rss(argv: Sequence[str], env: dict | None = None, timeout: float | None = None) -> Measured:
    """Run `argv` and return its exit code, peak resident set size and output (stdout + stderr).

    The peak is that process's own (`wait4`'s ru_maxrss, what `/usr/bin/time -v` reports), taken
    by a small launcher process (`_LAUNCHER` says why). Past `timeout` seconds it is killed."""
    with tempfile.TemporaryDirectory() as folder:
        report, log = Path(folder) / "report", Path(folder) / "output"
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *argv]
        with log.open("w") as out:
            proc = subprocess.Popen(launcher, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:  # past the timeout, or the caller interrupted: the program goes too
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        output = log.read_text(errors="replace")
        if not report.exists():  # killed before its child ended
            return Measured(proc.returncode, 0, output)
        code, maxrss_kib = (int(field) for field in report.read_text().split())
        return Measured(code, maxrss_kib * 1024, output)
