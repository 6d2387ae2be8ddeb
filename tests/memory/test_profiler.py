"""`voxgen profile`: measurement protocol, OOM handling, and the CLI without a GPU."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from voxgen.cli import main
from voxgen.config import compose
from voxgen.memory.planner import plan
from voxgen.memory.profiler import OK, measure, profile

TINY = [
    "model.channels=[8,16]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=8",
    "model.norm_num_groups=4",
    "data.shape=[8,8,8]",
    "training.batch_size=1",
]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")


class FakeMemory:
    """Allocator statistics stand-in: peaks are whatever the running stage set."""

    def __init__(self):
        self.events = []
        self.peak = (0, 0)

    def reset_peak(self):
        self.events.append("reset")
        self.peak = (0, 0)

    def peaks(self):
        self.events.append("read")
        return self.peak

    def release(self):
        self.events.append("release")


def _oom():
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_measure_resets_the_peak_before_each_measured_stage():
    memory = FakeMemory()
    sizes = iter([(100, 200), (150, 300)])
    status, peaks = measure(
        [
            ("build", lambda: None, False),
            ("first step", lambda: setattr(memory, "peak", next(sizes)), True),
            ("steady step", lambda: setattr(memory, "peak", next(sizes)), True),
        ],
        memory,
    )
    assert status == OK and peaks == {"first step": (100, 200), "steady step": (150, 300)}
    assert memory.events == ["reset", "read", "reset", "read"]


@pytest.mark.parametrize("stage, kept", [("build", []), ("first step", []), ("steady step", ["first step"])])
def test_out_of_memory_is_caught_and_named_by_stage(stage, kept):
    memory = FakeMemory()
    ran = []

    def stage_fn(name):
        def fn():
            if name == stage:
                _oom()
            ran.append(name)
            memory.peak = (1, 2)

        return fn

    names = ["build", "first step", "steady step"]
    status, peaks = measure([(n, stage_fn(n), n != "build") for n in names], memory)
    assert status == f"OOM ({stage})" and list(peaks) == kept and ran == names[: names.index(stage)]


def test_other_errors_are_not_taken_for_out_of_memory():
    with pytest.raises(ValueError):
        measure([("first step", lambda: (_ for _ in ()).throw(ValueError("bug")), True)], FakeMemory())


@pytest.mark.parametrize("extra", [[], ["mode=seg_conditioned"]], ids=["bravo", "size-bins"])
def test_profile_runs_the_real_step_on_cpu_with_a_stand_in_allocator(extra):
    memory = FakeMemory()
    m = profile(compose([], [*TINY, *extra]), device="cpu", memory=memory)
    assert m.status == OK and m.first_allocated == 0 and m.steady_allocated == 0 and m.environment == {}
    assert memory.events == ["release", "reset", "read", "reset", "read", "release"]


def test_profile_reports_oom_raised_inside_the_step(monkeypatch):
    import voxgen.training.step as step

    calls = []
    real = step.train_step

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _oom()
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "train_step", flaky)
    m = profile(compose([], TINY), device="cpu", memory=FakeMemory())
    assert m.status == "OOM (steady step)" and m.first_allocated == 0 and m.steady_allocated is None


@no_cuda
@pytest.mark.parametrize("argv", [["profile", *TINY], ["profile", "--json", *TINY]])
def test_profile_without_cuda_is_one_error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: voxgen profile needs a CUDA GPU"), err


@no_cuda
def test_profile_grid_without_cuda_is_one_error_line(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text("configs:\n  - {name: a, overrides: [training.batch_size=1]}\n")
    code = main(["profile", "--grid", str(grid), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: voxgen profile needs a CUDA GPU") and not (tmp_path / "out").exists()


def test_profile_bad_key_is_reported_before_the_gpu_check(capsys):
    code = main(["profile", "modle.channels=[8,16]"])
    assert code == 2 and "unknown config key 'modle'" in capsys.readouterr().err


@pytest.mark.gpu
def test_profile_on_the_gpu_measures_both_steps_and_matches_the_planner(capsys):
    # Large enough that activations, not the fixed workspaces, make the peak.
    sized = ["data.shape=[64,64,64]", "model.channels=[32,64]", "model.num_head_channels=32", "model.norm_num_groups=8"]
    code = main(["profile", "--json", *TINY, *sized, "training.precision=bf16-mixed"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == OK and result["environment"]["gpu"]
    assert 0 < result["first_allocated"] <= result["first_reserved"]
    assert 0 < result["steady_allocated"] <= result["steady_reserved"]
    # docs/gpu-validation.md: the required figure read within 2.2% of 23 configurations on an H200.
    assert abs(result["planned_required_bytes"] - result["steady_allocated"]) < 0.15 * result["steady_allocated"]


def test_profile_grid_writes_each_row_as_measured_with_the_verdict_for_that_gpu(tmp_path, monkeypatch):
    """The grid's table is rewritten after every configuration (a stopped grid keeps its rows), and
    each row carries the planner's reserved memory, band top and verdict for the GPU measured on."""
    import voxgen.memory.profiler as profiler
    from voxgen.memory.profiler import Measurement

    gpu = 80 * 2**30
    env = {"gpu": "Fake GPU", "gpu_memory_bytes": gpu, "torch": torch.__version__, "cuda": "", "cudnn": ""}
    env["cudnn_benchmark"] = False
    calls = []

    def fake_profile(cfg):
        calls.append(cfg)
        if len(calls) == 2:
            # The second configuration is stopped (a time limit, ^C): the first row is on disk.
            rows = (tmp_path / "out" / "profile.csv").read_text().splitlines()
            assert len(rows) == 2 and rows[1].startswith("a,")
            raise KeyboardInterrupt
        return Measurement(OK, 2**30, 2**30 + 1, 2**30, 2**30 + 2, env)

    monkeypatch.setattr(profiler, "require_cuda", lambda: None)
    monkeypatch.setattr(profiler, "environment", lambda device="cuda": env)
    monkeypatch.setattr(profiler, "profile", fake_profile)
    grid = tmp_path / "g.yaml"
    entries = "  - {name: a, overrides: []}\n  - {name: b, overrides: [training.batch_size=2]}\n"
    grid.write_text(f"base: {TINY}\nconfigs:\n{entries}")
    assert main(["profile", "--grid", str(grid), "--out", str(tmp_path / "out")]) == 130
    (row,) = list(csv.DictReader((tmp_path / "out" / "profile.csv").open()))
    planned = plan(compose([], TINY), gpu)
    assert row["verdict"] == planned.verdict == "fits" and row["status"] == OK and row["steady_gib"] == "1.00"
    assert float(row["planned_reserved_gib"]) == pytest.approx(planned.reserved_bytes / 2**30, abs=0.005)
    assert float(row["band_high_gib"]) == pytest.approx(planned.band_bytes[-1] / 2**30, abs=0.005)
