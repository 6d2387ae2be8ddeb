"""benchmarks/size_bins.py's sphere data set: its tumours are the balls it places, in the bins it
draws them from, so the requests the benchmark reads off the masks are what was drawn."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from benchmark_module import load_benchmark
from voxgen.data.tumour_bins import size_bin_vector
from voxgen.training.runs import load_run


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


def steps(n: int) -> list[str]:
    """A run of n steps, validated and checkpointed at its end (as the benchmark's runs are)."""
    return [f"training.steps={n}", f"training.val_every={n}", f"training.checkpoint_every={n}"]


def test_a_run_continued_to_more_steps_resumes_a_copy_and_leaves_the_earlier_run_alone(tmp_path):
    size_bins = load_benchmark("size_bins")
    data = replace(size_bins.DATA_SETS["spheres"], splits=(8, 4, 4))
    root = tmp_path / "spheres"
    data.write(root, data)
    recipe = [
        "mode=seg_conditioned",
        f"data.root={root}",
        "data.shape=[16,16,16]",
        "model.channels=[8,8,8]",
        "model.norm_num_groups=4",
        "model.num_head_channels=8",
        "model.attention_levels=[false,false,false]",
        "model.num_res_blocks=1",
        "training.batch_size=2",
        "training.val_batches=1",
        "training.device=cpu",
        "run.report=false",
    ]
    earlier, later = tmp_path / "run_2", tmp_path / "run_4_from_2"
    with pytest.raises(SystemExit, match="no finished run to continue"):
        size_bins.train_run([*recipe, *steps(4)], later, earlier)
    size_bins.train_run([*recipe, *steps(2)], earlier)
    (earlier / "size_bins_eval.json").write_text("{}")  # scores of the earlier run stay with it
    before = sorted(p.name for p in (earlier / "checkpoints").iterdir())

    saved = size_bins.train_run([*recipe, *steps(4)], later, earlier)

    assert saved["continued_from"] == {"run": "run_2", "steps": 2}
    assert load_run(later)[2] == 4
    assert load_run(earlier)[2] == 2
    assert sorted(p.name for p in (earlier / "checkpoints").iterdir()) == before
    assert not (later / "size_bins_eval.json").exists()
    first = json.loads((earlier / "size_bins_benchmark.json").read_text())
    # Its history goes on from the earlier run's (a fresh run would validate at steps 0 and 4 only).
    assert [r["step"] for r in json.loads((later / "history.json").read_text())] == [0, 2, 4]
    assert saved["seconds"] > first["seconds"]
