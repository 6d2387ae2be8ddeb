"""The memory planner: peak GPU memory of one training step of a config, without a GPU.

It runs the real `train_step` (the function the trainer runs: forward under the configured
precision, loss, backward, gradient clipping, AdamW update) on `meta` tensors that stand for
CUDA tensors: no weight, activation or gradient is allocated, so a multi-billion-parameter
model plans on a laptop. What a GPU does differently is applied on the way
(`voxgen.memory.cuda_emulation`), and every storage's allocation and release is counted as the
CUDA caching allocator counts it (`voxgen.memory.tracker`).

Two steps are traced. The first starts with a fresh optimiser (AdamW creates its state inside
the step): that is the protocol of the seeds' tables, `peak_bytes_first_step`. The second
starts with the state alive: that is what every later step needs, `peak_bytes`.

The verdict is judged on what the caching allocator reserves (`reserved_bytes`, the replay
of both steps, fragmentation included), widened into a band by the planner's measured error
for what dominates the step (`ERRORS`), against the GPU's memory less what the CUDA context
and the driver keep (`usable_bytes`): `fits` when the band's top is within it, `does not fit`
when its bottom is above it, `tight` in between. See docs/memory.md, "Verdict and band".

The traced steps (`Trace`) are planned for one process, for each rank of a torchrun job
(`voxgen.memory.ranks`: DDP or FSDP, the same log replayed with each allocation as a rank holds
it) and for the host memory of the training process (`voxgen.memory.host`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field

import torch

from voxgen.config.compose import SHARDINGS
from voxgen.errors import ConfigError
from voxgen.memory.allocator import replay
from voxgen.memory.cuda_emulation import CudaSemantics, emulated_autocast_policy
from voxgen.memory.tracker import AllocationTracker, Peak, attention_tokens, track_modules
from voxgen.tasks import build_task
from voxgen.training.step import make_optimizer, train_step

GiB = 2**30
DEFAULT_GPU_MEMORY = 80 * GiB

# Memory the caching allocator hands out that no tensor owns (documented in docs/memory.md).
# cuBLAS takes its workspaces from the caching allocator, one per handle and stream, alive from
# the first matmul on: 32 MiB each from Hopper on (4 MiB x 2 + 16 KiB x 8 before). An H200 step
# held 79.6 MiB more at its start than the pre-Hopper figure of two handles (16.25 MiB) predicts:
# three 32 MiB workspaces (the forward's, the autograd engine's and a cuBLASLt one;
# docs/gpu-validation.md). The larger figure is used for every GPU: it errs on the safe side.
CUBLAS_WORKSPACE = 3 * 32 * 2**20
# cuDNN convolution workspaces are requested from the caching allocator during each conv call
# and given back after it; they are not tensors, so they are added here as transients. Two sizes:
# - preferred: the conv's unfolded (im2col) input, N x C_in x k^3 x output voxels in the conv's
#   dtype, the buffer of the GEMM-based algorithms cuDNN's heuristics picked for 3D convolutions
#   on the seeds' A100 (their UNet rows match it); 1x1x1 convolutions need none;
# - required: the conv's input plus its output (or incoming gradient), what a bf16 3D
#   convolution took on an H200 with cuDNN 9.19 (docs/gpu-validation.md).
# PyTorch takes the preferred workspace only when the allocator can give it: on an
# out-of-memory error it tries cuDNN's next algorithm (or halves the workspace), so a step
# needs the required size and shows the preferred one where memory allows.
CONV_WORKSPACE = True

PARTS = ("parameters", "gradients", "optimizer", "activations", "other")

# What the allocator cannot hand out on a GPU of `gpu_memory_bytes`: the CUDA context (kernels
# of torch, cuBLAS and cuDNN: about 0.5 GiB on an A100 or H100 with torch 2.x) and the part of
# the nominal size the driver keeps (an "80 GB" A100 or H100 shows 79.2 GiB total).
CONTEXT_BYTES = GiB // 2
DRIVER_SHARE = 0.01
FITS, TIGHT, DOES_NOT_FIT = "fits", "tight", "does not fit"
# Materialised attention over at least this many tokens puts a step in its own error class.
MANY_TOKENS = 4096


@dataclass(frozen=True)
class ErrorClass:
    """The planner's measured error for steps whose peak is dominated by one kind of op.

    The band is [expected x (1 - low) - constant, expected, expected x (1 + high) + constant]
    (the constant: fixed buffers such as the cuBLAS workspaces differ between GPUs and versions); `source`
    says where the figures were measured (docs/memory.md).
    """

    name: str
    low: float
    high: float
    constant: int
    source: str


ERRORS = {
    # Every large miss of the held-out H100 table (MONAI UNets on space-to-depth inputs, 76 rows)
    # read 30-35% low, and every one had materialised attention at ~5,000 tokens. The same kind of
    # configuration on an H200 (torch 2.11, cuDNN 9.19) reads within 0.1% (required) and the
    # attention's own bytes match the hand count (docs/gpu-validation.md): the H100 misses are not
    # reproduced, so the band's top still covers them.
    "materialised attention": ErrorClass(
        "materialised attention", 0.04, 0.35, GiB // 10, "held-out H100 UNet table: misses 30-35% low"
    ),
    # Parameters, gradients and AdamW state have exact sizes: the seeds' UNet rows whose peak is
    # the optimiser step read 0.2-0.7% low; on an H200 the reserved memory of such rows read
    # 3.3% low to 3.3% high.
    "optimizer state": ErrorClass(
        "optimizer state", 0.04, 0.04, GiB // 10, "A100 allocated 0.2-0.7% low; H200 reserved -3.3% to +3.3%"
    ),
    # Convolution and transformer activations: the seeds' UNet and DiT rows read 0-11% low, the
    # largest misses a constant of about 0.1 GiB on the smallest rows; on an H200 the required
    # figure reads within 2.2% of the allocated peak and the allocator replay up to 11.4% below
    # the reserved memory (23 rows of configs/grids/gpu_validation.yaml).
    "activations": ErrorClass(
        "activations", 0.04, 0.12, GiB // 10, "A100 allocated 0-11% low, <= 0.1 GiB; H200 reserved up to 11.4% low"
    ),
}


def usable_bytes(gpu_memory_bytes: int, outside: int = 0) -> int:
    """What the caching allocator can reserve on a GPU of this nominal size, less `outside`
    bytes other libraries take from the GPU directly (NCCL's buffers)."""
    return int(gpu_memory_bytes * (1 - DRIVER_SHARE)) - CONTEXT_BYTES - outside


def band(expected: int, error: ErrorClass) -> list[int]:
    """[low, expected, high] bytes around an expected figure."""
    low = max(0, int(expected * (1 - error.low)) - error.constant)
    return [low, expected, int(expected * (1 + error.high)) + error.constant]


def verdict(band_bytes: list[int], gpu_memory_bytes: int, outside: int = 0) -> str:
    limit = usable_bytes(gpu_memory_bytes, outside)
    if band_bytes[2] <= limit:
        return FITS
    return DOES_NOT_FIT if band_bytes[0] > limit else TIGHT


def versions() -> dict[str, str]:
    """The versions the trace depends on (MONAI's attention code changed between releases)."""
    import platform

    from voxgen import __version__

    found = {"voxgen": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import monai

        found["monai"] = monai.__version__
    except ImportError:
        found["monai"] = "not installed"
    return found


@dataclass
class Plan:
    """Predicted peak GPU memory of one training step; bytes throughout."""

    model: str
    params: int
    in_channels: int
    out_channels: int
    shape: list[int]
    batch_size: int
    precision: str
    peak_bytes: int
    peak_bytes_first_step: int
    # The most either step needs when every cuDNN convolution gets only its required workspace
    # (PyTorch falls back to it when the preferred one does not fit); <= the peaks above.
    required_bytes: int
    gpu_memory_bytes: int
    fits: bool  # verdict == "fits"
    breakdown: dict[str, int]
    peak_phase: str
    peak_module: str
    breakdown_first_step: dict[str, int] = field(default_factory=dict)
    # The caching allocator replayed over both steps (`voxgen.memory.allocator`): what it
    # reserves from the driver, fragmentation included, and whether that still runs out of
    # `gpu_memory_bytes` after it has released its cached segments.
    reserved_bytes: int = 0
    reserved_bytes_first_step: int = 0
    allocator_oom: bool = False
    # The safe verdict: "fits", "tight" or "does not fit" (module docstring), the band of
    # reserved bytes it is judged on, the error class that sets the band's width, the memory
    # the allocator can use on the GPU, and the versions the trace was made with.
    verdict: str = ""
    band_bytes: list[int] = field(default_factory=list)
    error_class: str = ""
    usable_bytes: int = 0
    attention_tokens: int = 0  # the most tokens of a materialised attention matrix; 0: none
    versions: dict[str, str] = field(default_factory=dict)
    # Processes of the torchrun job and how they share the model (`training.sharding`). With
    # world_size > 1 every figure above is what EACH rank's GPU holds (`voxgen.memory.ranks`);
    # `one_gpu` keeps the same step's figures in one process, and `collectives` what DDP or FSDP
    # adds (bytes by term, FSDP's unit sizes). World size 1 is the plain one-process step.
    world_size: int = 1
    sharding: str = "ddp"
    one_gpu: dict = field(default_factory=dict)
    collectives: dict = field(default_factory=dict)
    # Host memory (RSS) of each training process and of a node (`voxgen.memory.host`).
    host: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '40g', '81920MiB', '12345678' (bytes) -> bytes. GB is read as GiB, as nvidia-smi's 80GB are.

    Under 1 MiB is refused: '--gpu-memory 80' is 80 bytes, almost certainly a size without its unit."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-memory {text!r} is not a size like 80GB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    nbytes = int(float(match.group(1)) * scale)
    if nbytes < 2**20:
        raise ConfigError(f"--gpu-memory {text!r} is {nbytes} bytes, less than 1 MiB: give a unit, like {match.group(1)}GB")
    return nbytes


def conv_workspace_bytes(input_shape, weight_shape, output_shape, itemsize: int) -> int:
    """Preferred workspace: im2col size of a convolution, N x C_in x prod(kernel) x prod(output spatial) x itemsize."""
    kernel = math.prod(weight_shape[2:])
    if kernel == 1 or len(weight_shape) < 5:
        return 0
    return input_shape[0] * input_shape[1] * kernel * math.prod(output_shape[2:]) * itemsize


def conv_required_bytes(input_shape, weight_shape, output_shape, itemsize: int) -> int:
    """Required workspace of a 3D convolution with kernel > 1: its input plus its output (or incoming gradient)."""
    if math.prod(weight_shape[2:]) == 1 or len(weight_shape) < 5:
        return 0
    return (math.prod(input_shape) + math.prod(output_shape)) * itemsize


def flash_backward_workspace_bytes(query_shape) -> int:
    """fp32 buffers FlashAttention-2's backward (mha_bwd) allocates besides dq, dk, dv.

    `dq_accum` (B, N rounded up to 128, heads, head_dim rounded up to 32) and `softmax_d`
    (B, heads, N rounded up to 128), both fp32; `query_shape` is (B, heads, N, head_dim).
    """
    b, h, n, d = query_shape
    n_rounded = -(-n // 128) * 128
    d_rounded = -(-d // 32) * 32 if d <= 128 else -(-d // 64) * 64
    return 4 * b * n_rounded * h * (d_rounded + 1)


def _kernel_workspaces(tracker: AllocationTracker, func, args, out) -> None:
    """Buffers GPU kernels take from the caching allocator and give back before returning.

    They are not tensors of the traced graph, so they are counted as transients alive with the
    op's outputs (documented in docs/memory.md):
    - cuDNN convolution workspaces: `conv_required_bytes`, and `conv_workspace_bytes` where memory allows;
    - CUDA softmax backward computes `grad * output` into a temporary the size of `grad` before
      its reduction kernel (aten/src/ATen/native/cuda/SoftMax.cu, softmax_backward_cuda_out);
    - FlashAttention backward's fp32 dq accumulator and softmax_d (`flash_backward_workspace_bytes`).
    """
    where = tracker._where
    conv = None
    if func is torch.ops.aten.convolution.default:
        conv = args[0], args[1], out  # input, weight, output
    elif func is torch.ops.aten.convolution_backward.default:
        conv = args[1], args[2], args[0]  # input, weight, incoming gradient
    if conv is not None and CONV_WORKSPACE:
        x, w, y = conv
        sizes = (x.shape, w.shape, y.shape, x.element_size())
        tracker.transient(conv_required_bytes(*sizes), f"{where()} (cuDNN workspace)", preferred=conv_workspace_bytes(*sizes))
    elif func is torch.ops.aten._softmax_backward_data.default:
        grad, output = args[0], args[1]
        itemsize = torch.promote_types(grad.dtype, output.dtype).itemsize
        tracker.transient(grad.numel() * itemsize, f"{where()} (softmax backward grad*output)", attention_tokens(grad))
    elif func is torch.ops.aten._scaled_dot_product_flash_attention_backward.default:
        tracker.transient(flash_backward_workspace_bytes(args[1].shape), f"{where()} (flash dq accumulator)")


def _cpu_workspaces(tracker: AllocationTracker, func, args, out) -> None:
    """What a CPU convolution allocates besides its outputs. PyTorch runs a float32 3D convolution
    through oneDNN (no buffer a tensor owns) unless `_slow_cpu_conv` says otherwise; its own
    kernel (slow_conv3d) unfolds the input into a columns buffer (`conv_workspace_bytes`), in the
    forward and again in the backward."""
    conv = None
    if func is torch.ops.aten.convolution.default and not args[6]:  # not transposed
        conv = args[0], args[1], out, args[8]
    elif func is torch.ops.aten.convolution_backward.default and not args[7]:
        conv = args[1], args[2], args[0], args[9]
    if conv is not None and _slow_cpu_conv(*conv):
        x, w, y, _ = conv
        tracker.transient(conv_workspace_bytes(x.shape, w.shape, y.shape, x.element_size()), f"{tracker._where()} (columns)")


def _slow_cpu_conv(x, w, y, groups: int) -> bool:
    """Whether PyTorch's CPU conv3d takes its own kernel rather than oneDNN's: its `use_mkldnn`
    (aten/src/ATen/native/Convolution.cpp) picks oneDNN for a batch above 1, groups, kernels above
    3 in the last two dimensions, or N x C x D x H above 20480, on float32 inputs."""
    if x.dim() != 5 or x.dtype != torch.float32:
        return False
    large_kernel = w.shape[-1] > 3 and w.shape[-2] > 3
    return x.shape[0] == 1 and groups == 1 and not large_kernel and math.prod(x.shape[:4]) <= 20480


def _breakdown(tracker: AllocationTracker, ids: dict[str, set], peak: Peak) -> dict[str, int]:
    parts = dict.fromkeys(PARTS, 0)
    for alloc_id in tracker.live_at(peak.event):
        alloc = tracker.allocations[alloc_id]
        for part in ("parameters", "gradients", "optimizer"):
            if alloc_id in ids[part]:
                break
        else:
            part = "activations" if alloc.phase in ("forward", "backward") else "other"
        parts[part] += alloc.bytes
    parts["other"] += peak.bytes - sum(parts.values())  # transient workspaces at the peak
    return parts


@dataclass
class StepPeak:
    """One traced step: its peak with cuDNN's preferred workspaces, that peak's breakdown, and
    the peak with the smallest (required) ones; bytes, without the cuBLAS workspaces."""

    peak: Peak
    parts: dict[str, int]
    required: int


def _run_step(tracker, parts, optimizer, batch, cfg, ids) -> StepPeak:
    tracker.set_phase("forward")
    tracker.reset_peak()
    # The last step: every term that starts late (an adversarial loss) is on.
    train_step(parts, optimizer, batch, None, cfg.training.grad_clip, step=cfg.training.steps, accumulate=cfg.training.accumulate)
    params = [p for p in parts.model.parameters()]
    # Tensors the tracker did not see (AdamW's step counts live on the host) have no id.
    ids["gradients"] = {tracker.storage_id(p.grad) for p in params if p.grad is not None} - {None}
    # Both steps' gradients, for the per-rank plans (the steady breakdown above uses this step's).
    ids["all gradients"] = ids.get("all gradients", set()) | ids["gradients"]
    ids["optimizer"] = {
        tracker.storage_id(t) for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    } - {None}
    # The peak with cuDNN's preferred workspaces (what a GPU with room shows), its breakdown, and
    # the peak with the smallest ones (what the step needs).
    peak = tracker.preferred_peak
    return StepPeak(peak, _breakdown(tracker, ids, peak), tracker.peak.bytes)


@dataclass
class Trace:
    """Two training steps of a config traced on meta tensors (module docstring): what every plan
    of it (one GPU, each rank of a torchrun job, the host) is read from."""

    cfg: object
    model: torch.nn.Module  # the trained network, on the meta device
    name: str
    shape: list[int]
    in_channels: int
    out_channels: int
    modalities: tuple[str, ...]
    tracker: AllocationTracker
    # Allocation ids: "parameters" (all, frozen networks included), "trainable", "gradients" (of
    # the steady step), "all gradients" (both steps), "optimizer" (AdamW's state).
    ids: dict[str, set]
    first: StepPeak
    steady: StepPeak
    first_step_events: int  # log entries up to the end of the first step
    device: str  # "cuda": GPU semantics; "cpu": what a CPU process allocates
    factory: torch.nn.Module | None = None  # the network given to `trace_step` in place of the registry's

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def cublas_bytes(self) -> int:
        return CUBLAS_WORKSPACE if self.device == "cuda" else 0


def trace_step(cfg, model: torch.nn.Module | None = None, device: str = "cuda") -> Trace:
    """Trace two training steps of `cfg` on meta tensors. `model` (on the meta device) replaces the
    registry's network. device="cpu" traces what a CPU process allocates instead: AdamW's default
    (per-tensor) update, the columns buffers of PyTorch's own CPU conv3d (`_cpu_workspaces`), and
    no cuDNN, cuBLAS or fused-attention workspaces."""
    with torch.device("meta"):
        parts = build_task(cfg, "meta", model=model)
    # torch.autocast has no meta device: the step runs under CUDA's casting rules instead.
    parts = dataclasses.replace(parts, autocast=emulated_autocast_policy(cfg.training.precision))
    net = parts.network
    shape, in_ch, out_ch = list(net.shape), net.in_channels, net.out_channels
    # An accumulated step reads `accumulate` micro-batches (voxgen.training.step.micro_batches).
    parts, batch = parts.meta_batch(cfg.training.batch_size * cfg.training.accumulate)
    optimizer = make_optimizer(parts.model, cfg)
    for group in optimizer.param_groups:
        # On CUDA, AdamW's default resolves to the foreach implementation (it is not chosen for
        # meta tensors), whose temporaries (sqrt of exp_avg_sq, one per parameter) set the peak
        # of large models. On CPU the default is the per-tensor loop, which meta tensors get too.
        group["foreach"] = device == "cuda"
        # The fused kernel (`training.fused_optimizer`) refuses meta tensors. It updates every
        # tensor in place with no temporaries, so the per-tensor loop (one parameter's temporaries
        # at a time) stands for it, a little above it.
        group["fused"] = False
    parts.model.train()

    tracker = AllocationTracker(on_op=_kernel_workspaces if device == "cuda" else _cpu_workspaces)
    # Frozen networks of the space (an uncached latent encoder) hold device memory as parameters do.
    frozen = [p for network in parts.frozen for p in network.parameters()]
    trainable = [p for p in parts.model.parameters() if p.requires_grad]
    ids = {"parameters": {tracker.register(p, "parameters") for p in [*parts.model.parameters(), *frozen]}}
    ids["trainable"] = {tracker.storage_id(p) for p in trainable}
    for t in batch.values():
        tracker.register(t, "input")
    hooks = track_modules(parts.model, tracker)
    try:
        with CudaSemantics(), tracker:
            first = _run_step(tracker, parts, optimizer, batch, cfg, ids)
            first_step_events = len(tracker.log)
            steady = _run_step(tracker, parts, optimizer, batch, cfg, ids)
    finally:
        for h in hooks:
            h.remove()
    name = cfg.model.name if model is None else type(model).__name__
    modalities = tuple(parts.modalities)
    steps = dict(first=first, steady=steady, first_step_events=first_step_events)
    return Trace(cfg, parts.model, name, shape, in_ch, out_ch, modalities, tracker, ids, **steps, device=device, factory=model)


def plan(cfg, gpu_memory_bytes: int = DEFAULT_GPU_MEMORY, model: torch.nn.Module | None = None, world_size: int = 1) -> Plan:
    """Trace two training steps of `cfg` on meta tensors and plan them; see the module docstring.
    `model` (on the meta device) replaces the registry's network. With `world_size` > 1 the
    memory figures are those of each rank of a torchrun job (`training.sharding`: ddp or fsdp)."""
    check_world(world_size, cfg.training.sharding)
    return plan_trace(trace_step(cfg, model), gpu_memory_bytes, world_size)


def check_world(world_size: int, sharding: str) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"--world-size {world_size}: must be a whole number of processes, at least 1")
    if sharding not in SHARDINGS:
        raise ConfigError(f"training.sharding={sharding!r}: must be one of {', '.join(SHARDINGS)}")


def plan_trace(trace: Trace, gpu_memory_bytes: int = DEFAULT_GPU_MEMORY, world_size: int = 1, host: bool = True) -> Plan:
    """The plan of a traced step on a GPU of `gpu_memory_bytes`: one process, or each rank of
    `world_size` processes (`voxgen.memory.ranks`); with the host memory of each process unless
    `host` is false."""
    from voxgen.memory.host import host_plan
    from voxgen.memory.ranks import rank_plan

    cfg = trace.cfg
    one = _one_gpu_plan(trace, gpu_memory_bytes)
    if world_size > 1:
        one = rank_plan(trace, one, world_size, cfg.training.sharding)
    if host:
        one.host = host_plan(trace, world_size, cfg.training.sharding).to_json()
    return one


def _one_gpu_plan(trace: Trace, gpu_memory_bytes: int) -> Plan:
    cfg, tracker, first, steady = trace.cfg, trace.tracker, trace.first, trace.steady
    first_parts, steady_parts = dict(first.parts), dict(steady.parts)
    # Peaks with the cuBLAS workspaces, which live from the first matmul on.
    cublas = trace.cublas_bytes
    peak_first, peak = first.peak.bytes + cublas, steady.peak.bytes + cublas
    required = max(first.required, steady.required) + cublas
    first_parts["other"] += cublas
    steady_parts["other"] += cublas
    # The two cuBLAS workspaces are the allocator's first requests (the first matmuls).
    events = [*cublas_events(), *tracker.log] if cublas else tracker.log
    first_replay = replay(events[: len(events) - len(tracker.log) + trace.first_step_events], gpu_memory_bytes)
    full_replay = replay(events, gpu_memory_bytes)
    tokens = max((a.attention_tokens for a in tracker.allocations.values()), default=0)
    error = ERRORS[error_class(tokens, steady_parts, peak)]
    # The replay saw the required workspaces: a GPU short of memory gives cuDNN no more.
    band_bytes = band(max(full_replay.peak_reserved, required), error)
    judged = verdict(band_bytes, gpu_memory_bytes)
    return Plan(
        model=trace.name,
        params=trace.params,
        in_channels=trace.in_channels,
        out_channels=trace.out_channels,
        shape=trace.shape,
        batch_size=cfg.training.batch_size,
        precision=cfg.training.precision,
        peak_bytes=peak,
        peak_bytes_first_step=peak_first,
        required_bytes=required,
        gpu_memory_bytes=gpu_memory_bytes,
        fits=judged == FITS,
        breakdown=steady_parts,
        peak_phase=steady.peak.phase,
        peak_module=steady.peak.where,
        breakdown_first_step=first_parts,
        reserved_bytes=full_replay.peak_reserved,
        reserved_bytes_first_step=first_replay.peak_reserved,
        allocator_oom=full_replay.oom,
        verdict=judged,
        band_bytes=band_bytes,
        error_class=error.name,
        usable_bytes=usable_bytes(gpu_memory_bytes),
        attention_tokens=tokens,
        versions=versions(),
        sharding=cfg.training.sharding,
    )


def cublas_events() -> list[tuple[int, int]]:
    """The cuBLAS workspaces as the allocator's first two requests (keys -1 and -2)."""
    return [(-1, CUBLAS_WORKSPACE // 2), (-2, CUBLAS_WORKSPACE // 2)]


def error_class(tokens: int, parts: dict[str, int], peak: int) -> str:
    """What dominates the step, for its error band: materialised attention over many tokens
    anywhere in the step, else the optimiser state when it is most of the peak, else activations."""
    if tokens >= MANY_TOKENS:
        return "materialised attention"
    state = parts["parameters"] + parts["gradients"] + parts["optimizer"]
    return "optimizer state" if state >= peak / 2 else "activations"
