"""`voxgen sample`: volumes from a run's EMA weights, written as NIfTI plus a slice mosaic."""

from __future__ import annotations

from pathlib import Path

from voxgen.diffusion.sampling import reference_affine, requested_sampling, sample_volumes, write_samples
from voxgen.errors import VoxgenError
from voxgen.training.runs import load_run


def run_sample(args) -> int:
    """The body of `voxgen sample` (arguments as `voxgen.cli` parses them); `--solver diffrs:...`
    samples with the run's DiffRS head (docs/diffrs.md)."""
    from voxgen.diffusion.diffrs import is_diffrs

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
