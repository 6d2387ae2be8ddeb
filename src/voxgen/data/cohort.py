"""The template cohort: augmented copies of the MNI ICBM152 2009 template with metastases.

Anatomy comes from the MNI152 2009 (sym, 09a) grey- and white-matter maps that ship
inside the nilearn wheel (Fonov et al., NeuroImage 2011); nothing is downloaded.
Each case warps the template with a random small affine and a smooth displacement
field, renders four MRI contrasts from the tissue maps with random intensities,
bias field, gamma and Rician noise, and inserts 0-6 metastases. These are augmented
templates, not a patient population.

The template is skull-stripped, so CSF, skull and scalp are built from a signed
distance to a smoothed intracranial hull around the brain.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from voxgen.data import synth
from voxgen.data.nifti import load_volume
from voxgen.errors import DataError

TEMPLATE_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
# Thickness of the layers outside the brain, mm: skull + scalp at most, plus room for
# the random affine/displacement, decides the field of view.
MAX_SHELL_MM = 2.5 + 8.0 + 9.0
FOV_MARGIN_MM = 6.0


@dataclass(frozen=True)
class Template:
    """Tissue maps of the template, (D, H, W) float32, with world -> (x, y, z) index maps.

    `gm` / `wm` hold block-averaged copies at 1, 2 and 4 mm (sampling a coarse grid
    from the level nearest its voxel size avoids aliasing). `sd` is the signed
    distance (mm, < 0 inside) to the intracranial hull on a 2 mm grid.
    """

    gm: dict[int, np.ndarray]
    wm: dict[int, np.ndarray]
    inv_affine: dict[int, np.ndarray]
    sd: np.ndarray
    sd_inv_affine: np.ndarray
    box_mm: np.ndarray  # (2, 3): min and max (x, y, z) of the head incl. margin


def template_folder() -> Path:
    """Folder of nilearn's packaged data, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn: package not installed; the template cohort needs its MNI152 files")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _block_mean(volume: np.ndarray, affine: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Average `level`^3 blocks of a (D, H, W) volume; returns it and its affine."""
    if level == 1:
        return volume, affine
    pad = [(0, (-n) % level) for n in volume.shape]
    v = np.pad(volume, pad)
    d, h, w = (n // level for n in v.shape)
    v = v.reshape(d, level, h, level, w, level).mean(axis=(1, 3, 5), dtype=np.float32)
    index_map = np.eye(4)
    index_map[:3, :3] *= level
    index_map[:3, 3] = (level - 1) / 2.0
    return v, affine @ index_map


def _hull_signed_distance(brain: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance (mm) to a smooth hull of the brain on a 2 mm grid.

    The hull (brain blurred by 3 mm and thresholded low) closes the sulci and adds a
    thin outer CSF layer, like the inner surface of the skull. The grid is padded
    by 30 mm except below: the template stops at the brainstem, and a real field of
    view also cuts through the neck there. Returns (sd, its affine, head box (2, 3)).
    """
    brain2, affine2 = _block_mean(brain.astype(np.float32), affine, 2)
    hull = (ndimage.gaussian_filter(brain2, sigma=1.5) > 0.3) | (brain2 > 0.5)
    hull = ndimage.binary_fill_holes(hull)
    pad = 15
    hull = np.pad(hull, ((0, pad), (pad, pad), (pad, pad)))  # (D, H, W): no padding inferiorly
    shift = np.eye(4)
    shift[:3, 3] = (-pad, -pad, 0)  # (x, y, z) index offsets
    affine2 = affine2 @ shift
    outside = ndimage.distance_transform_edt(~hull) - 0.5
    inside = ndimage.distance_transform_edt(hull) - 0.5
    sd = (np.where(hull, -inside, outside) * 2.0).astype(np.float32)

    dz, dy, dx = np.nonzero(sd <= MAX_SHELL_MM)
    ijk = np.stack([[dx.min(), dy.min(), dz.min()], [dx.max(), dy.max(), dz.max()]]).astype(np.float64)
    box = ijk @ affine2[:3, :3].T + affine2[:3, 3]
    box[0] -= FOV_MARGIN_MM
    box[1] += FOV_MARGIN_MM
    box[0, 2] = max(box[0, 2], (affine @ [0, 0, 0, 1])[2])  # never below the template's last slice
    return sd, affine2, box


@functools.lru_cache(maxsize=2)
def load_template(folder: Path | None = None) -> Template:
    """Read and prepare the MNI152 2009 tissue maps (once per process, ~1.5 s).

    `folder` defaults to nilearn's packaged data folder.
    """
    folder = template_folder() if folder is None else Path(folder)
    maps = {}
    for name, file in TEMPLATE_FILES.items():
        if not (folder / file).is_file():
            raise DataError(f"{folder / file}: MNI152 template file missing from the nilearn package")
        maps[name], affine = load_volume(folder / file)
    brain = maps["t1"] > 0  # the template is skull-stripped: background is exactly 0
    gm, wm, inv = {}, {}, {}
    for level in (1, 2, 4):
        gm[level], aff = _block_mean(maps["gm"] / np.float32(maps["gm"].max()), affine, level)
        wm[level], _ = _block_mean(maps["wm"] / np.float32(maps["wm"].max()), affine, level)
        inv[level] = np.linalg.inv(aff)
    sd, sd_affine, box = _hull_signed_distance(brain, affine)
    return Template(gm, wm, inv, sd, np.linalg.inv(sd_affine), box)


def cohort_affine(shape) -> np.ndarray:
    """RAS affine of the cohort grid: the template head's box over `shape` [D, H, W].

    Voxels are anisotropic as needed; the grid is the same for every case.
    """
    box = load_template().box_mm
    extent = box[1] - box[0]  # (x, y, z) mm
    spacing = extent / np.array(shape[::-1], dtype=np.float64)
    return synth.grid_affine(spacing, box[0] + spacing / 2.0)


def _sample(volume: np.ndarray, inv_affine: np.ndarray, xyz: list[np.ndarray], cval: float) -> np.ndarray:
    """Linear interpolation of a (D, H, W) volume at world points xyz (each (D, H, W))."""
    index = [sum(inv_affine[row, col] * xyz[col] for col in range(3)) + inv_affine[row, 3] for row in range(3)]
    # map_coordinates wants array axes (D, H, W) = (z, y, x) index order.
    coords = np.stack([index[2], index[1], index[0]]).astype(np.float32)
    return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=cval).astype(np.float32)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def cohort_case(index: int, shape=(32, 48, 40), seed: int = 0) -> dict[str, np.ndarray]:
    """One case: the four images (D, H, W) float32, "seg" uint8, and tissue fractions.

    Tissue fractions come back under "gm", "wm", "csf", "head" (for tests and figures);
    `make_cohort` writes only the modalities. Depends only on (seed, index, shape).
    """
    shape = synth.check_shape(shape)
    tpl = load_template()
    rng = np.random.default_rng([seed, index])
    affine = cohort_affine(shape)
    z, y, x = synth.axis_coords(affine, shape)  # (D,1,1), (1,H,1), (1,1,W) mm
    spacing_zyx = (affine[2, 2], affine[1, 1], affine[0, 0])
    extent_zyx = [s * n for s, n in zip(spacing_zyx, shape)]
    voxel = float(np.mean(spacing_zyx))

    # Subject point p -> template point M (p - c) + c + t + u(p): a small random
    # rotation/scaling about the head centre plus a smooth displacement of a few mm.
    centre = tpl.box_mm.mean(axis=0)  # (x, y, z)
    matrix = _rotation(np.deg2rad(rng.uniform(-4.0, 4.0, 3))) @ np.diag(rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, 3))
    shift = rng.uniform(-3.0, 3.0, 3)
    rel = (x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2]))
    src = []
    for row in range(3):
        disp = synth.smooth_field(rng, (z, y, x), extent_zyx, modes=6, amplitude=2.0)
        value = sum(np.float32(matrix[row, col]) * rel[col] for col in range(3))
        src.append(value + np.float32(centre[row] + shift[row]) + disp)  # (D, H, W)

    level = max(lv for lv in (1, 2, 4) if lv <= max(1.0, min(spacing_zyx)))
    gm = _sample(tpl.gm[level], tpl.inv_affine[level], src, 0.0)
    wm = _sample(tpl.wm[level], tpl.inv_affine[level], src, 0.0)
    sd = _sample(tpl.sd, tpl.sd_inv_affine, src, 1e3)

    # Layers outside the brain as partial-volume fractions of the signed distance.
    csf_mm, skull_mm, scalp_mm = rng.uniform(0.5, 2.5), rng.uniform(5.0, 8.0), rng.uniform(4.0, 9.0)

    def inside(level_mm: float) -> np.ndarray:
        return np.clip((level_mm - sd) / voxel + 0.5, 0.0, 1.0).astype(np.float32)

    icv, skull_out, head = inside(csf_mm), inside(csf_mm + skull_mm), inside(csf_mm + skull_mm + scalp_mm)
    brain = np.clip(gm + wm, 0.0, 1.0)
    fractions = {
        "gm": gm,
        "wm": wm,
        "csf": np.clip(icv - brain, 0.0, 1.0),
        "skull": skull_out - icv,
        "scalp": head - skull_out,
    }

    lesions = synth.paint_lesions(
        rng, (z, y, x), spacing_zyx, candidates=brain > 0.8, count=int(rng.integers(0, 7)), radius_mm=(1.5, 8.0)
    )
    lesions.rim *= icv
    lesions.core *= icv
    oedema_weight = np.clip(wm + 0.3 * gm, 0.0, 1.0)

    out: dict[str, np.ndarray] = {}
    for modality in synth.IMAGE_MODALITIES:
        contrast = {k: v * rng.uniform(0.95, 1.05) for k, v in synth.CONTRASTS[modality].items()}
        image = synth.render(fractions, lesions, contrast, oedema_weight)
        bias = np.exp(synth.smooth_field(rng, (z, y, x), extent_zyx, modes=4, amplitude=0.06))
        image = np.power(np.maximum(image * bias, 0.0), np.float32(np.exp(rng.uniform(-0.15, 0.15))))
        out[modality] = synth.rician_noise(rng, image.astype(np.float32), sigma=rng.uniform(0.01, 0.03))
    out["seg"] = lesions.seg
    out.update(gm=gm, wm=wm, csf=fractions["csf"], head=head)
    return out


def make_cohort(
    root,
    cases: int = 24,
    shape=(32, 48, 40),
    seed: int = 0,
    splits=None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `cases` template-cohort cases as a BrainMetShare-layout folder; returns root.

    Case ids are cohort_000, cohort_001, ... numbered across splits (train first).
    `splits` is {split: count} or (train, val, test); default about 2/3, 1/6, 1/6
    (24 -> 16/4/4). Deterministic given `seed`; a case depends only on (seed, index).
    """
    shape = synth.check_shape(shape)

    def make(index: int) -> dict[str, np.ndarray]:
        case = cohort_case(index, shape, seed)
        return {m: case[m] for m in (*synth.IMAGE_MODALITIES, "seg")}

    params = dict(generator="cohort", shape=list(shape), seed=seed, template="MNI ICBM152 2009 sym (nilearn)")
    return synth.write_dataset(root, "cohort", cases, splits, make, cohort_affine(shape), params, progress)
