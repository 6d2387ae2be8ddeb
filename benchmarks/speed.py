"""voxgen's training step against the seeds' reference loop, in one process, and sampling speed.

    .venv/bin/python benchmarks/speed.py --device cpu [--config FILE] [KEY=VALUE ...] [--json OUT]
    python benchmarks/speed.py --device cuda --config configs/unet_pixel_exp1_128.yaml \\
        --sample-shape 160,256,256 model.attention=sdpa [training.compile=true ...] --json OUT

Two training steps at the same configuration, timed in the same process, alternating (after a
warm-up of each): `--repeats` rounds of `--steps` steps of the reference, then `--steps` of voxgen.

- **reference**: the loop of the seeds. MONAI's `DiffusionModelUNet` built directly with the
  config's channels, attention levels, residual blocks and head channels, MONAI's own
  (materialised) attention, fp32 weights, `torch.autocast(bfloat16)` (on the CPU only with
  `--precision bf16-mixed`), `torch.optim.AdamW` (the config's learning rate, betas and weight
  decay), batch 1; each step draws the rectified-flow noise and a uniform time, runs the network
  on x_t (and the condition channels), takes the MSE to noise - x0, backward, AdamW step.
- **voxgen**: `voxgen.training.step.train_step` on the task `build_task` makes of the config and
  the optimiser of `make_optimizer`, with what the trainer passes: the step's random draws and its
  stability guards (`voxgen_step` below).

Both see the same random batch every step (data loading is not timed). Reported: the median step
time of each and their ratio (voxgen / reference; < 1 is voxgen faster), with the spread over rounds;
on CUDA the peak memory of each side's steps (`torch.cuda.max_memory_allocated`, counted as if the
other side were not in the process, see `held_bytes`) and its ratio; on the CPU peak memory is not
measured (one process's high-water RSS cannot be split between the two sides). Then voxgen's
sampler (`voxgen.diffusion.generate.generate`, what `voxgen sample` runs) at `--sample-shape`:
seconds per volume for Euler with `--sample-steps` steps.

`--plan-config FILE` also plans FILE with the memory planner twice, as written (the seeds'
materialised attention) and with `model.attention=sdpa`, both `bf16-mixed`, and compares the two
peaks (and the seeds' measured figure, when their table is at `--reference-table`).
Results are printed and, with `--json`, written as one JSON object (docs/speed.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from voxgen.config import compose

GiB = 2**30
# A 3-level UNet on a 32^3 bravo volume (image + mask in, image out), attention at the deepest
# level (512 tokens): small enough for two CPU cores, big enough that convolutions dominate.
CPU_DEFAULT = [
    "mode=bravo",
    "strategy=rflow",
    "space=pixel",
    "data.shape=[32,32,32]",
    "model.name=unet",
    "model.channels=[16,32,64]",
    "model.attention_levels=[false,false,true]",
    "model.num_res_blocks=1",
    "model.num_head_channels=16",
    "model.norm_num_groups=8",
    "model.attention=naive",
]
SWITCHES = ("compile", "channels_last", "fused_optimizer", "tf32")
# The seeds' measured tables sit in shared/ beside the repository.
REFERENCE_TABLE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "unet3d_latent_a100.csv"


@dataclass
class Side:
    """One of the two loops: `step()` runs one training step; `modules` and `optimizer` hold
    what stays on the device between steps (for `held_bytes`)."""

    name: str
    step: Callable[[], None]
    modules: list
    optimizer: torch.optim.Optimizer
    times: list[list[float]] = field(default_factory=list)  # wall-clock seconds, per round
    cpu_times: list[list[float]] = field(default_factory=list)  # CPU seconds of this process, per round
    first_step_s: float = 0.0
    peak_bytes: int | None = None
    skipped: int = 0  # steps the guards refused (voxgen's side)


def held_bytes(side: Side) -> int:
    """Bytes of this side's state on the device: weights, gradients, optimiser moments (each
    storage once). Its peak in this process is read as the allocator's peak during its steps
    minus what was allocated at their start plus this: the other side's state and shared
    buffers (cuBLAS workspaces) are left out of both sides alike."""
    storages = {}
    tensors = [p for m in side.modules for p in m.parameters()]
    tensors += [p.grad for p in tensors if p.grad is not None]
    tensors += [t for s in side.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def compose_config(args) -> object:
    """The voxgen config both loops are built from; batch 1 and the precision of `--precision`."""
    overrides = [] if args.config else list(CPU_DEFAULT)
    overrides += list(args.overrides)
    if args.shape:
        overrides.append(f"data.shape=[{args.shape}]")
    overrides += ["training.batch_size=1", f"training.precision={args.precision}"]
    return compose(args.config, overrides)


# ---- voxgen's side: what reaches into voxgen's internals (the step: `voxgen_step` only) -----------


def voxgen_step(cfg, device: torch.device) -> tuple[Side, object, dict]:
    """voxgen's training step of `cfg` on `device` as the trainer runs it: the task of
    `build_task`, the optimiser of `make_optimizer`, the stability guards, and each step
    `train_step` with the step's random draws and the config's gradient clipping (the trainer's
    learning-rate schedule and EMA, outside the step, are left out). Returns the side, the task
    and the batch (random numbers in the shapes a loaded batch has, from `task.meta_batch`)."""
    from voxgen.draws import Draws
    from voxgen.tasks import build_task
    from voxgen.training.guards import Guards
    from voxgen.training.step import make_optimizer, step_network, train_step

    torch.manual_seed(cfg.run.seed)
    with device:
        task = build_task(cfg, device)
    # The shapes a loaded batch has; a latent preset with channel overrides gets model-space ones.
    task, shapes = task.meta_batch(1)
    if task.frozen:
        raise SystemExit("speed.py: this config runs an encoder inside the step, which the reference loop does not")
    if task.network.vector_size:
        raise SystemExit("speed.py: this mode gives the network a condition vector, which the reference loop does not")
    generator = torch.Generator(device).manual_seed(cfg.run.seed)
    batch = {k: torch.randn(v.shape, generator=generator, device=device) for k, v in shapes.items()}
    task.model.train()
    optimizer = make_optimizer(task.model, cfg)
    task = task.with_model(step_network(task.model, cfg))  # the speed switches, as the trainer sets them
    guards = Guards(cfg.guards)
    side = Side("voxgen", lambda: None, [task.model], optimizer)
    counter = iter(range(10**9))

    def step() -> None:
        i = next(counter)
        draws = Draws.for_step(cfg.run.seed, i, 1, device)
        result = train_step(task, optimizer, batch, draws, cfg.training.grad_clip, accept=guards.accept, step=i)
        # A step the guards refuse skips the update and would read faster: counted and reported.
        side.skipped += not result.applied

    side.step = step
    return side, task, batch


def sample_seconds(task, batch: dict, steps: int, seed: int) -> tuple[float, int]:
    """(seconds per volume, network evaluations) of voxgen's sampler, Euler with `steps` steps,
    for one volume conditioned like the first item of `batch`."""
    from voxgen.diffusion.generate import generate
    from voxgen.diffusion.samplers import SolverSpec

    _, cond = task.mode.split(task.encode(batch))
    result = generate(task, [seed], cond, solver=SolverSpec("euler", steps=steps), batch_size=1)
    return result.seconds_per_volume, result.nfe


def switches_in_effect(side: Side) -> dict:
    """Which of voxgen's speed switches the built side actually carries (the config may ask
    for them before the build applies them: the JSON then says so)."""
    model, optimizer = side.modules[0], side.optimizer
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    return {
        "compile": any(type(m).__name__ == "OptimizedModule" for m in model.modules()),
        "channels_last": bool(convs) and convs[0].is_contiguous(memory_format=torch.channels_last_3d),
        "fused_optimizer": bool(optimizer.defaults.get("fused")),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


# ---- the seeds' side ------------------------------------------------------------------------------


def reference_step(cfg, network, device: torch.device, precision: str, seed: int) -> Side:
    """The seeds' plain loop at the geometry voxgen gives `cfg`'s network (`network`: channels
    in and out, the grid it sees)."""
    from monai.networks.nets import DiffusionModelUNet

    m = cfg.model
    torch.manual_seed(seed)
    with device:
        model = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=network.in_channels,
            out_channels=network.out_channels,
            channels=list(m.channels),
            attention_levels=list(m.attention_levels),
            num_res_blocks=m.num_res_blocks if isinstance(m.num_res_blocks, int) else list(m.num_res_blocks),
            num_head_channels=m.num_head_channels,
            norm_num_groups=m.norm_num_groups,
            use_flash_attention=False,  # MONAI's default: the attention matrix is materialised
        )
    model.train()
    # The config's hyperparameters: weight decay costs a multiply per tensor, so both sides use the same.
    t = cfg.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    generator = torch.Generator(device).manual_seed(seed)
    shape = (1, network.out_channels, *network.shape)
    x0 = torch.randn(shape, generator=generator, device=device)
    cond_channels = network.in_channels - network.out_channels
    cond = torch.randn((1, cond_channels, *network.shape), generator=generator, device=device) if cond_channels else None
    autocast = precision == "bf16-mixed"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        noise = torch.randn(shape, generator=generator, device=device)
        t = torch.rand(1, generator=generator, device=device)
        tb = t.reshape(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - tb) * x0 + tb * noise
        inputs = x_t if cond is None else torch.cat([x_t, cond], dim=1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            prediction = model(inputs, timesteps=1000 * t)
        loss = F.mse_loss(prediction.float(), noise - x0)
        loss.backward()
        optimizer.step()

    return Side("reference", step, [model], optimizer)


# ---- timing ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(side: Side, device: torch.device) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one step. The CPU time of the process (all its threads) is
    what the step computed on a CPU, whatever else the machine runs; on CUDA it is only the
    host's share."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    side.step()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_block(side: Side, steps: int, device: torch.device) -> None:
    """`steps` timed steps of one side, appended to its times; on CUDA, updates its peak (see `held_bytes`)."""
    if device.type == "cuda":
        sync(device)
        others = torch.cuda.memory_allocated(device) - held_bytes(side)
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed(side, device) for _ in range(steps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - others
        side.peak_bytes = max(side.peak_bytes or 0, peak)
    side.times.append([wall for wall, _ in times])
    side.cpu_times.append([cpu for _, cpu in times])


def alternate(sides: list[Side], warmup: int, steps: int, repeats: int, device: torch.device) -> None:
    """Warm each side up, then `repeats` rounds of `steps` steps of each, in turn."""
    for side in sides:
        side.first_step_s = timed(side, device)[0]  # includes one-off costs (autotuning, compilation)
        for _ in range(warmup - 1):
            side.step()
    for _ in range(repeats):
        for side in sides:
            run_block(side, steps, device)


def summary(times: list[list[float]]) -> dict:
    flat = sorted(t for block in times for t in block)
    q1, _, q3 = statistics.quantiles(flat, n=4) if len(flat) > 1 else (flat[0], None, flat[0])
    return {
        "median_s": statistics.median(flat),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": flat[0],
        "max_s": flat[-1],
        "steps": len(flat),
        "round_medians_s": [statistics.median(block) for block in times],
    }


def profile_sides(sides: list[Side], steps: int, device: torch.device) -> dict:
    """Where each side spends its steps (torch.profiler): self time per op and per step, in ms,
    and the ops whose time differs most between the two (voxgen minus reference)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    per_op = {}
    for side in sides:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                side.step()
            sync(device)
        times = {}
        for e in prof.key_averages():
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            times[e.key] = (us / 1e3 / steps, e.count / steps)
        per_op[side.name] = times
    ref, vox = per_op["reference"], per_op["voxgen"]
    ops = set(ref) | set(vox)
    diff = {op: vox.get(op, (0.0, 0))[0] - ref.get(op, (0.0, 0))[0] for op in ops}
    rows = lambda times: [{"op": op, "self_ms": t, "calls": n} for op, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])]
    return {
        "clock": "device" if cuda else "cpu",
        "steps": steps,
        "total_ms": {name: sum(t for t, _ in times.values()) for name, times in per_op.items()},
        "reference": rows(ref)[:15],
        "voxgen": rows(vox)[:15],
        "difference": [
            {"op": op, "voxgen_minus_reference_ms": d, "calls": (ref.get(op, (0, 0))[1], vox.get(op, (0, 0))[1])}
            for op, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:15]
        ],
    }


