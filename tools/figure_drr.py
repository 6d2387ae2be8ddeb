"""Make docs/img/drr_head_ct.png: the AP and lateral DRRs of voxgen's embedded head CT at 256 x 256.

    python tools/figure_drr.py [OUT.png]

The head CT (128 x 128 x 108 at 1.914 x 1.914 x 1.5 mm) is resampled to a 128^3 cube (1.914 mm
voxels, the scan's in-plane size) and rendered with the default geometry (source 1000 mm from the
isocentre, detector 1500 mm from the source, pixel spacing fitted to the cube) and vertical_flip,
so row 0 is the top of the head and the images are upright as drawn. Deterministic.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from voxgen.data import drr  # noqa: E402
from voxgen.data.ct import HEAD_CT  # noqa: E402
from voxgen.data.nifti import load_volume  # noqa: E402
from voxgen.data.xray import resample_cube  # noqa: E402
from voxgen.reports import save_png  # noqa: E402

OUT = ROOT / "docs" / "img" / "drr_head_ct.png"
CT_SIZE = 128
DRR_SIZE = 256


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(argv[0]) if argv else OUT
    hu, affine = load_volume(HEAD_CT)
    cube, grid = resample_cube(hu, affine, CT_SIZE)
    geometry = drr.fitted(cube.shape, grid, drr.Geometry(rows=DRR_SIZE, cols=DRR_SIZE, vertical_flip=True))
    start = time.perf_counter()
    views = drr.render(cube, grid, geometry)
    seconds = time.perf_counter() - start

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 5.0), constrained_layout=True)
    top = float(views.max())
    titles = ("AP (beam anterior -> posterior)", "lateral (beam right -> left)")
    sides = (("patient's left", "right"), ("posterior", "anterior"))
    for ax, image, title, (left, right) in zip(axes, views, titles, sides):
        shown = ax.imshow(image, cmap="gray", vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel(f"column: {left} -> {right}")
        ax.set_ylabel("row: superior -> inferior")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes, shrink=0.8, label="line integral of mu (dimensionless)")
    fig.suptitle(
        f"Embedded head CT ({CT_SIZE}^3 cube), DRRs {DRR_SIZE} x {DRR_SIZE}, pixel {geometry.spacing:.3f} mm, "
        f"sid {geometry.sid:g} mm, sdd {geometry.sdd:g} mm"
    )
    save_png(fig, out, dpi=100)
    print(f"{out}: rendered in {seconds:.2f} s; line integrals 0 to {top:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
