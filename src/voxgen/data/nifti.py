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
import io
import math
import os
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from voxgen.errors import DataError
from voxgen.files import atomic_path

GZIP_MAGIC = b"\x1f\x8b"
# Enough bytes for a NIfTI-2 header (540) and its 4-byte extension flag.
HEADER_BYTES = 544
# Plausible voxel sizes of a scan, in mm. Outside them the affine (or the header it came
# from) is broken: a 1 m voxel is a header in metres or a scale typed wrongly, a 0.01 mm
# voxel one in micrometres; resampling would silently make a volume of noise or one voxel.
MIN_VOXEL_MM = 0.05
MAX_VOXEL_MM = 20.0
# Deflate spends at least 2 bits (a length code and a distance code) on a run of at most 258
# bytes, so no deflate stream decompresses to more than 258 * 8 / 2 = 1032 times its size, and a
# gzip file's header and trailer decompress to nothing. An all-zero mask at gzip level 9 comes
# close (about 1025:1), so the bound must be this one and not a rule of thumb such as 1000:1.
MAX_DEFLATE_RATIO = 1032
# Decompressed bytes counted at a time when a gzip file's size must be measured.
COUNT_CHUNK = 1 << 20


def _one_line(exc: BaseException, path: Path) -> str:
    """The exception as a short single line, without repeating the full path."""
    text = " ".join(str(exc).split()).replace(str(path), path.name) or type(exc).__name__
    if isinstance(exc, EOFError):
        text = f"truncated file: {text}"
    elif isinstance(exc, (zlib.error, gzip.BadGzipFile)):
        text = f"corrupt gzip data: {text}"
    return text[:200]


def _describe(head: bytes) -> str:
    """What the first bytes of a file look like, for messages about files that are not NIfTI."""
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head[128:132] == b"DICM":
        return "a DICOM file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    if head.startswith(GZIP_MAGIC):
        return "gzip data"
    if _nifti_header_size(head):
        return "an uncompressed NIfTI image"
    sample = head[:40]
    try:
        text = sample.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if text.strip() and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"text starting {' '.join(text.split())[:30]!r}"
    return f"unknown content starting with bytes {sample[:8].hex(' ')}"


def _nifti_header_size(head: bytes) -> int:
    """348 (NIfTI-1 / Analyze) or 540 (NIfTI-2) when `head` starts like such a header, else 0."""
    if len(head) < 4:
        return 0
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
        if size in (348, 540):
            return size
    return 0


def _read_head(path: Path) -> bytes:
    """The first HEADER_BYTES of the (decompressed) file; DataError for what is not a NIfTI file.

    Done before nibabel so that a PNG renamed to .nii.gz, a text file or a gzip of something
    else is named as what it is, not as nibabel's guess about its extension.
    """
    with open(path, "rb") as raw:
        head = raw.read(HEADER_BYTES)
    if path.name.endswith(".gz"):
        if not head.startswith(GZIP_MAGIC):
            raise DataError(f"{path}: not gzip-compressed (it looks like {_describe(head)}); expected a .nii.gz NIfTI file")
        with gzip.open(path, "rb") as inner:
            head = inner.read(HEADER_BYTES)
    if not _nifti_header_size(head):
        raise DataError(f"{path}: not a NIfTI image (it holds {_describe(head)})")
    return head


def _header_problem(path: Path, head: bytes) -> str | None:
    """What is wrong with the header, found before nibabel reads any voxel, or None.

    A size the file cannot hold (nibabel allocates the claimed size before it finds out), and
    what nibabel silently repairs or guesses on load: a zero, negative or non-finite voxel size
    (it logs them and takes abs() or 1 instead), and a missing orientation.
    """
    header_size = _nifti_header_size(head)
    header_class = nib.Nifti2Header if header_size == 540 else nib.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(head), check=False)
    return _size_problem(path, header, header_size) or _pixdim_problem(header) or _orientation_problem(header)


