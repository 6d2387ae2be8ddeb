"""`model.name=video_unet`: the seed-003 CT-enhancement denoiser (slices kept, H and W halved)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from voxgen.cli import main
from voxgen.errors import ConfigError
from voxgen.models.registry import MODELS, build_on_meta, count_parameters
from voxgen.models.video_unet import ResBlock, SpatialTransformer3D, TemporalAttention, VideoUNet

from .family_checks import (
    cached_cfg,
    check_grad_checkpointing,
    tiny_model,
)

# The seed's four levels and attention pattern at tiny widths (8 heads of 1-2 channels).
TINY = [
    "model.name=video_unet",
    "model.channels=[8,16,16,16]",
    "model.attention_levels=[false,true,true,false]",
    "model.num_res_blocks=1",
    "model.norm_num_groups=4",
]
SEED = [
    "model.name=video_unet",
    "model.channels=[128,256,512,512]",
    "model.attention_levels=[false,true,true,false]",
    "model.num_res_blocks=2",
    "model.norm_num_groups=32",
]
SEED_UNET_PARAMS = 224_729_988  # benchmarks/seed003_params.py; the seed prints 270M and 163M (see its docstring)
SHAPE = (4, 16, 16)  # D=4 slices of 16x16: a 16x16 latent of the seed's 8x VAE on 128x128 images


def _seed_unet() -> VideoUNet:
    """The seed's denoiser on its latent: 8 slices of 16x16, 4 latent channels (+4 of the source)."""
    return build_on_meta(cached_cfg(*SEED).model, 8, 4, (8, 16, 16))


def _perturbed(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every weight off its initial value (conv_out starts at zero and would hide everything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def test_registered_and_listed_by_the_cli(capsys):
    assert MODELS["video_unet"].summary
    assert main(["models"]) == 0
    assert any(line.split()[0] == "video_unet" for line in capsys.readouterr().out.splitlines())


def test_output_shape_and_every_level_keeps_the_slices():
    model = _perturbed(tiny_model(TINY, shape=SHAPE, in_channels=4, out_channels=2))
    seen = []
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    hooks = [m.register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape))) for m in blocks]
    with torch.no_grad():
        out = model(torch.randn(2, 4, *SHAPE), torch.tensor([10.0, 900.0]))
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, 2, *SHAPE)
    # Encoder 4 levels x 1, middle 2, decoder 1 + 1 + 1 + 2 ResBlocks, at H = W = 16, 8, 4, 2.
    assert len(seen) == 11
    assert {s[2] for s in seen} == {4}  # every ResBlock sees all 4 slices
    assert [s[3] for s in seen] == [16, 8, 4, 2, 2, 2, 2, 4, 8, 16, 16]
    assert [s[3] for s in seen] == [s[4] for s in seen]


def test_a_depth_that_no_power_of_two_divides_is_fine_but_h_and_w_must_divide():
    model = tiny_model(TINY, shape=(5, 8, 24), in_channels=2, out_channels=1)
    with torch.no_grad():
        assert model(torch.randn(1, 2, 5, 8, 24), torch.tensor([1.0])).shape == (1, 1, 5, 8, 24)
    with pytest.raises(ConfigError, match=r"^data.shape H=12 is not divisible by 2\^3 for a 4-level video_unet"):
        tiny_model(TINY, shape=(4, 12, 16))
    with pytest.raises(ConfigError, match=r"^data.shape W=20 is not divisible by 2\^3 for a 4-level video_unet"):
        tiny_model(TINY, shape=(4, 16, 20))


