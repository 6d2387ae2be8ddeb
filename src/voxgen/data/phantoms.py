"""Procedural head phantoms: ellipsoids in mm, no external data.

A phantom is an ellipsoidal head (scalp, skull ring, CSF, a wavy cortical grey
matter layer, white matter, two ventricles) with random size and position jitter
and 0-4 spherical metastases. Each case depends only on (seed, case index).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from voxgen.data import synth

# Field of view in mm, (z, y, x): the head (semi-axes ~70 x 90 x 74 mm) fills it.
FOV_MM = (160.0, 200.0, 168.0)
HEAD_SEMI_AXES_MM = (70.0, 90.0, 74.0)


def phantom_affine(shape) -> np.ndarray:
    """RAS affine of the phantom grid: FOV_MM over `shape` [D, H, W], origin at the centre."""
    d, h, w = shape
    spacing_xyz = (FOV_MM[2] / w, FOV_MM[1] / h, FOV_MM[0] / d)
    origin = [-s * (n - 1) / 2.0 for s, n in zip(spacing_xyz, (w, h, d))]
    return synth.grid_affine(spacing_xyz, origin)


def _inside(rho: np.ndarray, level, width: float) -> np.ndarray:
    """Fraction of a voxel inside the surface rho = level (partial volume over `width`)."""
    return np.clip((level - rho) / width + 0.5, 0.0, 1.0).astype(np.float32)


def phantom_case(index: int, shape=(32, 48, 40), seed: int = 0) -> dict[str, np.ndarray]:
    """One phantom: the four images (D, H, W) float32, "seg" uint8, and tissue fractions.

    Tissue fractions are returned under "gm", "wm", "csf", "head" (for tests and figures);
    `make_phantoms` writes only the modalities.
    """
    shape = synth.check_shape(shape)
    rng = np.random.default_rng([seed, index])
    affine = phantom_affine(shape)
    z, y, x = synth.axis_coords(affine, shape)
    spacing_zyx = (affine[2, 2], affine[1, 1], affine[0, 0])

    semi = np.array(HEAD_SEMI_AXES_MM) * rng.uniform(0.92, 1.04, size=3)
    centre = rng.uniform(-5.0, 5.0, size=3)
    dz, dy, dx = (z - centre[0]) / semi[0], (y - centre[1]) / semi[1], (x - centre[2]) / semi[2]
    rho = np.sqrt(dz * dz + dy * dy + dx * dx)  # (D, H, W): 1 on the scalp surface
    width = float(np.mean(spacing_zyx) / semi.mean())  # one voxel in rho units

    # Gyri: the cortex surface and the GM/WM border wave with the direction.
    theta = np.arctan2(dy, dx)
    phi = np.arctan2(dz, np.sqrt(dx * dx + dy * dy))
    folds = rng.integers(5, 9)
    wave = np.sin(folds * theta + rng.uniform(0, 2 * np.pi)) * np.cos(folds * phi)
    head = _inside(rho, 1.0, width)
    skull_out = _inside(rho, 0.93, width)
    icv = _inside(rho, 0.87, width)
    brain = _inside(rho, 0.84 + 0.02 * wave, width)
    wm = _inside(rho, 0.66 + 0.05 * wave, width)

    # Two lateral ventricles, either side of the midline, a little above the centre.
    vent = np.zeros_like(rho)
    for side in (-1.0, 1.0):
        vz, vy, vx = dz - 0.12, dy - 0.02, dx - side * 0.13
        r = np.sqrt((vz / 0.16) ** 2 + (vy / 0.38) ** 2 + (vx / 0.09) ** 2)
        vent = np.maximum(vent, _inside(r, 1.0, width / 0.12))
    wm = np.clip(wm - vent, 0.0, 1.0)
    gm = np.clip(brain - wm - vent, 0.0, 1.0)
    fractions = {
        "scalp": head - skull_out,
        "skull": skull_out - icv,
        "gm": gm,
        "wm": wm,
        "csf": np.clip(icv - gm - wm, 0.0, 1.0),
    }

    lesions = synth.paint_lesions(
        rng, (z, y, x), spacing_zyx, candidates=rho < 0.6, count=int(rng.integers(0, 5)), radius_mm=(3.0, 12.0)
    )
    lesions.rim *= brain
    lesions.core *= brain
    out: dict[str, np.ndarray] = {}
    for modality in synth.IMAGE_MODALITIES:
        image = synth.render(fractions, lesions, synth.CONTRASTS[modality], oedema_weight=brain)
        out[modality] = synth.rician_noise(rng, image, sigma=0.02)
    out["seg"] = lesions.seg
    out.update(gm=gm, wm=wm, csf=fractions["csf"], head=head)
    return out


def make_phantoms(
    root,
    cases: int = 12,
    shape=(32, 48, 40),
    seed: int = 0,
    splits=None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `cases` phantoms as a BrainMetShare-layout folder at `root`; returns root.

    Case ids are phantom_000, phantom_001, ... numbered across splits (train first).
    `splits` is {split: count} or (train, val, test); default about 2/3, 1/6, 1/6.
    Deterministic given `seed`; a case depends only on (seed, index).
    """
    shape = synth.check_shape(shape)

    def make(index: int) -> dict[str, np.ndarray]:
        case = phantom_case(index, shape, seed)
        return {m: case[m] for m in (*synth.IMAGE_MODALITIES, "seg")}

    params = dict(generator="phantoms", shape=list(shape), seed=seed)
    return synth.write_dataset(root, "phantom", cases, splits, make, phantom_affine(shape), params, progress)
