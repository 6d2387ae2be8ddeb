"""The `voxgen` command. Thin: parse, call, print.

User errors (VoxgenError) print `error: ...` to stderr and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from voxgen.errors import VoxgenError


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. training.steps=200")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config file (repeatable)")


def _add_json_and_grid(p: argparse.ArgumentParser, verb: str) -> None:
    """The output flags `plan` and `profile` share: one JSON object, or a grid with tables and a chart."""
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--grid", metavar="FILE", help=f"YAML grid of named configurations: {verb}, write tables and a chart")
    p.add_argument("--out", metavar="DIR", help="folder for --grid's tables and chart (default runs/memory/GRID)")


def _add_world(p: argparse.ArgumentParser) -> None:
    """The torchrun job a plan is for (docs/distributed.md); checked by the command, in one line."""
    p.add_argument("--world-size", default=None, metavar="N", help="processes (GPUs) of the torchrun job: plan each rank")
    p.add_argument("--sharding", default=None, metavar="ddp|fsdp", help="how the ranks share the model (training.sharding)")


def _add_data_gen(sub, name: str, help: str, cases: int | None = 24, shape: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("--out", required=True, help="data folder to create")
    p.add_argument("--cases", type=int, default=cases)
    if shape:
        p.add_argument("--shape", type=int, nargs=3, default=[32, 48, 40], metavar=("D", "H", "W"))
    p.add_argument("--seed", type=int, default=0)
    return p


def _add_drr_parsers(data_sub) -> None:
    """`data drr` and `data xray-pairs` (docs/xray.md); None means the default of voxgen.data.xray / drr."""
    d = data_sub.add_parser("drr", help="X-ray / CT pairs: each CT of a data folder on a cube, with its AP and lateral DRRs")
    d.add_argument("--ct", required=True, metavar="ROOT", help="data folder of CT cases: ROOT/{train,val,test}/<case>/ct.nii.gz")
    d.add_argument("--out", required=True, metavar="ROOT", help="data folder to create")
    d.add_argument("--ct-size", type=int, default=None, metavar="N", help="CT cube of N^3 voxels (default 64; the seed's 256)")
    d.add_argument("--drr-size", type=int, default=None, metavar="N", help="N x N detector (default 128; the seed's 512)")
    d.add_argument("--vertical-flip", action="store_true", help="row 0 at the superior end (the seed's vertical_flip=True)")
    d.add_argument("--sid", type=float, default=None, metavar="MM", help="source to isocentre (default 1000)")
    d.add_argument("--sdd", type=float, default=None, metavar="MM", help="source to detector (default 1500)")
    d.add_argument("--spacing", type=float, default=None, metavar="MM", help="detector pixel spacing (default: fit the cube)")
    d.add_argument("--ct-modality", default="ct", metavar="NAME", help="the CT's file name in each case folder (default ct)")
    g = _add_data_gen(data_sub, "xray-pairs", "X-ray / CT pairs: poses of the embedded head CT", cases=None, shape=False)
    g.add_argument("--ct-size", type=int, default=None, metavar="N", help="CT cube of N^3 voxels (default 32)")
    g.add_argument("--drr-size", type=int, default=None, metavar="N", help="N x N detector (default 64)")


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
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop at this step with a checkpoint and exit 75, as a preemption would",
    )
    p.add_argument(
        "--run",
        default=None,
        metavar="RUN",
        help="train the DiffRS discriminator head of this diffusion run (task=diffrs-head, in RUN/diffrs-head; "
        "see docs/diffrs.md)",
    )

    p = sub.add_parser("slurm", help="write an sbatch script that trains in segments, resubmitting itself until done")
    _add_overrides(p)
    p.add_argument("--time", default="24:00:00", help="wall-time limit of each job (SLURM format, default 24:00:00)")
    p.add_argument("--segments", type=int, default=10, help="most jobs in the chain (default 10)")
    p.add_argument(
        "--signal-lead",
        type=int,
        default=300,
        metavar="SECONDS",
        help="SIGUSR1 this long before the time limit, to checkpoint and exit (default 300)",
    )
    p.add_argument("--partition", default=None)
    p.add_argument("--gpus", type=int, default=None, help="GPUs of the one training process (default 1; 0 asks for none)")
    p.add_argument("--nodes", type=int, default=1, help="nodes of each job (more than 1 needs --gpus-per-node)")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        metavar="G",
        help="run torchrun on every node with one training process per GPU (DDP or FSDP: training.sharding)",
    )
    p.add_argument(
        "--mem",
        default=None,
        metavar="SIZE",
        help="host memory per node, sbatch's --mem (default: the planned host memory of a node + 25%%)",
    )
    p.add_argument(
        "--sbatch", action="append", default=[], metavar="OPTION", help="one more #SBATCH option, e.g. --account=abc (repeatable)"
    )
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before training, e.g. 'source .venv/bin/activate' (repeatable)",
    )
    p.add_argument(
        "--template", default=None, metavar="FILE", help="sbatch template (default: the one shipped in voxgen/config/slurm/)"
    )
    p.add_argument("--out", default=None, metavar="FILE", help="script to write (default RUN_DIR.sbatch)")

    p = sub.add_parser("sample", help="generate volumes (NIfTI + mosaic) from a run's EMA weights")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--num", type=int, default=4)
    p.add_argument(
        "--solver",
        default=None,
        metavar="SPEC",
        help="sampler and its steps or tolerance: euler:25, heun2:25, dopri5:1e-3, restart:18,k=2, ddim:50,eta=0.5 "
        "(see docs/sampling.md; default: the run's sample.solver and sample.steps)",
    )
    p.add_argument("--steps", type=int, default=None, help="sampler steps (replaces the solver's)")
    p.add_argument("--shift", type=float, default=None, help="time shift of the grid (default: the run's sample.shift)")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale for conditional modes (default: the run's sample.guidance_scale)",
    )
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--split", default="test", help="split whose masks condition the samples")
    p.add_argument("--out", default=None, help="output folder (default RUN/samples; RUN/enhanced with --input)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--head", default=None, metavar="DIR", help="the DiffRS head of --solver diffrs (default RUN/diffrs-head)")
    p.add_argument(
        "--input",
        default=None,
        metavar="PATH",
        help="task=translate runs: the volume(s) to enhance, a NIfTI file, a case folder (its source) or a split or data "
        "folder (every case's source); writes OUT/<case>_enhanced.nii.gz and .png (default OUT: RUN/enhanced)",
    )
    p.add_argument(
        "--overlap",
        default=None,
        metavar="F[,F[,F]]",
        help="task=translate runs: overlap of the enhanced windows as a fraction of the clip, for all axes, "
        "D and in-plane, or D, H, W (default 0.5,0.25)",
    )

    sub.add_parser("models", help="list the model registry")

    p = sub.add_parser("status", help="one screen per run: step, speed and ETA, checkpoint, validation, guards, who trains it")
    p.add_argument("--run", action="append", required=True, metavar="DIR", help="a run folder (repeatable)")

    p = sub.add_parser("plan", help="what one training step of a config needs, without a GPU")
    _add_overrides(p)
    _add_json_and_grid(p, "plan all")
    p.add_argument("--gpu-memory", default="80GB", help="GPU memory to judge `fits` against (default 80GB)")
    p.add_argument("--factory", metavar="MODULE:FUNCTION", help="plan an importable nn.Module factory (f(x) or f(x, t))")
    p.add_argument("--input-shape", metavar="C,D,H,W", help="network input of --factory (batch from training.batch_size)")
    p.add_argument("--output-channels", type=int, metavar="N", help="output channels of --factory (default C)")
    p.add_argument(
        "--output-shape",
        metavar="D,H,W",
        help="--factory regresses one volume of this shape from --input-shape C,H,W images (X-ray to CT)",
    )
    _add_world(p)

    p = sub.add_parser("fit", help="the largest configuration of a product that fits a GPU, without a GPU")
    _add_overrides(p)
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="values to try (repeatable: the cartesian product); brackets keep commas: data.shape=[20,32,32],[40,64,64]",
    )
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
    # Defaults of ct-pairs live in voxgen.data.ct; None here means "its default".
    g = _add_data_gen(data_sub, "ct-pairs", "low-dose / real CT pairs: slabs of the embedded head CT", cases=None, shape=False)
    g.add_argument("--slab", type=int, default=None, help="consecutive axial slices per case (default 12; 9 x 12 = all 108)")
    g.add_argument("--photons", type=float, default=None, help="incident photons per detector bin and view (default 2e5)")
    g.add_argument("--angles", type=int, default=None, help="views of the simulated scan over 180 degrees (default 180)")
    _add_drr_parsers(data_sub)
    c = data_sub.add_parser("check", help="report every problem of a data folder")
    c.add_argument("root")
    c.add_argument("--mode", default=None, help="check only the modalities this mode reads (default: all of data.modalities)")
    c.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="the data set's names: data.modalities=[...] data.masks=[...] mode.generated=[...] mode.conditions=[...]",
    )
    p = sub.add_parser("report", help="one self-contained HTML page of a run: config, curves and events, checkpoints, samples")
    p.add_argument("--run", required=True, metavar="DIR", help="run folder")
    p.add_argument("--out", default=None, metavar="FILE.html", help="the page to write (default RUN/report.html)")
    p.add_argument("--samples", default=None, metavar="DIR", help="folder of sample_NNN_<modality>.nii.gz (default RUN/samples)")
    from voxgen.evaluation.commands import add_evaluate_parser, add_find_steps_parser

    add_evaluate_parser(sub)
    add_find_steps_parser(sub)
    return parser


def _models(args) -> int:
    from voxgen.diffusion.controlnet import NAME, SUMMARY
    from voxgen.models.registry import MODELS

    for entry in MODELS.values():
        print(f"{entry.name:8s} {entry.summary}")
    print(f"{NAME:8s} {SUMMARY}")
    return 0


def _data(args) -> int:
    from voxgen.data.commands import run_data

    if args.data_command != "check" or (args.mode is None and not args.overrides):
        return run_data(args)
    # Modes and the config belong to higher layers than data: the command line resolves the
    # modality names (data.modalities, data.masks, the mode's own) and hands them down.
    from voxgen.config import compose
    from voxgen.config.compose import parse_override
    from voxgen.data.layout import Modalities
    from voxgen.diffusion.modes import MODES, build_mode

    if args.mode is None:
        # The data set's names alone; a mode's own names are checked with the mode (--mode).
        given = dict(parse_override(text) for text in args.overrides)
        if set(given) - {"data.modalities", "data.masks", "data.grids"}:
            raise VoxgenError(
                "voxgen data check takes data.modalities=[...], data.masks=[...] and data.grids={...}; mode.* needs --mode NAME"
            )
        default = Modalities()
        grids = given.get("data.grids") or {}
        if not isinstance(grids, dict):
            raise VoxgenError(f"data.grids={grids!r}: expected a mapping such as {{xray: [2, 64, 64]}}")
        layout = Modalities(
            tuple(map(str, given.get("data.modalities", default.known))),
            tuple(map(str, given.get("data.masks", default.masks))),
            tuple((str(m), tuple(int(v) for v in shape)) for m, shape in grids.items()),
        )
        if set(layout.masks) - set(layout.known):
            raise VoxgenError(f"data.masks {list(layout.masks)} names modalities not in data.modalities {list(layout.known)}")
        return run_data(args, None, layout)
    if args.mode not in MODES:
        raise VoxgenError(f"--mode {args.mode!r} is not one of {', '.join(sorted(MODES))}")
    cfg = compose([], [*args.overrides, f"mode={args.mode}"])
    return run_data(args, build_mode(cfg).modalities, Modalities.of(cfg.data))


# Each command's body lives with its package, imported only when the command runs, so
# `voxgen --help` stays fast.
COMMANDS = {
    "quickstart": "voxgen.quickstart:run_quickstart",
    "train": "voxgen.training.commands:run_train",
    "slurm": "voxgen.slurm:run_slurm",
    "sample": "voxgen.sample:run_sample",
    "evaluate": "voxgen.evaluation.commands:run_evaluate",
    "find-steps": "voxgen.evaluation.commands:run_find_steps",
    "plan": "voxgen.memory.commands:run_plan",
    "fit": "voxgen.memory.commands:run_fit",
    "profile": "voxgen.memory.commands:run_profile",
    "models": _models,
    "data": _data,
    "status": "voxgen.training.commands:run_status",
    "report": "voxgen.reports.run_report:run_report",
}


def _command(name: str):
    target = COMMANDS[name]
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _command(args.command)(args)
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
