"""`voxgen sample`: volumes from a run's EMA weights, written as NIfTI plus a slice mosaic; for a
`task=translate` run, the enhanced volumes of `--input` (voxgen.tasks.enhance); for a `task=regress`
run, the volumes reconstructed from the inputs `--input` names (X-ray pairs to CT)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from voxgen.diffusion.sampling import reference_affine, requested_sampling, sample_volumes, write_samples
from voxgen.errors import VoxgenError
from voxgen.training.runs import load_run


def run_sample(args) -> int:
    """The body of `voxgen sample` (arguments as `voxgen.cli` parses them); `--solver diffrs:...`
    samples with the run's DiffRS head (docs/diffrs.md); a translate run enhances `--input`."""
    from voxgen.diffusion.diffrs import is_diffrs
    from voxgen.training.resume import run_config

    task = run_config(args.run).task
    if task == "translate":
        return run_enhance(args)
    if task == "regress":
        return run_reconstruct(args)
    for flag, value in (("--input", args.input), ("--overlap", args.overlap)):
        if value is not None:
            raise VoxgenError(
                f"{flag} is for task=translate and task=regress runs (given volumes); {args.run} is a task={task} run"
            )
    if is_diffrs(args.solver):
        from voxgen.tasks.diffrs_head import run_diffrs_sample

        return run_diffrs_sample(args)
    if args.head is not None:
        raise VoxgenError("--head is the discriminator head of --solver diffrs:STEPS (docs/diffrs.md)")
    cfg, parts, step = load_run(args.run, weights=args.weights)
    sampling = requested_sampling(cfg, parts, args)
    samples = sample_volumes(cfg, parts, args.num, args.seed, sampling, split=args.split)
    out = Path(args.out) if args.out else Path(args.run) / "samples"
    paths, mosaic = write_samples(samples, out, reference_affine(cfg, parts.mode), cfg.data.masks)
    print(
        f"{args.num} samples (step {step}, {samples.solver}, NFE {samples.nfe}, {samples.seconds_per_volume:.2f} s/volume) "
        f"in {out}; mosaic {mosaic}"
    )
    return 0


def run_enhance(args) -> int:
    """`voxgen sample --run RUN --input PATH` of a translate run: every volume PATH names, enhanced
    whole (voxgen.tasks.enhance), as OUT/<name>_enhanced.nii.gz and .png."""
    from voxgen.data.nifti import load_volume
    from voxgen.diffusion.diffrs import is_diffrs
    from voxgen.diffusion.samplers import prepare
    from voxgen.diffusion.sampling import sampling_settings
    from voxgen.tasks.enhance import (
        check_volume,
        enhance_volume,
        find_inputs,
        parse_overlap,
        training_affine,
        volume_progress,
        voxel_size_warning,
        window_count,
        write_enhanced,
    )
    from voxgen.training.resume import run_config

    if args.input is None:
        raise VoxgenError(
            f"{args.run} is a task=translate run: name the volumes to enhance with --input PATH "
            "(a NIfTI file, a case folder, or a split or data folder)"
        )
    if args.guidance_scale not in (None, 1.0) or is_diffrs(args.solver) or args.head is not None:
        raise VoxgenError("--guidance-scale, --head and --solver diffrs are for diffusion runs; a translate run takes neither")
    overlap = parse_overlap(args.overlap)
    cfg = run_config(args.run)
    inputs = find_inputs(args.input, cfg.translate.source, cfg.translate.target)
    cfg, task, step = load_run(args.run, weights=args.weights)
    spec = sampling_settings(cfg.sample, task.strategy, True, solver=args.solver, steps=args.steps, shift=args.shift).solver
    sampler, grid = prepare(spec, task.strategy)
    # Every input is read and checked before the long work starts, so a bad file late in a folder
    # does not end the command after hours of sampling.
    for item in inputs:
        check_volume(load_volume(item.source)[0].shape, task.clip, str(item.source))
    reference = training_affine(cfg, task.source, lambda line: print(line, file=sys.stderr))
    out = Path(args.out) if args.out else Path(args.run) / "enhanced"
    began, windows = time.perf_counter(), 0
    with volume_progress(len(inputs), "enhancing") as update:
        for i, item in enumerate(inputs):
            source, affine = load_volume(item.source)
            warning = None if reference is None else voxel_size_warning(str(item.source), affine, reference)
            if warning:
                print(warning, file=sys.stderr)
            enhanced = enhance_volume(
                task,
                source,
                sampler,
                grid,
                overlap=overlap,
                seed=args.seed,
                progress=lambda done, total, i=i, name=item.name: update(i, name, done, total),
                name=str(item.source),
            )
            windows += window_count(source.shape, task.clip, overlap)
            target = load_volume(item.target)[0] if item.target is not None else None
            write_enhanced(
                out, item.name, source, enhanced, affine, target if target is not None and target.shape == source.shape else None
            )
    seconds = (time.perf_counter() - began) / len(inputs)
    shown = ",".join(f"{f:g}" for f in overlap)
    print(
        f"enhanced {len(inputs)} volume{'s' * (len(inputs) != 1)} (step {step}, {spec}, {windows} windows of "
        f"{list(task.clip)}, overlap {shown}, {seconds:.2f} s/volume) in {out}"
    )
    return 0


