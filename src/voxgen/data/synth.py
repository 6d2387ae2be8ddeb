"""Pieces shared by the two embedded data sets (phantoms and template cohort).

Both build, per case, tissue fractions on a grid in mm (GM, WM, CSF, skull, scalp),
turn them into four MRI contrasts with one table of tissue intensities, paint
metastases (enhancing rim, necrotic core, oedema halo) and write the case folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxgen.data.layout import MASK_MODALITIES, MODALITIES, SPLITS, split_counts
from voxgen.data.nifti import save_volume
from voxgen.errors import ConfigError, DataError

IMAGE_MODALITIES = tuple(m for m in MODALITIES if m not in MASK_MODALITIES)
MARKER = ".voxgen-dataset.json"

# Tissue intensities per modality, arbitrary units with T1 white matter ~0.6.
# t1_pre / t1_gd / bravo are T1-weighted (WM > GM > CSF); BRAVO is the post-contrast
# IR-prepared T1 with the strongest GM/WM contrast. FLAIR is T2-weighted with CSF
# suppressed (GM > WM > CSF). Metastases: the rim enhances after gadolinium (t1_gd,
# bravo), is hypointense before it (t1_pre); vasogenic oedema is bright on FLAIR.
CONTRASTS: dict[str, dict[str, float]] = {
    "t1_pre": dict(csf=0.12, gm=0.42, wm=0.62, skull=0.07, scalp=0.78, rim=0.34, core=0.20, oedema=0.44),
    "t1_gd": dict(csf=0.14, gm=0.44, wm=0.62, skull=0.07, scalp=0.80, rim=1.00, core=0.20, oedema=0.44),
    "bravo": dict(csf=0.06, gm=0.38, wm=0.70, skull=0.05, scalp=0.72, rim=0.98, core=0.12, oedema=0.48),
    "flair": dict(csf=0.05, gm=0.52, wm=0.38, skull=0.05, scalp=0.70, rim=0.66, core=0.45, oedema=0.88),
}
TISSUES = ("csf", "gm", "wm", "skull", "scalp")


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ConfigError(f"shape: expected [D, H, W] with every size >= 4, got {list(shape)}")
    return shape


def grid_affine(spacing_xyz: Sequence[float], origin_xyz: Sequence[float]) -> np.ndarray:
    """RAS affine (x, y, z index -> mm) of an axis-aligned grid."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag(np.asarray(spacing_xyz, dtype=np.float64))
    affine[:3, 3] = origin_xyz
    return affine


