"""`voxgen evaluate` and `voxgen find-steps`: parsers that set `func`, and the functions they call.

Building the parsers imports nothing heavy (no torch), so `voxgen --help` stays fast; names of
extractors, metrics and solvers are checked when the command runs, with one-line errors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from voxgen.errors import VoxgenError

DEFAULT_SAMPLES = 8


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (its newest checkpoint's EMA weights are used)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"volumes per configuration (default {DEFAULT_SAMPLES})")
    p.add_argument(
        "--extractor",
        default="random3d",
        help="features of FID/KID/MMD: random3d (default; offline, not comparable with published figures), "
        "resnet50 (2.5D, needs --extractor-weights) or ct-resnet152 (3D, voxgen[ct-features])",
    )
    p.add_argument(
        "--extractor-weights",
        metavar="FILE",
        help="local weights file (resnet50: ImageNet or RadImageNet "
        "state dict in torchvision's layout; ct-resnet152: default from voxgen[ct-features])",
    )
    p.add_argument("--preprocess", choices=["imagenet", "radimagenet"], help="resnet50 input normalisation (default imagenet)")
    p.add_argument("--split", default=None, help="reference split (default test, or val when there is no test split)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i in every configuration")
    p.add_argument("--batch-size", type=int, default=8, help="volumes sampled together (default 8; fewer on a small GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale for conditional modes (default: the run's sample.guidance_scale)",
    )
    p.add_argument("--out", default=None, help="output folder (default RUN/evaluation)")


def _metric_list(text: str | None) -> list[str] | None:
    return None if text is None else [m.strip() for m in text.split(",") if m.strip()]


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="metrics table of a run per sampler configuration (Markdown, CSV, plot)")
    _add_common(p)
    p.add_argument(
        "--solvers",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="configurations: euler:10,25,50 heun2:25 dopri5:1e-3 (default: the run's sample.solver)",
    )
    p.add_argument(
        "--metrics",
        default=None,
        metavar="M1,M2",
        help="comma-separated subset of psnr, ssim, ms_ssim, fid, kid, mmd, intensity_w1, dice, hd95, lesions, "
        "lesion_count_w1, lesion_size_w1, lesion_fraction_w1, bins_exact, bins_mae (default: all that apply)",
    )
    return p


def add_find_steps_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("find-steps", help="golden-section search of the Euler step count for the best metric")
    _add_common(p)
    p.add_argument("--metric", default="fid", help="metric to optimise (default fid; any of evaluate's with a better direction)")
    p.add_argument("--min", dest="lo", type=int, default=4, help="fewest steps (default 4)")
    p.add_argument("--max", dest="hi", type=int, default=100, help="most steps (default 100)")
    p.add_argument("--solver", default="euler", help="fixed-step sampler whose steps are searched (default euler)")
    return p


def _evaluator(args, metrics):
    from voxgen.evaluation.evaluate import RunEvaluator

    return RunEvaluator(
        args.run,
        samples=args.samples,
        extractor=args.extractor,
        extractor_weights=args.extractor_weights,
        preprocess=args.preprocess,
        split=args.split,
        metrics=metrics,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        guidance_scale=args.guidance_scale,
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _line(row, headers) -> str:
    values = ", ".join(f"{h} {row.values[h]:.4g}" for h in headers)
    return f"NFE {row.nfe}, {row.seconds_per_volume:.2f} s/volume; {values}"


def _title(ev, what: str) -> str:
    ext = ev.extractor
    label = f"; features {ext.label}" if ext is not None else ""
    return f"{what}: {ev.run_dir.name} ({ev.cfg.model.name}, {ev.parts.mode.name}), {ev.samples} samples vs '{ev.split}'{label}"


def run_evaluate(args) -> int:
    from voxgen.evaluation.evaluate import expand_solvers
    from voxgen.evaluation.metrics import header
    from voxgen.evaluation.report import save_nfe_chart, write_tables
    from voxgen.training.resume import run_config

    began = time.perf_counter()
    task = run_config(args.run).task
    if task == "autoencoder":
        return run_evaluate_reconstruction(args)
    if task == "translate":
        return run_evaluate_translate(args)
    if task == "regress":
        return run_evaluate_regress(args)
    ev = _evaluator(args, _metric_list(args.metrics))
    texts = expand_solvers(args.solvers) if args.solvers else [ev.cfg.sample.solver]
    settings = [ev.sampling(t) for t in texts]  # every spec checked before any sampling starts
    headers = ev.headers()
    rows = []
    for i, sampling in enumerate(settings, 1):
        _say(f"[{i}/{len(settings)}] {sampling.solver}: sampling {ev.samples} volumes")
        row = ev.evaluate(sampling)
        _say(f"[{i}/{len(settings)}] {sampling.solver}: {_line(row, headers)}")
        rows.append(row)
    out = Path(args.out) if args.out else ev.run_dir / "evaluation"
    title = _title(ev, "Evaluation")
    label = ev.extractor.label if ev.extractor else ""
    md, csv_path = write_tables(rows, headers, out, "evaluate", title, ev.describe(), label)
    better = {header(c.metric, ev.extractor): c.metric.better for c in ev.columns}
    chart = save_nfe_chart(out / "evaluate.png", rows, headers, title, better)
    written = [md, csv_path, chart]
    if ev.anatomy_groups:
        from voxgen.evaluation import anatomy

        written.append(anatomy.write_csv(out / "anatomy.csv", ev.anatomy_groups))
    print(
        f"evaluated {len(rows)} configurations x {ev.samples} samples in {time.perf_counter() - began:.0f} s; "
        + ", ".join(map(str, written))
    )
    return 0


def run_evaluate_reconstruction(args) -> int:
    """`voxgen evaluate` of a compression model: PSNR and SSIM of its reconstructions of a split,
    next to trilinear down- and up-sampling by the same factor."""
    from voxgen.data.layout import Modalities
    from voxgen.evaluation.reconstruction import reconstruction_table
    from voxgen.files import write_atomic
    from voxgen.training.runs import load_run

    began = time.perf_counter()
    cfg, task, step = load_run(args.run, device=args.device)
    split = args.split or "test"
    device = next(task.model.parameters()).device
    _say(f"reconstructing the {split} split with {cfg.model.name} (step {step})")
    table = reconstruction_table(task, cfg.data.root, split, cfg.data.shape, device, Modalities.of(cfg.data))
    out = Path(args.out) if args.out else Path(args.run) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "reconstruction.md"
    write_atomic(path, f"# Reconstruction: {Path(args.run).name} ({cfg.model.name}, step {step}) vs '{split}'\n\n{table}\n")
    print(table)
    print(f"evaluated the reconstructions of '{split}' in {time.perf_counter() - began:.0f} s; {path}")
    return 0


def _held_out_pairs(cfg, split: str | None):
    """(split, [Pair]) of a translate run's data: `split`, or test, or val when there is no test split."""
    from voxgen.data.layout import Modalities, list_cases
    from voxgen.errors import DataError
    from voxgen.evaluation.translate import Pair

    source, target = cfg.translate.source, cfg.translate.target
    known = Modalities.of(cfg.data).known
    if split is not None:
        cases = list_cases(cfg.data.root, split, (source, target), known)
    else:
        try:
            split, cases = "test", list_cases(cfg.data.root, "test", (source, target), known)
        except DataError:
            split, cases = "val", list_cases(cfg.data.root, "val", (source, target), known)
    return split, [Pair(c.id, c.path(source), c.path(target)) for c in cases]


