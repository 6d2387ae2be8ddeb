"""Make voxgen's embedded head CT (src/voxgen/data/embedded/head_ct.nii.gz) from InVesalius's example.

    python tools/embed_head_ct.py /usr/share/doc/invesalius-examples/examples/Cranium.inv3

Debian's `invesalius-examples` package (3.1.99998-4) ships Cranium.inv3, an InVesalius 3 project:
a gzipped tar of `main.plist` (an Apple plist: shape, spacing, modality) and `matrix.dat` (raw
int16 Hounsfield units, C order). The tool unpacks it into a temporary folder, turns the matrix
to RAS, averages 2 x 2 in-plane blocks (256 x 256 at 0.957 mm -> 128 x 128 at 1.914 mm; the
108 axial slices stay at 1.5 mm) and writes int16 HU with a RAS affine whose origin puts the
centre of the field of view at (0, 0, 0) mm (InVesalius keeps no scanner coordinates).

Orientation: the matrix is [slice, row, column]. Slices run inferior -> superior (mandible in the
first slices, vertex in the last), rows posterior -> anterior (the head holder's arc is at row 0,
the face and frontal sinuses at high rows). Columns run right -> left: anatomy cannot tell left
from right in a head, but InVesalius's DICOM import (imagedata_utils.dcm2memmap) keeps the DICOM
columns, which point to the patient's left, and flips only the rows; the observed slice and row
directions agree with that (DICOM's right-handed L, P, S with its rows flipped). So columns are
flipped here to run left -> right.
"""

from __future__ import annotations

import argparse
import plistlib
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from voxgen.data.nifti import save_volume  # noqa: E402
from voxgen.errors import DataError  # noqa: E402

OUT = ROOT / "src" / "voxgen" / "data" / "embedded" / "head_ct.nii.gz"
FACTOR = 2  # in-plane block size


def read_inv3(path: Path) -> tuple[np.ndarray, dict]:
    """The project's matrix [slice, row, column] int16 and its main.plist."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with tarfile.open(path, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"{path}: not an InVesalius .inv3 project ({exc})") from None
        found = sorted(Path(tmp).rglob("main.plist"))
        if not found:
            raise DataError(f"{path}: holds no main.plist")
        folder = found[0].parent
        with open(folder / "main.plist", "rb") as f:
            meta = plistlib.load(f)
        matrix = meta["matrix"]
        shape = tuple(int(n) for n in matrix["shape"])
        data = np.fromfile(folder / matrix["filename"], dtype=np.dtype(matrix["dtype"]).newbyteorder("<"))
    if data.size != np.prod(shape):
        raise DataError(f"{path}: {matrix['filename']} holds {data.size} values, main.plist says shape {list(shape)}")
    if meta.get("modality") != "CT":
        raise DataError(f"{path}: modality is {meta.get('modality')!r}, expected 'CT'")
    return data.reshape(shape).astype(np.int16), meta


def to_ras(matrix: np.ndarray, spacing_xyz) -> tuple[np.ndarray, np.ndarray]:
    """[slice I->S, row P->A, column R->L] -> (D, H, W) RAS volume, block-averaged in-plane, and its affine."""
    volume = matrix[:, :, ::-1].astype(np.float64)  # columns left -> right
    d, h, w = volume.shape
    h2, w2 = h // FACTOR, w // FACTOR
    volume = volume[:, : h2 * FACTOR, : w2 * FACTOR].reshape(d, h2, FACTOR, w2, FACTOR).mean(axis=(2, 4))
    spacing = np.array([spacing_xyz[0] * FACTOR, spacing_xyz[1] * FACTOR, spacing_xyz[2]], dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = -spacing * (np.array([w2, h2, d]) - 1) / 2.0  # centre of the field of view at 0
    return volume, affine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inv3", type=Path, help="Cranium.inv3 of the invesalius-examples package")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    try:
        matrix, meta = read_inv3(args.inv3)
        volume, affine = to_ras(matrix, meta["spacing"])
        save_volume(args.out, volume, affine, dtype=np.int16)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spacing = " x ".join(f"{s:.3f}" for s in np.diag(affine)[:3])
    size = args.out.stat().st_size
    print(f"{meta.get('name')}: {list(volume.shape)} (D, H, W) at {spacing} mm (x, y, z) -> {args.out} ({size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
