"""NIfTI input and output in voxgen's conventions.

A volume in memory is a float32 array of shape (D, H, W) in RAS orientation:
D is the axial axis (z, inferior -> superior), H is y (posterior -> anterior) and
W is x (left -> right). The affine that travels with it is nibabel's 4x4 affine of
the *canonical* image, i.e. it maps (x, y, z) = (w, h, d) voxel indices to RAS mm.
Keeping nibabel's index order in the affine means the affine can be handed to any
NIfTI tool unchanged; only the array is transposed.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from voxgen.errors import DataError

# Everything nibabel, gzip and zlib raise for unreadable files. A truncated .gz is
# only noticed when the voxels are read (EOFError or OSError), not when the header is.
_READ_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    ValueError,
    gzip.BadGzipFile,
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
)


def _one_line(exc: BaseException, path: Path) -> str:
    """The exception as a short single line, without repeating the full path."""
    text = " ".join(str(exc).split()).replace(str(path), path.name) or type(exc).__name__
    if isinstance(exc, EOFError):
        text = f"truncated file: {text}"
    return text[:200]


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI file as a RAS volume.

    Returns:
        volume: float32 array (D, H, W) = the canonical (x, y, z) array transposed
            to (z, y, x).
        affine: float64 (4, 4) canonical affine for (x, y, z) voxel indices.

    A 4-D file with a trailing singleton dimension is accepted. Every failure
    (missing, not gzip, corrupt, truncated, wrong dimensionality, NaN/Inf voxels,
    non-invertible affine) raises DataError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        ndim = len(shape)
        if ndim == 4 and shape[3] == 1:
            ndim = 3
        if ndim != 3:
            raise DataError(f"{path}: has {len(shape)} dimensions (shape {list(shape)}), expected 3")
        affine = np.asarray(img.affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise DataError(f"{path}: affine is not invertible")
        canonical = nib.as_closest_canonical(img)
        data = np.asarray(canonical.dataobj, dtype=np.float32)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read NIfTI ({_one_line(exc, path)})") from exc
    if data.ndim == 4:
        data = data[..., 0]
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise DataError(f"{path}: has {bad} NaN or Inf voxels")
    volume = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (D, H, W)
    return volume, np.asarray(canonical.affine, dtype=np.float64)


def save_volume(path: str | Path, volume: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    """Write a (D, H, W) volume as NIfTI, the inverse of `load_volume`.

    `dtype` is np.float32 for images or np.uint8 for masks (values rounded).
    The file is written to a temporary name in the same folder and renamed, so it
    appears whole or not at all. The affine is stored in the header's sform and
    qform (float32 in the NIfTI format, so affines with float32-exact entries
    round-trip exactly).
    """
    path = Path(path)
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DataError(f"{path}: volume to write has shape {list(volume.shape)}, expected (D, H, W)")
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        data = np.clip(np.rint(volume), 0, 255).astype(np.uint8)
    elif dtype == np.float32:
        data = volume.astype(np.float32)
    else:
        raise ValueError(f"save_volume: dtype must be float32 or uint8, got {dtype}")
    data = np.ascontiguousarray(data.transpose(2, 1, 0))  # (D, H, W) -> (x, y, z)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    # Code 1 (scanner) in both forms: ITK-based tools read the qform, nibabel the sform.
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)

    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii" if path.name.endswith(".nii") else None
    if suffix is None:
        raise DataError(f"{path}: NIfTI file name must end in .nii.gz or .nii")
    path.parent.mkdir(parents=True, exist_ok=True)
    # nibabel picks compression from the extension, so the temp name keeps the suffix.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resized_affine(affine: np.ndarray, old_shape_dhw, new_shape_dhw) -> np.ndarray:
    """Affine of the same field of view resampled from `old_shape_dhw` to `new_shape_dhw`.

    Voxel sizes scale by old/new per axis and the centre of the field of view stays
    put. This matches torch's `interpolate(..., align_corners=False)`: new voxel j
    lies at old continuous index (j + 0.5) * old / new - 0.5.
    """
    affine = np.asarray(affine, dtype=np.float64)
    # The affine indexes (x, y, z) = (W, H, D): reverse the (D, H, W) sizes.
    old_xyz = np.array(old_shape_dhw[::-1], dtype=np.float64)
    new_xyz = np.array(new_shape_dhw[::-1], dtype=np.float64)
    scale = old_xyz / new_xyz
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = 0.5 * scale - 0.5
    return affine @ index_map
