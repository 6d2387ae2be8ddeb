"""The pictures in docs/data.md: `python -m voxgen.data.figures [OUT_DIR]`.

Mosaics show mid-slices only, so the cases drawn are, among the first 40 cases of
seed 0, the four with the most lesion voxels on the axial mid-slice; the caption in
docs/data.md says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

from voxgen.data.cohort import cohort_case
from voxgen.data.dataset import scale_image
from voxgen.data.synth import IMAGE_MODALITIES
from voxgen.reports.mosaic import save_mosaic

SHAPE = (64, 96, 80)


def _cases_with_mid_lesion(count: int, seed: int = 0, pool: int = 40) -> list[tuple[int, dict]]:
    scored = []
    for index in range(pool):
        case = cohort_case(index, SHAPE, seed)
        scored.append((int(case["seg"][SHAPE[0] // 2].sum()), index, case))
    best = sorted(scored, key=lambda s: -s[0])[:count]
    return [(index, case) for _, index, case in sorted(best, key=lambda s: s[1])]


def make_figures(out_dir: str | Path = "docs/img") -> list[Path]:
    """Write data_cohort.png (4 cases, bravo + seg) and data_modalities.png (one case)."""
    out_dir = Path(out_dir)
    cases = _cases_with_mid_lesion(4)
    cohort_png = save_mosaic(
        out_dir / "data_cohort.png",
        [scale_image(case["bravo"]) for _, case in cases],
        titles=[f"cohort_{i:03d} bravo" for i, _ in cases],
        overlays=[case["seg"] for _, case in cases],
    )
    # The case with the largest lesion on the mid-slice; no contour, so the rim shows.
    index, case = max(cases, key=lambda c: int(c[1]["seg"][SHAPE[0] // 2].sum()))
    modalities_png = save_mosaic(
        out_dir / "data_modalities.png",
        [scale_image(case[m]) for m in IMAGE_MODALITIES] + [case["seg"] * 2.0 - 1.0],
        titles=[f"cohort_{index:03d} {m}" for m in (*IMAGE_MODALITIES, "seg")],
    )
    return [cohort_png, modalities_png]


if __name__ == "__main__":
    for path in make_figures(*sys.argv[1:2]):
        print(path)
