"""The bodies of `voxgen plan`, `voxgen fit` and `voxgen profile` (arguments as `voxgen.cli` parses them)."""

from __future__ import annotations

import json
from pathlib import Path

from voxgen.errors import VoxgenError


def run_plan(args) -> int:
    from voxgen.config import compose
    from voxgen.memory.planner import parse_memory, plan

    world_size, overrides = parse_world(args.world_size, args.sharding, args.overrides)
    if args.grid:
        if args.factory:
            raise VoxgenError("--grid and --factory cannot be combined")
        if world_size != 1:
            raise VoxgenError("--world-size goes with one configuration: plan it alone, or use voxgen fit --vary world_size=...")
        args.overrides = overrides
        return _plan_grid(args)
    if args.factory:
        from voxgen.memory.factory import parse_input_shape, parse_sizes, plan_factory

        regression = args.output_shape is not None
        if not args.input_shape:
            raise VoxgenError(f"--factory needs --input-shape {'C,H,W' if regression else 'C,D,H,W'}")
        if regression and args.output_channels is not None:
            raise VoxgenError("--output-shape plans a regression to one volume: drop --output-channels")
        result = plan_factory(
            args.factory,
            parse_sizes(args.input_shape, "C,H,W", "--input-shape") if regression else parse_input_shape(args.input_shape),
            args.output_channels,
            overrides,
            args.config,
            parse_memory(args.gpu_memory),
            world_size,
            parse_sizes(args.output_shape, "D,H,W", "--output-shape") if regression else None,
        )
    elif args.input_shape or args.output_channels is not None or args.output_shape is not None:
        raise VoxgenError("--input-shape, --output-channels and --output-shape go with --factory")
    else:
        result = plan(compose(args.config, overrides), parse_memory(args.gpu_memory), world_size=world_size)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print("\n".join(format_plan(result)))
    return 0


def parse_world(world_size: str | None, sharding: str | None, overrides: list[str]) -> tuple[int, list[str]]:
    """`--world-size N` and `--sharding ddp|fsdp` -> (N, the overrides with training.sharding set)."""
    from voxgen.config.compose import SHARDINGS

    size = 1
    if world_size is not None:
        try:
            size = int(world_size)
        except ValueError:
            raise VoxgenError(f"--world-size {world_size!r}: give the number of processes, e.g. --world-size 8") from None
        if size < 1:
            raise VoxgenError(f"--world-size {size}: must be at least 1")
    if sharding is None:
        return size, list(overrides)
    if sharding not in SHARDINGS:
        raise VoxgenError(f"--sharding {sharding!r}: must be one of {', '.join(SHARDINGS)}")
    return size, [*overrides, f"training.sharding={sharding}"]


def format_plan(result) -> list[str]:
    """The text `voxgen plan` prints: the step's memory (per rank for a torchrun job), then the host's."""
    from voxgen.memory.planner import GiB

    lines = [
        f"{result.model}: {result.params:,} parameters ({result.params / 1e6:.1f} M), "
        f"{result.in_channels} -> {result.out_channels} channels at {result.shape}, "
        f"batch {result.batch_size}, {result.precision}"
    ]
    if result.world_size > 1:
        one = result.one_gpu
        lines.append(
            f"each of {result.world_size} ranks ({result.sharding}; batch {result.batch_size} per rank); "
            f"in one process the step peaks at {one['peak_bytes'] / GiB:.2f} GiB ({one['verdict']})"
        )
        lines += _collective_lines(result)
    for part, nbytes in result.breakdown.items():
        lines.append(f"  {part:12s} {nbytes / GiB:8.2f} GiB")
    lines.append(
        f"  {'peak':12s} {result.peak_bytes / GiB:8.2f} GiB  ({result.peak_phase}: {result.peak_module or '-'}); "
        f"first step {result.peak_bytes_first_step / GiB:.2f} GiB"
    )
    if result.required_bytes < result.peak_bytes:
        note = "cuDNN's smallest workspaces; larger ones where memory allows"
        lines.append(f"  {'required':12s} {result.required_bytes / GiB:8.2f} GiB  ({note})")
    note = "caching allocator with fragmentation, required workspaces"
    lines.append(f"  {'reserved':12s} {result.reserved_bytes / GiB:8.2f} GiB  ({note})")
    low, expected, high = (b / GiB for b in result.band_bytes)
    lines.append(
        f"  {'band':12s} {low:.2f} / {expected:.2f} / {high:.2f} GiB reserved (low / expected / high: {result.error_class})"
    )
    outside = "the CUDA context" + (" and NCCL" if result.world_size > 1 else "")
    usable = f"{result.usable_bytes / GiB:.1f} GiB usable after {outside}"
    lines.append(f"{result.verdict} in {result.gpu_memory_bytes / GiB:.1f} GiB ({usable})")
    if result.verdict == "tight":
        lines.append("tight: the band crosses the limit; measure it on the GPU (voxgen profile) or choose a smaller config")
    return lines + _host_lines(result.host)


