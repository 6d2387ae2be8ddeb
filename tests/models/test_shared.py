"""The pieces every family shares: shape checks, block lists for checkpointing, the registry."""

import ast
from pathlib import Path

import pytest
import torch

from voxgen.config.schema import ModelConfig
from voxgen.errors import ConfigError
from voxgen.models import registry
from voxgen.models.blocks import check_divisible, checkpoint_each
from voxgen.models.transformer import transformer_options

from .family_checks import tiny_model
from .test_families import TINY


def test_check_divisible_names_axis_size_factor_and_why():
    check_divisible((16, 8, 24), 8)
    with pytest.raises(ConfigError, match=r"^data.shape H=12 is not divisible by 8$"):
        check_divisible((16, 12, 24), 8)
    with pytest.raises(ConfigError, match=r"^latent W=6 is not divisible by 2\^2=4 \(two halvings\)$"):
        check_divisible((8, 8, 6), 4, " (two halvings)", by="2^2=4", what="latent")


def test_registry_imports_no_family():
    """Families may import the registry module's neighbours, never the other way round."""
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name and name.startswith("voxgen.models") for name in imported), imported
    assert list(registry.MODELS) == [
        "unet",
        "dit",
        "sit",
        "hdit",
        "uvit",
        "wdm",
        "video_unet",
        "xray2ct",
    ]  # the order `voxgen models` prints


@pytest.mark.parametrize("family", ["dit", "hdit", "uvit"])
def test_transformer_blocks_lists_every_block_once(family):
    model = tiny_model(TINY[family])
    blocks = model.transformer_blocks()
    block_type = type(blocks[0])
    assert len({id(b) for b in blocks}) == len(blocks)
    assert {id(m) for m in model.modules() if isinstance(m, block_type)} == {id(b) for b in blocks}


def test_checkpoint_each_keeps_names_and_values():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]
    model = torch.nn.Sequential(*layers)
    before = dict(model.state_dict())
    checkpoint_each(layers)
    assert all(type(layer).__name__ == "CheckpointedLinear" for layer in layers)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "qk_norm, default, expected", [(None, True, True), (None, False, False), (False, True, False), (True, False, True)]
)
def test_qk_norm_null_means_the_family_default(qk_norm, default, expected):
    cfg = ModelConfig(name="dit", patch_size=4, attention="naive", qk_norm=qk_norm)
    assert transformer_options(cfg, qk_norm_default=default) == {"patch": 4, "attention": "naive", "qk_norm": expected}


def test_patch_size_is_checked_first():
    cfg = ModelConfig(name="dit", patch_size=0)
    with pytest.raises(ConfigError, match=r"^model.patch_size=0 must be at least 1$"):
        transformer_options(cfg, qk_norm_default=True)
