"""Stage 2 of the ControlNet recipe: `model.name=controlnet controlnet.base=RUN_DIR`.

The network (`voxgen.models.controlnet.ControlledUNet`) is built on a stage-1 run: a UNet
trained with mode=bravo_uncond, read here (its config.yaml, then the EMA weights of its newest
checkpoint that reads back). The stage-1 folder is only ever read. Stage 2 trains with a mode
that generates what the base generates and adds a condition (mode=bravo: the tumour mask), in the
same space, on the same data shape, with the same strategy.

On the meta device (config checks, memory plans) only the base's config is read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from voxgen import checkpoint as store
from voxgen.diffusion.run_inputs import read_saved_config
from voxgen.errors import ConfigError
from voxgen.models.controlnet import ControlledUNet, build_controlled_unet

NAME = "controlnet"
SUMMARY = "ControlNet (Zhang et al. 2023) on a frozen stage-1 UNet run (controlnet.base=RUN_DIR, mode=bravo)"
# The base's weights: the stage-1 run's EMA copy, as sampling uses it.
WEIGHTS_PREFIX = "ema/"


def base_config(cfg):
    """The stage-1 run's config, checked against `cfg` (stage 2); ConfigError (one line) for a base
    that is missing, is not a run, is not a UNet, or does not fit the stage-2 mode, space, data
    shape or strategy."""
    from voxgen.diffusion.modes import build_mode, saved_mode

    key = "controlnet.base"
    source = str(cfg.controlnet.base)
    if not source:
        raise ConfigError(f"model.name=controlnet needs {key}=RUN_DIR: the folder of a stage-1 run (mode=bravo_uncond)")
    path = Path(source)
    if not path.is_dir():
        raise ConfigError(f"{key}={path}: no such run folder")
    data = read_saved_config(key, path, path / "config.yaml", ("model", "data"), "a voxgen run")
    base = OmegaConf.create(data)
    if base.get("task", "diffusion") != "diffusion":
        raise ConfigError(f"{key}={path} is a task={base.task} run, not a diffusion run")
    if base.model.get("name") != "unet":
        raise ConfigError(
            f"{key}={path} trained model.name={base.model.get('name')}; a ControlNet needs a UNet base (model.name=unet)"
        )
    base_mode, mode = saved_mode(data), build_mode(cfg)
    if base_mode is None or base_mode.conditional or base_mode.generated != mode.generated or not mode.conditions:
        raise ConfigError(
            f"{key}={path} was trained with mode={base_mode.name if base_mode else data.get('mode')}; mode={mode.name} "
            "needs a base that generates "
            f"{', '.join(mode.generated)} unconditionally (mode=bravo_uncond) and a mode with a condition (mode=bravo)"
        )
    checks = [
        ("data.shape", list(base.data.get("shape", [])), list(cfg.data.shape)),
        ("space", base.get("space", {}).get("name", "pixel"), cfg.space.name),
        ("strategy", base.get("strategy"), cfg.strategy),
    ]
    if cfg.space.name == "latent":
        checks.append(("space.autoencoder", str(base.space.get("autoencoder", "")), str(cfg.space.autoencoder)))
    for name, theirs, ours in checks:
        if theirs != ours:
            raise ConfigError(f"{key}={path} was trained with {name}={theirs}; this run has {name}={ours}: they must match")
    return base


def build_controlnet(cfg, network) -> ControlledUNet:
    """The controlled network of `cfg` for `network` (a `NetworkShape`), with the stage-1 run's EMA
    weights in its base and copied into its ControlNet (unless built on the meta device)."""
    base_cfg = base_config(cfg)
    generated = network.out_channels
    model = build_controlled_unet(
        base_cfg.model,
        generated_channels=generated,
        condition_channels=network.in_channels - generated,
        shape=network.shape,
        grad_checkpointing=cfg.training.grad_checkpointing,
        conditioning_channels=cfg.controlnet.conditioning_channels,
        conditioning_scale=float(cfg.controlnet.conditioning_scale),
    )
    if next(model.parameters()).device.type != "meta":
        load_base(model, Path(cfg.controlnet.base))
    return model


def load_base(model: ControlledUNet, run_dir: Path) -> None:
    """The stage-1 run's EMA weights into `model.base`, and its encoder into the ControlNet."""

    store.load_weights(run_dir, model.base, WEIGHTS_PREFIX, f"controlnet.base={run_dir}: the stage-1 run has no checkpoint yet")
    with torch.no_grad():
        model.copy_encoder()
    model.base.requires_grad_(False).eval()
