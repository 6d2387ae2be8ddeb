"""The `voxgen` command. Thin: parse, call, print.

User errors (VoxgenError) print `error: ...` to stderr and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from voxgen.errors import VoxgenError


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. training.steps=200")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config file (repeatable)")


def _add_json_and_grid(p: argparse.ArgumentParser, verb: str) -> None:
    """The output flags `plan` and `profile` share: one JSON object, or a grid with tables and a chart."""
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--grid", metavar="FILE", help=f"YAML grid of named configurations: {verb}, write tables and a chart")
    p.add_argument("--out", metavar="DIR", help="folder for --grid's tables and chart (default runs/memory/GRID)")


def _add_data_gen(sub, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument("--out", required=True, help="data folder to create")
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--shape", type=int, nargs=3, default=[32, 48, 40], metavar=("D", "H", "W"))
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxgen", description="Generative models of 3D medical volumes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="main job on the embedded data: data -> train -> sample -> evaluate")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = sub.add_parser("train", help="train; resumes when run.dir holds a checkpoint")
    _add_overrides(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop at this step with a checkpoint and exit 75, as a preemption would")

    p = sub.add_parser("slurm", help="write an sbatch script that trains in segments, resubmitting itself until done")
    _add_overrides(p)
    p.add_argument("--time", default="24:00:00", help="wall-time limit of each job (SLURM format, default 24:00:00)")
    p.add_argument("--segments", type=int, default=10, help="most jobs in the chain (default 10)")
    p.add_argument("--signal-lead", type=int, default=300, metavar="SECONDS",
                   help="SIGUSR1 this long before the time limit, to checkpoint and exit (default 300)")
    p.add_argument("--partition", default=None)
    p.add_argument("--gpus", type=int, default=1, help="GPUs per job (default 1; 0 asks for none)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="one more #SBATCH option, e.g. --account=abc (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before training, e.g. 'source .venv/bin/activate' (repeatable)")
    p.add_argument("--template", default=None, metavar="FILE", help="sbatch template (default: the one shipped in voxgen/config/slurm/)")
    p.add_argument("--out", default=None, metavar="FILE", help="script to write (default RUN_DIR.sbatch)")

    p = sub.add_parser("sample", help="generate volumes (NIfTI + mosaic) from a run's EMA weights")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--solver", default=None, metavar="SPEC",
                   help="sampler and its steps or tolerance: euler:25, heun2:25, dopri5:1e-3, restart:18,k=2, ddim:50,eta=0.5 "
                        "(see docs/sampling.md; default: the run's sample.solver and sample.steps)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (replaces the solver's)")
    p.add_argument("--shift", type=float, default=None, help="time shift of the grid (default: the run's sample.shift)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale for conditional modes (default: the run's sample.guidance_scale)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--split", default="test", help="split whose masks condition the samples")
    p.add_argument("--out", default=None, help="output folder (default RUN/samples)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")

    sub.add_parser("models", help="list the model registry")

    p = sub.add_parser("plan", help="what one training step of a config needs, without a GPU")
    _add_overrides(p)
    _add_json_and_grid(p, "plan all")
    p.add_argument("--gpu-memory", default="80GB", help="GPU memory to judge `fits` against (default 80GB)")
    p.add_argument("--factory", metavar="MODULE:FUNCTION", help="plan an importable nn.Module factory (f(x) or f(x, t))")
    p.add_argument("--input-shape", metavar="C,D,H,W", help="network input of --factory (batch from training.batch_size)")
    p.add_argument("--output-channels", type=int, metavar="N", help="output channels of --factory (default C)")

    p = sub.add_parser("fit", help="the largest configuration of a product that fits a GPU, without a GPU")
    _add_overrides(p)
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values to try (repeatable: the cartesian product); brackets keep commas: data.shape=[20,32,32],[40,64,64]")
    p.add_argument("--gpu-memory", default="80GB", help="GPU memory (default 80GB)")
    p.add_argument("--margin", type=float, default=0.1, help="safety margin, a fraction of GPU memory (default 0.1)")
    p.add_argument("--all", action="store_true", help="plan every candidate, not only down to the answer")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("profile", help="the training step measured on the GPU at hand")
    _add_overrides(p)
    _add_json_and_grid(p, "measure all")
    p.add_argument("--no-plan", action="store_true", help="do not plan the configurations for comparison")

    p = sub.add_parser("data", help="embedded data sets and data checks")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    _add_data_gen(data_sub, "cohort", "template cohort on MNI152 anatomy with inserted metastases")
    _add_data_gen(data_sub, "phantoms", "procedural phantoms (fast, for tests)")
    c = data_sub.add_parser("check", help="report every problem of a data folder")
    c.add_argument("root")
    c.add_argument("--mode", default=None,
                   help="check only the modalities this mode reads (default: every modality voxgen knows)")
    from voxgen.evaluation.commands import add_evaluate_parser, add_find_steps_parser

    add_evaluate_parser(sub)
    add_find_steps_parser(sub)
    return parser


def _train(args) -> int:
    import signal

    # A scheduler's SIGTERM or SIGUSR1 can come while torch is still importing; note it here and
    # let the trainer act on it (checkpoint, exit 75) instead of dying without one.
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda received, frame: pending.append(received)) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return _train_run(args, pending)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _train_run(args, pending: list[int]) -> int:
    from rich.console import Console

    from voxgen.config import compose, to_yaml
    from voxgen.training.trainer import train

    files = list(args.config)
    saved = _saved_config(args.overrides)
    if saved is not None:
        files.insert(0, saved)
    cfg = compose(files, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    result = train(cfg, Console(stderr=True), stop_at=args.stop_at, pending_signals=pending)
    if result.interrupted:
        return result.exit_code
    last = result.history[-1] if result.history else {}
    print(f"trained {result.step} steps in {result.run_dir}; val loss {last.get('val_loss', float('nan')):.4f}")
    return 0


def _slurm(args) -> int:
    from voxgen.slurm import TEMPLATE, SlurmJob, write_script

    job = SlurmJob(time=args.time, segments=args.segments, signal_lead=args.signal_lead, partition=args.partition,
                   gpus=args.gpus, sbatch_options=args.sbatch, setup=args.setup)
    path = write_script(args.overrides, args.config, job, args.out, Path(args.template) if args.template else TEMPLATE)
    print(f"wrote {path}: up to {job.segments} jobs of {job.time}, each warned {job.signal_lead} s before its limit; "
          f"submit it with: sbatch {path}")
    return 0


def _saved_config(overrides) -> Path | None:
    """A run folder's own config is the base when training resumes in it."""
    for text in overrides:
        if text.startswith("run.dir="):
            path = Path(text.split("=", 1)[1]) / "config.yaml"
            return path if path.is_file() else None
    return None


