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

    p = sub.add_parser("sample", help="generate volumes (NIfTI + mosaic) from a run's EMA weights")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--split", default="test", help="split whose masks condition the samples")
    p.add_argument("--out", default=None, help="output folder (default RUN/samples)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")

    sub.add_parser("models", help="list the model registry")

    p = sub.add_parser("plan", help="what one training step of a config needs, without a GPU")
    _add_overrides(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--gpu-memory", default="80GB", help="GPU memory to judge `fits` against (default 80GB)")

    p = sub.add_parser("data", help="embedded data sets and data checks")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    _add_data_gen(data_sub, "cohort", "template cohort on MNI152 anatomy with inserted metastases")
    _add_data_gen(data_sub, "phantoms", "procedural phantoms (fast, for tests)")
    c = data_sub.add_parser("check", help="report every problem of a data folder")
    c.add_argument("root")
    return parser


def _train(args) -> int:
    from rich.console import Console

    from voxgen.config import compose, to_yaml
    from voxgen.training.trainer import EXIT_INTERRUPTED, train

    files = list(args.config)
    saved = _saved_config(args.overrides)
    if saved is not None:
        files.insert(0, saved)
    cfg = compose(files, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    result = train(cfg, Console(stderr=True))
    if result.interrupted:
        return EXIT_INTERRUPTED
    last = result.history[-1] if result.history else {}
    print(f"trained {result.step} steps in {result.run_dir}; val loss {last.get('val_loss', float('nan')):.4f}")
    return 0


def _saved_config(overrides) -> Path | None:
    """A run folder's own config is the base when training resumes in it."""
    for text in overrides:
        if text.startswith("run.dir="):
            path = Path(text.split("=", 1)[1]) / "config.yaml"
            return path if path.is_file() else None
    return None


def _sample(args) -> int:
    from voxgen.diffusion.sample_run import reference_affine, sample_volumes, write_samples
    from voxgen.training.runs import load_run

    cfg, parts, step = load_run(args.run, weights=args.weights)
    steps = args.steps or cfg.sample.steps
    samples = sample_volumes(cfg, parts, args.num, args.seed, steps, split=args.split)
    out = Path(args.out) if args.out else Path(args.run) / "samples"
    paths, mosaic = write_samples(samples, out, reference_affine(cfg, parts.mode))
    print(f"{args.num} samples (step {step}, {steps} Euler steps, {samples.seconds_per_volume:.2f} s/volume) in {out}; mosaic {mosaic}")
    return 0


def _models(args) -> int:
    from voxgen.models.registry import MODELS

    for entry in MODELS.values():
        print(f"{entry.name:8s} {entry.summary}")
    return 0


def _data(args) -> int:
    if args.data_command == "check":
        from voxgen.data.dataset import check_folder

        problems = check_folder(args.root)
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
    from voxgen.training.trainer import EXIT_INTERRUPTED

    summary = quickstart(args.out, args.overrides)
    if summary.get("interrupted"):
        return EXIT_INTERRUPTED
    print(
        f"quickstart done in {summary['minutes']:.1f} min: val loss {summary['val_loss_ratio']:.2f}x of step 0, "
        f"samples {summary['distance_ratio']:.1f}x closer to held-out cases than untrained ({summary['metric']})"
    )
    return 0


def _plan(args) -> int:
    from voxgen.config import compose
    from voxgen.memory.planner import GiB, parse_memory, plan

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
    verdict = "fits" if result.fits else "does NOT fit"
    print(f"{verdict} in {result.gpu_memory_bytes / GiB:.1f} GiB")
    return 0


COMMANDS = {"plan": _plan, "train": _train, "sample": _sample, "models": _models, "data": _data, "quickstart": _quickstart}


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
