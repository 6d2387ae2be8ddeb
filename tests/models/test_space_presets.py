"""The latent, s2d and wavelet presets in configs/ name their real space, plan from it, and train two
steps when shrunk to test size (a tiny autoencoder run stands in for the presets' VQ-VAE): one preset
of each kind plans, one of each shrunk network trains."""

from pathlib import Path

import pytest

from tiny_autoencoder import TINY_AUTOENCODER_RUN
from voxgen.config import compose
from voxgen.memory.planner import plan
from voxgen.training.trainer import train

CONFIGS = Path(__file__).parents[2] / "configs"
SPACE_PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if compose([p]).space.name != "pixel")


def _shrunk(cfg) -> list[str]:
    """Overrides that keep a preset's family, levels, attention pattern and space, at test size."""
    levels = len(cfg.model.channels)
    # 32^3: a halving space leaves 16^3, which a 5-level UNet still divides.
    return [
        "data.shape=[32,32,32]",
        f"model.channels=[{','.join(['8'] * levels)}]",
        "model.num_res_blocks=1",
        "model.num_head_channels=8",
        "model.norm_num_groups=4",
        "model.hidden_size=48",  # the variant's heads (DiT-S: 6) divide it
        "model.depth=2",
        "training.steps=2",
        "training.batch_size=1",
        "training.val_batches=1",
        "training.precision=fp32",
        "training.grad_checkpointing=false",
        "sample.steps=2",
    ]


def test_space_presets_exist():
    names = {p.name for p in SPACE_PRESETS}
    assert {"unet_s2d_exp11_128.yaml", "unet_wavelet_exp12_128.yaml", "dit_exp13_S2_latent4x.yaml"} <= names
    assert sum(n.startswith("unet_latent") for n in names) == 19


def _kind(path: Path) -> str:
    """A preset's family and space, with the latent factor: the presets of one kind differ in widths and depths only."""
    cfg = compose([path])
    factor = ("4x" if "4x" in path.name else "8x") if cfg.space.name == "latent" else ""
    return f"{cfg.model.name}-{cfg.space.name}{factor}"


def _one_per_kind() -> list[Path]:
    first: dict[str, Path] = {}
    for path in SPACE_PRESETS:
        first.setdefault(_kind(path), path)
    return list(first.values())


def _one_per_shrunk_shape() -> list[Path]:
    """One preset per kind, number of levels and attention pattern: shrunk to test size (`_shrunk`),
    the presets of one such group are the same network."""
    first: dict[tuple, Path] = {}
    for path in SPACE_PRESETS:
        cfg = compose([path])
        first.setdefault((_kind(path), len(cfg.model.channels), tuple(cfg.model.attention_levels)), path)
    return list(first.values())


def _expected(cfg, path: Path) -> tuple[tuple[int, int], list[int]]:
    per_modality = {"s2d": 8, "wavelet": 8, "latent": 4}[cfg.space.name]
    factor = {"s2d": 2, "wavelet": 2, "latent": 4 if "4x" in path.name else 8}[cfg.space.name]
    return (2 * per_modality, per_modality), [s // factor for s in cfg.data.shape]


# Planning traces the whole step (seconds per preset): one preset of each kind (tests/models/test_presets.py
# builds every preset); the presets of a kind differ in widths and depths, not in what their space gives.
@pytest.mark.parametrize("path", _one_per_kind(), ids=[p.name for p in _one_per_kind()])
def test_space_preset_plans_in_its_space(path):
    cfg = compose([path])
    assert cfg.model.in_channels is None and cfg.model.out_channels is None, "the space gives the channels"
    planned = plan(cfg)
    assert ((planned.in_channels, planned.out_channels), planned.shape) == _expected(cfg, path)


@pytest.fixture(scope="module")
def tiny_autoencoder(cohort_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("ae") / "run"
    train(compose(overrides=[*TINY_AUTOENCODER_RUN, "data.shape=[32,32,32]", f"data.root={cohort_root}", f"run.dir={run}"]))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("path", _one_per_shrunk_shape(), ids=[p.name for p in _one_per_shrunk_shape()])
def test_space_preset_trains_two_steps_shrunk(path, cohort_root, tiny_autoencoder, tmp_path):
    cfg = compose([path])
    extra = [f"space.autoencoder={tiny_autoencoder}"] if cfg.space.name == "latent" else []
    shrunk = compose([path], [*_shrunk(cfg), *extra, f"data.root={cohort_root}", f"run.dir={tmp_path / 'run'}"])
    result = train(shrunk)
    assert result.step == 2 and all(r["val_loss"] == r["val_loss"] for r in result.history)
