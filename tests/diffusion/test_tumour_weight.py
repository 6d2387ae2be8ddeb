"""Regional loss weighting (`training.tumour_weight`, the seeds' exp2c): the voxel weights of
docs/training.md, the loss they weight, a tiny training step, and the one-line refusals."""

import math

import numpy as np
import pytest
import torch

from voxgen.cli import main
from voxgen.diffusion.parts import build_parts, prediction_and_target
from voxgen.diffusion.strategies import RectifiedFlow, mse
from voxgen.diffusion.tumour_weight import REFERENCE_VOXELS, component_factors, tumour_weight_map
from voxgen.training.step import make_optimizer, train_step

from .tiny import SHAPE, learnable_batch, tiny_cfg


def _mask() -> torch.Tensor:
    """(1, 1, 12, 12, 12) in model space {-1, 1}: a one-voxel tumour, a 3x3x3 cube (27 voxels)
    and a 4x4x4 cube (64 voxels), apart from each other."""
    mask = -torch.ones(1, 1, 12, 12, 12)
    mask[0, 0, 1, 1, 1] = 1
    mask[0, 0, 5:8, 1:4, 1:4] = 1
    mask[0, 0, 6:10, 6:10, 6:10] = 1
    return mask


def test_the_weights_are_the_documented_ones():
    lam = 2.0
    w = tumour_weight_map(_mask(), lam)
    assert w.shape == (1, 1, 12, 12, 12) and w.dtype == torch.float32
    one, small, large = w[0, 0, 1, 1, 1].item(), w[0, 0, 6, 2, 2].item(), w[0, 0, 7, 7, 7].item()
    assert REFERENCE_VOXELS == 27
    assert one == pytest.approx(1 + lam * 3.0)  # (27 / 1)^(1/3) = 3: the largest weight there is
    assert small == pytest.approx(1 + lam)  # the reference volume
    assert large == pytest.approx(1 + lam * 0.75)  # (27 / 64)^(1/3) = 3/4
    assert one > small > large > 1
    tumour = _mask() > 0
    assert torch.all(w[~tumour] == 1)  # background
    assert torch.unique(w[tumour]).numel() == 3  # one weight per tumour


def test_tumours_are_26_connected_and_a_disk_mask_reads_the_same():
    mask = np.zeros((5, 5, 5))
    mask[1, 1, 1] = mask[2, 2, 2] = 1  # corner neighbours: one tumour of 2 voxels
    factors = component_factors(mask)
    assert factors[1, 1, 1] == factors[2, 2, 2] == pytest.approx((27 / 2) ** (1 / 3))
    assert torch.equal(tumour_weight_map((_mask() > 0).float(), 2.0), tumour_weight_map(_mask(), 2.0))
    assert torch.equal(tumour_weight_map(-torch.ones(2, 1, 4, 4, 4), 5.0), torch.ones(2, 1, 4, 4, 4))


def test_the_weighted_loss_is_the_hand_computed_one():
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 1, 12, 12, 12, generator=g), torch.randn(2, 1, 12, 12, 12, generator=g)
    mask = torch.cat([_mask(), -torch.ones(1, 1, 12, 12, 12)])  # the second sample has no tumour
    w = tumour_weight_map(mask, 2.0)
    err = ((prediction - target) ** 2).numpy().astype(np.float64)
    wn = w.numpy().astype(np.float64)
    per_sample = [(wn[b] * err[b]).sum() / wn[b].sum() for b in range(2)]
    assert per_sample[1] == pytest.approx(err[1].mean())  # no tumour: the plain mean
    assert mse(prediction, target, voxel_weight=w).item() == pytest.approx(np.mean(per_sample), rel=1e-5)
    sample_weight = torch.tensor([0.3, 2.0])  # min-SNR's (B,) weight multiplies each sample's
    expected = np.mean([0.3 * per_sample[0], 2.0 * per_sample[1]])
    assert mse(prediction, target, sample_weight, w).item() == pytest.approx(expected, rel=1e-5)
    flow = RectifiedFlow(min_snr_gamma=5.0)
    t = torch.tensor([0.2, 0.7])
    expected = np.mean(flow.min_snr_weight(t).numpy() * np.array(per_sample))
    assert flow.loss(prediction, target, t, voxel_weight=w).item() == pytest.approx(expected, rel=1e-5)


def test_tumour_weight_zero_is_todays_loss_bit_for_bit():
    cfg = tiny_cfg()
    assert cfg.training.tumour_weight == 0
    torch.manual_seed(0)
    parts = build_parts(cfg)
    batch = learnable_batch()
    assert parts.voxel_weight(batch) == {}
    loss = parts.loss(batch, torch.Generator().manual_seed(3))
    prediction, target, _ = prediction_and_target(parts, batch, torch.Generator().manual_seed(3))
    assert torch.equal(loss, torch.mean((prediction.float() - target.float()) ** 2))


@pytest.mark.parametrize("mode", ["bravo", "seg"])
def test_a_tiny_training_step_runs_with_tumour_weighting(mode):
    cfg = tiny_cfg(f"mode={mode}", "training.tumour_weight=2", "training.min_snr_gamma=5")
    torch.manual_seed(0)
    parts = build_parts(cfg)
    assert parts.tumour_weight == 2.0
    optimizer = make_optimizer(parts.model, cfg)
    batch, generator = learnable_batch(), torch.Generator().manual_seed(0)
    weighted = parts.loss(batch, torch.Generator().manual_seed(1))
    plain = parts.strategy.loss(*prediction_and_target(parts, batch, torch.Generator().manual_seed(1)))
    assert not torch.equal(weighted, plain)
    losses = [train_step(parts, optimizer, batch, generator, grad_clip=1.0).loss for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    meta = tumour_weight_map(torch.empty(4, 1, *SHAPE, device="meta"), 2.0)  # the memory planner's trace
    assert meta.device.type == "meta" and meta.shape == (4, 1, *SHAPE)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.tumour_weight=-1"], "training.tumour_weight=-1.0 must be at least 0 (0 disables tumour weighting)"),
        (
            ["training.tumour_weight=2", "mode=bravo_uncond"],
            "training.tumour_weight=2.0 needs the tumour mask, but mode 'bravo_uncond' has no mask modality (data.masks; "
            "generates bravo; conditions: none)",
        ),
        (
            ["training.tumour_weight=2", "space=s2d"],
            "training.tumour_weight=2.0 needs space=pixel: in space=s2d the mask is encoded and its voxels are not "
            "the loss's voxels (set training.tumour_weight=0)",
        ),
        (
            ["training.tumour_weight=2", "task=autoencoder", "model.name=autoencoder_kl"],
            "training.tumour_weight=2.0 weights the diffusion loss; task=autoencoder has none (set it to 0)",
        ),
    ],
    ids=["negative", "no-seg", "not-pixel", "autoencoder"],
)
def test_each_refusal_is_one_line(capsys, overrides, message):
    assert main(["train", "--dry-run", *overrides]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: {message}\n"
