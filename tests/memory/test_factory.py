"""`voxgen plan --factory MODULE:FUNCTION --input-shape C,D,H,W`: any nn.Module, planned."""

from __future__ import annotations

import json

import pytest

from voxgen.cli import main
from voxgen.errors import ConfigError
from voxgen.memory.factory import parse_input_shape, plan_factory
from voxgen.models.registry import MODELS

MODULE = """
import torch
from torch import nn

def plain():
    return nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv3d(8, 1, 3, padding=1))

class Timed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 1, 3, padding=1)
        self.scale = nn.Linear(1, 1)

    def forward(self, x, t):
        return self.conv(x) * self.scale(t[:, None])[:, :, None, None, None]

def not_a_module():
    return 3

class ImagesToVolume(nn.Module):
    # (B, 2, 8, 8) images -> (B, 1, 8, 8, 8): each image broadcast along depth, then a 3D conv.

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(2, 4, 3, padding=1)
        self.conv = nn.Conv3d(4, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(self.mix(x)[:, :, None].expand(-1, -1, 8, -1, -1))

def tiny_xray2ct():
    from voxgen.models.xray2ct import build_xray2ct

    section = {"initial_size": 2, "initial_channels": 4, "xray_features": 8, "encoder_channels": [4, 8],
               "stages": [{"channels": 8}, {"channels": 8}, {"channels": 8}], "skip_channels": 4, "fusion_channels": 8,
               "refine": "conv", "refine_channels": [8, 4], "norm_groups": 4, "refine_norm_groups": 4}
    return build_xray2ct(section, 16, 16, False)
"""


@pytest.fixture()
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_nets"


def test_factory_of_f_x_and_f_x_t(factories):
    plain = plan_factory(f"{factories}:plain", (2, 8, 8, 8), 1, ["training.batch_size=1"])
    assert plain.params == (2 * 27 * 8 + 8) + 16 + (8 * 27 + 1) and plain.model == "my_nets:plain"
    # six parameter tensors in 512 B blocks: conv1 weight 1728 B -> 2048, conv2 weight 864 B -> 1024, four of 32 B -> 512
    assert plain.breakdown["parameters"] == 2048 + 1024 + 4 * 512
    assert plain.in_channels == 2 and plain.out_channels == 1 and plain.shape == [8, 8, 8]
    timed = plan_factory(f"{factories}:Timed", (2, 8, 8, 8), 1, ["training.batch_size=2"])
    assert timed.params == 2 * 27 + 1 + 2 and timed.batch_size == 2
    assert "factory" not in MODELS  # registered only while planning


def test_factory_cli_json(factories, capsys):
    code = main(
        [
            "plan",
            "--json",
            "--factory",
            f"{factories}:plain",
            "--input-shape",
            "2,8,8,8",
            "--output-channels",
            "1",
            "training.batch_size=1",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["peak_bytes"] > 0 and result["model"] == "my_nets:plain"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--factory", "my_nets:plain", "--input-shape", "2,8,8,8"], ["output (1, 1, 8, 8, 8)", "expected (1, 2, 8, 8, 8)"]),
        (["--factory", "my_nets:plain", "--input-shape", "3,8,8,8", "--output-channels", "1"], ["forward", "failed"]),
        (["--factory", "my_nets:nothing", "--input-shape", "2,8,8,8"], ["no attribute 'nothing'"]),
        (["--factory", "no_such_module:f", "--input-shape", "2,8,8,8"], ["cannot import no_such_module"]),
        (["--factory", "my_nets:not_a_module", "--input-shape", "2,8,8,8"], ["not an nn.Module"]),
        (["--factory", "my_nets", "--input-shape", "2,8,8,8"], ["MODULE:FUNCTION"]),
        (["--factory", "my_nets:plain"], ["--input-shape"]),
        (["--factory", "my_nets:plain", "--input-shape", "2,8,8"], ["C,D,H,W"]),
        (["--factory", "my_nets:plain", "--input-shape", "1,8,8,8", "--output-channels", "2"], ["more than the 1 input"]),
    ],
)
def test_factory_errors_are_one_line(factories, capsys, argv, words):
    code = main(["plan", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert "factory" not in MODELS


def test_parse_input_shape():
    assert parse_input_shape("2,160,256,256") == (2, 160, 256, 256)
    with pytest.raises(ConfigError):
        parse_input_shape("2,0,8,8")


def test_planning_a_factory_leaves_the_registry_alone(factories, monkeypatch):
    import types

    import voxgen.models.registry as registry

    # A read-only registry: any registration during the plan raises TypeError.
    monkeypatch.setattr(registry, "MODELS", types.MappingProxyType(dict(registry.MODELS)))
    result = plan_factory(f"{factories}:plain", (2, 8, 8, 8), 1, ["training.batch_size=1"])
    assert result.model == "my_nets:plain" and result.params == (2 * 27 * 8 + 8) + 16 + (8 * 27 + 1)


def test_a_regression_factory_plans_as_the_task_with_the_same_network(factories, tmp_path):
    """--output-shape: images in, a volume out, traced as task=regress; the same network planned
    from the registry's config gives the same plan."""
    result = plan_factory(f"{factories}:ImagesToVolume", (2, 8, 8), overrides=["training.batch_size=1"], output_shape=(8, 8, 8))
    assert result.params == (2 * 9 * 4 + 4) + (4 * 27 + 1)
    from tiny_regress import TINY_REGRESS
    from voxgen.config import compose
    from voxgen.memory.planner import plan

    via_factory = plan_factory(
        f"{factories}:tiny_xray2ct", (2, 16, 16), overrides=["training.batch_size=1"], output_shape=(16, 16, 16)
    )
    via_config = plan(
        compose(
            [],
            [
                *TINY_REGRESS,
                "xray2ct.stages=[{channels: 8}, {channels: 8}, {channels: 8}]",
                "training.batch_size=1",
                f"data.root={tmp_path}",
            ],
        )
    )
    assert via_factory.params == via_config.params and via_factory.peak_bytes == via_config.peak_bytes


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--input-shape", "2,8,8", "--output-shape", "8,8,4"], ["output (1, 1, 8, 8, 8)", "expected (1, 1, 8, 8, 4)"]),
        (["--input-shape", "2,8,8,8", "--output-shape", "8,8,8"], ["C,H,W"]),
        (["--input-shape", "2,8,8", "--output-shape", "8,8,8", "--output-channels", "1"], ["drop --output-channels"]),
    ],
)
def test_regression_factory_errors_are_one_line(factories, capsys, argv, words):
    code = main(["plan", "--factory", f"{factories}:ImagesToVolume", *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
