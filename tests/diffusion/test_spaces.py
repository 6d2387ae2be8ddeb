"""The s2d and wavelet spaces: exact inverses, the documented channel order, fitted sub-band
normalisation, its state, and the shape checks."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from voxgen.diffusion.spaces import (
    SPACES,
    PixelSpace,
    S2DSpace,
    WaveletSpace,
    build_space,
    decode_channels,
    encode_channels,
    pixel_unshuffle3d,
)
from voxgen.errors import ConfigError
from voxgen.models.wdm import haar_dwt3d

SHAPES = [(1, [2, 2, 2]), (3, [4, 6, 8]), (2, [32, 48, 40]), (5, [2, 4, 2])]


def volumes(batch: int, shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, D, H, W) uniform in [-1, 1], the range of images in model space."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, *shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def smooth_plus_noise(batch: int, shape=(8, 12, 10), seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """(B, 1, D, H, W): a bright smooth ramp plus 1e-3 noise, so LLL spreads ~1000x more than HHH."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, s, dtype=torch.float64) for s in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    ramp = 0.4 * zz + 0.3 * yy + 0.2 * xx  # (D, H, W)
    brightness = 0.1 + 0.8 * torch.rand(batch, 1, 1, 1, 1, generator=g, dtype=torch.float64)
    noise = 1e-3 * torch.randn(batch, 1, *shape, generator=g, dtype=torch.float64)
    return (brightness * ramp + noise).to(dtype)


def fitted(modalities=("bravo",), shape=(4, 6, 8)) -> WaveletSpace:
    space = WaveletSpace()
    space.fit({m: volumes(3, shape, seed=i) for i, m in enumerate(modalities)} | {"case": ["a", "b", "c"]} for _ in range(2))
    return space


# --- s2d ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,shape", SHAPES)
def test_s2d_inverts_exactly(batch, shape):
    space = S2DSpace()
    x = volumes(batch, shape)
    z = space.encode(x, "bravo")
    assert z.shape == (batch, 8, *space.shape(shape))
    assert torch.equal(space.decode(z, "bravo"), x)


def test_s2d_channel_order_is_block_offset_d_h_w():
    # Documented: z[b, 4 i + 2 j + l, d, h, w] = x[b, 0, 2 d + i, 2 h + j, 2 w + l].
    x = torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(1, 1, 4, 6, 8)
    z = S2DSpace().encode(x, "bravo")
    assert z[0, 4 * 1 + 2 * 0 + 1, 1, 2, 3].item() == 183.0  # x[0, 0, 3, 4, 7] = 3 * 48 + 4 * 8 + 7
    assert z[0, 0, 0, 0, 0].item() == 0.0 and z[0, 7, 0, 0, 0].item() == 1 * 48 + 1 * 8 + 1


def test_s2d_order_is_the_sub_band_order_of_the_haar_transform():
    # haar_dwt3d = the 8x8 orthonormal Haar matrix (H x H x H) / 2^1.5 applied to the s2d channels.
    x = volumes(2, [4, 6, 8], dtype=torch.float64)
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    haar = torch.kron(torch.kron(h, h), h) / 2**1.5  # row k = 4 i + 2 j + l: band (i, j, l)
    assert torch.allclose(torch.einsum("kc,bcdhw->bkdhw", haar, pixel_unshuffle3d(x)), haar_dwt3d(x), atol=1e-12)


# --- wavelet -----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,shape", SHAPES)
def test_fitted_wavelet_inverts_to_1e6_in_fp32(batch, shape):
    space = WaveletSpace()
    space.fit([{"bravo": smooth_plus_noise(3, shape, dtype=torch.float32), "case": ["a", "b", "c"]}])
    x = volumes(batch, shape, seed=1)
    z = space.encode(x, "bravo")
    assert z.shape == (batch, 8, *space.shape(shape)) and z.dtype == torch.float32
    assert (space.decode(z, "bravo") - x).abs().max().item() < 1e-6


@pytest.mark.parametrize("space", [S2DSpace(), fitted(("bravo", "seg"))], ids=["s2d", "wavelet"])
def test_channels_of_two_modalities_encode_each_on_its_own_and_invert(space):
    x = torch.cat([volumes(3, [4, 6, 8], seed=5), 0.5 * volumes(3, [4, 6, 8], seed=6)], dim=1)  # (B, 2, D, H, W)
    z = encode_channels(space, x, ["bravo", "seg"])
    assert z.shape == (3, 16, 2, 3, 4)
    assert torch.equal(z[:, 8:], space.encode(x[:, 1:2], "seg"))
    assert (decode_channels(space, z, ["bravo", "seg"]) - x).abs().max().item() < 1e-6


def test_wavelet_codes_each_sub_band_to_mean_0_and_std_1_over_the_fit_data():
    batches = [{"bravo": smooth_plus_noise(b, seed=b), "case": [f"c{i}" for i in range(b)]} for b in (1, 2, 3)]
    raw = haar_dwt3d(torch.cat([b["bravo"] for b in batches])).transpose(0, 1).reshape(8, -1)
    assert raw[0].std() / raw[7].std() > 100  # the premise: raw sub-bands differ by orders of magnitude

    space = WaveletSpace()
    space.fit(iter(batches))  # streamed: a one-pass iterator, batches of different sizes
    codes = torch.cat([space.encode(b["bravo"], "bravo") for b in batches]).transpose(0, 1).reshape(8, -1)
    assert codes.mean(dim=1).abs().max().item() < 1e-6
    assert (codes.std(dim=1, correction=0) - 1).abs().max().item() < 1e-5