def compare(reference: list[list[float]], voxgen: list[list[float]]) -> dict:
    """Both sides' summaries and voxgen / reference: of the medians, and per round."""
    ref, vox = summary(reference), summary(voxgen)
    # Each round's ratio compares steps run seconds apart: robust to slow drifts in load.
    rounds = [v / r for v, r in zip(vox["round_medians_s"], ref["round_medians_s"])]
    return {
        "reference": ref,
        "voxgen": vox,
        "ratio": vox["median_s"] / ref["median_s"],
        "round_ratios": rounds,
        "median_round_ratio": statistics.median(rounds),
    }


# ---- the planner's comparison ---------------------------------------------------------------------


def seeds_measured_gib(preset: Path, table: Path) -> float | None:
    """The seeds' measured peak (GB, read as GiB) of a preset named unet_latent<F>_<config>.yaml,
    from their table; None without one."""
    match = re.fullmatch(r"unet_latent(\d+x)_(.+)\.yaml", preset.name)
    if not match or not table.is_file():
        return None
    for row in csv.DictReader(table.open()):
        if (row["latent"], row["config"]) == match.groups():
            return float(row["peak_gb"])
    return None


def plan_comparison(preset: Path, table: Path) -> dict:
    """Planned peaks of `preset` with the seeds' materialised attention and with sdpa, bf16-mixed."""
    from voxgen.memory.planner import plan

    plans = {}
    for name, attention in (("reference", "naive"), ("voxgen", "sdpa")):
        p = plan(compose([preset], [f"model.attention={attention}", "training.precision=bf16-mixed", "training.batch_size=1"]))
        plans[name] = {"attention": attention, "peak_bytes": p.peak_bytes, "required_bytes": p.required_bytes}
    measured = seeds_measured_gib(preset, table)
    return {
        "config": str(preset),
        **plans,
        "ratio_peak": plans["voxgen"]["peak_bytes"] / plans["reference"]["peak_bytes"],
        "ratio_required": plans["voxgen"]["required_bytes"] / plans["reference"]["required_bytes"],
        "seeds_measured_bytes": None if measured is None else int(measured * GiB),
        "ratio_to_seeds_measured": None if measured is None else plans["voxgen"]["peak_bytes"] / (measured * GiB),
    }


