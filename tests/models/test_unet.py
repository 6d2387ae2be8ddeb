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
        compose(
            [],
            [
                "model.channels=[8,16,16,16]",
                "model.attention_levels=[false,false,false,false]",
                "model.norm_num_groups=4",
                "model.num_head_channels=8",
                "data.shape=[20,16,16]",
            ],
        )


# The seeds' space-to-depth profiles (bravo: 16 channels in, 8 out; 16 head channels, 16 groups)
# give residual blocks per level; their parameter counts, in millions, as printed there.
S2D_ROWS = [
    ("[64,128,256,512]", "[false,false,false,false]", "[1,2,2,2]", 159),
    ("[128,256,512,1024]", "[false,false,true,true]", "[2,2,3,3]", 858),
    ("[32,64,256,512,512]", "[false,false,false,true,true]", "[1,1,2,2,2]", 270),
    ("[32,64,256,512,512]", "[false,false,false,true,true]", "[2,2,3,3,3]", 356),
    ("[64,128,256,512,1024]", "[false,false,false,true,true]", "[1,1,2,3,3]", 853),
]


@pytest.mark.parametrize("channels, attention, blocks, millions", S2D_ROWS)
def test_residual_blocks_per_level_match_the_seed_counts(channels, attention, blocks, millions):
    cfg = compose(
        [],
        [
            f"model.channels={channels}",
            f"model.attention_levels={attention}",
            f"model.num_res_blocks={blocks}",
            "model.num_head_channels=16",
            "model.norm_num_groups=16",
            "data.shape=[80,64,64]",
        ],
    )
    model = build_on_meta(cfg.model, 16, 8, (80, 64, 64))
    assert round(count_parameters(model) / 1e6) == millions


def test_one_count_means_every_level():
    blocks = [len(level.resnets) for level in _unet("model.num_res_blocks=2").net.down_blocks]
    assert blocks == [2, 2]
    blocks = [len(level.resnets) for level in _unet("model.num_res_blocks=[1,3]").net.down_blocks]
    assert blocks == [1, 3]
