"""A few rows of the seeds' A100 tables, planned in CI: a guard on the planner's accuracy.

`benchmarks/plan_vs_reference.py` checks every row; these are the rows where the peak sits in
different places (backward of a deep DiT, the forward output layer, the optimiser step, a UNet's
cuDNN workspace), so a regression in any part of the model shows here. Rows are read and planned
by the benchmark's own functions, so the two cannot drift apart.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
# The seeds' measured tables, in shared/ beside the repository.
REFERENCE = REPO.parent / "shared" / "reference"
DIT_ROWS = [
    ("L", "pixel", "80,64,64", "2"),
    ("XL", "pixel", "40,64,64", "2"),
    ("S", "pixel", "160,256,256", "4"),
    ("B", "pixel", "160,256,256", "8"),
    ("XL", "latent", "20,16,16", "4"),
]


def _benchmark():
    spec = importlib.util.spec_from_file_location("plan_vs_reference", REPO / "benchmarks" / "plan_vs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(reader, name):
    table = REFERENCE / name
    if not table.is_file():
        pytest.skip(f"reference table {table} is absent (the shared folder sits next to the repository)")
    return list(reader(table))


@pytest.mark.parametrize("variant,space,shape,patch", DIT_ROWS)
def test_dit_rows_within_5_percent(variant, space, shape, patch):
    bench = _benchmark()
    key = (variant, space, *shape.split(","), patch)
    name, row, overrides = next(
        r
        for r in _rows(bench.dit_rows, "dit3d_a100.csv")
        if (r[1]["variant"], r[1]["space"], r[1]["D"], r[1]["H"], r[1]["W"], r[1]["patch"]) == key
    )
    result = bench.evaluate(name, row, overrides)
    assert abs(result["error"]) <= 0.05, result


def test_unet_4l_small_within_5_percent():
    bench = _benchmark()
    name, row, overrides = next(
        r for r in _rows(bench.unet_rows, "unet3d_latent_a100.csv") if (r[1]["config"], r[1]["latent"]) == ("4L_small", "4x")
    )
    result = bench.evaluate(name, row, overrides)
    assert abs(result["error"]) <= 0.05, result
