"""Open a finished (or running) run folder: its config and its weights."""

from __future__ import annotations

from pathlib import Path

import torch

from voxgen import checkpoint as store
from voxgen.tasks import Task, build_task
from voxgen.training.resume import run_config
from voxgen.training.trainer import resolve_device


def load_run(run_dir: str | Path, weights: str = "ema", device: str = "auto") -> tuple[object, Task, int]:
    """(config, task with the chosen weights, step) of a run's newest checkpoint whose weights read back whole.

    weights: 'ema' (what sampling uses) or 'model' (the raw trained weights). Only the shards
    holding those tensors are read (and verified): one set of weights reaches host memory, not
    the training state (weights, EMA, two Adam moments, a quarter of it), and damage confined
    to the other shards does not make the checkpoint unusable here.
    """
    cfg = run_config(run_dir)
    prefix = f"{weights}/"
    parts = build_task(cfg, resolve_device(device))

    missing = f"{run_dir}: run has no checkpoint yet"
    _, state = store.load_weights(run_dir, parts.model, prefix, missing, lambda s: parts.load_state_dict(s.get("task", {})))
    parts.model.eval()
    if cfg.training.compile:  # sampling runs the network the way it trained (docs/speed.md)
        parts = parts.with_model(torch.compile(parts.model))
    return cfg, parts, state["step"]