def run_evaluate_translate(args) -> int:
    """`voxgen evaluate` of a translate run: PSNR and SSIM of the held-out sources, their enhancement by
    the run and non-local means against the targets, per case and on average (voxgen.evaluation.translate)."""
    from voxgen.data.nifti import voxel_sizes
    from voxgen.diffusion.samplers import prepare
    from voxgen.diffusion.sampling import sampling_settings
    from voxgen.evaluation.translate import describe, evaluate_pairs, to_markdown, write_translate_tables
    from voxgen.tasks.enhance import DEFAULT_OVERLAP, training_affine, volume_progress, voxel_size_warning
    from voxgen.training.resume import run_config
    from voxgen.training.runs import load_run

    if args.metrics is not None:
        raise VoxgenError("--metrics: a translate run is scored by PSNR and SSIM in two HU ranges; drop --metrics")
    if args.solvers is not None and len(args.solvers) != 1:
        raise VoxgenError(f"--solvers {' '.join(args.solvers)}: a translate run is evaluated with one sampler at a time")
    if args.guidance_scale not in (None, 1.0):
        raise VoxgenError("--guidance-scale: a translate run has no classifier-free guidance")
    began = time.perf_counter()
    split, pairs = _held_out_pairs(run_config(args.run), args.split)
    cfg, task, step = load_run(args.run, device=args.device)
    solver = args.solvers[0] if args.solvers else None
    spec = sampling_settings(cfg.sample, task.strategy, True, solver=solver).solver
    sampler, grid = prepare(spec, task.strategy)
    reference = training_affine(cfg, task.source, _say)
    warned = set()

    def inspect(pair, affine) -> None:
        sizes = tuple(round(float(v), 3) for v in voxel_sizes(affine))
        line = None if reference is None or sizes in warned else voxel_size_warning(str(pair.source), affine, reference)
        if line:  # once per voxel size, not once per case
            warned.add(sizes)
            _say(line)

    pairs_text = f"{len(pairs)} pair{'s' * (len(pairs) != 1)}"
    _say(f"enhancing the {pairs_text} of '{split}' with {cfg.model.name} (step {step}, {spec}) and NLM")
    with volume_progress(len(pairs), f"evaluating '{split}'") as update:
        rows = evaluate_pairs(
            task, pairs, sampler, grid, seed=args.seed, batch_size=args.batch_size, progress=update, inspect=inspect
        )
    out = Path(args.out) if args.out else Path(args.run) / "evaluation"
    title = f"CT enhancement: {Path(args.run).name} (step {step}) vs '{split}' ({pairs_text})"
    notes = describe(str(spec), DEFAULT_OVERLAP, args.seed, split, task.windows)
    md, csv_path = write_translate_tables(rows, out, title, notes)
    print(to_markdown(rows, title), end="")
    mean = {r.method: r.values["psnr_soft_db"] for r in rows if r.case == "mean"}
    print(
        f"evaluated {pairs_text} of '{split}' in {time.perf_counter() - began:.0f} s; soft-tissue PSNR "
        f"input {mean['input']:.2f}, enhanced {mean['enhanced']:.2f}, nlm {mean['nlm']:.2f} dB; {md}, {csv_path}"
    )
    return 0