def _sample(args) -> int:
    from dataclasses import replace

    from voxgen.diffusion.generate import solver_from_config
    from voxgen.diffusion.sample_run import reference_affine, sample_volumes, write_samples
    from voxgen.diffusion.samplers import parse_solver
    from voxgen.training.runs import load_run

    cfg, parts, step = load_run(args.run, weights=args.weights)
    solver = parse_solver(args.solver, cfg.sample) if args.solver else solver_from_config(cfg)
    if args.shift is not None:
        solver = replace(solver, shift=args.shift)
    samples = sample_volumes(cfg, parts, args.num, args.seed, args.steps, split=args.split, solver=solver,
                             guidance_scale=args.guidance_scale)
    out = Path(args.out) if args.out else Path(args.run) / "samples"
    paths, mosaic = write_samples(samples, out, reference_affine(cfg, parts.mode))
    print(f"{args.num} samples (step {step}, {samples.solver}, NFE {samples.nfe}, {samples.seconds_per_volume:.2f} s/volume) "
          f"in {out}; mosaic {mosaic}")
    return 0


def _models(args) -> int:
    from voxgen.models.registry import MODELS

    for entry in MODELS.values():
        print(f"{entry.name:8s} {entry.summary}")
    return 0


def _data(args) -> int:
    if args.data_command == "check":
        from voxgen.data.dataset import check_folder

        from voxgen.diffusion.modes import MODES

        if args.mode is not None and args.mode not in MODES:
            raise VoxgenError(f"--mode {args.mode!r} is not one of {', '.join(sorted(MODES))}")
        problems = check_folder(args.root, MODES[args.mode].modalities) if args.mode else check_folder(args.root)
        for line in problems:
            print(line)
        if problems:
            raise VoxgenError(f"{args.root}: {len(problems)} problem(s) found")
        print(f"{args.root}: no problems found")
        return 0
    if args.data_command == "cohort":
        from voxgen.data.cohort import make_cohort as make
    else:
        from voxgen.data.phantoms import make_phantoms as make
    root = make(args.out, cases=args.cases, shape=tuple(args.shape), seed=args.seed)
    print(f"{args.cases} {args.data_command} cases at {args.shape} in {root}")
    return 0


