"""The seed-003 VAE (`voxgen.models.video_vae`): 8x in H and W, every slice kept, deterministic."""

import pytest
import torch

from voxgen.errors import ConfigError
from voxgen.models.registry import MODELS, count_parameters
from voxgen.models.video_vae import DownsampleBlock, ResBlock3D, UpsampleBlock, build_video_vae

TINY = {"channels": (8, 16, 16, 16), "in_channels": 3, "latent_channels": 4, "num_res_blocks": 2, "norm_num_groups": 4}
# benchmarks/seed003_params.py at the seed's sizes; the seed prints 86M + 86M = 172M.
SEED_ENCODER, SEED_DECODER = 85_950_980, 86_003_459


def _tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_video_vae(**{**TINY, **kwargs})


def _seed_vae():
    with torch.device("meta"):
        return build_video_vae()


def test_factor_and_shapes_keep_the_slices():
    vae = _tiny()
    assert vae.factor == (1, 8, 8)
    x = torch.randn(2, 3, 5, 16, 24)  # 5 slices: no power of two needed along T
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (2, 4, 5, 2, 3)
        assert vae.decode(z).shape == x.shape
        assert vae(x).shape == x.shape
    assert _tiny(channels=(8, 16)).factor == (1, 2, 2)


def test_every_block_keeps_t_and_resamples_only_h_and_w():
    vae = _tiny()
    seen = []
    blocks = [m for m in vae.modules() if isinstance(m, (ResBlock3D, DownsampleBlock, UpsampleBlock))]
    hooks = [m.register_forward_hook(lambda m, i, out: seen.append((type(m).__name__, tuple(out.shape[2:])))) for m in blocks]
    with torch.no_grad():
        vae(torch.randn(1, 3, 4, 16, 16))
    for hook in hooks:
        hook.remove()
    # Encoder: 3 x (2 ResBlocks, Downsample), 2 middle; decoder: 2 middle, 3 x (Upsample, 2 ResBlocks).
    assert len(seen) == 9 + 2 + 2 + 9
    assert {t for _, (t, _, _) in seen} == {4}
    sizes = [h for _, (_, h, _) in seen]
    assert sizes == [16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2] + [2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16]


def test_deterministic_no_mean_or_log_variance():
    """The encoder's output is the latent itself: 4 channels, the same on every call."""
    vae = _tiny()
    x = torch.randn(1, 3, 4, 16, 16)
    with torch.no_grad():
        a, b = vae.encode(x), vae.encode(x)
    assert a.shape[1] == 4 and torch.equal(a, b)
    assert vae.encoder.conv_out.out_channels == 4 and vae.encoder.conv_out.kernel_size == (1, 1, 1)


def test_grad_checkpointing_same_outputs_and_gradients():
    plain, ckpt = _tiny(), _tiny(grad_checkpointing=True)
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    assert any(type(m).__name__.startswith("Checkpointed") for m in ckpt.modules())
    x = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for vae in (plain, ckpt):
        out = vae(x)
        loss = (out**2).mean()
        loss.backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in vae.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert (out_a - out_b).abs().max().item() <= 1e-6
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_h_or_w_not_divisible_is_a_config_error():
    vae = _tiny()
    with pytest.raises(ConfigError, match=r"^video_vae input H=12 is not divisible by 8"):
        vae.encode(torch.randn(1, 3, 4, 12, 16))
    with pytest.raises(ConfigError, match=r"^video VAE channels entry 6 is not divisible by norm_num_groups=4"):
        _tiny(channels=(6, 16))


def test_seed_size_layers_and_parameter_counts():
    """The seed's tables: widths 128 -> 256 -> 512 -> 512 by (3, 4, 4) / (1, 2, 2) convolutions, and back."""
    vae = _seed_vae()
    assert all(p.is_meta for p in vae.parameters())
    downs = [m.conv for m in vae.encoder.modules() if isinstance(m, DownsampleBlock)]
    ups = [m.conv for m in vae.decoder.modules() if isinstance(m, UpsampleBlock)]
    assert [(c.in_channels, c.out_channels) for c in downs] == [(128, 256), (256, 512), (512, 512)]
    assert [(c.in_channels, c.out_channels) for c in ups] == [(512, 512), (512, 256), (256, 128)]
    assert {(c.kernel_size, c.stride, c.padding) for c in downs + ups} == {((3, 4, 4), (1, 2, 2), (1, 1, 1))}
    assert (vae.encoder.conv_in.in_channels, vae.decoder.conv_in.in_channels, vae.decoder.conv_out.out_channels) == (3, 4, 3)
    assert count_parameters(vae.encoder) == SEED_ENCODER
    assert count_parameters(vae.decoder) == SEED_DECODER
    assert count_parameters(vae) == SEED_ENCODER + SEED_DECODER


def test_not_a_registry_family():
    assert "video_vae" not in MODELS
