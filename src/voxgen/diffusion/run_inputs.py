"""The saved config of another run that a run builds on (the latent space's autoencoder, a
ControlNet's base), read with one-line errors that name the key pointing at it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from voxgen.errors import ConfigError


def read_saved_config(key: str, path: Path, saved: Path, sections: Sequence[str], what: str) -> dict:
    """The mapping in `saved` (the config file of `key`=`path`), which must hold every one of
    `sections` as a mapping; ConfigError "KEY=PATH: ..." when it is missing, does not read as
    YAML, or is not the config of `what`."""
    if not saved.is_file():
        raise ConfigError(f"{key}={path}: not a voxgen run folder (no config.yaml)")
    try:
        data = yaml.safe_load(saved.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{key}={path}: {saved.name} does not read ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(s), dict) for s in sections):
        raise ConfigError(f"{key}={path}: {saved.name} is not the config of {what} (no {' and '.join(sections)} sections)")
    return data