# ---- main -----------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import monai

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        # Other processes on the machine slow both sides alike only on average: say how busy it was.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return env


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "overrides", nargs="*", help="KEY=VALUE config overrides (voxgen's side; the reference reads its geometry)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--config", action="append", default=[], help="a preset YAML (repeatable); none: a tiny CPU UNet")
    parser.add_argument("--shape", help="D,H,W of the data (data.shape)")
    parser.add_argument("--precision", choices=("fp32", "bf16-mixed"), help="both sides; default bf16-mixed on cuda, fp32 on cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each side per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    parser.add_argument("--sample-shape", help="D,H,W to sample at (default: the training shape)")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--sample-repeats", type=int, default=1, help="volumes sampled one at a time (0: no sampling)")
    parser.add_argument("--plan-config", type=Path, help="a preset to plan with naive attention and with sdpa")
    parser.add_argument("--plan-only", action="store_true", help="only the plans of --plan-config: no timing")
    parser.add_argument("--reference-table", type=Path, default=REFERENCE_TABLE, help="the seeds' latent UNet table")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="then profile N steps of each side (torch.profiler)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "fp32")
    if args.plan_only and not args.plan_config:
        parser.error("--plan-only needs --plan-config")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    return args


def measure(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("speed.py: --device cuda but torch sees no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config(args)
    voxgen, task, batch = voxgen_step(cfg, device)
    reference = reference_step(cfg, task.network, device, args.precision, cfg.run.seed)
    params = {s.name: sum(p.numel() for p in s.modules[0].parameters()) for s in (reference, voxgen)}
    if params["reference"] != params["voxgen"]:
        raise SystemExit(f"speed.py: the two networks differ ({params}); the comparison needs the same UNet")
    sides = [reference, voxgen]
    alternate(sides, args.warmup, args.steps, args.repeats, device)
    profiled = profile_sides(sides, args.profile, device) if args.profile else None
    step = compare(reference.times, voxgen.times)
    step["reference"]["first_step_s"] = reference.first_step_s
    step["voxgen"] |= {"first_step_s": voxgen.first_step_s, "skipped": voxgen.skipped}
    # On a shared CPU the wall clock also counts waiting for a core; the CPU time does not.
    step["cpu_time"] = compare(reference.cpu_times, voxgen.cpu_times) if device.type == "cpu" else None
    result = {
        "device": args.device,
        "environment": environment(device),
        "command": " ".join(["benchmarks/speed.py", *args.argv]),
        "config": {
            "files": list(args.config),
            "overrides": list(args.overrides),
            "shape": list(cfg.data.shape),
            "network_shape": list(task.network.shape),
            "channels": list(cfg.model.channels),
            "precision": args.precision,
            "attention": {"reference": "naive", "voxgen": cfg.model.attention},
            "switches_requested": {k: bool(cfg.training[k]) for k in SWITCHES},
            "switches_in_effect": switches_in_effect(voxgen),
        },
        "params": params,
        "protocol": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats},
        "step": step,
        "memory": {
            "reference_peak_bytes": reference.peak_bytes,
            "voxgen_peak_bytes": voxgen.peak_bytes,
            "ratio": voxgen.peak_bytes / reference.peak_bytes if device.type == "cuda" else None,
            "note": "torch.cuda.max_memory_allocated per side" if device.type == "cuda" else "not measured on the CPU",
        },
        "sampling": None,
        "profile": profiled,
    }
    del sides, reference, voxgen, task, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.sample_repeats:
        result["sampling"] = sampling(args, cfg, device)
    if args.plan_config:
        result["plan"] = plan_comparison(args.plan_config, args.reference_table)
    return result


def sampling(args, cfg, device: torch.device) -> dict:
    """voxgen's Euler sampler at --sample-shape: one untimed one-step volume first, then timed ones."""
    if args.sample_shape:
        cfg = compose_config(argparse.Namespace(**{**vars(args), "shape": args.sample_shape}))
    _, task, batch = voxgen_step(cfg, device)
    sample_seconds(task, batch, 1, seed=0)  # warm-up: kernels, cuDNN handles
    runs = [sample_seconds(task, batch, args.sample_steps, seed=i) for i in range(args.sample_repeats)]
    return {
        "solver": f"euler:{args.sample_steps}",
        "shape": list(cfg.data.shape),
        "nfe": runs[0][1],
        "seconds_per_volume": statistics.median(s for s, _ in runs),
        "runs_s": [s for s, _ in runs],
    }


def report(result: dict) -> str:
    ref, vox, step = result["step"]["reference"], result["step"]["voxgen"], result["step"]
    cfg = result["config"]
    lines = [
        f"{result['device']}: {result['params']['voxgen'] / 1e6:.1f} M-parameter UNet {cfg['channels']} at "
        f"{cfg['shape']} ({cfg['precision']}; attention reference {cfg['attention']['reference']}, "
        f"voxgen {cfg['attention']['voxgen']}); torch {result['environment']['torch']}",
    ]
    for name, s in (("reference", ref), ("voxgen", vox)):
        lines.append(
            f"  {name:9s} median {s['median_s'] * 1e3:8.1f} ms  (IQR {s['q1_s'] * 1e3:.1f}-{s['q3_s'] * 1e3:.1f}, "
            f"min {s['min_s'] * 1e3:.1f}, max {s['max_s'] * 1e3:.1f}, n={s['steps']}; first step {s['first_step_s']:.2f} s)"
        )
    if vox["skipped"]:
        lines.append(f"  voxgen's guards refused {vox['skipped']} steps (no update): its times are not comparable")
    ratios = step["round_ratios"]
    lines.append(
        f"  wall-clock step time voxgen / reference: {step['ratio']:.3f} (ratio of medians); per round: median "
        f"{step['median_round_ratio']:.3f}, range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds"
    )
    cpu = step["cpu_time"]
    if cpu:
        lines.append(
            f"  CPU time per step: reference median {cpu['reference']['median_s'] * 1e3:.1f} ms, voxgen "
            f"{cpu['voxgen']['median_s'] * 1e3:.1f} ms; voxgen / reference {cpu['ratio']:.3f} (ratio of medians), "
            f"per round median {cpu['median_round_ratio']:.3f}, "
            f"range {min(cpu['round_ratios']):.3f}-{max(cpu['round_ratios']):.3f}"
        )
    mem = result["memory"]
    if mem["ratio"] is None:
        lines.append(f"  peak memory: {mem['note']}")
    else:
        lines.append(
            f"  peak memory reference {mem['reference_peak_bytes'] / GiB:.2f} GiB, "
            f"voxgen {mem['voxgen_peak_bytes'] / GiB:.2f} GiB, ratio {mem['ratio']:.3f}"
        )
    if cfg["switches_requested"] != cfg["switches_in_effect"]:
        lines.append(f"  speed switches requested {cfg['switches_requested']}, in effect {cfg['switches_in_effect']}")
    if result["profile"]:
        p = result["profile"]
        total = p["total_ms"]
        lines.append(
            f"  profile ({p['clock']} self time per step, {p['steps']} steps): reference {total['reference']:.1f} ms, "
            f"voxgen {total['voxgen']:.1f} ms; largest differences (voxgen - reference):"
        )
        for row in p["difference"][:10]:
            calls = "/".join(f"{c:g}" for c in row["calls"])
            lines.append(f"    {row['voxgen_minus_reference_ms']:+9.2f} ms  {row['op']}  (calls {calls})")
    if result["sampling"]:
        s = result["sampling"]
        lines.append(f"  sampling {s['solver']} at {s['shape']}: {s['seconds_per_volume']:.2f} s per volume (NFE {s['nfe']})")
    return "\n".join(lines)


def report_plan(p: dict) -> str:
    lines = [f"planned peak of {p['config']} (bf16-mixed, batch 1):"]
    for name in ("reference", "voxgen"):
        q = p[name]
        lines.append(
            f"  {name:9s} {q['attention']:5s} peak {q['peak_bytes'] / GiB:6.2f} GiB, "
            f"required {q['required_bytes'] / GiB:6.2f} GiB"
        )
    lines.append(f"  ratio sdpa / naive: peak {p['ratio_peak']:.3f}, required {p['ratio_required']:.3f}")
    if p["seeds_measured_bytes"] is not None:
        lines.append(
            f"  seeds' measured reference {p['seeds_measured_bytes'] / GiB:.1f} GiB; "
            f"planned sdpa peak / it: {p['ratio_to_seeds_measured']:.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plan_only:
        result = {
            "command": " ".join(["benchmarks/speed.py", *args.argv]),
            "plan": plan_comparison(args.plan_config, args.reference_table),
        }
    else:
        result = measure(args)
        print(report(result))
    if result.get("plan"):
        print(report_plan(result["plan"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
