import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from voxgen.errors import ConfigError
from voxgen.models.compression import check_autoencoder_shape, stage_strides
from voxgen.models.dcae import DCAE3D, SEED_COMPRESSIONS, build_dcae, channel_to_space, space_to_channel

CONFIGS = Path(__file__).parents[2] / "configs"

# Counted on the meta device; docs/dcae.md prints the same numbers.
SEED_PARAMS = {"f32c32": 292_916_001, "f64c128": 366_362_497, "f128c512": 447_771_905}


def _build(channels, factor, latent_channels=4, num_res_blocks=1, norm_num_groups=4, **kwargs) -> DCAE3D:
    model_cfg = SimpleNamespace(channels=channels, num_res_blocks=num_res_blocks, norm_num_groups=norm_num_groups)
    return build_dcae(model_cfg, SimpleNamespace(latent_channels=latent_channels, factor=factor), **kwargs)


def _build_setting(setting) -> DCAE3D:
    channels, num_res_blocks = list(setting.channels), list(setting.num_res_blocks)
    return _build(channels, list(setting.factor), setting.latent_channels, num_res_blocks, setting.norm_num_groups)


def _zero_convs(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.zero_()
                module.bias.zero_()


# Reference shortcuts written with strided slicing, independently of the module's reshapes.


def _offsets(stride):
    return list(itertools.product(*[range(s) for s in stride]))


def _ref_s2c(x, stride):
    sd, sh, sw = stride
    parts = [x[:, :, a::sd, b::sh, k::sw] for a, b, k in _offsets(stride)]
    return torch.stack(parts, dim=2).flatten(1, 2)  # channel-major, then offsets


def _ref_c2s(y, stride):
    sd, sh, sw = stride
    r = sd * sh * sw
    b, cr, d, h, w = y.shape
    out = y.new_empty(b, cr // r, d * sd, h * sh, w * sw)
    for i, (a, bb, k) in enumerate(_offsets(stride)):
        out[:, :, a::sd, bb::sh, k::sw] = y[:, i::r]
    return out


def _ref_avg(x, out_channels):
    g = x.shape[1] // out_channels
    return torch.stack([x[:, j * g : (j + 1) * g].mean(dim=1) for j in range(out_channels)], dim=1)


def _ref_dup(x, out_channels):
    g = out_channels // x.shape[1]
    return torch.stack([x[:, j // g] for j in range(out_channels)], dim=1)


def _ref_encode(x, channels, factor, latent_channels):
    h = _ref_dup(x, channels[0])
    for width, stride in zip(channels[1:], stage_strides(factor, len(channels) - 1)):
        h = _ref_avg(_ref_s2c(h, stride), width)
    return _ref_avg(h, latent_channels)


def _ref_decode(z, channels, factor):
    h = _ref_dup(z, channels[-1])
    for width, stride in reversed(list(zip(channels[:-1], stage_strides(factor, len(channels) - 1)))):
        h = _ref_c2s(_ref_dup(h, width * stride[0] * stride[1] * stride[2]), stride)
    return _ref_avg(h, 1)


def _phantom(n=16):
    """An ellipsoid with an intensity ramp and a bright lesion, in [-1, 1]."""
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, n)] * 3, indexing="ij")
    ball = ((zz / 0.8) ** 2 + (yy / 0.6) ** 2 + (xx / 0.7) ** 2 < 1).float()
    lesion = ((zz - 0.2) ** 2 + (yy + 0.2) ** 2 + (xx - 0.1) ** 2 < 0.08).float()
    return ((ball * (0.3 + 0.4 * xx) + 0.6 * lesion) * 2 - 1)[None, None]


@pytest.mark.parametrize(
    "factor, channels",
    [([4, 4, 4], [4, 8, 8]), ([1, 4, 4], [4, 8, 8]), ([2, 4, 4], [4, 8, 8]), ([2, 2, 2], [4, 8]), ([8, 2, 4], [4, 8, 8, 8])],
)
def test_encode_decode_shapes_and_zero_regulariser(factor, channels):
    torch.manual_seed(0)
    model = _build(channels, factor)
    assert model.factor == tuple(factor) and model.latent_channels == 4
    x = torch.randn(2, 1, *[2 * f for f in factor])
    z = model.encode(x)
    assert z.shape == (2, 4, 2, 2, 2)
    assert torch.equal(z, model.encode(x))  # deterministic
    assert model.decode(z).shape == x.shape
    reconstruction, regulariser = model(x, generator=torch.Generator().manual_seed(0))
    assert reconstruction.shape == x.shape
    assert regulariser.shape == () and regulariser.item() == 0.0


def test_space_to_channel_is_pixel_unshuffle_in_3d_and_inverts():
    x = torch.randn(2, 3, 4, 6, 8)
    stride = (2, 3, 2)
    y = space_to_channel(x, stride)
    assert torch.equal(y, _ref_s2c(x, stride))
    assert torch.equal(channel_to_space(y, stride), x)
    assert torch.equal(channel_to_space(y, stride), _ref_c2s(y, stride))
    flat = torch.randn(2, 3, 1, 6, 8)  # one slice: PyTorch's 2D definition
    assert torch.equal(space_to_channel(flat, (1, 2, 2))[:, :, 0], F.pixel_unshuffle(flat[:, :, 0], 2))


@pytest.mark.parametrize(
    "channels, factor, latent_channels",
    [
        ([4, 8, 16], [2, 4, 4], 4),
        # Widths where averaging groups span several input channels and duplication repeats several times.
        ([4, 16, 8], [2, 2, 4], 2),
    ],
)
def test_zeroed_network_is_its_shortcuts(channels, factor, latent_channels):
    torch.manual_seed(0)
    model = _build(channels, factor, latent_channels=latent_channels)
    _zero_convs(model)
    x = torch.randn(2, 1, *[2 * f for f in factor])
    z = model.encode(x)
    assert torch.allclose(z, _ref_encode(x, channels, factor, latent_channels), atol=1e-6)
    # The channel mean of the latent is the block average of x.
    assert torch.allclose(z.mean(dim=1, keepdim=True), F.avg_pool3d(x, factor), atol=1e-6)
    latent = torch.randn(2, latent_channels, 2, 2, 2)
    assert torch.allclose(model.decode(latent), _ref_decode(latent, channels, factor), atol=1e-6)
    # A latent equal across channels decodes to its nearest-neighbour upsampling.
    flat = latent[:, :1].expand(-1, latent_channels, -1, -1, -1)
    assert torch.allclose(model.decode(flat), F.interpolate(latent[:, :1], scale_factor=factor, mode="nearest"), atol=1e-6)


@pytest.mark.parametrize("name", sorted(SEED_COMPRESSIONS))
def test_seed_settings_build_on_meta_with_pinned_counts(name):
    setting = SEED_COMPRESSIONS[name]
    with torch.device("meta"):
        model = _build_setting(setting)
        z = model.encode(torch.empty(1, 1, 160, 256, 256))
    assert next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) == SEED_PARAMS[name]
    grid = 256 // int(name[1 : name.index("c")])
    assert z.shape == (1, setting.latent_channels, 10, grid, grid)


@pytest.mark.parametrize("name", sorted(SEED_COMPRESSIONS))
def test_presets_match_seed_settings(name):
    setting = SEED_COMPRESSIONS[name]
    cfg = yaml.safe_load((CONFIGS / f"dcae_{name}.yaml").read_text())
    assert cfg["task"] == "autoencoder" and cfg["model"]["name"] == "dcae"
    assert cfg["model"]["channels"] == list(setting.channels)
    assert cfg["model"]["num_res_blocks"] == list(setting.num_res_blocks)
    assert cfg["model"]["norm_num_groups"] == setting.norm_num_groups
    assert cfg["autoencoder"]["latent_channels"] == setting.latent_channels
    assert cfg["autoencoder"]["factor"] == list(setting.factor)
    check_autoencoder_shape(cfg["data"]["shape"], cfg["autoencoder"]["factor"])


@pytest.mark.parametrize(
    "channels, factor, latent_channels, num_res_blocks, keys",
    [
        # The factor and num_res_blocks rules are voxgen.models.compression's (tested in test_autoencoders.py):
        # one case each shows the DC-AE applies them to its own levels.
        ([4, 8, 8], [3, 4, 4], 4, 1, ["autoencoder.factor"]),
        ([4, 8, 8], [8, 8, 8], 4, 1, ["autoencoder.factor", "model.name=dcae", "model.channels 4 entries"]),
        ([4, 6, 8], [1, 4, 4], 4, 1, ["model.channels", "model.norm_num_groups"]),
        ([4, 8, 12], [1, 4, 4], 8, 1, ["autoencoder.latent_channels", "model.channels"]),
        ([4, 24], [1, 1, 2], 4, 1, ["model.channels", "autoencoder.factor"]),
        ([4, 8, 8], [1, 4, 4], 4, [1, 1], ["model.num_res_blocks"]),
    ],
)
def test_bad_configs_raise_one_line(channels, factor, latent_channels, num_res_blocks, keys):
    with pytest.raises(ConfigError) as info:
        _build(channels, factor, latent_channels, num_res_blocks)
    message = str(info.value)
    assert "\n" not in message
    for key in keys:
        assert key in message


def test_encode_checks_the_shape():
    model = _build([4, 8, 8], [1, 4, 4])
    with pytest.raises(ConfigError, match="data.shape W=6 is not divisible by autoencoder.factor W=4"):
        model.encode(torch.zeros(1, 1, 4, 8, 6))


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(1, 1, 4, 8, 8)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = _build([4, 8, 8], [1, 4, 4], grad_checkpointing=checkpointing)
        model(x)[0].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_tiny_dcae_overfits_one_volume():
    torch.manual_seed(0)
    model = _build([4, 8, 8], [4, 4, 4], latent_channels=8, num_res_blocks=0)
    x = _phantom()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        reconstruction, regulariser = model(x)
        loss = (reconstruction - x).abs().mean() + regulariser
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] / losses[-1] >= 5, losses[::10]
