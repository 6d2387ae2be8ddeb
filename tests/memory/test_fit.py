"""`voxgen fit`: the largest candidate that fits, ordered by parameters then tokens."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from voxgen.cli import main
from voxgen.errors import ConfigError
from voxgen.memory.fit import FITS, INVALID, NOT_PLANNED, TOO_BIG, fit, format_table, parse_vary, split_values
from voxgen.memory.planner import GiB

TINY_DIT = ["model.name=dit", "model.hidden_size=24", "mode=seg", "training.batch_size=1", "data.shape=[8,8,8]"]


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_split_values_keeps_bracketed_lists():
    assert split_values("2,4,8") == ["2", "4", "8"]
    assert split_values("[20,32,32],[40,64,64]") == ["[20,32,32]", "[40,64,64]"]
    assert parse_vary(["model.depth=1,2", "data.shape=[8,8,8]"]) == [("model.depth", ["1", "2"]), ("data.shape", ["[8,8,8]"])]
    for bad in (["model.depth"], ["model.depth=1,,2"], ["a=1", "a=2"], [], ["world_size=0,2"], ["world_size=two"]):
        with pytest.raises(ConfigError):
            parse_vary(bad)


def _fake_planner(bytes_per_param: int, world_calls: list | None = None):
    """Peak = parameters x bytes_per_param / world size: a planner whose answer is known in advance."""
    calls = []

    def planner(cfg, gpu, world_size=1):
        from voxgen.memory.grid import describe

        params = describe(cfg).params
        calls.append(params)
        if world_calls is not None:
            world_calls.append((world_size, cfg.training.sharding, cfg.training.grad_checkpointing))
        peak = params * bytes_per_param // world_size
        return SimpleNamespace(
            peak_bytes=peak,
            peak_bytes_first_step=peak - 1,
            peak_phase="forward",
            peak_module="m",
            band_bytes=[peak, peak, peak],
            collectives={"nccl_bytes": 0},
        )

    return planner, calls


def test_fit_picks_the_largest_within_the_margin_and_names_the_next_one_up():
    axes = parse_vary(["model.depth=1,2,3,4", "model.patch_size=2,3"])  # patch 3 does not divide 8
    planner, calls = _fake_planner(1000)
    from voxgen.config import compose
    from voxgen.memory.grid import describe

    p = {d: describe(compose([], [*TINY_DIT, f"model.depth={d}", "model.patch_size=2"])).params for d in (1, 2, 3, 4)}
    # a budget between depth 2 and depth 3 after a 10% margin
    gpu = int((p[2] + p[3]) / 2 * 1000 / 0.9)
    result = fit(axes, gpu, 0.1, overrides=TINY_DIT, planner=planner)
    assert result.best.label == "model.depth=2 model.patch_size=2"
    assert result.next_up.label == "model.depth=3 model.patch_size=2" and result.next_up.status == TOO_BIG
    assert result.next_up.needs_bytes > result.budget_bytes >= result.best.needs_bytes
    assert result.budget_bytes == int(gpu * 0.9)
    statuses = [c.status for c in result.candidates]
    assert statuses == [TOO_BIG, TOO_BIG, FITS, NOT_PLANNED] + [INVALID] * 4
    assert "data.shape D=8 is not divisible by model.patch_size=3" in result.candidates[-1].reason
    assert calls == [p[4], p[3], p[2]]  # planned from the largest down to the answer, no further
    assert "next one up, model.depth=3 model.patch_size=2" in result.why_not_next()
    table = format_table(result)
    assert len(table) == 9 and "FITS <- largest" in table[3] and "invalid: data.shape" in table[-1]
    assert json.loads(json.dumps(result.to_json()))["best"]["label"] == result.best.label


def test_fit_with_no_room_and_with_room_for_all():
    axes = parse_vary(["model.depth=1,2"])
    planner, _ = _fake_planner(10**6)
    assert fit(axes, GiB, overrides=TINY_DIT, planner=planner).best is None
    planner, calls = _fake_planner(1)
    result = fit(axes, GiB, overrides=TINY_DIT, planner=planner, plan_all=True)
    assert result.best.label == "model.depth=2" and result.next_up is None and len(calls) == 2
    assert result.why_not_next() == "it is the largest candidate"


def test_fit_cli_json_with_the_real_planner(capsys):
    code, out, err = _run(capsys, "fit", "--json", "--gpu-memory", "4GB", "--vary", "model.depth=1,2", *TINY_DIT)
    result = json.loads(out)
    assert code == 0 and result["best"]["label"] == "model.depth=2" and result["budget_bytes"] == int(4 * GiB * 0.9)
    assert result["best"]["peak_bytes"] > 0 and result["candidates"][1]["status"] == "not planned"


def test_fit_cli_errors(capsys):
    code, out, err = _run(capsys, "fit", "--gpu-memory", "1MB", "--vary", "model.depth=1", *TINY_DIT)
    assert code == 2 and err.startswith("error: no candidate fits") and "model.depth=1" in out
    code, _, err = _run(capsys, "fit", "--vary", "modle.depth=1,2", *TINY_DIT)
    assert code == 2 and err.startswith("error: no candidate fits")
    code, _, err = _run(capsys, "fit", *TINY_DIT)
    assert code == 2 and "--vary" in err


def test_fit_varies_world_size_and_sharding_and_takes_the_cheapest_run_that_fits():
    """Among candidates of one network: fewer processes first, then no checkpointing, then DDP."""
    axes = parse_vary(["training.grad_checkpointing=false,true", "training.sharding=ddp,fsdp", "world_size=1,2,4"])
    world_calls = []
    planner, _ = _fake_planner(1000, world_calls)
    from voxgen.config import compose
    from voxgen.memory.grid import describe

    params = describe(compose([], TINY_DIT)).params
    gpu = int(params * 1000 / 3 / 0.9)  # the fake's peak fits from 4 processes on
    result = fit(axes, gpu, 0.1, overrides=TINY_DIT, planner=planner)
    assert result.best.world_size == 4 and result.best.overrides == [
        "training.grad_checkpointing=false",
        "training.sharding=ddp",
    ]
    assert result.best.label == "training.grad_checkpointing=false training.sharding=ddp world_size=4"
    # Planned in order of cost; world size 1 is the same run whatever the sharding (product order kept).
    assert world_calls[:4] == [(1, "ddp", False), (1, "fsdp", False), (1, "ddp", True), (1, "fsdp", True)]
    assert world_calls[4:8] == [(2, "ddp", False), (2, "fsdp", False), (2, "ddp", True), (2, "fsdp", True)]
    assert world_calls[8] == (4, "ddp", False) and len(world_calls) == 9
    assert result.next_up.world_size == 2 and json.loads(json.dumps(result.to_json()))["best"]["world_size"] == 4
    table = format_table(result)
    assert "FITS <- largest" in table[9] and all("costlier run (not planned" in line for line in table[10:])


def test_the_tracing_planner_traces_a_network_once_for_every_world_size(monkeypatch):
    from voxgen.memory import fit as fit_module
    from voxgen.memory import planner as planner_module

    traced = []
    real = planner_module.trace_step
    monkeypatch.setattr(planner_module, "trace_step", lambda cfg, *a, **k: traced.append(cfg) or real(cfg, *a, **k))
    axes = parse_vary(["training.sharding=ddp,fsdp", "world_size=1,2,8"])
    result = fit_module.fit(axes, 80 * GiB, overrides=TINY_DIT, plan_all=True)
    assert len(traced) == 1 and all(c.status == FITS for c in result.candidates)
    peaks = {c.label: c.peak_bytes for c in result.candidates}
    # The same trace, spread differently: FSDP needs less per rank as ranks are added, DDP does not.
    assert peaks["training.sharding=fsdp world_size=8"] < peaks["training.sharding=fsdp world_size=2"]
    assert peaks["training.sharding=ddp world_size=8"] == peaks["training.sharding=ddp world_size=2"]
    assert peaks["training.sharding=fsdp world_size=1"] == peaks["training.sharding=ddp world_size=1"]