def _collective_lines(result) -> list[str]:
    from voxgen.memory.planner import GiB

    c = result.collectives
    if result.sharding == "ddp":
        return [f"  DDP gradient buckets {c['gradient_buckets_bytes'] / GiB:.2f} GiB held all step ({c['buckets']} buckets)"]
    largest = max(c["unit_params"], default=0)
    return [
        f"  FSDP: {c['units']} units (largest {largest / 1e6:.1f} M parameters, root {c['root_params'] / 1e6:.1f} M); "
        f"in flight up to {c['forward_in_flight_bytes'] / GiB:.2f} GiB in forward, "
        f"{c['backward_in_flight_bytes'] / GiB:.2f} GiB in backward"
    ]


def _host_lines(host: dict) -> list[str]:
    from voxgen.memory.planner import GiB

    if not host:
        return []
    phases = ", ".join(f"{name.replace('_', ' ')} {nbytes / GiB:.2f}" for name, nbytes in host["phases"].items())
    parts = ", ".join(f"{name.replace('_', ' ')} {nbytes / GiB:.2f}" for name, nbytes in host["parts"].items() if nbytes)
    cases = "" if host["data_cases"] is None else f" ({host['data_cases']} cases cached)"
    lines = [
        f"host memory (RSS) per process, {host['device']} run: up to {host['rank_bytes'] / GiB:.2f} GiB ({phases} GiB)",
        f"  {parts} GiB{cases}",
    ]
    return lines + [f"  note: {note}" for note in host["notes"]]


def _grid_out(args) -> Path:
    return Path(args.out) if args.out else Path("runs") / "memory" / Path(args.grid).stem


def _plan_grid(args) -> int:
    from voxgen.memory.grid import load_grid, plan_row, resolve, run_grid
    from voxgen.memory.planner import GiB, parse_memory
    from voxgen.memory.tables import PLAN_COLUMNS, write_tables
    from voxgen.reports.memory_chart import save_memory_chart

    gpu = parse_memory(args.gpu_memory)
    grid, items = load_grid(args.grid)
    resolved = resolve(grid, items, args.overrides)
    rows, seconds = run_grid(resolved, lambda item: plan_row(item, gpu), "planning", str(grid.path))
    out = _grid_out(args)
    notes = [
        f"Predicted by `voxgen plan --grid {args.grid}` (no GPU): peak GPU memory of one training step; "
        f"first step = fresh optimiser, steady = optimiser state alive; verdict at {gpu / GiB:.0f} GiB from the reserved "
        "memory and the planner's error band (docs/memory.md)."
    ]
    notes += [f"Skipped (invalid): {'; '.join(grid.skipped)}."] if grid.skipped else []
    csv_path, md_path = write_tables(rows, out, "plan", PLAN_COLUMNS, grid.title, notes)
    chart = save_memory_chart(out / "plan.png", rows, gpu, f"{grid.title} (predicted)")
    fitting = sum(r.verdict == "fits" for r in rows)
    skipped = f", {len(grid.skipped)} invalid skipped" if grid.skipped else ""
    print(
        f"planned {len(rows)} configurations in {seconds:.1f} s{skipped}: {fitting} fit in {gpu / GiB:.0f} GiB; "
        f"{md_path}, {csv_path}, {chart}"
    )
    return 0


def run_fit(args) -> int:
    from rich.console import Console

    from voxgen.memory.fit import fit, format_table, parse_vary
    from voxgen.memory.planner import GiB, parse_memory

    axes = parse_vary(args.vary)
    console = Console(stderr=True)
    with console.status("planning") as status:
        result = fit(
            axes,
            parse_memory(args.gpu_memory),
            args.margin,
            args.config,
            args.overrides,
            args.all,
            on_plan=lambda c: status.update(f"planning {c.label}"),
        )
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print("\n".join(format_table(result)))
    if result.best is None:
        planned = [c for c in result.candidates if c.needs_bytes is not None]
        # What the budget was compared with: the reserve's band, not the greedy-workspace peak.
        smallest = f"; the smallest needs up to {planned[-1].needs_bytes / GiB:.2f} GiB" if planned else ""
        raise VoxgenError(
            f"no candidate fits in {result.budget_bytes / GiB:.2f} GiB "
            f"({result.gpu_memory_bytes / GiB:.0f} GiB - {100 * result.margin:.0f}% margin){smallest}"
        )
    if not args.json:
        best = result.best
        print(
            f"largest that fits: {best.label} ({best.network.params / 1e6:.1f} M parameters, "
            f"needs up to {best.needs_bytes / GiB:.2f} GiB of {result.budget_bytes / GiB:.2f} GiB budget); "
            f"{result.why_not_next()}"
        )
    return 0