def _claimed(header, header_size: int) -> tuple[str, int] | None:
    """The volume a single-file header describes ('1600 x 1600 x 1600 uint8') and the bytes the
    file needs for it; None where the header is too broken to say (nibabel then says why)."""
    ndim = int(header["dim"][0])
    offset = float(header["vox_offset"])
    single_file = bytes(header["magic"])[:3] in (b"n+1", b"n+2")
    if not single_file or not 1 <= ndim <= 7 or not np.isfinite(offset):
        return None
    shape = [int(v) for v in header["dim"][1 : 1 + ndim]]
    try:
        dtype = header.get_data_dtype()
    except Exception:  # an unknown datatype code
        return None
    if min(shape) < 0:
        return None
    # The voxels start at vox_offset, which the standard puts after the header and its 4-byte
    # extension flag; a file with a smaller one would hand out its header as voxels.
    start = max(int(offset), header_size + 4)
    described = " x ".join(str(n) for n in shape) + f" {dtype.name}"
    return described, start + math.prod(shape) * dtype.itemsize


def _size_problem(path: Path, header, header_size: int) -> str | None:
    """Why the file cannot hold the volume its header claims, or None.

    nibabel allocates the claimed size before it reads, so a 60-byte file whose header claims
    1600^3 voxels would cost 4 GB before failing. Each refusal compares the claim with an upper
    bound on what the file holds, so no intact file is refused: a plain .nii holds its size; a
    .nii.gz at most MAX_DEFLATE_RATIO times its size, and, when its gzip trailer disagrees with
    the claim, exactly what it decompresses to (counted without keeping it).
    """
    claim = _claimed(header, header_size)
    if claim is None:
        return None
    described, needed = claim
    size = path.stat().st_size
    if not path.name.endswith(".gz"):
        holds = f"more than the file holds ({size} bytes)" if needed > size else None
    elif needed > MAX_DEFLATE_RATIO * size:
        bound = MAX_DEFLATE_RATIO * size
        holds = f"more than {size} bytes of gzip data can hold (at most {bound} bytes decompressed)"
    elif _trailer_allows(path, size, needed):
        holds = None
    else:
        count = _decompressed_size(path, needed)
        holds = f"more than the file holds ({count} bytes decompressed)" if count < needed else None
    if holds is None:
        return None
    return f"header claims a {described} volume ({needed} bytes), {holds}: the header is wrong or the file is truncated"


def _trailer_allows(path: Path, size: int, needed: int) -> bool:
    """Whether the gzip trailer leaves room for `needed` decompressed bytes.

    Its last 4 bytes (ISIZE) are the decompressed size modulo 2^32, but only of the last member of
    a multi-member file, and a file padded after its end has no trailer there: a disagreement is a
    reason to count the bytes, never to refuse the file.
    """
    with open(path, "rb") as raw:
        raw.seek(-4, os.SEEK_END)
        isize = int.from_bytes(raw.read(4), "little")
    bound = MAX_DEFLATE_RATIO * size
    if isize > bound:
        return False
    largest = isize + (bound - isize) // 2**32 * 2**32  # the largest size within the bound it allows
    return largest >= needed


def _decompressed_size(path: Path, limit: int) -> int:
    """Bytes a gzip file decompresses to, counted up to `limit` a chunk at a time.

    A truncated or corrupt stream raises as it would when nibabel reads it.
    """
    total = 0
    with gzip.open(path, "rb") as inner:
        while total < limit:
            chunk = inner.read(min(COUNT_CHUNK, limit - total))
            if not chunk:
                break
            total += len(chunk)
    return total


def _pixdim_problem(header) -> str | None:
    """A zero, negative or non-finite voxel size in the header's pixdim."""
    ndim = int(header["dim"][0])
    pixdim = [float(v) for v in header["pixdim"][1 : 1 + min(max(ndim, 0), 3)]]
    if any(not np.isfinite(v) or v <= 0 for v in pixdim):
        shown = " x ".join(f"{v:g}" for v in pixdim)
        return f"voxel size in the header (pixdim) is {shown} mm: every size must be a positive number"
    return None


