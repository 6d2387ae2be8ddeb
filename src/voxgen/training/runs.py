"""Open a finished (or running) run folder: its config and its weights."""

from __future__ import annotations

import sys
from pathlib import Path

from voxgen import checkpoint as store
from voxgen.errors import CheckpointError
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

    def use(folder, tensors, state) -> None:
        parts.model.load_state_dict(store.split_prefix(tensors, prefix))
        parts.load_state_dict(state.get("task", {}))

    found = store.load_latest(run_dir, warn=lambda m: print(m, file=sys.stderr), prefix=prefix, use=use)
    if found is None:
        raise CheckpointError(f"{run_dir}: run has no checkpoint yet")
    _, _, state = found
    parts.model.eval()
    return cfg, parts, state["step"]
