"""The experiment presets in configs/ compose, build, and have the seeds' parameter counts."""

import csv
from pathlib import Path

import pytest
import torch

from voxgen.config import compose
from voxgen.models.registry import count_parameters
from voxgen.tasks import build_task

CONFIGS = Path(__file__).parents[2] / "configs"
from .family_checks import REFERENCE  # noqa: E402

PRESETS = sorted(CONFIGS.glob("*.yaml"))
# Presets of a seed's network shrunk to train on a CPU in minutes.
CPU_PRESETS = {"xray2ct_cpu.yaml"}

# Counts the seed documents print for presets that are not rows of a reference table:
# (millions, the unit they are rounded to). Latent UNet presets are checked against the CSV.
SEED_COUNTS = {
    "unet_pixel_exp1_128.yaml": (270, 1),  # seed 002 exp1, seed 000 default_3d_5lvl
    "unet_pixel_exp1_1_256.yaml": (270, 1),  # seed 002 exp1_1
    "wdm_128.yaml": (74, 1),  # seed 000 WDM-style configs
    "wdm_128_attn34.yaml": (77, 1),
    "wdm_256.yaml": (268, 1),
    "wdm_256_attn34.yaml": (279, 1),
    "wdm_256_wider.yaml": (639, 1),
    "dit_exp7_B8_pixel128.yaml": (135, 1),  # seed 002 exp7
    "dit_exp13_S2_latent4x.yaml": (40, 1),  # seed 002 exp13
    "unet_s2d_exp11_128.yaml": (1420, 10),  # seed 002 exp11: "1.42B"
    "unet_wavelet_exp12_128.yaml": (1420, 10),  # seed 002 exp12
}


def _params(cfg) -> int:
    """All parameters of the preset's task (its network; an autoencoder's), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_task(cfg, "meta").model
    assert all(p.is_meta for p in model.parameters())
    return count_parameters(model)


def _within(got_m: float, seed_m: float, unit: float) -> bool:
    """0.5%, or the rounding of the printed figure when that is coarser."""
    return abs(got_m - seed_m) <= max(0.005 * seed_m, unit / 2)


def test_there_are_presets():
    assert len(PRESETS) >= 28, PRESETS


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_composes_builds_and_says_what_it_mirrors(path):
    assert path.read_text().startswith("# Seed "), f"{path.name}: start with a comment naming the seed experiment"
    cfg = compose([path], [])
    got = _params(cfg) / 1e6
    assert got > (0.05 if path.name in CPU_PRESETS else 1)
    if path.name in SEED_COUNTS:
        seed_m, unit = SEED_COUNTS[path.name]
        print(f"{path.name}: {got:.2f}M vs seeds' {seed_m}M")
        assert _within(got, seed_m, unit), f"{path.name}: {got:.2f}M vs the seeds' {seed_m}M"


def test_every_latent_unet_row_has_a_matching_preset():
    """Each row of the seeds' latent UNet profile: its preset holds the row's settings and
    MONAI's DiffusionModelUNet built from it has the row's parameter count to 0.5%, or to the
    table's rounding (0.1M) for the smallest rows (3L_tiny: 7.256M is printed 7.3M, 0.6%)."""
    table = REFERENCE / "unet3d_latent_a100.csv"
    if not table.is_file():
        pytest.skip(f"reference table {table} is absent (the shared folder sits next to the repository)")
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 19
    errors = []
    for row in rows:
        path = CONFIGS / f"unet_latent{row['latent']}_{row['config']}.yaml"
        assert path.is_file(), f"no preset for row {row['config']},{row['latent']}: expected {path.name}"
        cfg = compose([path], [])
        # The network sees the code of the preset's latent space: the row's grid and channels.
        assert cfg.space.name == "latent" and (cfg.model.in_channels, cfg.model.out_channels) == (None, None), path.name
        with torch.device("meta"):
            net = build_task(cfg, "meta").network
        assert list(net.shape) == [int(row[k]) for k in "DHW"], path.name
        assert (net.in_channels, net.out_channels) == (int(row["in_channels"]), int(row["out_channels"])), path.name
        assert list(cfg.model.channels) == [int(c) for c in row["channels"].split()], path.name
        assert list(cfg.model.attention_levels) == [a == "true" for a in row["attention_levels"].split()], path.name
        assert cfg.model.num_res_blocks == int(row["num_res_blocks"]), path.name
        assert cfg.model.num_head_channels == int(row["num_head_channels"]), path.name
        got = _params(cfg) / 1e6
        errors.append((abs(got - float(row["params_m"])) / float(row["params_m"]), row, got))
    worst, row, got = max(errors, key=lambda e: e[0])
    print(f"worst latent UNet row: {row['config']} {row['latent']}: {got:.3f}M vs {row['params_m']}M ({100 * worst:.3f}%)")
    for _, row, got in errors:
        assert _within(got, float(row["params_m"]), 0.1), f"{row['config']},{row['latent']}: {got:.3f}M vs {row['params_m']}M"