def run_evaluate_regress(args) -> int:
    """`voxgen evaluate` of a regress run: PSNR and 3D SSIM of the held-out cases reconstructed by the run,
    by its untrained network and by the mean training volume (voxgen.evaluation.regress)."""
    from voxgen.data.dataset import VolumeDataset
    from voxgen.errors import DataError
    from voxgen.evaluation.regress import describe, mean_rows, mean_volume, score_cases, to_markdown, write_regress_tables
    from voxgen.tasks import build_task
    from voxgen.training.runs import load_run
    from voxgen.training.state import seed_everything

    for flag, value in (("--metrics", args.metrics), ("--solvers", args.solvers)):
        if value is not None:
            raise VoxgenError(f"{flag}: a regress run is scored by PSNR and 3D SSIM and has no sampler; drop {flag}")
    if args.guidance_scale not in (None, 1.0):
        raise VoxgenError("--guidance-scale: a regress run has no classifier-free guidance")
    began = time.perf_counter()
    cfg, trained, step = load_run(args.run, device=args.device)
    device = next(trained.model.parameters()).device
    seed_everything(cfg.run.seed)  # the weights the run started from
    untrained = build_task(cfg, device)
    untrained.model.eval()
    modalities = trained.modalities
    if args.split is not None:
        split, dataset = args.split, VolumeDataset.of(cfg.data, args.split, modalities)
    else:
        try:
            split, dataset = "test", VolumeDataset.of(cfg.data, "test", modalities)
        except DataError:
            split, dataset = "val", VolumeDataset.of(cfg.data, "val", modalities)
    _say(f"reconstructing the {len(dataset)} cases of '{split}' with {cfg.model.name} (step {step}), untrained, mean volume")
    rows = score_cases({"trained": trained, "untrained": untrained}, dataset, mean_volume(cfg, trained.target), device)
    rows += mean_rows(rows)
    out = Path(args.out) if args.out else Path(args.run) / "evaluation"
    title = f"X-ray to CT: {Path(args.run).name} (step {step}) vs '{split}' ({len(dataset)} cases)"
    md, csv_path = write_regress_tables(rows, out, title, describe(cfg, split))
    print(to_markdown(rows, title, []), end="")
    mean = {r.method: r for r in rows if r.case == "mean"}
    summary = ", ".join(f"{m} {r.psnr_db:.2f} dB / {r.ssim:.3f}" for m, r in mean.items())
    seconds = time.perf_counter() - began
    print(f"evaluated {len(dataset)} cases of '{split}' in {seconds:.0f} s; PSNR / SSIM: {summary}; {md}, {csv_path}")
    return 0


