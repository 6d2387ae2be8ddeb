"""model.name=xray2ct (seed 004): shapes, geometry, the presets' parameter counts, checkpointing, the seed's
three memory fixes and the config section's errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from voxgen.errors import ConfigError
from voxgen.models.registry import MODELS, count_parameters
from voxgen.models.xray2ct import (
    ResidualDenseBlock,
    StageConfig,
    XRay2CT,
    XRay2CTConfig,
    backproject,
    build_xray2ct,
    xray2ct_config,
)

CONFIGS = Path(__file__).parents[2] / "configs"
# preset -> (output size, X-ray size), as each file's header states.
PRESETS = {
    "xray2ct_256_before_fixes.yaml": (256, 512),
    "xray2ct_256_after_fixes.yaml": (256, 512),
    "xray2ct_128.yaml": (128, 512),
    "xray2ct_cpu.yaml": (32, 64),
}


def preset(name: str):
    return OmegaConf.load(CONFIGS / name).xray2ct


# ---- parameter count from the architecture as documented, independent of the module ------------


def _conv(k: int, cin: int, cout: int, dims: int = 3) -> int:
    return k**dims * cin * cout + cout


def _rdb(c: int, growth: int, layers: int) -> int:
    return sum(_conv(3, c + i * growth, growth) for i in range(layers)) + _conv(1, c + layers * growth, c)


def expected_params(cfg: XRay2CTConfig) -> int:
    gn = 2  # GroupNorm: a weight and a bias per channel
    widths = [1, *cfg.encoder_channels, cfg.xray_features]
    encoder = sum(_conv(3, a, b, dims=2) + gn * b for a, b in zip(widths[:-1], widths[1:]))
    total = encoder * (1 if cfg.shared_encoder else 2)
    total += _conv(3, cfg.xray_features, cfg.initial_channels) + gn * cfg.initial_channels
    c_in = cfg.initial_channels
    for s in cfg.stages:
        total += _conv(3, c_in, s.channels) + gn * s.channels + s.rdb_blocks * _rdb(s.channels, s.growth, s.rdb_layers)
        if s.fuse_xray:
            total += _conv(1, s.channels + cfg.xray_features, s.channels) + gn * s.channels
        c_in = s.channels
    skips = cfg.stages[:-1] if cfg.skip_channels else ()
    total += sum(_conv(1, s.channels, cfg.skip_channels) for s in skips)
    total += _conv(3, c_in + cfg.skip_channels * len(skips), cfg.fusion_channels) + gn * cfg.fusion_channels
    if cfg.refine == "rdb":
        return total + _rdb(cfg.fusion_channels, cfg.refine_growth, cfg.refine_layers) + _conv(1, cfg.fusion_channels, 1)
    refine = [cfg.fusion_channels, *cfg.refine_channels]
    total += sum(_conv(3, a, b) + gn * b for a, b in zip(refine[:-1], refine[1:]))
    return total + _conv(1, refine[-1], 1)


def meta_params(section, output_size: int, xray_size: int) -> int:
    with torch.device("meta"):
        model = build_xray2ct(section, output_size, xray_size, grad_checkpointing=False)
    assert all(p.is_meta for p in model.parameters())
    return count_parameters(model)


def saved_activation_bytes(model: torch.nn.Module, xray: torch.Tensor) -> int:
    """Bytes the forward pass keeps for backward (parameters excluded), each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(xray).sum()
    return sum(kept.values())


# ---- shapes and geometry ------------------------------------------------------------------------


