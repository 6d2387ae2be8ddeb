"""task=autoencoder: the batch layout, the one-scalar GAN objective, the losses, config errors, and
both families overfitting one volume."""

import numpy as np
import pytest
import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import resnet10

from tiny_autoencoder import SHAPE, tiny_autoencoder_cfg
from voxgen.errors import ConfigError
from voxgen.tasks.autoencoder import build_autoencoder_task
from voxgen.tasks.autoencoder_losses import least_squares, ssim_loss, ssim_window


def _cfg(name="autoencoder_kl", **keys):
    return tiny_autoencoder_cfg(name, **keys)


def _task(name="autoencoder_kl", seed=0, **keys):
    torch.manual_seed(seed)
    return build_autoencoder_task(_cfg(name, **keys), "cpu", training=True)


def _phantom(seed=0) -> torch.Tensor:
    """A smooth volume in [-1, 1]: a bright ball off-centre on a ramp, (1, 1, D, H, W)."""
    d, h, w = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    centre = torch.rand(3, generator=torch.Generator().manual_seed(seed)) * 0.6 - 0.3
    ball = ((d - centre[0]) ** 2 + (h - centre[1]) ** 2 + (w - centre[2]) ** 2 < 0.35).float()
    return (0.3 * w + 1.2 * ball - 0.6).clamp(-1, 1)[None, None]


def _batch(items=2):
    bravo = torch.cat([_phantom(i) for i in range(items)])
    seg = torch.where(bravo > 0, 1.0, -1.0)
    return {"bravo": bravo, "seg": seg, "case": [f"case{i}" for i in range(items)]}


def test_modalities_are_separate_samples_stacked_on_the_batch_axis():
    task = _task()
    assert task.modalities == ("bravo", "seg")
    batch = _batch(items=2)
    with torch.no_grad():
        loss, reconstruction, target = task.evaluate(batch, None)
    assert reconstruction.shape == target.shape == (4, 1, *SHAPE)
    assert torch.equal(target[:2], batch["bravo"]) and torch.equal(target[2:], batch["seg"])
    assert loss.item() == pytest.approx((reconstruction - target).abs().mean().item())


def test_evaluate_is_deterministic_and_preview_shows_the_first_items_first_modality():
    task = _task()
    batch = _batch()
    with torch.no_grad():
        first, second = task.evaluate(batch, None), task.evaluate(batch, None)
    assert torch.equal(first[1], second[1])
    reconstruction, real = task.preview(batch, seed=0)
    assert isinstance(reconstruction, np.ndarray) and reconstruction.shape == real.shape == SHAPE
    np.testing.assert_array_equal(real, batch["bravo"][0, 0].numpy())
    np.testing.assert_allclose(reconstruction, first[1][0, 0].numpy(), atol=1e-4)  # batch of 1 vs 4: float sums differ


def test_loss_is_the_weighted_sum_of_its_terms():
    weights = {"autoencoder.l1_weight": 0.7, "autoencoder.ssim_weight": 0.3, "autoencoder.kl_weight": 0.01}
    task = _task(**weights, **{"autoencoder.adversarial_weight": 0.1})
    batch = _batch()
    loss = task.loss(batch, torch.Generator().manual_seed(5), step=0)
    t = task.terms(batch, torch.Generator().manual_seed(5), step=0)
    assert set(t) == {"l1", "ssim", "regulariser", "generator", "discriminator"}
    expected = 0.7 * t["l1"] + 0.3 * t["ssim"] + 0.01 * t["regulariser"] + 0.1 * t["generator"] + t["discriminator"]
    torch.testing.assert_close(loss, expected)
    assert loss.dtype == torch.float32


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def test_one_backward_gives_each_network_the_gradient_of_its_own_objective():
    task = _task(**{"autoencoder.adversarial_weight": 0.5, "autoencoder.kl_weight": 1e-3})
    ae, disc = task.model.autoencoder, task.model.discriminator
    batch, w = _batch(), task.weights

    task.model.zero_grad()
    task.loss(batch, torch.Generator().manual_seed(7), step=0).backward()
    together_ae, together_disc = _grads(ae), _grads(disc)

    # The two objectives, each on its own (same noise): the autoencoder's ...
    task.model.zero_grad()
    t = task.terms(batch, torch.Generator().manual_seed(7), step=0)
    (w.l1 * t["l1"] + w.ssim * t["ssim"] + w.regulariser * t["regulariser"] + w.adversarial * t["generator"]).backward()
    alone_ae = _grads(ae)
    # ... and the discriminator's.
    task.model.zero_grad()
    task.terms(batch, torch.Generator().manual_seed(7), step=0)["discriminator"].backward()
    alone_disc = _grads(disc)

    assert any(g.abs().sum() > 0 for g in alone_disc) and any(g.abs().sum() > 0 for g in alone_ae)
    for together, alone in zip(together_ae + together_disc, alone_ae + alone_disc):
        torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-6)


def test_generator_term_alone_moves_no_discriminator_weight():
    task = _task(**{"autoencoder.adversarial_weight": 1.0})
    task.terms(_batch(), torch.Generator().manual_seed(0), step=0)["generator"].backward()
    assert all(p.grad is None for p in task.model.discriminator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.autoencoder.parameters())


def test_adversarial_terms_start_at_adversarial_start():
    task = _task(**{"autoencoder.adversarial_weight": 1.0, "autoencoder.adversarial_start": 3})
    assert set(task.terms(_batch(), None, step=2)) == {"l1", "ssim", "regulariser"}
    assert {"generator", "discriminator"} <= set(task.terms(_batch(), None, step=3))
    assert _task().model.discriminator is None  # adversarial_weight 0: no discriminator to train or store


