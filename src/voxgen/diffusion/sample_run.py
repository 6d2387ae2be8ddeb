"""`voxgen sample`: volumes from a run's EMA weights, written as NIfTI plus a slice mosaic."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxgen.data.dataset import VolumeDataset
from voxgen.data.layout import MASK_MODALITIES
from voxgen.data.nifti import save_volume
from voxgen.diffusion.generate import generate
from voxgen.reports.mosaic import save_mosaic
from voxgen.training.batches import collate


@dataclass
class Samples:
    volumes: dict[str, np.ndarray]  # modality -> (N, D, H, W) in model space
    conditions: dict[str, np.ndarray]  # modality -> (N, D, H, W) in model space
    case_ids: list[str]
    seconds_per_volume: float


def conditions_for(mode, data_root, split: str, shape, num: int) -> tuple[torch.Tensor | None, list[str], dict]:
    """Condition volumes (num, K, D, H, W) drawn in order (cycling) from the split's cases."""
    if not mode.conditions:
        return None, [], {}
    dataset = VolumeDataset(data_root, split, mode.conditions, shape)
    items = [dataset[i % len(dataset)] for i in range(num)]
    batch = collate(items)
    cond = torch.cat([batch[m] for m in mode.conditions], dim=1)  # (num, K, D, H, W)
    return cond, batch["case"], {m: batch[m][:, 0].numpy() for m in mode.conditions}


def sample_volumes(cfg, parts, num: int, seed: int, steps: int, split: str = "test", batch_size: int = 4, progress=None) -> Samples:
    """Generate `num` volumes with per-sample seeds seed, seed + 1, ...; conditioned modes take
    their conditions from the cases of `split`."""
    cond, case_ids, cond_volumes = conditions_for(parts.mode, cfg.data.root, split, cfg.data.shape, num)
    latent_shape = (parts.space.channels(len(parts.mode.generated)), *parts.space.shape(cfg.data.shape))
    started = time.perf_counter()
    out = generate(parts, list(range(seed, seed + num)), latent_shape, cond, steps=steps, solver=cfg.sample.solver,
                   batch_size=batch_size, progress=progress)  # (N, G, D, H, W)
    seconds = (time.perf_counter() - started) / num
    volumes = {m: out[:, i].numpy() for i, m in enumerate(parts.mode.generated)}
    return Samples(volumes, cond_volumes, case_ids, seconds)


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
