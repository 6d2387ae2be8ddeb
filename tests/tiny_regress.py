"""A tiny `task=regress` set-up for tests: cubes of 16^3 holding a few ellipsoids (HU), each with two
parallel projections of 16 x 16 as its X-ray pair, and a 3-stage xray2ct network (2^3 -> 16^3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from voxgen.data.nifti import save_volume

SIZE = 16
TINY_REGRESS = [
    "task=regress",
    "model.name=xray2ct",
    "data.modalities=[xray,ct]",
    "data.masks=[]",
    "data.intensity=fixed",
    f"data.shape=[{SIZE},{SIZE},{SIZE}]",
    f"data.grids={{xray: [2, {SIZE}, {SIZE}]}}",
    "xray2ct.initial_size=2",
    "xray2ct.initial_channels=4",
    "xray2ct.xray_features=8",
    "xray2ct.encoder_channels=[4,8]",
    "xray2ct.stages=[{channels: 8, rdb_blocks: 1, growth: 4, rdb_layers: 2}, {channels: 8}, {channels: 8}]",
    "xray2ct.skip_channels=4",
    "xray2ct.fusion_channels=8",
    "xray2ct.refine=conv",
    "xray2ct.refine_channels=[8,4]",
    "xray2ct.norm_groups=4",
    "xray2ct.refine_norm_groups=4",
    "training.batch_size=2",
    "training.val_batches=1",
    "training.warmup_steps=0",
]


def ellipsoid_ct(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """(size,)*3 float32 HU: air around a water ball with 1-3 denser ellipsoids inside."""
    d, h, w = np.meshgrid(*(np.linspace(-1, 1, size),) * 3, indexing="ij")
    ct = np.full((size,) * 3, -1000.0)
    ct[d**2 + h**2 + w**2 < 0.8] = 0.0
    for _ in range(rng.integers(1, 4)):
        centre, radii = rng.uniform(-0.4, 0.4, 3), rng.uniform(0.15, 0.35, 3)
        inside = sum(((a - c) / r) ** 2 for a, c, r in zip((d, h, w), centre, radii)) < 1
        ct[inside] = rng.uniform(200.0, 1200.0)
    return ct.astype(np.float32)


def projections(ct: np.ndarray) -> np.ndarray:
    """(2, D, W) and (D, H) parallel line integrals of attenuation: the AP view along H, the lateral along W."""
    mu = np.clip(1.0 + ct / 1000.0, 0.0, None)
    return np.stack([mu.sum(axis=1), mu.sum(axis=2)]).astype(np.float32)


def make_regress_root(root: Path, counts=(("train", 6), ("val", 2), ("test", 2)), seed: int = 0) -> Path:
    """ROOT/{split}/case_NN/{ct,xray}.nii.gz of ellipsoid cubes and their projections."""
    rng = np.random.default_rng(seed)
    n = 0
    for split, count in counts:
        for _ in range(count):
            ct = ellipsoid_ct(rng)
            folder = root / split / f"case_{n:02d}"
            folder.mkdir(parents=True)
            save_volume(folder / "ct.nii.gz", ct, np.diag([2.0, 2.0, 2.0, 1.0]))
            save_volume(folder / "xray.nii.gz", projections(ct), np.eye(4))
            n += 1
    return root
