"""Compose a config: schema defaults <- YAML files <- `key=value` overrides.

Everything is checked against the schema before any work starts: an unknown key comes
back with the nearest known key, a wrong type names the key and the value.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from voxgen.config.schema import Config
from voxgen.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


def _known_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, DictConfig):
            keys.extend(_known_keys(value, full + "."))
    return keys


def _nearest(key: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _merge(base: DictConfig, layer, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        known = _known_keys(OmegaConf.structured(Config))
        if "not in struct" in str(exc) or "Key '" in str(exc) and "not in" in str(exc):
            raise ConfigError(f"{source}: unknown config key '{key}'{_nearest(key, known)}") from None
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: bad value for '{key}': {reason}") from None


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys")
    return data


def compose(files: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> DictConfig:
    """Return the resolved, validated config (an OmegaConf node typed by `Config`)."""
    cfg = OmegaConf.structured(Config)
    for path in files:
        cfg = _merge(cfg, OmegaConf.create(load_yaml(path)), str(path))
    for text in overrides:
        key, value = _parse_override(text)
        layer = OmegaConf.create()
        OmegaConf.update(layer, key, value, force_add=True)
        cfg = _merge(cfg, layer, f"override '{text}'")
    validate(cfg)
    return cfg


def from_dict(data: dict) -> DictConfig:
    """Rebuild a config saved as plain data (run folders, checkpoint metadata)."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(data), "saved config")
    validate(cfg)
    return cfg


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def to_json(cfg: DictConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def _choice(value: str, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}{_nearest(value, choices)}")


def validate(cfg: DictConfig) -> None:
    """Checks that need more than one key or a registry; types are checked by the schema."""
    # Imported here: the registries import torch and model code, config must stay light.
    from voxgen.diffusion.modes import MODES
    from voxgen.diffusion.spaces import SPACES
    from voxgen.diffusion.strategies import STRATEGIES
    from voxgen.models.registry import MODELS

    _choice(cfg.mode, sorted(MODES), "mode")
    _choice(cfg.strategy, sorted(STRATEGIES), "strategy")
    _choice(cfg.space, sorted(SPACES), "space")
    _choice(cfg.model.name, sorted(MODELS), "model.name")
    _choice(cfg.model.attention, ["sdpa", "naive"], "model.attention")
    _choice(cfg.training.precision, ["fp32", "bf16-mixed"], "training.precision")
    _choice(cfg.training.device, ["auto", "cpu", "cuda"], "training.device")
    _choice(cfg.rflow.time_sampling, ["uniform", "logit-normal"], "rflow.time_sampling")
    shape = list(cfg.data.shape)
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ConfigError(f"data.shape={shape} must be three positive sizes [D, H, W]")
    positive = {
        "training.batch_size": cfg.training.batch_size,
        "training.steps": cfg.training.steps,
        "training.val_every": cfg.training.val_every,
        "training.checkpoint_every": cfg.training.checkpoint_every,
        "training.log_every": cfg.training.log_every,
        "sample.steps": cfg.sample.steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if cfg.training.lr <= 0:
        raise ConfigError(f"training.lr={cfg.training.lr} must be positive")
    if not 0.0 <= cfg.training.ema_decay < 1.0:
        raise ConfigError(f"training.ema_decay={cfg.training.ema_decay} must be in [0, 1)")
    if len(cfg.model.channels) != len(cfg.model.attention_levels):
        raise ConfigError(
            f"model.attention_levels has {len(cfg.model.attention_levels)} entries but "
            f"model.channels has {len(cfg.model.channels)}: give one per level"
        )