def run_profile(args) -> int:
    from voxgen.memory.profiler import require_cuda

    if args.grid:
        return _profile_grid(args)
    from voxgen.config import compose
    from voxgen.memory.planner import GiB, plan
    from voxgen.memory.profiler import profile

    cfg = compose(args.config, args.overrides)
    require_cuda()
    planned = None if args.no_plan else plan(cfg)
    m = profile(cfg)
    if args.json:
        out = m.to_json()
        out["params"] = planned.params if planned else None
        out["planned_peak_bytes"] = planned.peak_bytes if planned else None
        out["planned_peak_bytes_first_step"] = planned.peak_bytes_first_step if planned else None
        out["planned_required_bytes"] = planned.required_bytes if planned else None
        print(json.dumps(out))
        return 0
    env = m.environment
    print(f"{cfg.model.name} on {env['gpu']} (torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}): {m.status}")

    def versus(planned_bytes, measured) -> str:
        return f"{planned_bytes / GiB:.2f} GiB ({100 * (planned_bytes - measured) / measured:+.1f}%)"

    for label, alloc, reserved, pred in (
        ("first step", m.first_allocated, m.first_reserved, planned and planned.peak_bytes_first_step),
        ("steady step", m.steady_allocated, m.steady_reserved, planned and planned.peak_bytes),
    ):
        if alloc is None:
            print(f"  {label:12s} -")
            continue
        vs = f"; planned {versus(pred, alloc)}" if pred else ""
        if planned and label == "steady step" and planned.required_bytes < planned.peak_bytes:
            vs += f", required {versus(planned.required_bytes, alloc)}"
        print(f"  {label:12s} {alloc / GiB:8.2f} GiB allocated, {reserved / GiB:.2f} GiB reserved{vs}")
    return 0


def _profile_grid(args) -> int:
    from voxgen.memory.grid import load_grid, resolve, run_grid
    from voxgen.memory.planner import GiB, plan
    from voxgen.memory.profiler import environment, profile, require_cuda
    from voxgen.memory.tables import PROFILE_COLUMNS, Row, write_tables
    from voxgen.reports.memory_chart import save_memory_chart

    grid, items = load_grid(args.grid)
    resolved = resolve(grid, items, args.overrides)
    require_cuda()
    env = environment()
    out = _grid_out(args)
    notes = [
        f"Measured by `voxgen profile --grid {args.grid}` on {env['gpu']} ({env['gpu_memory_bytes'] / GiB:.1f} GiB), "
        f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, cudnn.benchmark={env['cudnn_benchmark']}: "
        "max_memory_allocated / max_memory_reserved of the first (fresh optimiser) and the steady step; "
        "error = planned vs measured; planned reserved, band top and verdict are the planner's for this GPU."
    ]

    def work(item) -> Row:
        # Judged against the GPU it runs on: the verdict is then checked by the measurement.
        planned = None if args.no_plan else plan(item.cfg, env["gpu_memory_bytes"])
        m = profile(item.cfg)
        return Row(
            config=item.entry.name,
            network=item.network,
            series=item.series,
            gpu_memory_bytes=env["gpu_memory_bytes"],
            planned_first=planned and planned.peak_bytes_first_step,
            planned_steady=planned and planned.peak_bytes,
            planned_required=planned and planned.required_bytes,
            planned_reserved=planned and planned.reserved_bytes,
            band_high=planned and planned.band_bytes[-1],
            verdict=planned.verdict if planned else "",
            measured_first=m.first_allocated,
            measured_steady=m.steady_allocated,
            reserved_first=m.first_reserved,
            reserved_steady=m.steady_reserved,
            status=m.status,
            environment=m.environment,
        )

    def save(rows) -> tuple[Path, Path]:
        return write_tables(rows, out, "profile", PROFILE_COLUMNS, grid.title, notes)

    rows, seconds = run_grid(resolved, work, "profiling", str(grid.path), on_row=save)
    csv_path, md_path = save(rows)
    chart = save_memory_chart(out / "profile.png", rows, env["gpu_memory_bytes"], f"{grid.title} (measured)")
    ooms = sum(r.status != "OK" for r in rows)
    print(f"profiled {len(rows)} configurations in {seconds:.1f} s ({ooms} OOM) on {env['gpu']}; {md_path}, {csv_path}, {chart}")
    return 0
