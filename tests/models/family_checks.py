"""Checks every model family must pass, shared by the per-family test files.

Each takes config overrides that make a tiny model of the family (CPU, seconds).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from voxgen.config import compose
from voxgen.diffusion.generate import generate
from voxgen.diffusion.parts import build_parts
from voxgen.diffusion.samplers import parse_solver
from voxgen.models.registry import build_model
from voxgen.training.step import make_optimizer, train_step

# The seeds' measured tables, in shared/ beside the repository.
REFERENCE = Path(__file__).parents[3] / "shared" / "reference"


@functools.cache
def cached_cfg(*overrides):
    """A config of the schema's defaults plus `overrides`, composed once per distinct call."""
    return compose([], list(overrides))


def tiny_model(tiny, *extra, shape=(8, 8, 8), in_channels=2, out_channels=1, seed=0):
    """A seeded model of the family that the `tiny` overrides (plus `extra`) describe."""
    torch.manual_seed(seed)
    return build_model(cached_cfg(*tiny, *extra).model, in_channels, out_channels, shape, False)


def tiny_cfg(overrides, shape=(8, 8, 8), extra=()):
    return compose([], [f"data.shape={list(shape)}", "training.lr=1e-3", "training.batch_size=2", *overrides, *extra])


def synthetic_batch(shape, batch=2, seed=0):
    """A learnable bravo batch: a smooth blob whose brightness follows the mask."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = shape
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = torch.exp(-(zz**2 + yy**2 + xx**2) * 2)
    seg = torch.where(torch.rand(batch, 1, d, h, w, generator=g) > 0.8, 1.0, -1.0)
    bravo = (blob * 1.5 - 0.7).expand(batch, 1, d, h, w) + 0.2 * seg
    return {"bravo": bravo.clamp(-1, 1), "seg": seg}


def check_trains_and_samples(overrides, shape=(8, 8, 8), steps=20, extra=()):
    """20 steps on a fixed batch: the loss falls; a sample has the data's shape."""
    cfg = tiny_cfg(overrides, shape, extra)
    torch.manual_seed(0)
    parts = build_parts(cfg)
    optimizer = make_optimizer(parts.model, cfg)
    batch = synthetic_batch(shape)
    generator = torch.Generator().manual_seed(0)
    losses = [train_step(parts, optimizer, batch, generator, grad_clip=1.0).loss for _ in range(steps)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    out = generate(parts, [0], batch["seg"][:1], solver=parse_solver("euler:3")).volumes
    assert out.shape == (1, 1, *shape) and torch.isfinite(out).all()
    return losses


def _loss_and_grads(model, in_channels, out_channels, shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, in_channels, *shape, generator=g)
    target = torch.randn(2, out_channels, *shape, generator=g)
    # Zero-initialised output layers would hide most gradients: perturb every weight.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    loss = ((model(x, torch.tensor([100.0, 700.0])) - target) ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_grad_checkpointing(overrides, shape=(8, 8, 8), in_channels=2, out_channels=1):
    """Loss and every gradient are the same with and without checkpointing; names are the same."""
    cfg = tiny_cfg(overrides, shape)
    torch.manual_seed(0)
    plain = build_model(cfg.model, in_channels, out_channels, shape, grad_checkpointing=False)
    torch.manual_seed(0)
    ckpt = build_model(cfg.model, in_channels, out_channels, shape, grad_checkpointing=True)
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    loss_a, grads_a = _loss_and_grads(plain, in_channels, out_channels, shape)
    loss_b, grads_b = _loss_and_grads(ckpt, in_channels, out_channels, shape)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def check_attention_kinds_agree(overrides, shape=(8, 8, 8), in_channels=2, out_channels=1):
    """`model.attention=sdpa` and `naive` give the same outputs to 1e-4 in fp32."""
    cfg_s = tiny_cfg(overrides, shape, ["model.attention=sdpa"])
    cfg_n = tiny_cfg(overrides, shape, ["model.attention=naive"])
    sdpa = build_model(cfg_s.model, in_channels, out_channels, shape, False)
    naive = build_model(cfg_n.model, in_channels, out_channels, shape, False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in sdpa.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    naive.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, in_channels, *shape, generator=g)
    t = torch.tensor([3.0, 800.0])
    with torch.no_grad():
        a, b = sdpa(x, t), naive(x, t)
    assert (a - b).abs().max().item() < 1e-4


def check_channels(overrides, shape=(8, 8, 8)):
    """1 to 16 input channels."""
    for in_channels in (1, 16):
        cfg = tiny_cfg(overrides, shape)
        model = build_model(cfg.model, in_channels, 1, shape, False)
        with torch.no_grad():
            assert model(torch.randn(1, in_channels, *shape), torch.tensor([10.0])).shape == (1, 1, *shape)


def check_vector_conditioning(tiny, shape=(8, 8, 8)):
    """Built with a condition vector (mode=seg_conditioned), a network starts out ignoring it (the
    embedding's last layer is zero), depends on it once that layer is not zero, refuses a call
    without it, and a network built without one refuses a vector."""
    torch.manual_seed(0)
    model = build_model(cached_cfg(*tiny).model, 1, 1, shape, False, vector_size=7).eval()
    x, t = torch.randn(2, 1, *shape, generator=torch.Generator().manual_seed(1)), torch.full((2,), 500.0)
    a, b = torch.zeros(2, 7), torch.rand(2, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x, t, a), model(x, t, b))
        embeddings = [m for m in model.modules() if type(m).__name__ == "VectorEmbedding"]
        assert len(embeddings) == 1
        # Zero-initialised output layers (adaLN-Zero, MONAI's last convolution) hide every input
        # at init: move all weights off their initial values.
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        assert (model(x, t, a) - model(x, t, b)).abs().max() > 1e-4
        try:
            model(x, t)
        except ValueError:
            pass
        else:
            raise AssertionError("a network built with a vector ran without one")
        plain = build_model(cached_cfg(*tiny).model, 1, 1, shape, False).eval()
        try:
            plain(x, t, a)
        except (ValueError, TypeError):
            pass
        else:
            raise AssertionError("a network built without a vector took one")
