"""Grids: YAML -> named configs -> planned tables (CSV, Markdown) and a chart."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from voxgen.cli import main
from voxgen.config import compose
from voxgen.errors import ConfigError
from voxgen.memory.grid import describe, fill_template, format_value, load_grid, resolve
from voxgen.memory.planner import GiB, plan
from voxgen.memory.tables import PLAN_COLUMNS, PROFILE_COLUMNS, Network, Row, to_csv, to_markdown
from voxgen.reports.memory_chart import save_memory_chart

REPO = Path(__file__).resolve().parents[2]
TINY_UNET = [
    "model.channels=[8,16]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=8",
    "model.norm_num_groups=4",
    "training.batch_size=1",
]
TINY_DIT = ["model.name=dit", "model.hidden_size=24", "model.depth=2", "mode=seg", "training.batch_size=1"]


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_format_and_template():
    assert format_value([40, 64, 64]) == "[40,64,64]" and format_value(True) == "true" and format_value("S") == "S"
    assert fill_template("S-p{model.patch_size}-{data.shape}", {"model.patch_size": 2, "data.shape": [4, 8, 8]}) == "S-p2-4x8x8"
    with pytest.raises(ConfigError, match="not a varied key"):
        fill_template("{model.depth}", {"model.patch_size": 2})


def test_load_grid_base_entries_and_product(tmp_path):
    path = _write(
        tmp_path,
        """
base: [training.batch_size=1]
configs:
  - name: a
    overrides: {model.name: dit, data.shape: [8, 8, 8]}
product:
  name: "p{model.patch_size}-{data.shape}"
  series: "p{model.patch_size}"
  overrides: [model.name=dit]
  skip_invalid: true
  vary:
    data.shape: [[8, 8, 8], [12, 8, 8]]
    model.patch_size: [2, 8]
""",
    )
    grid, items = load_grid(path)
    names = [e.name for e, _ in items]
    assert names == ["a", "p2-8x8x8", "p8-8x8x8", "p2-12x8x8", "p8-12x8x8"]
    entry, skippable = items[0]
    assert entry.overrides == ["training.batch_size=1", "model.name=dit", "data.shape=[8,8,8]"] and not skippable
    assert items[1][0].series == "p2" and items[1][1]
    resolved = resolve(grid, items, ["model.hidden_size=24", "model.depth=1", "mode=seg"])
    # 12 is not divisible by patch 8: dropped and said why
    assert [r.entry.name for r in resolved] == ["a", "p2-8x8x8", "p8-8x8x8", "p2-12x8x8"]
    assert len(grid.skipped) == 1 and "D=12 is not divisible by model.patch_size=8" in grid.skipped[0]
    assert resolved[1].network.tokens == 64 and resolved[2].network.tokens == 1 and resolved[0].network.voxels == 512


@pytest.mark.parametrize(
    "text, named",
    [
        ("configs:\n  - name: bad one\n    overrides: ['modle.channels=[8,16]']\n", ["bad one", "modle"]),
        (
            "configs:\n  - name: odd\n    overrides: ['data.shape=[20,16,16]', 'model.channels=[8,16,16,16]', "
            "'model.attention_levels=[false,false,false,false]', model.norm_num_groups=4]\n",
            ["odd", "data.shape D=20"],
        ),
        ("configs:\n  - name: x\n    overrides: [notanoverride]\n", ["x", "notanoverride"]),
        ("configs:\n  - overrides: [a=1]\n", ["entry 1", "name"]),
        ("configs:\n  - {name: a}\n  - {name: a}\n", ["'a'", "twice"]),
        ("configs:\n  - {name: a, config: missing.yaml}\n", ["'a'", "missing.yaml"]),
        ("product:\n  vary: {model.patch_size: 3}\n", ["product 1", "model.patch_size"]),
        ("colors: red\n", ["colors"]),
    ],
)
def test_bad_grid_is_one_error_line_naming_entry_and_key(tmp_path, capsys, text, named):
    path = _write(tmp_path, text)
    code, out, err = _run(capsys, "plan", "--grid", str(path), "--out", str(tmp_path / "out"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in named:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_plan_grid_writes_tables_and_chart_equal_to_single_plans(tmp_path, capsys):
    path = _write(
        tmp_path,
        """
title: tiny
base:
  model.channels: [8, 16]
  model.attention_levels: [false, true]
  model.num_head_channels: 8
  model.norm_num_groups: 4
  training.batch_size: 1
configs:
  - {name: small, overrides: ["data.shape=[8,8,8]"]}
  - {name: large, overrides: ["data.shape=[16,16,16]"], series: s}
