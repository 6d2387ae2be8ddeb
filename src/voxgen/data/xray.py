"""X-ray / CT pairs for the X-ray-to-CT task: a CT resampled to an isotropic cube and its two DRRs.

`make_drr_dataset` (`voxgen data drr`) turns a folder of CT cases into pairs; `make_xray_pairs`
(`voxgen data xray-pairs`) makes the embedded demo set from the one real head CT voxgen ships
(`voxgen.data.ct.HEAD_CT`). Every demo case is the SAME head in a different rigid pose (rotations
up to MAX_ANGLE_DEG about each axis, shifts up to MAX_SHIFT_MM): its val and test cases hold out
poses, not patients, so their scores say nothing about other heads.

Each case folder holds
- `ct.nii.gz`: the CT on an axis-aligned isotropic cube of N^3 voxels, float32 HU (see `cube_affine`);
- `xray.nii.gz`: its DRRs (`voxgen.data.drr.render`) as one 3-D NIfTI of shape (2, rows, cols) =
  (view: ap then lateral, detector row, detector column), float32 line integrals of mu (see `xray_affine`).
The data folder also holds `drr.json`: the geometry of every case, the HU-to-attenuation conversion
and the layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from voxgen.data import drr
from voxgen.data.ct import HEAD_CT, SOURCE_NOTE
from voxgen.data.layout import SPLITS, case_folders, root_problem, split_counts
from voxgen.data.nifti import load_volume, save_volume, voxel_sizes
from voxgen.data.synth import MARKER, replacing_folder
from voxgen.errors import ConfigError, DataError

# Scanners write -1024 HU for air and for what lies outside their field of view; the embedded head
# uses it too, so the cube's padding matches the scan's own background.
AIR_HU = -1024.0
MODALITIES = ("ct", "xray")
META = "drr.json"
DEFAULT_CT_SIZE = 64
PAIRS_CT_SIZE = 32
PAIRS_DRR_SIZE = 64
PAIRS_CASES = 24  # 16 / 4 / 4
MAX_ANGLE_DEG = 15.0
MAX_SHIFT_MM = 10.0
ONE_HEAD = (
    f"every case is the same real head CT in a different rigid pose (rotations up to {MAX_ANGLE_DEG:g} degrees about "
    f"each axis, shifts up to {MAX_SHIFT_MM:g} mm): held-out cases are held-out poses, not patients"
)
# Output voxels per resampling call (a 256^3 cube goes in 16 slabs; ~200 MB of sample coordinates each).
RESAMPLE_CHUNK = 1 << 22


def check_size(name: str, value: int, least: int = 2) -> int:
    if int(value) != value or value < least:
        raise ConfigError(f"{name}: must be a whole number >= {least}, got {value}")
    return int(value)


def cube_affine(shape_dhw: Sequence[int], affine: np.ndarray, size: int) -> np.ndarray:
    """The RAS affine of the N^3 cube that holds a volume's field of view.

    The cube is axis-aligned in world (RAS) coordinates with isotropic voxels of L / N mm, where L
    is the longest side of the world bounding box of the volume's voxels (faces, not centres); its
    centre is that box's centre (for an axis-aligned volume, the centre of its field of view). So
    the field of view fills the cube along its longest axis and is padded with air along the others.
    """
    size = check_size("ct-size", size)
    n = np.array(shape_dhw[::-1], dtype=np.float64)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64) * n - 0.5
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    low, high = world.min(axis=0), world.max(axis=0)
    voxel = float((high - low).max()) / size
    out = np.eye(4)
    out[:3, :3] *= voxel
    out[:3, 3] = (low + high) / 2.0 - voxel * (size - 1) / 2.0
    return out


def rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """3 x 3 rotation: about x (left-right) by angles[0], then y by angles[1], then z by angles[2] (degrees, right-handed)."""
    ax, ay, az = np.radians(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def resample_cube(
    hu: np.ndarray,
    affine: np.ndarray,
    size: int,
    angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
    shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """The CT (D, H, W) HU on its `cube_affine` grid, optionally moved rigidly: (cube float32 HU, cube affine).

    The pose rotates the anatomy by `rotation(angles_deg)` about the cube's centre, then shifts it by
    `shift_mm` (world mm). Trilinear interpolation; where the cube's voxels are larger than the CT's,
    a Gaussian of sigma (ratio - 1) / 2 source voxels per axis first takes out what the cube cannot
    hold (as scikit-image's anti-aliasing does), so thin bone does not alias. Outside the CT's field
    of view is AIR_HU.
    """
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    affine = np.asarray(affine, dtype=np.float64)
    grid_affine = cube_affine(hu.shape, affine, size)
    voxel = grid_affine[0, 0]
    ratio = voxel / voxel_sizes(affine)  # (x, y, z)
    sigma = np.maximum(0.0, (ratio - 1.0) / 2.0)[::-1]  # (D, H, W)
    # Work on HU above air so that the zero padding of the filter and of grid_sample is air.
    above_air = np.asarray(hu, dtype=np.float32) - np.float32(AIR_HU)
    if sigma.max() > 0:
        above_air = ndimage.gaussian_filter(above_air, sigma, mode="constant", cval=0.0)

    centre = grid_affine[:3] @ np.append(np.full(3, (size - 1) / 2.0), 1.0)
    turn = rotation(angles_deg)
    # Cube voxel index -> world p -> the anatomy's original place R^T (p - c - t) + c -> CT voxel index.
    to_world = grid_affine.copy()
    to_head = np.eye(4)
    to_head[:3, :3] = turn.T
    to_head[:3, 3] = centre - turn.T @ (centre + np.asarray(shift_mm, dtype=np.float64))
    index_map = np.linalg.inv(affine) @ to_head @ to_world  # (x, y, z) cube index -> (x, y, z) CT index
    n = np.array(hu.shape[::-1], dtype=np.float64)
    scale = 2.0 / np.maximum(n - 1.0, 1.0)
    normalised = np.diag(np.append(scale, 1.0)) @ index_map
    normalised[:3, 3] -= 1.0  # grid_sample's align_corners=True: index i -> 2 i / (n - 1) - 1
    matrix = torch.as_tensor(normalised[:3], dtype=torch.float64)

    volume = torch.from_numpy(np.ascontiguousarray(above_air))[None, None]
    out = np.empty((size, size, size), dtype=np.float32)
    axis = torch.arange(size, dtype=torch.float64)
    slab = max(1, RESAMPLE_CHUNK // (size * size))
    for z0 in range(0, size, slab):
        z = axis[z0 : z0 + slab]
        zz, yy, xx = torch.meshgrid(z, axis, axis, indexing="ij")
        index = torch.stack([xx, yy, zz, torch.ones_like(xx)], dim=-1)  # (d, H, W, 4) cube (x, y, z, 1)
        grid = (index @ matrix.T).to(torch.float32)[None]  # (1, d, H, W, 3) normalised CT (x, y, z)
        with torch.no_grad():
            sampled = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out[z0 : z0 + slab] = sampled[0, 0].numpy()
    return out + np.float32(AIR_HU), grid_affine


def xray_affine(geometry: drr.Geometry) -> np.ndarray:
    """The affine written with xray.nii.gz: diag(spacing, spacing, 1) over NIfTI's (x, y, z) = (column, row, view).

    Columns and rows are `spacing` mm apart on the detector and the origin puts the detector's
    centre (where the central ray lands) at (0, 0); the two views are 1 unit apart. The affine is
    not a place in the patient: it only carries the pixel spacing. It stays positive with
    `vertical_flip` (a reader that reorients to RAS would otherwise undo the flip); drr.json says
    which end row 0 is.
    """
    out = np.diag([geometry.spacing, geometry.spacing, 1.0, 1.0])
    out[0, 3] = -geometry.spacing * (geometry.cols - 1) / 2.0
    out[1, 3] = -geometry.spacing * (geometry.rows - 1) / 2.0
    return out


def _pair(hu: np.ndarray, affine: np.ndarray, ct_size: int, geometry: drr.Geometry, pose=None) -> tuple[dict, dict]:
    """One case: {modality: (volume, affine)} and its geometry record."""
    angles, shift = pose if pose is not None else ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    cube, grid = resample_cube(hu, affine, ct_size, angles, shift)
    fitted = drr.fitted(cube.shape, grid, geometry)
    views = drr.render(cube, grid, fitted)
    record = dict(spacing=fitted.spacing, cube_voxel_mm=float(grid[0, 0]), isocentre_mm=drr.isocentre(cube.shape, grid).tolist())
    if pose is not None:
        record.update(angles_deg=[float(a) for a in angles], shift_mm=[float(s) for s in shift])
    return {"ct": (cube, grid), "xray": (views, xray_affine(fitted))}, record


def _layout_note(geometry: drr.Geometry) -> dict:
    row0 = "superior" if geometry.vertical_flip else "inferior"
    return dict(
        ct="ct.nii.gz: (D, H, W) float32 HU on an axis-aligned isotropic cube (RAS affine), outside the scan -1024 HU",
        xray="xray.nii.gz: (view, row, column) float32 line integrals; views "
        + ", ".join(drr.VIEWS)
        + "; affine diag(spacing, spacing, 1) over (column, row, view)",
        row_0=row0,
        frames={view: dict(zip(("beam", "columns", "rows"), (axis.tolist() for axis in drr.frame(view)))) for view in drr.VIEWS},
    )


def _meta(geometry: drr.Geometry, ct_size: int, cases: dict, **extra) -> dict:
    geometry_record = geometry.as_dict()
    geometry_record["spacing"] = "fitted per case (see cases)" if geometry.spacing is None else geometry.spacing
    return dict(
        **extra,
        views=list(drr.VIEWS),
        ct_size=ct_size,
        geometry=geometry_record,
        hu_to_mu=drr.hu_conversion(),
        layout=_layout_note(geometry),
        cases=cases,
    )


def _write_folder(
    root: str | Path,
    cases: Sequence[tuple[str, str]],
    make: Callable[[int], tuple[dict, dict]],
    meta: Callable[[dict], dict],
    marker: dict,
    progress: Callable[[int, int], None] | None,
) -> Path:
    """Write ROOT/<split>/<name>/{ct,xray}.nii.gz for `cases` [(split, name)], drr.json and voxgen's marker.

    As `synth.write_dataset`: built in a hidden sibling folder and renamed into place, so ROOT
    appears whole or not at all; an existing ROOT is replaced only when it is empty or voxgen made it.
    """
    root = Path(root)
    records = {}
    with replacing_folder(root) as tmp:
        for index, (split, name) in enumerate(cases):
            volumes, record = make(index)
            for modality, (volume, affine) in volumes.items():
                save_volume(tmp / split / name / f"{modality}.nii.gz", volume, affine)
            records[f"{split}/{name}"] = record
            if progress is not None:
                progress(index + 1, len(cases))
        (tmp / META).write_text(json.dumps(meta(records), indent=2) + "\n")
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return root


def ct_cases(ct_root: str | Path, modality: str = "ct") -> list[tuple[str, str, Path]]:
    """(split, case, file) of every case of the splits present; DataError for a missing file or no cases."""
    ct_root = Path(ct_root)
    problem = root_problem(ct_root)
    if problem:
        raise DataError(problem)
    found = []
    for split in SPLITS:
        if not (ct_root / split).exists():
            continue
        for case in case_folders(ct_root, split):
            path = case.path(modality)
            if not path.is_file():
                raise DataError(f"{path}: missing modality '{modality}' of case '{case.id}'")
            found.append((split, case.id, path))
    if not found:
        raise DataError(f"{ct_root}: no split folders (expected {ct_root}/{{{','.join(SPLITS)}}}/<case>/{modality}.nii.gz)")
    return found


def _nested(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def make_drr_dataset(
    ct_root: str | Path,
    out: str | Path,
    ct_size: int = DEFAULT_CT_SIZE,
    geometry: drr.Geometry = drr.Geometry(),
    modality: str = "ct",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """X-ray / CT pairs of every CT case of `ct_root` (ROOT/{train,val,test}/<case>/<modality>.nii.gz) in `out`.

    Each CT becomes an N^3 cube (`resample_cube`) and its two DRRs; `out` mirrors the splits and
    case names of `ct_root`. With `geometry.spacing` None each case's detector is fitted to its
    cube (`drr.fitted`), so every DRR frames its cube the same way. Returns `out`.
    """
    ct_root, out = Path(ct_root), Path(out)
    ct_size = check_size("ct-size", ct_size)
    geometry = geometry.checked()
    if _nested(ct_root, out):
        raise ConfigError(f"out: {out} and the CT folder {ct_root} overlap; write the pairs to a folder of their own")
    found = ct_cases(ct_root, modality)

    def make(index: int) -> tuple[dict, dict]:
        hu, affine = load_volume(found[index][2])
        return _pair(hu, affine, ct_size, geometry)

    def meta(records: dict) -> dict:
        return _meta(geometry, ct_size, records, generator="drr", source=str(ct_root), modality=modality)

    marker = dict(generator="drr", source=str(ct_root), ct_size=ct_size, geometry=geometry.as_dict(), cases=len(found))
    return _write_folder(out, [(split, name) for split, name, _ in found], make, meta, marker, progress)


def pose(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The rigid pose of demo case `index`: (angles in degrees about x, y, z; shift in mm), from (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    return rng.uniform(-MAX_ANGLE_DEG, MAX_ANGLE_DEG, 3), rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3)


def make_xray_pairs(
    root: str | Path,
    cases: int = PAIRS_CASES,
    ct_size: int = PAIRS_CT_SIZE,
    drr_size: int = PAIRS_DRR_SIZE,
    seed: int = 0,
    splits=None,
    *,
    geometry: drr.Geometry | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The embedded X-ray / CT demo set: `cases` poses of the embedded head CT; returns root.

    ROOT/{train,val,test}/pose_<index>/{ct,xray}.nii.gz, numbered across splits (train first);
    `splits` is {split: count} or (train, val, test), default about 2/3, 1/6, 1/6 (24 -> 16/4/4).
    Case i is the head moved by `pose(seed, i)`, on a `ct_size`^3 cube covering the scan's field of
    view (245 mm: 7.7 mm voxels at 32, 3.8 mm at 64), with drr_size x drr_size DRRs of `geometry`
    (default `drr.Geometry()`; its rows and cols become drr_size). ALL CASES ARE ONE HEAD (see the
    module docstring). Deterministic given `seed`.
    """
    ct_size = check_size("ct-size", ct_size)
    drr_size = check_size("drr-size", drr_size, least=1)
    counts = split_counts(cases, splits)
    geometry = (geometry or drr.Geometry()).checked()
    geometry = replace(geometry, rows=drr_size, cols=drr_size)
    hu, affine = load_volume(HEAD_CT)
    splits_in_order = [split for split in SPLITS for _ in range(counts[split])]
    names = [(split, f"pose_{index:03d}") for index, split in enumerate(splits_in_order)]

    def make(index: int) -> tuple[dict, dict]:
        return _pair(hu, affine, ct_size, geometry, pose(seed, index))

    def meta(records: dict) -> dict:
        return _meta(geometry, ct_size, records, generator="xray-pairs", head=SOURCE_NOTE, seed=seed, note=ONE_HEAD)

    marker = dict(generator="xray-pairs", head=SOURCE_NOTE, seed=seed, ct_size=ct_size, drr_size=drr_size, cases=cases)
    marker["splits"] = counts
    return _write_folder(root, names, make, meta, marker, progress)
