"""Sampling a trained run: its solver and guidance settings, conditions from a data split, and
the samples written as NIfTI with a slice mosaic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxgen.data.batches import collate
from voxgen.data.dataset import VolumeDataset
from voxgen.data.layout import MASK_MODALITIES
from voxgen.data.nifti import save_volume
from voxgen.diffusion.generate import generate
from voxgen.diffusion.samplers import SolverSpec, check_solver, check_strategy, parse_solver
from voxgen.diffusion.spaces import encode_channels
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


@dataclass
class Samples:
    volumes: dict[str, np.ndarray]  # modality -> (N, D, H, W) in model space
    conditions: dict[str, np.ndarray]  # modality -> (N, D, H, W) in model space
    case_ids: list[str]
    seconds_per_volume: float
    nfe: int  # network evaluations per volume
    solver: str  # the SolverSpec text that produced them


def conditions_for(parts, data_root, split: str, shape, num: int) -> tuple[torch.Tensor | None, list[str], dict]:
    """Conditions drawn in order (cycling) from the split's cases: encoded in the model's space
    (num, K C', D', H', W'), their case ids, and the volumes {modality: (num, D, H, W)}."""
    mode = parts.mode
    if not mode.conditions:
        return None, [], {}
    dataset = VolumeDataset(data_root, split, mode.conditions, shape)
    items = [dataset[i % len(dataset)] for i in range(num)]
    batch = collate(items)
    volumes = torch.cat([batch[m] for m in mode.conditions], dim=1)  # (num, K, D, H, W)
    device = next(parts.model.parameters()).device
    with torch.no_grad():
        cond = encode_channels(parts.space, volumes.to(device), mode.conditions).cpu()  # (num, K C', D', H', W')
    return cond, batch["case"], {m: batch[m][:, 0].numpy() for m in mode.conditions}


def sample_volumes(
    cfg, parts, num: int, seed: int, sampling: Sampling, split: str = "test", batch_size: int = 4, progress=None
) -> Samples:
    """Generate `num` volumes with per-sample seeds seed, seed + 1, ...; conditioned modes take
    their conditions from the cases of `split` (see `sampling_settings` for `sampling`)."""
    cond, case_ids, cond_volumes = conditions_for(parts, cfg.data.root, split, cfg.data.shape, num)
    result = generate(
        parts,
        list(range(seed, seed + num)),
        cond,
        solver=sampling.solver,
        batch_size=batch_size,
        guidance_scale=sampling.guidance_scale,
        progress=progress,
    )
    out = result.volumes  # (N, G, D, H, W)
    volumes = {m: out[:, i].numpy() for i, m in enumerate(parts.mode.generated)}
    return Samples(volumes, cond_volumes, case_ids, result.seconds_per_volume, result.nfe, str(sampling.solver))


def to_data_space(volume: np.ndarray, modality: str) -> tuple[np.ndarray, type]:
    """Model space -> what is written: masks thresholded at 0 to {0, 1}, images [-1, 1] -> [0, 1]."""
    if modality in MASK_MODALITIES:
        return (volume > 0).astype(np.uint8), np.uint8
    return ((np.clip(volume, -1.0, 1.0) + 1.0) / 2.0).astype(np.float32), np.float32


def write_samples(samples: Samples, out_dir: str | Path, affine: np.ndarray) -> tuple[list[Path], Path]:
    """NIfTI files `sample_000_<modality>.nii.gz` (conditions too) and `mosaic.png`."""
    out_dir = Path(out_dir)  # created by the first write
    paths = []
    for group in (samples.volumes, samples.conditions):
        for modality, volumes in group.items():
            for i, volume in enumerate(volumes):
                data, dtype = to_data_space(volume, modality)
                path = out_dir / f"sample_{i:03d}_{modality}.nii.gz"
                save_volume(path, data, affine, dtype=dtype)
                paths.append(path)
    first = next(iter(samples.volumes))
    shown = samples.volumes[first][:4]
    overlays = samples.conditions.get("seg", [None] * len(shown))[:4] if samples.conditions else None
    titles = [f"sample {i}" + (f" | mask of {samples.case_ids[i]}" if samples.case_ids else "") for i in range(len(shown))]
    mosaic = save_mosaic(out_dir / "mosaic.png", list(shown), titles=titles, overlays=overlays)
    return paths, mosaic


def reference_affine(cfg, mode) -> np.ndarray:
    """The data set's reference affine (its first training case, at the model's grid)."""
    return VolumeDataset(cfg.data.root, "train", mode.modalities, cfg.data.shape).affine
