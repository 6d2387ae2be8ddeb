"""A few rows of the seeds' A100 tables, planned in CI: a guard on the planner's accuracy.

`benchmarks/plan_vs_reference.py` checks every row; these are the rows where the peak sits in
different places (backward of a deep DiT, the forward output layer, the optimiser step, a UNet's
cuDNN workspace), so a regression in any part of the model shows here.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from voxgen.config import compose
from voxgen.memory.planner import GiB, plan

# The seeds' measured tables, in shared/ beside the repository.
REFERENCE = Path(__file__).parents[3] / "shared" / "reference"

SEED_SETTINGS = ["training.batch_size=1", "training.precision=bf16-mixed", "training.grad_checkpointing=false"]
DIT_ROWS = [("L", "pixel", "80,64,64", "2"), ("XL", "pixel", "40,64,64", "2"), ("S", "pixel", "160,256,256", "4"),
            ("B", "pixel", "160,256,256", "8"), ("XL", "latent", "20,16,16", "4")]


def _rows(name):
    table = REFERENCE / name
    if not table.is_file():
        pytest.skip(f"reference table {table} is absent (the shared folder sits next to the repository)")
    return list(csv.DictReader(table.open()))


@pytest.mark.parametrize("variant,space,shape,patch", DIT_ROWS)
def test_dit_rows_within_5_percent(variant, space, shape, patch):
    d, h, w = shape.split(",")
    row = next(r for r in _rows("dit3d_a100.csv") if (r["variant"], r["space"], r["D"], r["H"], r["W"], r["patch"])
               == (variant, space, d, h, w, patch))
    cfg = compose([], ["mode=seg", "model.name=dit", f"model.variant={variant}", f"model.patch_size={patch}",
                       "model.attention=sdpa", "model.in_channels=1", "model.out_channels=1",
                       f"data.shape=[{shape}]", *SEED_SETTINGS])
    predicted = plan(cfg).peak_bytes_first_step / GiB
    assert predicted == pytest.approx(float(row["peak_gb"]), rel=0.05), (predicted, row)


def test_unet_4l_small_within_5_percent():
    row = next(r for r in _rows("unet3d_latent_a100.csv") if r["config"] == "4L_small" and r["latent"] == "4x")
    channels, levels = row["channels"].split(), row["attention_levels"].split()
    cfg = compose([], ["mode=bravo", "model.name=unet", "model.attention=naive", "model.norm_num_groups=32",
                       f"model.channels=[{','.join(channels)}]", f"model.attention_levels=[{','.join(levels)}]",
                       f"model.num_res_blocks={row['num_res_blocks']}", f"model.num_head_channels={row['num_head_channels']}",
                       f"model.in_channels={row['in_channels']}", f"model.out_channels={row['out_channels']}",
                       f"data.shape=[{row['D']},{row['H']},{row['W']}]", *SEED_SETTINGS])
    predicted = plan(cfg).peak_bytes_first_step / GiB
    assert predicted == pytest.approx(float(row["peak_gb"]), rel=0.05), (predicted, row)