def run_find_steps(args) -> int:
    from voxgen.diffusion.samplers import SAMPLERS
    from voxgen.evaluation.evaluate import golden_section
    from voxgen.evaluation.metrics import get_metric
    from voxgen.evaluation.report import write_tables

    if get_metric(args.metric).better not in ("lower", "higher"):
        raise VoxgenError(f"--metric {args.metric}: a statistic with no better direction; choose e.g. fid, kid, ssim")
    if args.lo < 1 or args.hi < args.lo:
        raise VoxgenError(f"--min {args.lo} --max {args.hi}: need 1 <= min <= max")
    entry = SAMPLERS.get(args.solver)
    if entry is None or entry.value != "steps":
        raise VoxgenError(f"--solver {args.solver}: needs a fixed-step sampler (e.g. euler, heun2)")
    began = time.perf_counter()
    ev = _evaluator(args, [args.metric])
    column = ev.columns[0]
    head = ev.headers()[0]
    sign = 1.0 if column.metric.better == "lower" else -1.0
    rows = {}

    def objective(steps: int) -> float:
        row = ev.evaluate(ev.sampling(f"{args.solver}:{steps}"))
        rows[steps] = row
        _say(f"{args.solver}:{steps}: {_line(row, [head])}")
        return sign * row.values[head]

    best, _ = golden_section(objective, args.lo, args.hi)
    ordered = [rows[s] for s in sorted(rows)]
    out = Path(args.out) if args.out else ev.run_dir / "evaluation"
    title = _title(ev, f"Step search ({args.solver}, {args.lo}-{args.hi} steps, {column.metric.better} {head} is better)")
    notes = [
        f"Golden-section search: {len(rows)} evaluations instead of {args.hi - args.lo + 1}; best: "
        f"{args.solver}:{best} ({head} {rows[best].values[head]:.4g}). The search assumes the metric is "
        "unimodal in the step count; every configuration samples the same seeds.",
        *ev.describe(),
    ]
    label = ev.extractor.label if ev.extractor else ""
    md, csv_path = write_tables(ordered, [head], out, "find_steps", title, notes, label)
    print(
        f"best {args.solver} steps for {head}: {best} ({rows[best].values[head]:.4g}); {len(rows)} evaluations in "
        f"{time.perf_counter() - began:.0f} s; {md}, {csv_path}"
    )
    return 0
