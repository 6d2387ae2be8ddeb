import pytest
import torch

from voxgen.config import compose
from voxgen.errors import ConfigError
from voxgen.models.registry import MODELS, build_model, build_on_meta, count_parameters

TINY = ["model.channels=[8,16]", "model.attention_levels=[false,true]", "model.num_head_channels=8", "model.norm_num_groups=4"]


def _unet(*extra, grad_checkpointing=False, seed=0):
    cfg = compose([], [*TINY, *extra])
    torch.manual_seed(seed)
    return build_model(cfg.model, 2, 1, (8, 8, 8), grad_checkpointing)


def test_registry_lists_unet():
    assert "unet" in MODELS and MODELS["unet"].summary


def test_forward_shape():
    x = torch.randn(2, 2, 8, 8, 8)
    assert _unet()(x, torch.tensor([10.0, 900.0])).shape == (2, 1, 8, 8, 8)


def test_meta_build_counts_without_memory():
    cfg = compose([], ["model.channels=[256,512,768]", "model.attention_levels=[false,true,true]", "model.num_head_channels=64"])
    model = build_on_meta(cfg.model, 8, 4, (64, 64, 64))
    assert next(model.parameters()).is_meta
    assert count_parameters(model) > 100_000_000


def test_shape_not_divisible_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"data.shape D=20 is not divisible by 2\^3 for a 4-level UNet"):
        compose([], ["model.channels=[8,16,16,16]", "model.attention_levels=[false,false,false,false]",
                     "model.norm_num_groups=4", "model.num_head_channels=8", "data.shape=[20,16,16]"])
