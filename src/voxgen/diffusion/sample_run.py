"""`voxgen sample`: volumes from a run's EMA weights, written as NIfTI plus a slice mosaic."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from voxgen.data.dataset import VolumeDataset
from voxgen.data.layout import MASK_MODALITIES
from voxgen.data.nifti import save_volume
from voxgen.diffusion.generate import generate, solver_from_config
from voxgen.diffusion.samplers import SolverSpec
from voxgen.reports.mosaic import save_mosaic
from voxgen.training.batches import collate


@dataclass
class Samples:
    volumes: dict[str, np.ndarray]  # modality -> (N, D, H, W) in model space
    conditions: dict[str, np.ndarray]  # modality -> (N, D, H, W) in model space
    case_ids: list[str]
    seconds_per_volume: float
    nfe: int  # network evaluations per volume
    solver: str  # the SolverSpec text that produced them


def conditions_for(mode, data_root, split: str, shape, num: int) -> tuple[torch.Tensor | None, list[str], dict]:
    """Condition volumes (num, K, D, H, W) drawn in order (cycling) from the split's cases."""
    if not mode.conditions:
        return None, [], {}
    dataset = VolumeDataset(data_root, split, mode.conditions, shape)
    items = [dataset[i % len(dataset)] for i in range(num)]
    batch = collate(items)
    cond = torch.cat([batch[m] for m in mode.conditions], dim=1)  # (num, K, D, H, W)
    return cond, batch["case"], {m: batch[m][:, 0].numpy() for m in mode.conditions}


def sample_volumes(cfg, parts, num: int, seed: int, steps: int | None = None, split: str = "test", batch_size: int = 4,
                   progress=None, solver: SolverSpec | None = None, guidance_scale: float | None = None) -> Samples:
    """Generate `num` volumes with per-sample seeds seed, seed + 1, ...; conditioned modes take
    their conditions from the cases of `split`. `solver` defaults to the run's config
    (`sample.*`); `steps` replaces its number of steps; `guidance_scale` defaults to
    `sample.guidance_scale` and applies to conditional modes only."""
    spec = solver if solver is not None else solver_from_config(cfg)
    if steps is not None:
        spec = replace(spec, steps=steps)
    scale = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
    cond, case_ids, cond_volumes = conditions_for(parts.mode, cfg.data.root, split, cfg.data.shape, num)
    if cond is None and guidance_scale is None:
        scale = 1.0  # the config's scale is for conditional modes; an explicit one is checked by generate
    latent_shape = (parts.space.channels(len(parts.mode.generated)), *parts.space.shape(cfg.data.shape))
    result = generate(parts, list(range(seed, seed + num)), latent_shape, cond, solver=spec, batch_size=batch_size,
                      guidance_scale=scale, progress=progress)
    out = result.volumes  # (N, G, D, H, W)
    volumes = {m: out[:, i].numpy() for i, m in enumerate(parts.mode.generated)}
    return Samples(volumes, cond_volumes, case_ids, result.seconds_per_volume, result.nfe, str(spec))


def to_data_space(volume: np.ndarray, modality: str) -> tuple[np.ndarray, type]:
    """Model space -> what is written: masks thresholded at 0 to {0, 1}, images [-1, 1] -> [0, 1]."""
    if modality in MASK_MODALITIES:
        return (volume > 0).astype(np.uint8), np.uint8
    return ((np.clip(volume, -1.0, 1.0) + 1.0) / 2.0).astype(np.float32), np.float32


def write_samples(samples: Samples, out_dir: str | Path, affine: np.ndarray) -> tuple[list[Path], Path]:
    """NIfTI files `sample_000_<modality>.nii.gz` (conditions too) and `mosaic.png`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