def test_cpu_preset_maps_two_views_to_a_volume_and_learns_from_both():
    torch.manual_seed(0)
    model = build_xray2ct(preset("xray2ct_cpu.yaml"), 32, 64, grad_checkpointing=False)
    xray = torch.randn(2, 2, 64, 64)
    out = model(xray)
    assert out.shape == (2, 1, 32, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    with torch.no_grad():
        for view in (0, 1):  # either view alone changes the volume
            changed = xray.clone()
            changed[:, view] += 1.0
            assert (model(changed) - out).abs().max() > 1e-4, view
    with pytest.raises(ValueError, match=r"takes \(B, 2, X, X\)"):
        model(torch.randn(2, 1, 64, 64))


def test_backprojection_repeats_ap_along_h_and_lateral_along_w():
    views = torch.zeros(1, 2, 1, 4, 4)
    views[0, 0, 0, 1, 2] = 1.0  # AP: row 1 (D), column 2 (W)
    views[0, 1, 0, 3, 0] = 1.0  # lateral: row 3 (D), column 0 (H)
    vol = backproject(views, 4)[0, 0]  # (D, H, W)
    expected = torch.zeros(4, 4, 4)
    expected[1, :, 2] += 0.5  # the AP pixel's ray runs along H
    expected[3, 0, :] += 0.5  # the lateral pixel's ray runs along W
    assert torch.equal(vol, expected)
    # Resized to the grid first: a constant map stays constant whether it grows or shrinks.
    const = torch.full((1, 2, 3, 8, 8), 2.0)
    for size in (4, 16):
        assert torch.allclose(backproject(const, size), torch.full((1, 3, size, size, size), 2.0))


def test_separate_encoders_double_the_encoder():
    cfg = xray2ct_config(preset("xray2ct_cpu.yaml"))
    shared, separate = XRay2CT(cfg), XRay2CT(dataclasses.replace(cfg, shared_encoder=False))
    assert len(shared.encoders) == 1 and len(separate.encoders) == 2
    assert count_parameters(separate) - count_parameters(shared) == count_parameters(shared.encoders[0])
    assert separate(torch.randn(1, 2, 64, 64)).shape == (1, 1, 32, 32, 32)


# ---- presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_on_meta_with_the_documented_parameter_count(name):
    text = (CONFIGS / name).read_text()
    assert text.startswith("# Seed 004"), name
    loaded = OmegaConf.load(CONFIGS / name)
    assert loaded.task == "regress" and loaded.model.name == "xray2ct"
    output_size, xray_size = PRESETS[name]
    got = meta_params(loaded.xray2ct, output_size, xray_size)
    print(f"{name}: {got:,d} parameters")
    assert got == expected_params(xray2ct_config(loaded.xray2ct))


def test_default_section_is_the_before_fixes_preset_and_the_cpu_preset_is_small():
    assert xray2ct_config({}) == xray2ct_config(preset("xray2ct_256_before_fixes.yaml")) == XRay2CTConfig()
    assert meta_params(preset("xray2ct_cpu.yaml"), 32, 64) < 300_000
    # The 128^3 network is the 256^3 one (before fixes) without its last stage.
    short = dataclasses.replace(XRay2CTConfig(), stages=XRay2CTConfig().stages[:3])
    assert xray2ct_config(preset("xray2ct_128.yaml")) == short


def test_section_may_be_a_dict_a_dictconfig_or_a_dataclass():
    raw = OmegaConf.to_container(preset("xray2ct_cpu.yaml"))
    from_dict = xray2ct_config(raw)
    assert xray2ct_config(OmegaConf.create(raw)) == from_dict
    assert xray2ct_config(from_dict) == from_dict
    assert from_dict.stages[2] == StageConfig(channels=16)


# ---- the seed's three fixes ---------------------------------------------------------------------

BEFORE = xray2ct_config(preset("xray2ct_256_before_fixes.yaml"))


def fix1(cfg: XRay2CTConfig) -> XRay2CTConfig:
    return dataclasses.replace(cfg, xray_features=cfg.xray_features // 4)  # 512 -> 128


def fix2(cfg: XRay2CTConfig) -> XRay2CTConfig:
    return dataclasses.replace(cfg, stages=(*cfg.stages[:-1], StageConfig(channels=cfg.stages[-1].channels)))


def fix3(cfg: XRay2CTConfig) -> XRay2CTConfig:
    return dataclasses.replace(cfg, refine="conv")


def test_after_fixes_preset_is_before_fixes_with_the_three_fixes():
    assert xray2ct_config(preset("xray2ct_256_after_fixes.yaml")) == fix3(fix2(fix1(BEFORE)))


def test_fixes_1_and_2_lower_the_parameter_count_and_fix_3_swaps_the_refine_rdb_for_convolutions():
    with torch.device("meta"):
        before, one, two, three = (XRay2CT(c) for c in (BEFORE, fix1(BEFORE), fix2(BEFORE), fix3(BEFORE)))
    n = count_parameters(before)
    assert count_parameters(one) < n and count_parameters(two) < n
    assert one.encoders[0].levels[-1][0].out_channels == 128 and one.stages[3].fusion.mix[0].in_channels == 128 + 128
    assert len(before.stages[3].rdbs) == 2 and len(two.stages[3].rdbs) == 0
    assert isinstance(before.head.refine[0], ResidualDenseBlock)
    convs = [m for m in three.head.refine.modules() if isinstance(m, torch.nn.Conv3d)]
    norms = [m for m in three.head.refine.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert not any(isinstance(m, ResidualDenseBlock) for m in three.head.modules())
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [(128, 64, 3), (64, 32, 3), (32, 1, 1)]
    assert [(g.num_groups, g.num_channels) for g in norms] == [(8, 64), (8, 32)]
    # Fix 3 saves activation memory, not parameters: 3x3x3 convolutions 128 -> 64 -> 32 outweigh a growth-8 RDB.
    assert count_parameters(three) > n


def _scaled(cfg: XRay2CTConfig) -> XRay2CTConfig:
    """The seed's network at a quarter of its widths and a 1^3 initial grid (16^3 out, 64x64 X-rays): small
    enough for a CPU forward, with the same structure."""
    stages = tuple(dataclasses.replace(s, channels=s.channels // 4, growth=max(s.growth // 4, 1)) for s in cfg.stages)
    return dataclasses.replace(
        cfg,
        initial_size=1,
        initial_channels=8,  # GroupNorm needs 2 values per group on the 1^3 grid
        xray_features=cfg.xray_features // 4,
        encoder_channels=(8, 8, 16, 32, 64),
        stages=stages,
        skip_channels=16,
        fusion_channels=32,
        refine_channels=(16, 8),
        norm_groups=4,
        refine_norm_groups=4,
    )


def test_each_fix_lowers_the_activations_kept_for_backward():
    torch.manual_seed(0)
    xray = torch.randn(1, 2, 64, 64)
    kept = {}
    for name, cfg in [("before", BEFORE), ("fix1", fix1(BEFORE)), ("fix2", fix2(BEFORE)), ("fix3", fix3(BEFORE))]:
        kept[name] = saved_activation_bytes(XRay2CT(_scaled(cfg)), xray)
    kept["all"] = saved_activation_bytes(XRay2CT(_scaled(fix3(fix2(fix1(BEFORE))))), xray)
    print({k: f"{v / 2**20:.1f} MiB" for k, v in kept.items()})
    assert max(kept["fix1"], kept["fix2"], kept["fix3"]) < kept["before"]
    assert kept["all"] < min(kept["fix1"], kept["fix2"], kept["fix3"])


# ---- gradient checkpointing ---------------------------------------------------------------------


# 2^3 -> 4^3 -> 8^3 -> 16^3 from 16x16 X-rays, every kind of block (RDBs, fusion, skips, RDB refine head).
TINY = {
    "initial_size": 2,
    "initial_channels": 4,
    "xray_features": 8,
    "encoder_channels": [4, 8],
    "stages": [
        {"channels": 8, "rdb_blocks": 1, "growth": 4, "rdb_layers": 2},
        {"channels": 8, "rdb_blocks": 2, "growth": 2, "rdb_layers": 2},
        {"channels": 4, "rdb_blocks": 1, "growth": 2, "rdb_layers": 2},
    ],
    "skip_channels": 4,
    "fusion_channels": 8,
    "refine_growth": 2,
    "refine_layers": 2,
    "norm_groups": 4,
}


def test_checkpointing_gives_identical_outputs_and_gradients_and_keeps_less():
    torch.manual_seed(0)
    plain = build_xray2ct(TINY, 16, 16, grad_checkpointing=False).double()
    torch.manual_seed(0)
    recomputed = build_xray2ct(TINY, 16, 16, grad_checkpointing=True).double()
    assert all(type(s).__name__.startswith("Checkpointed") for s in recomputed.stages)
    assert type(recomputed.head).__name__.startswith("Checkpointed")
    assert not any(type(m).__name__.startswith("Checkpointed") for m in plain.modules())
    xray = torch.randn(2, 2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (plain, recomputed):
        out = model(xray)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        outs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-12, atol=1e-12, msg=name)
    assert saved_activation_bytes(recomputed, xray) < saved_activation_bytes(plain, xray) / 2


def test_per_stage_flags_choose_the_recompute_units():
    raw = OmegaConf.to_container(preset("xray2ct_cpu.yaml"))
    raw["stages"][1]["grad_checkpointing"] = False
    raw["head_grad_checkpointing"] = False
    model = build_xray2ct(raw, 32, 64, grad_checkpointing=True)
    assert [type(s).__name__.startswith("Checkpointed") for s in model.stages] == [True, False, True]
    assert not type(model.head).__name__.startswith("Checkpointed")


# ---- the registry -------------------------------------------------------------------------------


def test_registry_builds_the_seed_network_cut_to_a_cubic_shape():
    factory = MODELS["xray2ct"].factory
    with torch.device("meta"):
        model = factory(None, in_channels=2, out_channels=1, shape=(128, 128, 128), grad_checkpointing=True)
    assert model.cfg == dataclasses.replace(XRay2CTConfig(), stages=XRay2CTConfig().stages[:3])
    assert all(type(s).__name__.startswith("Checkpointed") for s in model.stages)
    for kwargs, message in [
        ({"shape": (32, 32, 16)}, "data.shape=[32, 32, 16] must be a cube of side 32, 64, 128, 256 for model.name=xray2ct"),
        ({"shape": (48, 48, 48)}, "data.shape=[48, 48, 48] must be a cube of side 32, 64, 128, 256 for model.name=xray2ct"),
        ({"in_channels": 1}, "model.name=xray2ct maps 2 X-ray views to 1 channel, not 1 -> 1"),
        ({"vector_size": 3}, "model.name=xray2ct takes no condition vector"),
    ]:
        args = {"in_channels": 2, "out_channels": 1, "shape": (32, 32, 32), "grad_checkpointing": False} | kwargs
        with pytest.raises(ConfigError) as info:
            factory(None, **args)
        assert str(info.value) == message


# ---- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, sizes, message",
    [
        ({"stage": []}, (256, 512), "xray2ct: unknown key 'stage' (did you mean 'stages'?)"),
        ({"zzz": 1}, (256, 512), "xray2ct: unknown key 'zzz' (keys: initial_size, "),
        ({}, (128, 512), "output size 128 is not xray2ct.initial_size * 2^stages = 16 * 2^4 = 256"),
        ({}, (256, 500), "X-ray size 500 must be a multiple of 32: the encoder halves it 5 times"),
        ({}, (256, 16), "X-ray size 16 must be a multiple of 32"),
        ({"norm_groups": 24}, (256, 512), "xray2ct.encoder_channels[0]=32 is not divisible by xray2ct.norm_groups=24"),
        ({"refine": "mlp"}, (256, 512), "xray2ct.refine='mlp' is not one of rdb, conv"),
        ({"refine": "conv", "refine_channels": [60]}, (256, 512), "xray2ct.refine_channels[0]=60 is not divisible by"),
        (
            {"stages": [{"channels": 32, "grwoth": 16}]},
            (32, 512),
            "xray2ct.stages[0]: unknown key 'grwoth' (did you mean 'growth'?)",
        ),
        ({"stages": [{"rdb_blocks": 1}]}, (32, 512), "xray2ct.stages[0] lacks channels"),
        ({"stages": [{"channels": 32, "rdb_blocks": 1}]}, (32, 512), "xray2ct.stages[0].growth=0 must be a whole number >= 1"),
        ({"stages": []}, (16, 512), "xray2ct.stages=[] must be a non-empty list of stages"),
        ({"stages": 3}, (256, 512), "xray2ct.stages=3 must be a non-empty list of stages"),
        ({"shared_encoder": "yes"}, (256, 512), "xray2ct.shared_encoder='yes' must be true or false"),
        ({"initial_size": 16.0}, (256, 512), "xray2ct.initial_size=16.0 must be a whole number >= 1"),
        ({"skip_channels": -1}, (256, 512), "xray2ct.skip_channels=-1 must be a whole number >= 0"),
        ({"encoder_channels": 32}, (256, 512), "xray2ct.encoder_channels=32 must be a list of whole numbers >= 1"),
        ("big", (256, 512), "xray2ct must be a section of keys, got 'big'"),
    ],
)
def test_bad_sections_and_sizes_are_one_config_line(section, sizes, message):
    with pytest.raises(ConfigError) as info:
        build_xray2ct(OmegaConf.create(section) if isinstance(section, dict) else section, *sizes, grad_checkpointing=False)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)