def _quickstart(args) -> int:
    from voxgen.quickstart import quickstart

    summary = quickstart(args.out, args.overrides)
    if summary.get("interrupted"):
        return summary["exit_code"]
    print(
        f"quickstart done in {summary['minutes']:.1f} min: val loss {summary['val_loss_ratio']:.2f}x of step 0, "
        f"samples {summary['distance_ratio']:.1f}x closer to held-out cases than untrained ({summary['metric']})"
    )
    return 0


def _plan(args) -> int:
    from voxgen.config import compose
    from voxgen.memory.planner import GiB, parse_memory, plan

    if args.grid:
        if args.factory:
            raise VoxgenError("--grid and --factory cannot be combined")
        return _plan_grid(args)
    if args.factory:
        from voxgen.memory.factory import parse_input_shape, plan_factory

        if not args.input_shape:
            raise VoxgenError("--factory needs --input-shape C,D,H,W")
        result = plan_factory(args.factory, parse_input_shape(args.input_shape), args.output_channels,
                              args.overrides, args.config, parse_memory(args.gpu_memory))
    elif args.input_shape or args.output_channels is not None:
        raise VoxgenError("--input-shape and --output-channels go with --factory")
    else:
        result = plan(compose(args.config, args.overrides), parse_memory(args.gpu_memory))
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(f"{result.model}: {result.params:,} parameters ({result.params / 1e6:.1f} M), "
          f"{result.in_channels} -> {result.out_channels} channels at {result.shape}, "
          f"batch {result.batch_size}, {result.precision}")
    for part, nbytes in result.breakdown.items():
        print(f"  {part:12s} {nbytes / GiB:8.2f} GiB")
    print(f"  {'peak':12s} {result.peak_bytes / GiB:8.2f} GiB  ({result.peak_phase}: {result.peak_module or '-'}); "
          f"first step {result.peak_bytes_first_step / GiB:.2f} GiB")
    print(f"  {'reserved':12s} {result.reserved_bytes / GiB:8.2f} GiB  (caching allocator with fragmentation)")
    verdict = "fits" if result.fits else "does NOT fit"
    print(f"{verdict} in {result.gpu_memory_bytes / GiB:.1f} GiB")
    if result.fits and result.allocator_oom:
        print("warning: the caching allocator's fragmentation may still run out of memory; "
              "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True avoids most of it")
    return 0


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
    notes = [f"Predicted by `voxgen plan --grid {args.grid}` (no GPU): peak GPU memory of one training step; "
             f"first step = fresh optimiser, steady = optimiser state alive (what `fits` uses, {gpu / GiB:.0f} GiB)."]
    notes += [f"Skipped (invalid): {'; '.join(grid.skipped)}."] if grid.skipped else []
    csv_path, md_path = write_tables(rows, out, "plan", PLAN_COLUMNS, grid.title, notes)
    chart = save_memory_chart(out / "plan.png", rows, gpu, f"{grid.title} (predicted)")
    fitting = sum(bool(r.fits) for r in rows)
    skipped = f", {len(grid.skipped)} invalid skipped" if grid.skipped else ""
    print(f"planned {len(rows)} configurations in {seconds:.1f} s{skipped}: {fitting} fit in {gpu / GiB:.0f} GiB; "
          f"{md_path}, {csv_path}, {chart}")
    return 0


