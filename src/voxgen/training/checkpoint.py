"""Checkpoint store: one folder per checkpoint, written whole or not at all.

    RUN/checkpoints/step_00000100/
        tensors-00001-of-00002.safetensors   tensors, in shards of at most max_shard_bytes
        index.json                           tensor name -> shard file, byte totals
        state.json                           everything else (step, data position, RNG, config, versions)
    RUN/checkpoints/latest                   name of the newest complete checkpoint

A checkpoint is written into a temporary folder, every file fsynced, then renamed into
place; `latest` is replaced atomically last. Nothing is pickled: tensors go to safetensors,
the rest to JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from voxgen.errors import CheckpointError

INDEX = "index.json"
STATE = "state.json"
LATEST = "latest"
DEFAULT_MAX_SHARD_BYTES = int(1.9 * 2**30)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a complete checkpoint for `step` and point `latest` at it."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    shards = _shard(cpu, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"tensors-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / filename))
        _fsync_path(tmp / filename)
        weight_map.update({k: filename for k in shard})
    _write_json(tmp / INDEX, {"weight_map": weight_map, "total_bytes": sum(t.numel() * t.element_size() for t in cpu.values())})
    _write_json(tmp / STATE, state)
    _fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(root)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    _fsync_path(pointer)
    os.replace(pointer, root / LATEST)
    _fsync_path(root)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and state of one checkpoint folder; CheckpointError if anything is missing or corrupt."""
    try:
        index = json.loads((folder / INDEX).read_text())
        state = json.loads((folder / STATE).read_text())
        tensors: dict[str, torch.Tensor] = {}
        for filename in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(str(folder / filename)))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: checkpoint is incomplete or corrupt ({type(exc).__name__}: {exc})") from None
    missing = set(index["weight_map"]) - set(tensors)
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks tensors {sorted(missing)[:3]}")
    return tensors, state


def load_latest(run_dir: str | Path, warn=print) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint that reads back whole, or None when the run has none.

    The `latest` pointer is tried first; a damaged checkpoint is reported and the previous
    complete one is used.
    """
    candidates = list_checkpoints(run_dir)
    pointer = checkpoint_root(run_dir) / LATEST
    if pointer.is_file():
        named = checkpoint_root(run_dir) / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for folder in candidates:
        try:
            tensors, state = read_checkpoint(folder)
        except CheckpointError as exc:
            warn(f"warning: {exc}; trying the previous checkpoint")
            continue
        return folder, tensors, state
    return None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names)."""
    root = checkpoint_root(run_dir)
    pointer = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    for folder in list_checkpoints(run_dir)[keep:]:
        if folder.name != pointer:
            shutil.rmtree(folder, ignore_errors=True)


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """{'model/a.b': t} -> {'a.b': t} for prefix 'model/'."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}
