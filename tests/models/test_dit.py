import csv
import time

import pytest
import torch

from voxgen.errors import ConfigError
from voxgen.models.registry import MODELS, build_on_meta, count_parameters
from voxgen.models.transformer import sincos_embedding_3d

from .family_checks import REFERENCE, cached_cfg, tiny_model

# Variant S's heads (6) with a narrow, shallow stack: the real S takes minutes per check on 2 CPU cores.
TINY = ["model.name=dit", "model.variant=S", "model.patch_size=2", "model.hidden_size=96", "model.depth=2"]


_cfg = cached_cfg


def _tiny(*extra, **kwargs):
    return tiny_model(TINY, *extra, **kwargs)


def test_registry_lists_dit_and_sit():
    assert MODELS["dit"].summary and MODELS["sit"].summary
    assert MODELS["dit"].summary != MODELS["sit"].summary
    assert MODELS["dit"].factory is MODELS["sit"].factory


def test_parameter_counts_match_the_seed_table():
    """Every row of the seeds' DiT profile (S/B/L/XL, latent and pixel, patch 2/4/8) to 0.5%."""
    table = REFERENCE / "dit3d_a100.csv"
    if not table.is_file():
        pytest.skip(f"reference table {table} is absent (the shared folder sits next to the repository)")
    rows = list(csv.DictReader(table.open()))
    assert len(rows) > 100
    errors = []
    for row in rows:
        cfg = _cfg("model.name=dit", f"model.variant={row['variant']}", f"model.patch_size={row['patch']}")
        shape = (int(row["D"]), int(row["H"]), int(row["W"]))
        model = build_on_meta(cfg.model, int(row["in_channels"]), int(row["out_channels"]), shape)
        assert model.pos_embed.shape[1] == int(row["tokens"])
        got = count_parameters(model) / 1e6
        errors.append((abs(got - float(row["params_m"])) / float(row["params_m"]), row, got))
    worst, row, got = max(errors, key=lambda e: e[0])
    print(
        f"worst DiT row: {row['variant']} {row['space']} {row['D']}x{row['H']}x{row['W']} p={row['patch']}: "
        f"{got:.2f}M vs {row['params_m']}M ({100 * worst:.3f}%)"
    )
    assert worst < 0.005


def test_xl_builds_on_meta_quickly():
    """DiT-XL/8 at 160x256x256 (20,480 tokens): no initialisation work on meta tensors."""
    cfg = _cfg("model.name=dit", "model.variant=XL", "model.patch_size=8")
    start = time.perf_counter()
    model = build_on_meta(cfg.model, 1, 1, (160, 256, 256))
    elapsed = time.perf_counter() - start
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == pytest.approx(698.4e6, rel=0.005)
    assert elapsed < 10.0, elapsed


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_patch_sizes_round_trip_the_shape(patch):
    model = _tiny(f"model.patch_size={patch}", shape=(8, 16, 8), in_channels=3, out_channels=2)
    assert model.pos_embed.shape == (1, (8 // patch) * (16 // patch) * (8 // patch), 96)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 16, 8), torch.tensor([500.0])).shape == (1, 2, 8, 16, 8)


def test_positions_are_learnable_and_start_as_sincos():
    model = _tiny()
    assert model.pos_embed.requires_grad
    assert torch.equal(model.pos_embed.detach()[0], sincos_embedding_3d(96, (4, 4, 4)))


def test_adaln_zero_starts_at_zero_output_and_patches_do_not_mix():
    """adaLN-Zero: the untrained net predicts exactly 0 and every block is the identity.

    With identity blocks only the per-token final layer sees a patch, so perturbing it and
    changing one input patch must change exactly that output patch: unpatchify puts every
    token back where PatchEmbed took it from."""
    model = _tiny("model.patch_size=4", shape=(8, 8, 8), in_channels=1, out_channels=1)
    x, t = torch.randn(1, 1, 8, 8, 8), torch.tensor([250.0])
    with torch.no_grad():
        assert model(x, t).abs().max().item() == 0.0
        model.final_layer.linear.weight.normal_(0, 0.1)
        model.final_layer.adaLN_modulation[-1].weight.normal_(0, 0.1)
        y = x.clone()
        y[..., 0:4, 0:4, 4:8] += 1.0
        delta = (model(y, t) - model(x, t)).abs()
    assert delta[..., 0:4, 0:4, 4:8].min() > 0
    delta[..., 0:4, 0:4, 4:8] = 0
    assert delta.max().item() == 0.0


def test_unknown_variant_is_a_clear_error():
    # Refused when the config is composed, before any model is built.
    with pytest.raises(ConfigError, match=r"model.variant='XXL' is not a DiT variant; use one of S, B, L, XL"):
        _cfg("model.name=dit", "model.variant=XXL")


def test_shape_not_divisible_by_patch_is_a_clear_error():
    cfg = _cfg("model.name=sit", "model.variant=S", "model.patch_size=8")
    with pytest.raises(ConfigError, match=r"data.shape D=20 is not divisible by model.patch_size=8"):
        build_on_meta(cfg.model, 1, 1, (20, 32, 32))


def test_width_override_must_divide_by_the_heads():
    with pytest.raises(ConfigError, match=r"model.hidden_size=100 is not divisible by the 6 heads of variant S"):
        _cfg("model.name=dit", "model.variant=S", "model.hidden_size=100")


def test_qk_norm_is_on_by_default_and_can_be_switched_off():
    on, off = _tiny(), _tiny("model.qk_norm=false")
    assert isinstance(on.blocks[0].attn.q_norm, torch.nn.LayerNorm)
    assert on.blocks[0].attn.q_norm.normalized_shape == (96 // 6,)  # per head
    assert isinstance(off.blocks[0].attn.k_norm, torch.nn.Identity)
    assert count_parameters(on) - count_parameters(off) == 2 * 4 * (96 // 6)  # 2 blocks x 2 norms x (w, b)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(qk_norm):
    from voxgen.models.transformer import Attention

    torch.manual_seed(0)
    x = torch.randn(2, 10, 32)
    attn = Attention(32, 4, qk_norm=qk_norm)
    before = attn(x)
    with torch.no_grad():  # qkv's output rows are [q | k | v], each head-major
        attn.qkv.weight[:64] *= 10
        attn.qkv.bias[:64] *= 10
    after = attn(x)
    assert torch.allclose(before, after, atol=1e-4) == qk_norm
