"""Sampling a trained run: its solver and guidance settings, conditions from a data split, and
the samples written as NIfTI with a slice mosaic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxgen.data.batches import collate
from voxgen.data.dataset import VolumeDataset
from voxgen.data.nifti import save_volume
from voxgen.data.tumour_bins import BIN_EDGES_MM, SIZE_BINS, WithSizeBins, size_bin_vector
from voxgen.diffusion.generate import generate
from voxgen.diffusion.modes import scale_counts
from voxgen.diffusion.samplers import SolverSpec, check_solver, check_strategy, parse_solver
from voxgen.diffusion.spaces import encode_channels
from voxgen.files import write_atomic
from voxgen.reports.mosaic import save_mosaic


@dataclass(frozen=True)
class Sampling:
    """How to sample a run: the solver and the classifier-free guidance scale."""

    solver: SolverSpec
    guidance_scale: float = 1.0


def sampling_settings(
    sample,
    strategy,
    conditional: bool,
    *,
    solver: str | None = None,
    steps: int | None = None,
    shift: float | None = None,
    guidance_scale: float | None = None,
) -> Sampling:
    """The one place where a run's `sample` section and the command line's overrides meet.

    `solver` (a spec text) replaces `sample.solver`, which null makes the strategy's default
    sampler; both are completed by `sample.steps`, `sample.tolerance`, `sample.shift` and
    `sample.eta`. `steps` and `shift` then replace the spec's settings, refused (ConfigError)
    for a sampler without them, as the same settings in the spec text are; the solver is
    checked against the strategy too. `guidance_scale` replaces `sample.guidance_scale`; the
    config's scale is for conditional modes and is not applied to unconditional ones (an
    explicit one there is refused by `generate`, before it samples).
    """
    text = solver or sample.solver or strategy.default_sampler
    spec = parse_solver(text, sample).with_settings(steps=steps, shift=shift)
    check_solver(spec)
    check_strategy(spec, strategy)
    scale = guidance_scale if guidance_scale is not None else sample.guidance_scale if conditional else 1.0
    return Sampling(spec, scale)


def requested_sampling(cfg, parts, request) -> Sampling:
    """`sampling_settings` of a run with what a `voxgen sample` command line asks for (`request`
    has solver, steps, shift and guidance_scale, each None for the run's own)."""
    return sampling_settings(
        cfg.sample,
        parts.strategy,
        parts.mode.conditional,
        solver=request.solver,
        steps=request.steps,
        shift=request.shift,
        guidance_scale=request.guidance_scale,
    )


@dataclass
class Samples:
    volumes: dict[str, np.ndarray]  # modality -> (N, D, H, W) in model space
    conditions: dict[str, np.ndarray]  # modality -> (N, D, H, W) in model space
    case_ids: list[str]
    seconds_per_volume: float
    nfe: int  # network evaluations per volume
    solver: str  # the SolverSpec text that produced them
    # Size-bin modes: the tumour counts per size bin requested of each sample, (N, 7) int64.
    size_bins: np.ndarray | None = None


@dataclass
class Conditions:
    """What conditions the samples, drawn in order (cycling) from a split's cases."""

    cond: torch.Tensor | None  # in the model's space: (num, K C', D', H', W'), (num, 7), or None
    case_ids: list[str]
    volumes: dict[str, np.ndarray]  # volume conditions {modality: (num, D, H, W)} in model space
    size_bins: np.ndarray | None = None  # size-bin modes: the requested counts (num, 7)


def conditions_for(cfg, parts, split: str, num: int) -> Conditions:
    """The conditions of `num` samples from the split's cases in order (cycling): the volume
    conditions encoded in the model's space, or for a size-bin mode the size-bin vectors of the
    split's masks (the requests)."""
    mode = parts.mode
    if not mode.conditional:
        return Conditions(None, [], {})
    if mode.size_bins:
        mask = mode.generated[0]
        dataset = WithSizeBins(VolumeDataset.of(cfg.data, split, (mask,)), mask)
        items = [dataset[i % len(dataset)] for i in range(num)]
        counts = torch.stack([item[SIZE_BINS] for item in items])  # (num, 7)
        return Conditions(scale_counts(counts), [item["case"] for item in items], {}, counts.numpy())
    dataset = VolumeDataset.of(cfg.data, split, mode.conditions)
    items = [dataset[i % len(dataset)] for i in range(num)]
    batch = collate(items)
    volumes = torch.cat([batch[m] for m in mode.conditions], dim=1)  # (num, K, D, H, W)
    device = next(parts.model.parameters()).device
    with torch.no_grad():
        cond = encode_channels(parts.space, volumes.to(device), mode.conditions).cpu()  # (num, K C', D', H', W')
    return Conditions(cond, batch["case"], {m: batch[m][:, 0].numpy() for m in mode.conditions})


def sample_volumes(
    cfg, parts, num: int, seed: int, sampling: Sampling, split: str = "test", batch_size: int = 4, progress=None
) -> Samples:
    """Generate `num` volumes with per-sample seeds seed, seed + 1, ...; conditioned modes take
    their conditions from the cases of `split` (see `sampling_settings` for `sampling`)."""
    conditions = conditions_for(cfg, parts, split, num)
    result = generate(
        parts,
        list(range(seed, seed + num)),
        conditions.cond,
        solver=sampling.solver,
        batch_size=batch_size,
        guidance_scale=sampling.guidance_scale,
        progress=progress,
    )
    out = result.volumes  # (N, G, D, H, W)
    volumes = {m: out[:, i].numpy() for i, m in enumerate(parts.mode.generated)}
    return Samples(
        volumes,
        conditions.volumes,
        conditions.case_ids,
        result.seconds_per_volume,
        result.nfe,
        str(sampling.solver),
        conditions.size_bins,
    )


def to_data_space(volume: np.ndarray, modality: str, masks) -> tuple[np.ndarray, type]:
    """Model space -> what is written: masks (modalities in `masks`) thresholded at 0 to {0, 1},
    images [-1, 1] -> [0, 1]."""
    if modality in masks:
        return (volume > 0).astype(np.uint8), np.uint8
    return ((np.clip(volume, -1.0, 1.0) + 1.0) / 2.0).astype(np.float32), np.float32


def write_samples(samples: Samples, out_dir: str | Path, affine: np.ndarray, masks) -> tuple[list[Path], Path]:
    """NIfTI files `sample_000_<modality>.nii.gz` (conditions too; `masks` names the mask
    modalities), `mosaic.png`, and for size-bin modes `size_bins.csv` (requested and measured
    counts per sample)."""
    out_dir = Path(out_dir)  # created by the first write
    paths = []
    for group in (samples.volumes, samples.conditions):
        for modality, volumes in group.items():
            for i, volume in enumerate(volumes):
                data, dtype = to_data_space(volume, modality, masks)
                path = out_dir / f"sample_{i:03d}_{modality}.nii.gz"
                save_volume(path, data, affine, dtype=dtype)
                paths.append(path)
    first = next(iter(samples.volumes))
    shown = samples.volumes[first][:4]
    if first in masks:  # what is written and counted: thresholded at 0, not the soft values
        shown = np.where(shown > 0, 1.0, -1.0)
    mask = next((m for m in samples.conditions if m in masks), None)
    overlays = samples.conditions[mask][:4] if mask else None
    titles = [f"sample {i}" + (f" | mask of {samples.case_ids[i]}" if samples.case_ids else "") for i in range(len(shown))]
    if samples.size_bins is not None:
        measured = [size_bin_vector(volume, affine) for volume in samples.volumes[first]]
        paths.append(write_size_bins(out_dir / "size_bins.csv", samples.size_bins, measured, samples.case_ids))
        titles = [f"sample {i} | asked {''.join(map(str, samples.size_bins[i]))}" for i in range(len(shown))]
    mosaic = save_mosaic(out_dir / "mosaic.png", list(shown), titles=titles, overlays=overlays)
    return paths, mosaic


def write_size_bins(path: Path, requested, measured, case_ids) -> Path:
    """One row per sample: the case whose mask gave the request, then the requested and the
    measured tumour count of every size bin."""
    names = [f"{lo}-{hi}mm" for lo, hi in zip(BIN_EDGES_MM, [*BIN_EDGES_MM[1:], "inf"])]
    header = ["sample", "case", *(f"asked {n}" for n in names), *(f"got {n}" for n in names)]
    lines = [",".join(header)]
    for i, (want, got) in enumerate(zip(requested, measured, strict=True)):
        lines.append(",".join([str(i), case_ids[i], *map(str, want), *map(str, got)]))
    return write_atomic(path, "\n".join(lines) + "\n")


def reference_affine(cfg, mode) -> np.ndarray:
    """The data set's reference affine (its first training case, at the model's grid)."""
    return VolumeDataset.of(cfg.data, "train", mode.modalities).affine