def _orientation_problem(header) -> str | None:
    """Neither an sform nor a qform: nibabel would build an affine from pixdim alone, with x
    flipped on a guess (radiological order), so a left-right mirror would pass unnoticed."""
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        return (
            "both sform_code and qform_code are 0 (no orientation): the header does not say which way "
            "the voxel axes point, and a guessed orientation may swap left and right"
        )
    return None


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape without trailing singleton dimensions beyond the third ((x, y, z, 1) is 3-D)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI file as a RAS volume.

    Returns:
        volume: float32 array (D, H, W) = the canonical (x, y, z) array transposed
            to (z, y, x).
        affine: float64 (4, 4) canonical affine for (x, y, z) voxel indices.

    A file with trailing singleton dimensions ((x, y, z, 1)) is accepted. Every failure
    raises DataError naming the file: missing, a folder, empty, unreadable, not gzip
    (a PNG renamed, text), not NIfTI, corrupt or truncated, not 3-D (2-D, a 4-D series,
    an empty axis, a single slice), a header claiming more voxels than the file holds (refused
    before they are allocated), complex or RGB voxels, a non-positive voxel size in the header,
    no orientation (sform_code and qform_code both 0), a non-finite or non-invertible affine,
    NaN/Inf voxels.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a NIfTI file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: permission denied (the file is not readable by this user)")
    try:
        # nibabel logs header repairs and numpy warns about casts: both would print stray
        # lines around the one-line error, and both are reported below in voxgen's words.
        with warnings.catch_warnings(), nib.imageglobals.LoggingOutputSuppressor():
            warnings.simplefilter("ignore")
            head = _read_head(path)
            problem = _header_problem(path, head)
            if problem:
                raise DataError(f"{path}: {problem}")
            img = nib.load(str(path))
            on_disk = tuple(int(s) for s in img.shape)
            shape = _spatial_shape(on_disk)
            if len(shape) != 3:
                series = f": a series of {shape[3]} volumes" if len(shape) == 4 else ""
                raise DataError(f"{path}: has {len(shape)} dimensions (shape {list(on_disk)}){series}, expected 3")
            if min(shape) == 0:
                raise DataError(f"{path}: has an empty axis (shape {list(on_disk)}): no voxels to read")
            if min(shape) == 1:
                raise DataError(f"{path}: is a single slice (shape {list(on_disk)}), not a 3-D volume")
            dtype = img.get_data_dtype()
            if dtype.kind not in "biuf":
                raise DataError(f"{path}: voxel type {dtype.name or dtype} is not a real number (complex or RGB data)")
            affine = np.asarray(img.affine, dtype=np.float64)
            if not np.all(np.isfinite(affine)):
                raise DataError(f"{path}: affine (sform/qform) has non-finite entries")
            if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
                raise DataError(f"{path}: affine is not invertible (its voxel axes span no volume)")
            canonical = nib.as_closest_canonical(img)
            data = np.asarray(canonical.dataobj, dtype=np.float32).reshape(shape)
    except DataError:
        raise
    except PermissionError:
        raise DataError(f"{path}: permission denied (the file is not readable by this user)") from None
    # nibabel, gzip and zlib raise a wide range of types for malformed files (OSError, EOFError,
    # zlib.error, ValueError, TypeError, struct.error, HeaderDataError, ...); whatever escapes
    # while reading a user's file is a fault of that file, not a voxgen bug.
    except Exception as exc:
        raise DataError(f"{path}: cannot read NIfTI ({_one_line(exc, path)})") from exc
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise DataError(f"{path}: has {bad} NaN or Inf voxels")
    volume = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (D, H, W)
    return volume, np.asarray(canonical.affine, dtype=np.float64)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """(3,) voxel sizes in mm along the (x, y, z) voxel axes of a (4, 4) affine."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def voxel_size_problem(affine: np.ndarray) -> str | None:
    """Why the affine's voxel sizes are not those of a scan (outside MIN_VOXEL_MM..MAX_VOXEL_MM), or None.

    Not part of `load_volume`: volumes voxgen writes itself at a small `data.shape` may have
    coarse voxels and must still read back.
    """
    sizes = voxel_sizes(affine)
    if sizes.min() >= MIN_VOXEL_MM and sizes.max() <= MAX_VOXEL_MM:
        return None
    shown = " x ".join(f"{s:.3g}" for s in sizes)
    return f"voxel size {shown} mm (x, y, z) is implausible: expected {MIN_VOXEL_MM} to {MAX_VOXEL_MM:g} mm per axis"


def save_volume(path: str | Path, volume: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    """Write a (D, H, W) volume as NIfTI, the inverse of `load_volume`.

    `dtype` is np.float32 for images, np.uint8 for masks or np.int16 for CT in Hounsfield units
    (both rounded and clipped to the type's range).
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
    elif dtype == np.int16:
        data = np.clip(np.rint(volume), -32768, 32767).astype(np.int16)
    elif dtype == np.float32:
        data = volume.astype(np.float32)
    else:
        raise ValueError(f"save_volume: dtype must be float32, uint8 or int16, got {dtype}")
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
    # nibabel picks compression from the extension, so the temp name keeps the suffix.
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
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