""",
    )
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "plan", "--grid", str(path), "--out", str(out), "--gpu-memory", "1GB")
    assert code == 0 and stdout.startswith("planned 2 configurations")
    rows = list(csv.DictReader((out / "plan.csv").open()))
    assert [r["config"] for r in rows] == ["small", "large"] and list(rows[0]) == PLAN_COLUMNS
    single = plan(compose([], [*TINY_UNET, "data.shape=[16,16,16]"]), GiB)
    assert rows[1]["first_step_gib"] == f"{single.peak_bytes_first_step / GiB:.2f}"
    assert rows[1]["steady_gib"] == f"{single.peak_bytes / GiB:.2f}"
    assert float(rows[1]["params_m"]) == round(single.params / 1e6, 1) and rows[1]["voxels"] == "4096"
    assert rows[1]["verdict"] == single.verdict == "fits" and rows[1]["gpu_gib"] == "1.0"
    assert float(rows[0]["steady_gib"]) < float(rows[1]["steady_gib"])
    md = (out / "plan.md").read_text()
    assert md.startswith("# tiny") and "| small |" in md and "All rows: model unet" in md
    png = (out / "plan.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_tables_format_planned_and_measured_rows():
    net = Network("dit", (8, 16, 16), 1, 1, 32_600_000, patch=2)
    planned = Row(
        "a",
        net,
        planned_first=GiB,
        planned_steady=2 * GiB,
        verdict="fits",
        gpu_memory_bytes=80 * GiB,
        peak_phase="backward",
        peak_module="MulBackward0",
    )
    measured = Row(
        "a",
        net,
        planned_first=GiB,
        planned_steady=2 * GiB,
        measured_first=GiB // 2 * 1,
        measured_steady=2 * GiB,
        reserved_first=GiB,
        reserved_steady=3 * GiB,
        status="OK",
        environment={"gpu": "H100", "torch": "2.x", "cudnn": "9"},
    )
    rec = measured.record()
    assert rec["first_step_gib"] == "0.50" and rec["error_first_pct"] == "+100.0" and rec["error_steady_pct"] == "+0.0"
    assert planned.record()["first_step_gib"] == "1.00" and planned.record()["tokens"] == "256"
    text = to_csv([measured], PROFILE_COLUMNS)
    assert text.splitlines()[1].endswith(",H100,2.x,9")
    oom = Row("b", net, status="OOM (first step)")
    md = to_markdown([measured, oom], PROFILE_COLUMNS, "t")
    assert "| OOM (first step) |" in md and "+100.0%" in md


def test_chart_of_two_families(tmp_path):
    rows = [
        Row(
            f"d{i}",
            Network("dit", (8 * i, 16, 16), 1, 1, 10**7, patch=2),
            series="S p2",
            planned_first=i * GiB,
            planned_steady=i * GiB + GiB // 4,
        )
        for i in (1, 2, 4)
    ]
    rows += [Row("u", Network("unet", (16, 16, 16), 8, 4, 10**8), measured_first=None, status="OOM (first step)")]
    path = save_memory_chart(tmp_path / "c.png", rows, 80 * GiB, "t")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_shipped_dit_grid_is_the_14_seed_rows():
    grid, items = load_grid(REPO / "configs" / "grids" / "dit_s_latent.yaml")
    resolved = resolve(grid, items)
    # reference/dit3d_a100.csv, variant S, space latent: params_m column in table order
    expected = [32.6, 32.7, 32.5, 33.5, 32.6, 34.4, 32.8, 32.9, 40.3, 33.5, 33.0, 48.2, 34.5, 33.1]
    assert [round(r.network.params / 1e6, 1) for r in resolved] == expected
    assert resolved[0].entry.name == "S-p2-10x16x16" and len(grid.skipped) == 4


def test_shipped_unet_grid_resolves_every_seed_row():
    grid, items = load_grid(REPO / "configs" / "grids" / "unet_latent.yaml")
    resolved = resolve(grid, items)
    params = {r.entry.name: round(r.network.params / 1e6, 1) for r in resolved}
    assert len(params) == 19 and params["4L_small 4x"] == 166.6 and params["3L_huge_d 8x"] == 3473.7


def test_describe_counts_tokens_of_transformers_only():
    dit = describe(compose([], [*TINY_DIT, "data.shape=[8,16,16]", "model.patch_size=4"]))
    unet = describe(compose([], [*TINY_UNET, "data.shape=[8,16,16]"]))
    assert dit.patch == 4 and dit.tokens == 2 * 4 * 4 and dit.size == 32
    assert unet.patch is None and unet.tokens is None and unet.size == 8 * 16 * 16


def test_shipped_gpu_validation_grid_covers_every_family_with_and_without_checkpointing():
    grid, items = load_grid(REPO / "configs" / "grids" / "gpu_validation.yaml")
    resolved = resolve(grid, items)
    assert len(resolved) >= 12
    settings = {(r.cfg.model.name, r.cfg.training.grad_checkpointing) for r in resolved}
    for family in ("unet", "dit", "hdit", "uvit"):
        assert {(family, False), (family, True)} <= settings, family
    assert {r.cfg.training.precision for r in resolved} == {"bf16-mixed", "fp32"}