def axis_coords(affine: np.ndarray, shape_dhw: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mm coordinates of an axis-aligned grid, broadcastable to (D, H, W): (z, y, x)."""
    d, h, w = shape_dhw
    z = (affine[2, 3] + affine[2, 2] * np.arange(d, dtype=np.float32))[:, None, None]
    y = (affine[1, 3] + affine[1, 1] * np.arange(h, dtype=np.float32))[None, :, None]
    x = (affine[0, 3] + affine[0, 0] * np.arange(w, dtype=np.float32))[None, None, :]
    return z.astype(np.float32), y.astype(np.float32), x.astype(np.float32)


def smooth_field(
    rng: np.random.Generator, zyx: Sequence[np.ndarray], extent_mm: Sequence[float], modes: int, amplitude: float
) -> np.ndarray:
    """A random low-frequency field (D, H, W) with standard deviation ~`amplitude`.

    A sum of `modes` separable cosines with 0.25-1.25 periods across `extent_mm`:
    each mode is an outer product of three 1-D arrays, so the cost is a few
    multiply-adds per voxel however large the grid.
    """
    z, y, x = zyx
    out = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
    for _ in range(modes):
        factors = []
        for coord, extent in zip((z, y, x), extent_mm):
            freq = rng.uniform(0.25, 1.25) * 2.0 * np.pi / extent
            factors.append(np.cos(freq * coord + rng.uniform(0.0, 2.0 * np.pi)).astype(np.float32))
        # cos products have mean square 1/8; rescale so the sum has std ~amplitude.
        out += np.float32(rng.normal() * amplitude * np.sqrt(8.0 / modes)) * factors[0] * factors[1] * factors[2]
    return out


@dataclass
class Lesions:
    """Fractions (D, H, W) in [0, 1]: enhancing rim, necrotic core, oedema halo."""

    rim: np.ndarray
    core: np.ndarray
    oedema: np.ndarray

    @property
    def seg(self) -> np.ndarray:
        """Lesion mask (enhancing + core), uint8 {0, 1}."""
        return ((self.rim + self.core) >= 0.5).astype(np.uint8)


def paint_lesions(
    rng: np.random.Generator,
    zyx: Sequence[np.ndarray],
    spacing_zyx: Sequence[float],
    candidates: np.ndarray,
    count: int,
    radius_mm: tuple[float, float] = (1.5, 8.0),
) -> Lesions:
    """Metastases as slightly ellipsoidal spheres centred on random `candidates` voxels.

    `candidates` is a boolean (D, H, W) map of allowed centres (inside the brain).
    Radii are log-uniform in `radius_mm` (small metastases are the common ones).
    Lesions >= 3 mm have a necrotic core; the oedema halo is 1.5-3 radii. Edges are
    partial-volume fractions over one voxel, so a lesion smaller than a voxel still
    shows as a faint blip (though it may leave no mask voxel).
    """
    z, y, x = zyx
    shape = np.broadcast_shapes(z.shape, y.shape, x.shape)
    rim = np.zeros(shape, np.float32)
    core = np.zeros(shape, np.float32)
    halo = np.zeros(shape, np.float32)
    index = np.flatnonzero(candidates)
    if count == 0 or index.size == 0:
        return Lesions(rim, core, halo)
    voxel = float(np.mean(spacing_zyx))
    for _ in range(count):
        centre_idx = np.unravel_index(index[rng.integers(index.size)], shape)
        # Anywhere within the chosen voxel, so centres are not locked to the grid.
        centre = [float(c.reshape(-1)[i]) + rng.uniform(-0.5, 0.5) * s for c, i, s in zip((z, y, x), centre_idx, spacing_zyx)]
        radius = float(np.exp(rng.uniform(np.log(radius_mm[0]), np.log(radius_mm[1]))))
        axes = radius * rng.uniform(0.85, 1.15, size=3)
        core_frac = rng.uniform(0.35, 0.6) if radius >= 3.0 else 0.0
        halo_frac = rng.uniform(1.5, 3.0)
        # Work on the bounding box of the halo only: lesions are small next to the head.
        reach = axes * halo_frac + voxel
        box = []
        for c, coord, r in zip(centre, (z, y, x), reach):
            line = coord.reshape(-1)
            inside = np.flatnonzero(np.abs(line - c) <= r)
            box.append(slice(inside[0], inside[-1] + 1) if inside.size else slice(0, 0))
        zz, yy, xx = (coord.reshape(-1)[b] for coord, b in zip((z, y, x), box))
        q = np.sqrt(
            ((zz[:, None, None] - centre[0]) / axes[0]) ** 2
            + ((yy[None, :, None] - centre[1]) / axes[1]) ** 2
            + ((xx[None, None, :] - centre[2]) / axes[2]) ** 2
        )  # (d, h, w) of the box: 1 on the lesion surface

        def inside_frac(level: float) -> np.ndarray:
            return np.clip((level - q) * radius / voxel + 0.5, 0.0, 1.0).astype(np.float32)

        whole = inside_frac(1.0)
        c_frac = inside_frac(core_frac) if core_frac > 0 else np.zeros_like(whole)
        b = tuple(box)
        core[b] = np.maximum(core[b], c_frac)
        rim[b] = np.maximum(rim[b], whole - c_frac)
        halo[b] = np.maximum(halo[b], inside_frac(halo_frac))
    # Where lesions overlap the core of one and the rim of another can both be set.
    rim = np.minimum(rim, 1.0 - core)
    halo = np.clip(halo - rim - core, 0.0, 1.0)
    return Lesions(rim, core, halo)


def render(
    fractions: Mapping[str, np.ndarray],
    lesions: Lesions,
    contrast: Mapping[str, float],
    oedema_weight: np.ndarray,
) -> np.ndarray:
    """Noise-free image (D, H, W): tissue fractions x intensities, then lesions on top.

    `oedema_weight` (D, H, W) in [0, 1] says where oedema can show (white matter
    mostly: vasogenic oedema spreads along it and spares cortex and CSF).
    """
    image = sum(fractions[t] * np.float32(contrast[t]) for t in TISSUES)
    oedema = lesions.oedema * oedema_weight
    image = image * (1.0 - oedema) + oedema * np.float32(contrast["oedema"])
    lesion = lesions.rim + lesions.core
    image = image * (1.0 - lesion) + lesions.rim * np.float32(contrast["rim"]) + lesions.core * np.float32(contrast["core"])
    return image.astype(np.float32)


def rician_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude MR noise: |image + N(0, s) + i N(0, s)| (positive, biased in the background)."""
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def write_dataset(
    root: str | Path,
    prefix: str,
    cases: int,
    splits,
    make_case: Callable[[int], dict[str, np.ndarray]],
    affine: np.ndarray | Callable[[int], np.ndarray],
    params: dict,
    progress: Callable[[int, int], None] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> Path:
    """Write `cases` cases made by `make_case(index)` into ROOT/<split>/<prefix>_<index>/.

    Cases are numbered across splits, train first. `affine` is every case's grid, or a function
    of the index that gives each case its own; `names` replaces the case ids (one per index).
    The set is built in a hidden sibling folder and renamed into place, so ROOT
    appears whole or not at all. An existing ROOT is replaced only when it is empty
    or was itself written by voxgen (it holds the hidden marker file); anything
    else raises DataError rather than deleting a user's folder.
    """
    root = Path(root)
    counts = split_counts(cases, splits)
    with replacing_folder(root) as tmp:
        index = 0
        for split in SPLITS:
            (tmp / split).mkdir(parents=True)
            for _ in range(counts[split]):
                folder = tmp / split / (f"{prefix}_{index:03d}" if names is None else names[index])
                grid = affine(index) if callable(affine) else affine
                for modality, volume in make_case(index).items():
                    dtype = np.uint8 if modality in MASK_MODALITIES else np.float32
                    save_volume(folder / f"{modality}.nii.gz", volume, grid, dtype=dtype)
                index += 1
                if progress is not None:
                    progress(index, cases)
        meta = dict(params, cases=cases, splits=counts)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return root


@contextlib.contextmanager
def replacing_folder(root: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to build ROOT's new contents in; on success it is renamed into
    place, so ROOT appears whole or not at all, and on failure it is removed and ROOT left as it was.
    An existing ROOT is replaced only when it is empty or was written by voxgen (it holds the
    hidden marker file, which the builder writes); anything else raises DataError before any work
    rather than deleting a user's folder."""
    if root.exists():
        if not root.is_dir():
            raise DataError(f"{root}: exists and is not a folder")
        if any(root.iterdir()) and not (root / MARKER).is_file():
            raise DataError(f"{root}: folder exists, is not empty and was not made by voxgen; choose a new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if root.exists():
            root.rename(old)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not root.exists():
            old.rename(root)
        raise
    shutil.rmtree(old, ignore_errors=True)