def test_widths_that_8_heads_or_the_groups_do_not_divide_and_empty_levels_are_config_errors():
    with pytest.raises(ConfigError, match=r"^model.channels entry 12 is not divisible by the 8 attention heads"):
        tiny_model([*TINY, "model.channels=[8,12,12,12]"], shape=SHAPE)
    with pytest.raises(ConfigError, match=r"^model.channels entry 6 is not divisible by model.norm_num_groups=4"):
        tiny_model([*TINY, "model.channels=[6,16,16,16]"], shape=SHAPE)
    with pytest.raises(ConfigError, match=r"^model.num_res_blocks=\[1, 0, 1, 1\] must be"):  # compose says it first
        tiny_model([*TINY, "model.num_res_blocks=[1,0,1,1]"], shape=SHAPE)


def test_seed_size_matches_the_seed_dimension_table():
    """The seed's "U-Net Dimensions" table: decoder ResBlocks 1024->512, 1024->512, 768->256,
    384->128; 2, 2, 2 and 3 ResBlocks; attention at levels 1 and 2 both ways; 1024-wide time embedding."""
    model = _seed_unet()
    assert all(p.is_meta for p in model.parameters())
    first = [(level.res[0].conv1.in_channels, level.res[0].conv1.out_channels) for level in model.decoder]
    assert first == [(1024, 512), (1024, 512), (768, 256), (384, 128)]
    assert [len(level.res) for level in model.decoder] == [2, 2, 2, 3]
    assert [len(level.res) for level in model.encoder] == [2, 2, 2, 2]
    assert [level.attn is not None for level in model.encoder] == [False, True, True, False]
    assert [level.attn is not None for level in model.decoder] == [False, True, True, False]  # levels 3, 2, 1, 0
    assert [(d.conv.in_channels, d.conv.out_channels, d.conv.stride) for d in model.down] == [
        (128, 256, (1, 2, 2)),
        (256, 512, (1, 2, 2)),
        (512, 512, (1, 2, 2)),
    ]
    assert model.middle.res1.time.in_features == 1024
    assert (model.conv_in.in_channels, model.conv_out.out_channels) == (8, 4)


def test_parameter_count_at_seed_size_is_the_benchmarks():
    assert count_parameters(_seed_unet()) == SEED_UNET_PARAMS
    path = Path(__file__).parents[2] / "benchmarks" / "seed003_params.py"
    spec = importlib.util.spec_from_file_location("seed003_params", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    unet = bench.seed_unet()
    assert count_parameters(unet) == SEED_UNET_PARAMS
    assert sum(bench.unet_parts(unet).values()) == SEED_UNET_PARAMS


def test_temporal_attention_mixes_only_along_the_slices():
    """A change at one voxel moves the output of its own (h, w) column, at every slice, and nowhere else."""
    torch.manual_seed(0)
    block = _perturbed(TemporalAttention(16, "sdpa"))
    x = torch.randn(2, 16, 5, 3, 4)
    y = x.clone()
    # Not a constant: the block's LayerNorm removes a shift shared by all channels.
    y[1, :, 2, 1, 3] += torch.randn(16)  # sample 1, slice 2, column (h=1, w=3)
    with torch.no_grad():
        diff = (block(y) - block(x)).abs().amax(dim=1)  # (B, T, H, W)
    column = torch.zeros_like(diff, dtype=torch.bool)
    column[1, :, 1, 3] = True
    assert diff[~column].max().item() == 0.0
    assert diff[column].min().item() > 1e-4  # every slice of the column, not only the changed one


def test_spatial_attention_mixes_every_voxel():
    """The contrast: the spatial transformer's tokens are all T*H*W voxels, so one voxel moves all of them."""
    torch.manual_seed(0)
    block = _perturbed(SpatialTransformer3D(16, "sdpa"))
    x = torch.randn(1, 16, 3, 4, 4)
    y = x.clone()
    y[0, :, 2, 1, 3] += torch.randn(16)
    with torch.no_grad():
        diff = (block(y) - block(x)).abs().amax(dim=1)
    assert diff.min().item() > 1e-3


def test_grad_checkpointing_same_outputs_and_gradients():
    check_grad_checkpointing(TINY, shape=SHAPE, in_channels=4, out_channels=2)
