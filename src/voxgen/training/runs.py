"""Open a finished (or running) run folder: its config and its weights."""

from __future__ import annotations

from pathlib import Path

import yaml

from voxgen.config import from_dict
from voxgen.diffusion.parts import Parts, build_parts
from voxgen.errors import CheckpointError
from voxgen.training import checkpoint as store
from voxgen.training.trainer import resolve_device


def run_config(run_dir: str | Path):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.yaml)")
    return from_dict(yaml.safe_load(path.read_text()))


def load_run(run_dir: str | Path, weights: str = "ema", device: str = "auto") -> tuple[object, Parts, int]:
    """(config, parts with the chosen weights, step) of a run's newest checkpoint whose weights read back whole.

    weights: 'ema' (what sampling uses) or 'model' (the raw trained weights). Only the shards
    holding those tensors are read (and verified): one set of weights reaches host memory, not
    the training state (weights, EMA, two Adam moments, a quarter of it), and damage confined
    to the other shards does not make the checkpoint unusable here.
    """
    cfg = run_config(run_dir)
    prefix = f"{weights}/"
    found = store.load_latest(run_dir, prefix=prefix)
    if found is None:
        raise CheckpointError(f"{run_dir}: run has no checkpoint yet")
    folder, tensors, state = found
    parts = build_parts(cfg, resolve_device(device))
    parts.model.load_state_dict(store.split_prefix(tensors, prefix))
    parts.model.eval()
    return cfg, parts, state["step"]
