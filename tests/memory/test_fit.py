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
    for bad in (["model.depth"], ["model.depth=1,,2"], ["a=1", "a=2"], []):
        with pytest.raises(ConfigError):
            parse_vary(bad)


def _fake_planner(bytes_per_param: int):
    """Peak = parameters x bytes_per_param: a planner whose answer is known in advance."""
    calls = []

    def planner(cfg, gpu):
        from voxgen.memory.grid import describe

        params = describe(cfg).params
        calls.append(params)
        peak = params * bytes_per_param
        return SimpleNamespace(
            peak_bytes=peak, peak_bytes_first_step=peak - 1, peak_phase="forward", peak_module="m", band_bytes=[peak, peak, peak]
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
