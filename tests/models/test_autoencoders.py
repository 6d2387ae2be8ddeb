"""KL autoencoder and VQ-VAE on MONAI: latent geometry per axis, determinism, regularisers, config errors;
the rules every compression model shares (voxgen.models.compression) and the registry of all of them."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from tiny_autoencoder import tiny_autoencoder_cfg
from voxgen.errors import ConfigError
from voxgen.models import autoencoders
from voxgen.models.autoencoders import AUTOENCODERS, KLAutoencoder, VQAutoencoder, build_autoencoder, kl_divergence
from voxgen.models.compression import check_autoencoder_shape, check_factor, res_blocks_per_level, stage_strides
from voxgen.models.dcae import DCAE3D

SHAPE = (16, 16, 16)


def _cfg(**model):
    return tiny_autoencoder_cfg(attention=True, **model)


def _build(family, seed=0, **keys):
    cfg = _cfg(**keys)
    torch.manual_seed(seed)
    return AUTOENCODERS[family](cfg.model, cfg.autoencoder)


def _volume(batch=2, seed=0):
    return torch.rand(batch, 1, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("family", ["autoencoder_kl", "vqvae"])
@pytest.mark.parametrize("factor", [[4, 4, 4], [1, 4, 4], [2, 1, 4]])
def test_latent_and_reconstruction_shapes_per_axis(family, factor):
    ae = _build(family, **{"autoencoder.factor": factor})
    x = _volume()
    z = ae.encode(x)
    latent = tuple(n // f for n, f in zip(SHAPE, factor))
    assert z.shape == (2, 3, *latent)
    assert ae.latent_channels == 3 and ae.factor == tuple(factor)
    assert ae.decode(z).shape == x.shape
    reconstruction, regulariser = ae(x, torch.Generator().manual_seed(0))
    assert reconstruction.shape == x.shape and regulariser.ndim == 0 and regulariser.dtype == torch.float32


@pytest.mark.parametrize("family", ["autoencoder_kl", "vqvae"])
def test_encode_is_deterministic_and_forward_follows_the_generator(family):
    ae = _build(family)
    x = _volume()
    assert torch.equal(ae.encode(x), ae.encode(x))
    state = {k: v.clone() for k, v in ae.state_dict().items()}
    first, reg_first = ae(x, torch.Generator().manual_seed(3))
    ae.load_state_dict(state)  # a VQ forward in training mode moves the codebook's EMA
    second, reg_second = ae(x, torch.Generator().manual_seed(3))
    assert torch.equal(first, second) and torch.equal(reg_first, reg_second)


def test_kl_sample_depends_on_the_seed_and_centres_on_the_mean():
    ae = _build("autoencoder_kl")
    x = _volume()
    a, _ = ae(x, torch.Generator().manual_seed(1))
    b, _ = ae(x, torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)
    # sigma -> 0 makes the sample the posterior mean: forward reconstructs like decode(encode(x)).
    with torch.no_grad():
        ae.net.quant_conv_log_sigma.conv.weight.zero_()
        ae.net.quant_conv_log_sigma.conv.bias.fill_(-30.0)
    c, _ = ae(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(c, ae.decode(ae.encode(x)), atol=1e-5, rtol=0)


def test_kl_regulariser_equals_the_closed_form():
    mu = torch.full((2, 3, 2, 2, 2), 0.5)
    mu[1] = -1.0
    sigma = torch.full((2, 3, 2, 2, 2), 2.0)
    sigma[1] = 0.25
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1) / 2 - log s per latent value; 24 values per sample.
    per_sample = [24 * ((0.25 + 4.0 - 1) / 2 - math.log(2.0)), 24 * ((1.0 + 0.0625 - 1) / 2 - math.log(0.25))]
    assert kl_divergence(mu, sigma).item() == pytest.approx(sum(per_sample) / 2, rel=1e-6)


def test_kl_forward_returns_the_kl_of_its_posterior():
    ae = _build("autoencoder_kl")
    x = _volume()
    _, regulariser = ae(x, torch.Generator().manual_seed(0))
    mu, sigma = ae.moments(x)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0, 1))
    torch.testing.assert_close(regulariser, reference.flatten(1).sum(1).mean(), rtol=1e-5, atol=1e-5)


def test_vq_code_only_holds_codebook_vectors_and_encode_leaves_the_codebook():
    ae = _build("vqvae")
    assert isinstance(ae, VQAutoencoder)
    codebook = ae.quantizer.embedding.weight.detach().clone()  # (num_embeddings, latent_channels)
    z = ae.encode(_volume())  # (B, C, D', H', W')
    vectors = z.movedim(1, -1).reshape(-1, z.shape[1])
    distances = torch.cdist(vectors, codebook)  # (N, num_embeddings)
    assert distances.min(dim=1).values.max().item() == 0.0
    assert torch.equal(ae.quantizer.embedding.weight, codebook)
    ae(_volume())  # a training forward updates the codebook (EMA): the test above can tell
    assert not torch.equal(ae.quantizer.embedding.weight, codebook)


def test_vq_codebook_starts_on_encodings_and_dead_codes_come_back_instead_of_blowing_up():
    """MONAI's EMA update divides a code's running sum by its cluster size plus ~epsilon: a code no
    encoding picks grew to norms of ~1e5 and stayed dead (the cohort VQ-VAE used 1 code of 512). The
    first training forward puts every code on an encoding of the batch, and codes that fall out of
    use are put back on one."""
    ae = _build("vqvae")
    x = _volume(batch=1)
    ae(x, torch.Generator().manual_seed(0))
    encodings = ae.net.encode(x).detach().movedim(1, -1).reshape(-1, ae.latent_channels)
    codebook = ae.quantizer.embedding.weight
    # Every code is one of the batch's encodings (the EMA step moved it by 1% towards its cluster's mean).
    near = torch.cdist(codebook, encodings).min(dim=1).values
    assert near.max() < 0.05 * encodings.norm(dim=1).max()
    # The same input for many steps: most codes fall out of use; they must stay near the data.
    for step in range(600):
        ae(x, torch.Generator().manual_seed(step))
    norms = ae.quantizer.embedding.weight.norm(dim=1)
    assert norms.max() < 2 * encodings.norm(dim=1).max()
    assert (ae.quantizer.ema_cluster_size >= autoencoders.VQ_DEAD_CODE_SIZE).all()


def test_vq_loss_is_the_commitment_term():
    ae = _build("vqvae", **{"autoencoder.commitment_cost": 0.5})
    ae.eval()  # no EMA move, so the code below is the one forward used
    x = _volume()
    _, loss = ae(x)
    expected = 0.5 * torch.nn.functional.mse_loss(ae.encode(x), ae.net.encode(x))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    ("family", "keys", "message"),
    [
        # The factor and num_res_blocks rules are check_factor's and res_blocks_per_level's (tested below): one
        # case each shows a family applies them to its own levels.
        ("autoencoder_kl", {"autoencoder.factor": [8, 8, 8]}, r"needs 4 levels in model.channels for model.name=autoencoder_kl"),
        ("vqvae", {"autoencoder.factor": [1, 2, 2]}, r"needs 2 levels in model.channels for model.name=vqvae .* of 4$"),
        ("autoencoder_kl", {"model.norm_num_groups": 16}, r"model.channels=\[8, 16, 16\] must all be multiples of model.norm"),
        ("autoencoder_kl", {"model.attention_levels": [False, True]}, r"model.attention_levels=.* one entry per level"),
        ("autoencoder_kl", {"model.num_res_blocks": [1, 2]}, r"model.num_res_blocks=\[1, 2\] needs one count per level"),
        ("vqvae", {"model.num_res_blocks": [1, 2, 2]}, r"model.name=vqvae takes one count for every level"),
    ],
)
def test_bad_geometry_is_a_one_line_config_error(family, keys, message):
    with pytest.raises(ConfigError, match=message) as error:
        _build(family, **keys)
    assert "\n" not in str(error.value)


# ---- the shared rules (voxgen.models.compression) -----------------------------------------------


def test_stage_strides_halve_an_axis_while_it_needs_halving():
    assert stage_strides([1, 4, 4], 2) == [(1, 2, 2), (1, 2, 2)]
    assert stage_strides([1, 8, 8], 3) == [(1, 2, 2)] * 3
    assert stage_strides([2, 8, 4], 3) == [(2, 2, 2), (1, 2, 2), (1, 2, 1)]
    assert stage_strides([2, 4, 8], 3) == [(2, 2, 2), (1, 2, 2), (1, 1, 2)]
    assert stage_strides([16, 32, 32], 5) == [(2, 2, 2)] * 4 + [(1, 2, 2)]


def test_check_factor_returns_the_factor_per_axis():
    assert check_factor([1, 8, 8], 4, "vqvae") == (1, 8, 8)
    assert check_factor(OmegaConf.create([2, 4, 4]), 3, "dcae") == (2, 4, 4)
    assert check_factor((1, 1, 1), 1, "dcae") == (1, 1, 1)


@pytest.mark.parametrize(
    ("factor", "levels", "message"),
    [
        ([3, 4, 4], 3, r"^autoencoder.factor=\[3, 4, 4\] must be three powers of two >= 1, one per axis"),
        ([0, 4, 4], 3, r"autoencoder.factor=\[0, 4, 4\] must be three powers of two"),
        ([4, 4], 3, r"autoencoder.factor=\[4, 4\] must be three powers of two"),
        ([4, 4, 4, 4], 3, r"autoencoder.factor=\[4, 4, 4, 4\] must be three powers of two"),
        ([True, 4, 4], 3, r"must be three powers of two"),
        ([4.0, 4, 4], 3, r"must be three powers of two"),
        (4, 3, r"autoencoder.factor=\[4\] must be three powers of two"),
        (
            [8, 8, 8],
            3,
            r"needs 4 levels in model.channels for model.name=fam .* but model.channels has 3: "
            r"give model.channels 4 entries or use a largest factor of 4$",
        ),
        ([1, 4, 4], 4, r"needs 3 levels in model.channels .* has 4: give model.channels 3 entries or use a largest factor of 8$"),
    ],
)
def test_check_factor_is_a_one_line_config_error(factor, levels, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_factor(factor, levels, "fam")
    assert "\n" not in str(error.value)


def test_shape_not_divisible_names_the_axis():
    check_autoencoder_shape([16, 48, 40], [1, 8, 8])
    check_autoencoder_shape([160, 256, 256], (16, 32, 32))
    cases = [
        ([16, 48, 36], [1, 8, 8], r"^data.shape W=36 is not divisible by autoencoder.factor W=8: .*\(e.g. 32 or 40\)$"),
        ([8, 20, 16], [1, 8, 8], r"^data.shape H=20 is not divisible by autoencoder.factor H=8: use a multiple of 8"),
        ([4, 16, 16], [8, 8, 8], r"^data.shape D=4 .* \(e.g. 8\)$"),  # no multiple below: one example
        ([8, 16, 16], [1, 6, 8], r"^autoencoder.factor=\[1, 6, 8\] must be three powers of two"),
        ([8, 16], [1, 8, 8], r"^data.shape=\[8, 16\] must be three sizes"),
    ]
    for shape, factor, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            check_autoencoder_shape(shape, factor)
        assert "\n" not in str(error.value)


def test_res_blocks_per_level_takes_one_count_or_one_per_level():
    assert res_blocks_per_level(2, 3) == [2, 2, 2]
    assert res_blocks_per_level(0, 2) == [0, 0]  # 0: no blocks at that level
    assert res_blocks_per_level([0, 2, 1], 3) == [0, 2, 1]
    assert res_blocks_per_level(OmegaConf.create([1, 2]), 2) == [1, 2]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ([1, 2], r"\[1, 2\]"),
        ([1, 2, 3, 4], r"\[1, 2, 3, 4\]"),
        ([1, -1, 1], r"\[1, -1, 1\]"),
        (-1, "-1"),
        (1.5, "1.5"),
        (True, "True"),
        ("2", "2"),
        ([1, 2.5, 1], r"\[1, 2.5, 1\]"),
    ],
)
def test_res_blocks_per_level_refuses_other_counts(value, shown):
    with pytest.raises(
        ConfigError, match=rf"^model.num_res_blocks={shown} needs one count per level of model.channels \(3\)"
    ) as error:
        res_blocks_per_level(value, 3)
    assert "\n" not in str(error.value)


# ---- the registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["autoencoder_kl", "vqvae", "dcae"])
def test_build_autoencoder_builds_every_name_with_the_shared_interface(name):
    cfg = _cfg(**{"model.name": name, "autoencoder.latent_channels": 4, "autoencoder.factor": [1, 4, 4]})
    torch.manual_seed(0)
    ae = build_autoencoder(cfg.model, cfg.autoencoder)
    assert isinstance(ae, {"autoencoder_kl": KLAutoencoder, "vqvae": VQAutoencoder, "dcae": DCAE3D}[name])
    assert ae.latent_channels == 4 and ae.factor == (1, 4, 4)
    x = _volume()
    z = ae.encode(x)
    assert z.shape == (2, 4, 16, 4, 4)
    assert ae.decode(z).shape == x.shape
    reconstruction, regulariser = ae(x, torch.Generator().manual_seed(0))
    assert reconstruction.shape == x.shape and regulariser.ndim == 0 and regulariser.dtype == torch.float32


def test_build_autoencoder_passes_grad_checkpointing(monkeypatch):
    calls = []
    monkeypatch.setitem(AUTOENCODERS, "recorder", lambda model_cfg, ae_cfg, **kwargs: calls.append(kwargs) or "built")
    cfg = _cfg(**{"model.name": "recorder"})
    assert build_autoencoder(cfg.model, cfg.autoencoder, grad_checkpointing=True) == "built"
    assert build_autoencoder(cfg.model, cfg.autoencoder) == "built"
    assert calls == [{"grad_checkpointing": True}, {"grad_checkpointing": False}]


def test_build_autoencoder_refuses_an_unknown_name():
    cfg = _cfg(**{"model.name": "unet"})
    with pytest.raises(
        ConfigError, match=r"^model.name='unet' is not an autoencoder: choose one of autoencoder_kl, vqvae, dcae$"
    ):
        build_autoencoder(cfg.model, cfg.autoencoder)


def test_registry_names_every_family_and_the_task_check_stays_importable():
    assert list(AUTOENCODERS) == ["autoencoder_kl", "vqvae", "dcae"]
    assert autoencoders.check_autoencoder_shape is check_autoencoder_shape  # voxgen.tasks.autoencoder imports it there
