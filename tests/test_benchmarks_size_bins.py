"""benchmarks/size_bins.py's sphere data set: its tumours are the balls it places, in the bins it
draws them from, so the requests the benchmark reads off the masks are what was drawn."""

from __future__ import annotations

import numpy as np

from benchmark_module import load_benchmark
from voxgen.data.tumour_bins import size_bin_vector


def test_every_placed_ball_is_one_tumour_of_6_mm_or_more():
    size_bins = load_benchmark("size_bins")
    spacing = (size_bins.SPHERES_SPACING_MM,) * 3
    counts = np.zeros(7, int)
    for index in range(60):
        placed = size_bins.place_spheres(index)
        vector = size_bin_vector(size_bins.sphere_case(index)["seg"], spacing)
        assert vector.sum() == len(placed), index  # balls never touch, none is lost
        counts += vector
    assert counts[:2].sum() == 0  # nothing under 6 mm
    assert (counts[2:6] >= 5).all(), counts  # each drawn bin (6-10 ... 20-30 mm) is well represented
    assert counts.sum() > 60  # 0-3 balls a case, 1.5 on average