def test_wavelet_with_identity_statistics_is_the_haar_transform():
    space = WaveletSpace()
    space.load_state_dict({"bravo": {"shift": [0.0] * 8, "scale": [1.0] * 8}})
    x = volumes(2, [4, 6, 8])
    assert torch.equal(space.encode(x, "bravo"), haar_dwt3d(x))


def test_wavelet_state_round_trips_through_json():
    space = fitted(("bravo", "seg"))
    state = json.loads(json.dumps(space.state_dict()))
    assert sorted(state) == ["bravo", "seg"]
    assert all(len(state[m]["shift"]) == len(state[m]["scale"]) == 8 for m in state)
    assert state["bravo"]["shift"] != state["seg"]["shift"]  # per modality

    loaded = WaveletSpace()
    loaded.load_state_dict(state)
    x = volumes(2, [4, 6, 8], seed=9)
    for modality in ("bravo", "seg"):
        z = space.encode(x, modality)
        assert torch.equal(loaded.encode(x, modality), z)
        assert torch.equal(loaded.decode(z, modality), space.decode(z, modality))


def test_constant_mask_gives_finite_codes_and_decodes_back():
    mask = torch.full((2, 1, 4, 6, 8), -1.0)
    space = WaveletSpace()
    space.fit([{"seg": mask, "case": ["a", "b"]}])
    assert min(space.state_dict()["seg"]["scale"]) > 0
    z = space.encode(mask, "seg")
    assert torch.isfinite(z).all() and z.abs().max().item() < 1e-2
    assert (space.decode(z, "seg") - mask).abs().max().item() < 1e-6


def test_wavelet_before_fit_raises():
    space, x = WaveletSpace(), volumes(1, [2, 2, 2])
    with pytest.raises(RuntimeError, match="before fit"):
        space.encode(x, "bravo")
    with pytest.raises(RuntimeError, match="before fit"):
        space.decode(torch.zeros(1, 8, 1, 1, 1), "bravo")
    with pytest.raises(RuntimeError, match="before fit"):
        space.state_dict()


def test_wavelet_refuses_a_modality_it_was_not_fitted_on():
    with pytest.raises(KeyError, match="t1_gd"):
        fitted(("bravo",)).encode(volumes(1, [2, 2, 2]), "t1_gd")


GOOD = {"shift": [0.0] * 8, "scale": [1.0] * 8}


@pytest.mark.parametrize(
    "state",
    [
        {},
        [GOOD],
        {"bravo": [0.0] * 8},
        {"bravo": {"shift": [0.0] * 8}},
        {"bravo": {**GOOD, "extra": 1}},
        {"bravo": {**GOOD, "shift": [0.0] * 7}},
        {"bravo": {**GOOD, "scale": [1.0] * 7 + [0.0]}},
        {"bravo": {**GOOD, "scale": [1.0] * 7 + [-1.0]}},
        {"bravo": {**GOOD, "shift": [0.0] * 7 + [math.nan]}},
        {"bravo": {**GOOD, "shift": [0.0] * 7 + ["0"]}},
        {"bravo": {**GOOD, "shift": [0.0] * 7 + [True]}},
        {"bravo": GOOD, "seg": {**GOOD, "scale": [1.0] * 7 + [math.inf]}},
    ],
)
def test_wavelet_refuses_malformed_state_and_keeps_its_own(state):
    space = fitted(("bravo",))
    before = space.state_dict()
    with pytest.raises(ValueError, match="wavelet space state"):
        space.load_state_dict(state)
    assert space.state_dict() == before


def test_wavelet_fit_without_volumes_is_refused():
    with pytest.raises(ValueError, match="without any volume"):
        WaveletSpace().fit([{"case": ["a"]}])


# --- shapes and registry -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["s2d", "wavelet"])
@pytest.mark.parametrize("shape,axis", [([33, 48, 40], "D=33"), ([32, 47, 40], "H=47"), ([32, 48, 41], "W=41")])
def test_check_names_the_odd_axis_in_one_line(name, shape, axis):
    space = SPACES[name](None)
    with pytest.raises(ConfigError) as error:
        space.check(shape)
    message = str(error.value)
    assert message == f"data.shape={shape}: {axis} is not divisible by 2 (space={name} halves every axis)"
    with pytest.raises(ConfigError, match=axis):
        space.shape(shape)


@pytest.mark.parametrize("name", ["s2d", "wavelet"])
def test_check_passes_even_sizes_and_shape_halves_them(name):
    space = SPACES[name](None)
    space.check([32, 48, 40])
    assert space.shape([32, 48, 40]) == (16, 24, 20)
    assert space.latent_channels == 8


def test_pixel_check_accepts_any_size():
    PixelSpace().check([33, 47, 41])


@pytest.mark.parametrize("name,cls", [("pixel", PixelSpace), ("s2d", S2DSpace), ("wavelet", WaveletSpace)])
def test_build_space_picks_by_name(name, cls):
    space = build_space(SimpleNamespace(space=SimpleNamespace(name=name)))
    assert isinstance(space, cls) and space.name == name