@pytest.mark.parametrize("real", [True, False])
def test_least_squares_equals_monais_patch_adversarial_loss(real):
    logits = torch.randn(2, 1, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 2
    reference = PatchAdversarialLoss(criterion="least_squares")(logits, target_is_real=real, for_discriminator=not real)
    torch.testing.assert_close(least_squares(logits, real), reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["autoencoder_kl", "vqvae"])
def test_loss_traces_on_meta_tensors(name):
    # The memory planner traces the step on meta tensors: every term, the adversarial ones included, must run there.
    with torch.device("meta"):
        task = build_autoencoder_task(_cfg(name, **{"autoencoder.adversarial_weight": 0.1}), "meta")
    batch = {m: torch.empty(2, 1, *SHAPE, device="meta") for m in task.modalities}
    loss = task.loss(batch, None, step=0)
    loss.backward()
    assert loss.is_meta and loss.shape == ()
    assert all(p.grad is not None for p in task.model.discriminator.parameters())


def test_with_model_wraps_another_copy():
    task = _task()
    other = _task(seed=1).model
    copy = task.with_model(other)
    assert copy.model is other and copy.weights == task.weights and copy.modalities == task.modalities
    with torch.no_grad():
        assert not torch.equal(copy.evaluate(_batch(), None)[1], task.evaluate(_batch(), None)[1])


def test_bf16_mixed_keeps_the_losses_in_float32():
    task = _task("vqvae", **{"training.precision": "bf16-mixed"})
    loss = task.loss(_batch(), None, step=0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, *SHAPE, generator=generator) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    reference = metrics.structural_similarity(
        x[0, 0].double().numpy(),
        y[0, 0].double().numpy(),
        data_range=2.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim_loss(y, x).item() == pytest.approx(1 - reference, abs=1e-5)


def test_ssim_of_tiny_volumes_shrinks_its_window():
    assert ssim_window((16, 8, 5)) == (11, 7, 5)
    x = _phantom()[..., :8, :5]
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert ssim_loss(x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), x).item() > 0.05


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"model.name": "unet"}, r"model.name='unet' is not an autoencoder: task=autoencoder takes one of autoencoder_kl, vqvae"),
        ({"data.shape": [16, 16, 14]}, r"data.shape W=14 is not divisible by autoencoder.factor W=4"),
        ({"autoencoder.modalities": []}, r"autoencoder.modalities is empty"),
        (
            {"autoencoder.adversarial_weight": 0.1, "autoencoder.discriminator_layers": 3},
            r"data.shape D=16 is too small for the patch discriminator of autoencoder.discriminator_layers=3: it needs D >= 24",
        ),
        ({"autoencoder.perceptual_weight": 0.1}, r"perceptual loss needs autoencoder.perceptual_weights"),
        (
            {"autoencoder.perceptual_weight": 0.1, "autoencoder.perceptual_weights": "/nonexistent/resnet_10.pth"},
            r"autoencoder.perceptual_weights=/nonexistent/resnet_10.pth: no such file",
        ),
    ],
)
def test_impossible_configs_are_one_line_config_errors(keys, message):
    with pytest.raises(ConfigError, match=message) as error:
        build_autoencoder_task(_cfg(**keys), "cpu", training=True)
    assert "\n" not in str(error.value)


def test_perceptual_loss_reads_a_local_medicalnet_checkpoint(tmp_path):
    # MedicalNet's layout: {"state_dict": {"module.conv1.weight": ...}}; random weights stand in for the real ones.
    torch.manual_seed(0)
    backbone = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", bias_downsample=False)
    path = tmp_path / "resnet_10_23dataset.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in backbone.state_dict().items()}}, path)
    task = _task(**{"autoencoder.perceptual_weight": 0.5, "autoencoder.perceptual_weights": str(path)})
    torch.testing.assert_close(task.perceptual.net.conv1.weight, backbone.conv1.weight)
    x = _phantom()
    assert task.perceptual(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert task.perceptual(x, x.flip(-1)).item() > 1e-3
    t = task.terms(_batch(), None, step=0)
    assert "perceptual" in t and not any(p.requires_grad for p in task.perceptual.parameters())
    assert all(not name.startswith("perceptual") for name in task.model.state_dict())  # not checkpointed

    torch.save({"state_dict": {"conv1.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"not a MedicalNet ResNet-10 checkpoint"):
        _task(**{"autoencoder.perceptual_weight": 0.5, "autoencoder.perceptual_weights": str(tmp_path / "other.pth")})


@pytest.mark.parametrize("name", ["autoencoder_kl", "vqvae"])
def test_overfits_one_volume(name):
    # 8^3 keeps it to a few seconds on one CPU thread; both families are at ~1/6 of the start by step 60.
    keys = {"autoencoder.modalities": ["bravo"], "autoencoder.ssim_weight": 0.0, "data.shape": [8, 8, 8]}
    task = _task(name, **keys)
    batch = {"bravo": _phantom()[..., ::2, ::2, ::2].contiguous(), "case": ["case0"]}
    optimizer = torch.optim.Adam(task.model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    def l1() -> float:
        with torch.no_grad():
            return task.evaluate(batch, None)[0].item()

    start = l1()
    for step in range(60):
        optimizer.zero_grad()
        task.loss(batch, generator, step).backward()
        optimizer.step()
    assert l1() <= start / 3, (start, l1())
