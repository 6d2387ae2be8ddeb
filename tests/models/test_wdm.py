import pytest
import torch

from voxgen.config import compose
from voxgen.diffusion.parts import build_parts
from voxgen.errors import ConfigError
from voxgen.models.registry import MODELS, build_model, build_on_meta, count_parameters
from voxgen.models.wdm import haar_dwt3d, haar_idwt3d
from voxgen.training.step import make_optimizer, train_step

from .family_checks import synthetic_batch, tiny_cfg

# 3 levels: the (8, 8, 8) test volume -> sub-bands at 4^3 -> UNet levels at 4^3, 2^3, 1^3.
# Narrower UNets (8 or 16 channels for 8-16 sub-bands) learn too slowly for the 20-step check.
TINY = [
    "model.name=wdm",
    "model.channels=[32,32,32]",
    "model.attention_levels=[false,true,true]",
    "model.num_res_blocks=2",
    "model.num_head_channels=8",
    "model.norm_num_groups=8",
]

NO_ATTN = "[false,false,false,false,false]"
ATTN_34 = "[false,false,false,true,true]"
# Seed 000, "WDM-style Configs": bravo in wavelet space, 16 sub-band channels in, 8 out.
SEED_COUNTS = [
    ("WDM-128", [64, 128, 128, 256, 256], NO_ATTN, 74e6),
    ("WDM-128+attn34", [64, 128, 128, 256, 256], ATTN_34, 77e6),
    ("WDM-256", [64, 128, 256, 512, 512], NO_ATTN, 268e6),
    ("WDM-256+attn34", [64, 128, 256, 512, 512], ATTN_34, 279e6),
    ("WDM-256-wider", [64, 128, 256, 512, 1024], NO_ATTN, 639e6),
]


def _wdm_cfg(channels, attention, shape=(160, 128, 128)):
    return compose(
        [],
        [
            "model.name=wdm",
            f"model.channels={channels}",
            f"model.attention_levels={attention}",
            "model.num_res_blocks=2",
            "model.num_head_channels=32",
            f"data.shape={list(shape)}",
        ],
    )


def test_registry_lists_wdm():
    assert "wdm" in MODELS and MODELS["wdm"].summary


def test_haar_transform_is_orthonormal_and_inverts_exactly():
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    bands = haar_dwt3d(x)
    assert bands.shape == (2, 24, 2, 3, 4)
    assert torch.allclose(haar_idwt3d(bands), x, atol=1e-12)
    assert torch.allclose(bands.norm(), x.norm(), atol=1e-10)
    # Channel 8c is the LLL band of input channel c: the block sum / 2^1.5.
    assert torch.allclose(bands[:, 8, 0, 0, 0], x[:, 1, :2, :2, :2].sum(dim=(-3, -2, -1)) / 2**1.5)


def test_constant_volume_has_only_the_low_band():
    bands = haar_dwt3d(torch.full((1, 1, 4, 4, 4), 0.5))
    assert torch.allclose(bands[:, 0], torch.full((1, 2, 2, 2), 0.5 * 2**1.5))
    assert bands[:, 1:].abs().max().item() == 0.0


def test_pixel_loss_equals_the_wavelet_space_loss():
    """The rectified-flow loss of IDWT(UNet(DWT x_t)) against noise - x0 equals the loss of the
    UNet on transformed x_t against transformed targets: wdm in pixel space is diffusion in
    wavelet space."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(TINY).model, 1, 1, (8, 8, 8), False).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x0, noise = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, 8, dtype=torch.float64)
        t = torch.tensor([0.3, 0.8], dtype=torch.float64).view(-1, 1, 1, 1, 1)
        x_t = (1 - t) * x0 + t * noise
        model_t = 1000 * t.flatten()
        pixel = ((model(x_t, model_t) - (noise - x0)) ** 2).mean()
        z0, z_noise = haar_dwt3d(x0), haar_dwt3d(noise)
        z_t = (1 - t) * z0 + t * z_noise
        wavelet = ((model.unet(z_t, model_t) - (z_noise - z0)) ** 2).mean()
    assert pixel.item() > 0.1
    assert abs(pixel.item() - wavelet.item()) < 1e-10


def test_trains_on_the_8_subbands_of_one_channel():
    """mode=seg: one channel in and out, so the UNet sees exactly the 8 Haar sub-bands."""
    cfg = tiny_cfg(TINY, extra=["mode=seg"])
    torch.manual_seed(0)
    parts = build_parts(cfg)
    seen = []
    parts.model.unet.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, out.shape)))
    optimizer = make_optimizer(parts.model, cfg)
    batch, generator = synthetic_batch((8, 8, 8)), torch.Generator().manual_seed(0)
    losses = [train_step(parts, optimizer, batch, generator, grad_clip=1.0).loss for _ in range(20)]
    assert seen[0] == ((2, 8, 4, 4, 4), (2, 8, 4, 4, 4))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("label,channels,attention,expected", SEED_COUNTS, ids=[c[0] for c in SEED_COUNTS])
def test_parameter_counts_match_the_seeds(label, channels, attention, expected):
    """Bravo (2 in, 1 out) at 160x128x128: the UNet sees 16 sub-bands in, 8 out."""
    got = count_parameters(build_on_meta(_wdm_cfg(channels, attention).model, 2, 1, (160, 128, 128)))
    print(f"{label}: {got / 1e6:.2f}M vs {expected / 1e6:.0f}M ({100 * (got - expected) / expected:+.2f}%)")
    # The seeds print whole millions, so 1% covers their rounding.
    assert got == pytest.approx(expected, rel=0.01)


def test_shape_must_divide_by_transform_and_levels():
    with pytest.raises(ConfigError, match=r"data.shape D=80 is not divisible by 2\^5=32: wdm halves it once"):
        _wdm_cfg([64, 128, 128, 256, 256], NO_ATTN, shape=(80, 128, 128))


def test_attention_at_early_levels_is_refused():
    with pytest.raises(ConfigError, match=r"attention at level\(s\) \[2\]; wdm allows it only at the two deepest"):
        _wdm_cfg([64, 128, 128, 256, 256], "[false,false,true,true,true]")
