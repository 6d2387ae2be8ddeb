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