def _fit(args) -> int:
    from rich.console import Console

    from voxgen.memory.fit import fit, format_table, parse_vary
    from voxgen.memory.planner import GiB, parse_memory

    axes = parse_vary(args.vary)
    console = Console(stderr=True)
    with console.status("planning") as status:
        result = fit(axes, parse_memory(args.gpu_memory), args.margin, args.config, args.overrides, args.all,
                     on_plan=lambda c: status.update(f"planning {c.label}"))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print("\n".join(format_table(result)))
    if result.best is None:
        planned = [c for c in result.candidates if c.peak_bytes is not None]
        smallest = f"; the smallest needs {planned[-1].peak_bytes / GiB:.2f} GiB" if planned else ""
        raise VoxgenError(f"no candidate fits in {result.budget_bytes / GiB:.2f} GiB "
                          f"({result.gpu_memory_bytes / GiB:.0f} GiB - {100 * result.margin:.0f}% margin){smallest}")
    if not args.json:
        best = result.best
        print(f"largest that fits: {best.label} ({best.network.params / 1e6:.1f} M parameters, "
              f"{best.peak_bytes / GiB:.2f} GiB of {result.budget_bytes / GiB:.2f} GiB budget); {result.why_not_next()}")
    return 0


def _profile(args) -> int:
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
        print(json.dumps(out))
        return 0
    env = m.environment
    print(f"{cfg.model.name} on {env['gpu']} (torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}): {m.status}")
    for label, alloc, reserved, pred in (("first step", m.first_allocated, m.first_reserved,
                                          planned and planned.peak_bytes_first_step),
                                         ("steady step", m.steady_allocated, m.steady_reserved,
                                          planned and planned.peak_bytes)):
        if alloc is None:
            print(f"  {label:12s} -")
            continue
        vs = f"; planned {pred / GiB:.2f} GiB ({100 * (pred - alloc) / alloc:+.1f}%)" if pred else ""
        print(f"  {label:12s} {alloc / GiB:8.2f} GiB allocated, {reserved / GiB:.2f} GiB reserved{vs}")
    return 0


def _profile_grid(args) -> int:
    from voxgen.memory.grid import load_grid, resolve, run_grid
    from voxgen.memory.planner import GiB, plan
    from voxgen.memory.profiler import profile, require_cuda
    from voxgen.memory.tables import PROFILE_COLUMNS, Row, write_tables
    from voxgen.reports.memory_chart import save_memory_chart

    grid, items = load_grid(args.grid)
    resolved = resolve(grid, items, args.overrides)
    require_cuda()

    def work(item) -> Row:
        planned = None if args.no_plan else plan(item.cfg)
        m = profile(item.cfg)
        return Row(config=item.entry.name, network=item.network, series=item.series,
                   gpu_memory_bytes=m.environment.get("gpu_memory_bytes"),
                   planned_first=planned and planned.peak_bytes_first_step, planned_steady=planned and planned.peak_bytes,
                   measured_first=m.first_allocated, measured_steady=m.steady_allocated,
                   reserved_first=m.first_reserved, reserved_steady=m.steady_reserved, status=m.status,
                   environment=m.environment)

    rows, seconds = run_grid(resolved, work, "profiling", str(grid.path))
    env = rows[0].environment
    out = _grid_out(args)
    notes = [f"Measured by `voxgen profile --grid {args.grid}` on {env['gpu']} ({env['gpu_memory_bytes'] / GiB:.1f} GiB), "
             f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, cudnn.benchmark={env['cudnn_benchmark']}: "
             "max_memory_allocated / max_memory_reserved of the first (fresh optimiser) and the steady step; "
             "error = planned vs measured."]
    csv_path, md_path = write_tables(rows, out, "profile", PROFILE_COLUMNS, grid.title, notes)
    chart = save_memory_chart(out / "profile.png", rows, env["gpu_memory_bytes"], f"{grid.title} (measured)")
    ooms = sum(r.status != "OK" for r in rows)
    print(f"profiled {len(rows)} configurations in {seconds:.1f} s ({ooms} OOM) on {env['gpu']}; {md_path}, {csv_path}, {chart}")
    return 0


def _evaluate(args) -> int:
    from voxgen.evaluation.commands import run_evaluate

    return run_evaluate(args)


def _find_steps(args) -> int:
    from voxgen.evaluation.commands import run_find_steps

    return run_find_steps(args)


COMMANDS = {"evaluate": _evaluate, "find-steps": _find_steps, "fit": _fit, "profile": _profile, "plan": _plan, "train": _train, "slurm": _slurm, "sample": _sample, "models": _models, "data": _data, "quickstart": _quickstart}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VoxgenError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
