"""`voxgen evaluate` and `voxgen find-steps` on a tiny trained run; the step search; solver lists."""

import csv
import math

import pytest

from tiny_run import TINY_RUN
from voxgen.cli import main
from voxgen.errors import VoxgenError
from voxgen.evaluation.evaluate import RunEvaluator, expand_solvers, golden_section

TINY = [*TINY_RUN, "training.batch_size=2"]


@pytest.fixture(scope="module")
def tiny_run(cohort_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluate") / "run"
    assert main(["train", *TINY, f"data.root={cohort_root}", f"run.dir={run}"]) == 0
    return run


def _command(argv):
    """The real `voxgen` entry point, in-process: user errors print `error: ...` and return 2."""
    return main(argv)


def test_evaluate_writes_table_csv_and_plot_with_the_nfe_of_each_solver(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        _command(["evaluate", "--run", str(tiny_run), "--solvers", "euler:2,3", "heun2:2", "--samples", "2", "--out", str(out)])
        == 0
    )
    assert "evaluated 3 configurations x 2 samples" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "evaluate.csv").open()))
    assert [(r["solver"], r["steps / tolerance"], int(r["NFE"])) for r in rows] == [
        ("euler", "2 steps", 2),
        ("euler", "3 steps", 3),
        ("heun2", "2 steps", 4),
    ]  # Heun: two evaluations a step
    for r in rows:
        assert float(r["seconds per volume"]) > 0
        assert math.isfinite(float(r["FID (random3d)"])) and float(r["FID (random3d)"]) >= 0
        assert -1 <= float(r["SSIM"]) <= 1 and float(r["PSNR (dB)"]) > 0
        assert 0 <= float(r["MS-SSIM"]) <= 1
        assert r["extractor"] == "random3d, not comparable with published figures"
        assert 0 < float(r["anatomy"]) <= 1  # cohort data is in template space: scored by default
    anatomy = list(csv.DictReader((out / "anatomy.csv").open()))
    assert [a["group"] for a in anatomy] == ["real (test)", "samples euler:2", "samples euler:3", "samples heun2:2"]
    assert [float(a["dice_mean"]) for a in anatomy[1:]] == pytest.approx([float(r["anatomy"]) for r in rows], abs=1e-6)
    assert float(anatomy[0]["dice_mean"]) > 0.4  # the real cases: their labels follow the template
    table = (out / "evaluate.md").read_text()
    assert "| solver | steps / tolerance | NFE | PSNR (dB) | SSIM | MS-SSIM | FID (random3d) | KID (random3d) |" in table
    assert "not comparable with published figures" in table
    assert "cases themselves score" in table and "(chance)" in table
    assert "MS-SSIM: volumes [16, 16, 16] use 1 of 5 scales" in table
    assert (out / "evaluate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nfe_is_the_number_of_network_calls(tiny_run):
    ev = RunEvaluator(tiny_run, samples=2, metrics=["intensity_w1"], batch_size=2)
    ev.warm_up()  # its untimed single step is not part of any row
    calls = []
    ev.parts.model.register_forward_hook(lambda *_: calls.append(1))
    for text in ("euler:3", "heun2:2", "dopri5:1e-2"):
        calls.clear()
        row = ev.evaluate(ev.sampling(text))
        assert row.nfe == len(calls), text  # one batch of both samples: calls = evaluations per volume
    assert row.setting == "tol 0.01"


def test_find_steps_searches_and_writes_its_evaluations(tiny_run, tmp_path, capsys):
    out = tmp_path / "steps"
    assert (
        _command(
            [
                "find-steps",
                "--run",
                str(tiny_run),
                "--metric",
                "intensity_w1",
                "--min",
                "1",
                "--max",
                "9",
                "--samples",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "find_steps.csv").open()))
    steps = [int(r["NFE"]) for r in rows]
    assert steps == sorted(set(steps)) and len(steps) < 9  # fewer evaluations than trying every count
    values = {int(r["NFE"]): float(r["intensity W1"]) for r in rows}
    best = min(values, key=lambda s: (values[s], s))
    assert f"best euler steps for intensity W1: {best} " in printed
    assert "Golden-section search" in (out / "find_steps.md").read_text()


def test_user_errors_are_one_line(tiny_run, capsys):
    assert _command(["evaluate", "--run", str(tiny_run), "--metrics", "dice", "--samples", "2"]) == 2
    assert "error: metric 'dice' needs mask modalities; this run generates bravo (image)" in capsys.readouterr().err
    assert _command(["evaluate", "--run", str(tiny_run), "--solvers", "euler:0", "--samples", "2"]) == 2
    assert "error: solver" in capsys.readouterr().err
    assert _command(["evaluate", "--run", str(tiny_run), "--samples", "1"]) == 2
    assert "--samples must be at least 2" in capsys.readouterr().err
    assert _command(["evaluate", "--run", str(tiny_run), "--extractor", "inception"]) == 2
    assert "error: --extractor: unknown extractor 'inception' (have: random3d, resnet50, ct-resnet152)" in capsys.readouterr().err
    assert _command(["find-steps", "--run", str(tiny_run), "--metric", "lesions"]) == 2
    assert "a statistic with no better direction" in capsys.readouterr().err
    assert _command(["evaluate", "--run", str(tiny_run.parent / "absent")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_ms_ssim_uses_the_scales_that_fit_and_says_how_many(tiny_run):
    # 16 voxels per axis, below the 176 of five scales: one scale of the 11-voxel window fits.
    note = "MS-SSIM: volumes [16, 16, 16] use 1 of 5 scales (11-voxel window; weights renormalised)."
    ev = RunEvaluator(tiny_run, samples=2, metrics=["ms_ssim"], batch_size=2)
    assert [c.metric.name for c in ev.columns] == ["ms_ssim"]
    assert note in ev.notes and note in ev.describe()
    row = ev.evaluate(ev.sampling("euler:1"))
    assert 0 <= row.values["MS-SSIM"] <= 1
    default = RunEvaluator(tiny_run, samples=2, batch_size=2)
    assert "ms_ssim" in [c.metric.name for c in default.columns]
    assert default.notes.count(note) == 1
    # No note at five scales; below the window itself MS-SSIM is left out of the default set and
    # refused when asked for (no run of such volumes here: the columns are chosen for another shape).
    ev.notes.clear()
    ev.cfg.data.shape = [176, 176, 200]
    assert [c.metric.name for c in ev._columns(["ms_ssim"])] == ["ms_ssim"] and ev.notes == []
    ev.cfg.data.shape = [10, 16, 16]
    with pytest.raises(VoxgenError, match=r"volumes \[10, 16, 16\] are smaller than the 11-voxel window"):
        ev._columns(["ms_ssim"])
    assert "ms_ssim" not in [c.metric.name for c in ev._columns(None)]
    assert any(n.startswith("MS-SSIM: volumes [10, 16, 16] are smaller") and n.endswith("left out.") for n in ev.notes)


def test_expand_solvers():
    assert expand_solvers(["euler:10,25,50", "heun2:25", "dopri5:1e-3"]) == [
        "euler:10",
        "euler:25",
        "euler:50",
        "heun2:25",
        "dopri5:1e-3",
    ]
    assert expand_solvers(["euler:10,25,shift=3", "euler"]) == ["euler:10,shift=3", "euler:25,shift=3", "euler"]
    with pytest.raises(VoxgenError, match="names no steps or tolerance"):
        expand_solvers(["euler:shift=3"])


def test_golden_section_finds_the_minimum_with_few_evaluations():
    calls = []

    def f(x):
        calls.append(x)
        return (x - 37) ** 2

    best, seen = golden_section(f, 4, 100)
    assert best == 37
    assert len(calls) == len(set(calls)) == len(seen) <= 16  # cached; brute force would take 97
    assert golden_section(lambda x: abs(x - 4), 4, 100)[0] == 4
    assert golden_section(lambda x: -x, 4, 100)[0] == 100
    assert golden_section(lambda x: 1.0, 7, 7) == (7, {7: 1.0})
    # A flat stretch: the smallest step count among the best.
    assert golden_section(lambda x: max(0, 20 - x), 4, 100)[0] == 20
