"""Which checkpoints a run keeps: the newest few, the best one, whatever a pointer names."""

from __future__ import annotations

import math
from pathlib import Path

from voxgen.checkpoint.layout import BEST, LATEST, STATE, _read_pointer, _step_of, checkpoint_root
from voxgen.checkpoint.read import _read_index, list_checkpoints, read_state
from voxgen.checkpoint.write import _write_pointer, delete_checkpoint
from voxgen.errors import CheckpointError


def _looks_complete(folder: Path) -> bool:
    """Index and state parse and every listed file has its recorded size (no checksums: cheap)."""
    try:
        index = _read_index(folder)
        if "files" not in index:
            names = set(index["weight_map"].values()) | {STATE}
            return all((folder / f).is_file() for f in names)
        return all((folder / f).stat().st_size == meta["bytes"] for f, meta in index["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _metric(folder: Path, metric: str) -> float | None:
    try:
        value = float(read_state(folder).get("metrics", {})[metric])
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return value if math.isfinite(value) else None


def retain(run_dir: str | Path, keep_last: int, best_metric: str = "") -> list[Path]:
    """Keep the newest `keep_last` complete checkpoints and the best one; delete the rest.

    best: the lowest finite `state["metrics"][best_metric]`, earliest on ties; the `best`
    pointer is moved to it atomically before anything is deleted. best_metric "" tracks no
    best (an existing `best` pointer is left as it is). Whatever `latest` or `best` names is
    never deleted, nor is a checkpoint with fewer than `keep_last` complete ones after it.
    Returns the deleted folders.
    """
    root = checkpoint_root(run_dir)
    if not isinstance(keep_last, int) or keep_last < 1:
        raise CheckpointError(f"{root}: keep_last={keep_last} must be at least 1")
    folders = list_checkpoints(run_dir)  # newest first
    complete = [f for f in folders if _looks_complete(f)]
    if best_metric:
        scored = [(v, _step_of(f), f) for f in complete if (v := _metric(f, best_metric)) is not None]
        if scored:
            best = min(scored)[2]
            if _read_pointer(root, BEST) != best.name:
                _write_pointer(root, BEST, best.name)
    protected = {_read_pointer(root, LATEST), _read_pointer(root, BEST)}
    deleted = []
    for folder in folders:
        newer_complete = sum(1 for f in complete if _step_of(f) > _step_of(folder))
        if folder.name in protected or newer_complete < keep_last:
            continue
        try:
            delete_checkpoint(folder)
        except OSError:  # left for the next retention pass; the checkpoint just written is safe
            continue
        deleted.append(folder)
    return deleted


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints: `retain` without a best metric."""
    retain(run_dir, keep_last=keep, best_metric="")