def run_reconstruct(args) -> int:
    """`voxgen sample --run RUN --input PATH` of a regress run: each input file PATH names (a file, a
    case folder or a data folder, as for enhancement) reconstructed by the run's EMA weights, written as
    OUT/<name>_<target>.nii.gz in the target's units on the training grid's affine (the first training
    case's, resized to data.shape), with a mosaic next to the real volume where the case has one."""
    import numpy as np

    from voxgen.data.dataset import Intensity, VolumeDataset
    from voxgen.data.nifti import load_volume, save_volume
    from voxgen.reports.mosaic import save_mosaic
    from voxgen.tasks.enhance import find_inputs

    if args.input is None:
        raise VoxgenError(f"{args.run} is a task=regress run: name the inputs to reconstruct from with --input PATH")
    if args.overlap is not None or args.solver is not None or args.head is not None:
        raise VoxgenError("--overlap, --solver and --head are for sampling runs; a regress run predicts in one pass")
    cfg, task, step = load_run(args.run, weights=args.weights)
    inputs = find_inputs(args.input, task.input, task.target)
    arrays = [load_volume(item.source)[0] for item in inputs]  # every input read before the work starts
    views, rows, cols = task.input_grid
    for item, array in zip(inputs, arrays):
        # Another image size is another detector (pixel spacing, magnification): resampling it
        # would show the network X-rays of a geometry it never saw.
        if array.shape != task.input_grid:
            raise VoxgenError(
                f"{item.source}: {array.shape[0]} images of {array.shape[1]} x {array.shape[2]}; the run was trained on "
                f"{views} of {rows} x {cols} (data.grids.{task.input}): make them with its geometry "
                f"(voxgen data drr --drr-size {rows})"
            )
    affine = VolumeDataset.of(cfg.data, "train", (task.target,)).affine
    # In the data's units where model space has them (data.intensity=fixed: HU), else model space.
    fixed = cfg.data.intensity == "fixed"
    intensity, shown_range = Intensity.of(cfg.data), tuple(cfg.data.intensity_range) if fixed else (-1.0, 1.0)
    out = Path(args.out) if args.out else Path(args.run) / "reconstructed"
    began = time.perf_counter()
    for item, array in zip(inputs, arrays):
        prediction = task.predict_file(array)
        volume = (intensity.to_units(prediction) if fixed else prediction).numpy().astype(np.float32)
        path = save_volume(out / f"{item.name}_{task.target}.nii.gz", volume, affine)
        shown, titles = [volume], ["reconstructed"]
        if item.target is not None:
            real = load_volume(item.target)[0]
            if real.shape == volume.shape and fixed:
                shown, titles = [volume, real], ["reconstructed", "real"]
        save_mosaic(out / f"{item.name}_{task.target}.png", shown, titles=titles, value_range=shown_range)
        print(f"{item.source} -> {path}", file=sys.stderr)
    seconds = (time.perf_counter() - began) / len(inputs)
    print(f"reconstructed {len(inputs)} volume{'s' * (len(inputs) != 1)} (step {step}, {seconds:.2f} s/volume) in {out}")
    return 0
