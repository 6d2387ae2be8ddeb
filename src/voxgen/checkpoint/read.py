"""Reading a checkpoint back: verified shard by shard, whole or only the tensors under a prefix.

Every file read is checked against the size and crc32 index.json records for it, so a
truncated or bit-flipped file is reported as a CheckpointError, and `load_latest` falls back
to the previous checkpoint. A prefix ('ema/') restricts a read to the shards holding tensors
under it: the others are not opened, so their damage does not matter to that read.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from voxgen.checkpoint.layout import (
    _STEP_NAME,
    BEST,
    FORMAT,
    INDEX,
    LATEST,
    STATE,
    _file_crc,
    _read_pointer,
    _step_of,
    checkpoint_root,
    index_crc,
    split_prefix,
)
from voxgen.errors import CheckpointError


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders (step_NNNNNNNN), complete or not, newest (highest step) first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=_step_of, reverse=True)


# What a damaged or truncated checkpoint file raises while it is read: each becomes one CheckpointError.
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)


def _corrupt(folder: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{folder}: checkpoint is incomplete or corrupt ({why})")


def _verify(folder: Path, filename: str, files: dict | None, size: int, crc: int) -> None:
    if files is None:  # format 1 recorded no sizes or checksums
        return
    if filename not in files:
        raise _corrupt(folder, f"{filename} is not listed in {INDEX}")
    expected = files[filename]
    if size != expected["bytes"]:
        raise _corrupt(folder, f"{filename} has {size} bytes, {INDEX} says {expected['bytes']}")
    if crc != expected["crc32"]:
        raise _corrupt(folder, f"{filename} fails its crc32 check: its bytes changed after it was written")


def _load_shard(folder: Path, filename: str, files: dict | None, keys: set[str]) -> dict[str, torch.Tensor]:
    """The tensors named in `keys` of one shard, in memory of their own.

    The whole file is verified first (its crc32 covers every byte, not only those of `keys`).
    A key the file lacks is left out, for the caller to report.
    """
    if files is not None:
        _verify(folder, filename, files, *_file_crc(folder / filename))
    # safe_open maps the file; the copies detach the tensors from it, so a file deleted or
    # truncated later cannot take them away. Tensors not asked for are never copied.
    with safe_open(str(folder / filename), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in keys & set(f.keys())}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"unknown dtype {name!r}")
    return dtype


_INDEX_KEYS = {"format", "total_bytes", "weight_map", "split_tensors", "files", "index_crc32"}


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # A flipped bit can turn one tensor name into another: json.loads would keep the second
    # entry and drop the first tensor without a word.
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _read_index(folder: Path) -> dict:
    """index.json, verified: no duplicate or unknown keys, and whatever a format promises is there.

    Every entry that can verify something is used when present, whatever `format` says, so a
    damaged `format` value cannot switch verification off.
    """
    index = json.loads((folder / INDEX).read_bytes(), object_pairs_hook=_refuse_duplicates)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise TypeError(f"{INDEX} has no weight_map")
    if unknown := sorted(set(index) - _INDEX_KEYS):
        raise ValueError(f"{INDEX} has unknown entries {unknown[:3]}")
    version = index.get("format", 1)
    if version not in range(1, FORMAT + 1):
        raise ValueError(f"{INDEX} has unknown format {version!r}")
    if version >= 2 and not isinstance(index.get("files"), dict):
        raise ValueError(f"{INDEX} of format {version} lacks the sizes and checksums of its files")
    if version >= 3 and "index_crc32" not in index:
        raise ValueError(f"{INDEX} of format {version} lacks its own checksum")
    if "index_crc32" in index and index["index_crc32"] != index_crc(index):
        raise ValueError(f"{INDEX} fails its own crc32 check: its bytes changed after it was written")
    return index


def _keys_by_shard(index: dict, wanted: Callable[[str], bool]) -> dict[str, set[str]]:
    """The safetensors keys each shard file must hold, for the tensors `wanted` accepts: whole
    tensors under their names, pieces of split tensors under their piece keys."""
    keys: dict[str, set[str]] = {}
    for name, filename in index["weight_map"].items():
        if wanted(name):
            keys.setdefault(filename, set()).add(name)
    for name, spec in index.get("split_tensors", {}).items():
        if wanted(name):
            for piece in spec["pieces"]:
                keys.setdefault(piece["file"], set()).add(piece["key"])
    return keys


def iter_tensors(folder: str | Path, prefix: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one checkpoint, read and verified one shard at a time.

    prefix: only the tensors whose names start with it ('ema/'), full names yielded; only the
    shards holding (pieces of) them are opened and verified. None: every tensor.

    Holds at most one shard (and one split tensor being put back together) in memory, so a
    checkpoint larger than the host's memory can be inspected or compared. Raises CheckpointError.
    """
    folder = Path(folder)

    def wanted(name: str) -> bool:
        return prefix is None or name.startswith(prefix)

    try:
        index = _read_index(folder)
        files = index.get("files")
        split = {name: spec for name, spec in index.get("split_tensors", {}).items() if wanted(name)}
        by_file: dict[str, list[tuple[str, dict]]] = {}
        for name, spec in split.items():
            for piece in spec["pieces"]:
                by_file.setdefault(piece["file"], []).append((name, piece))
        whole_by_file: dict[str, list[str]] = {}
        for name, filename in index["weight_map"].items():
            if wanted(name):
                whole_by_file.setdefault(filename, []).append(name)
        expected = {name for names in whole_by_file.values() for name in names} | set(split)
        seen: set[str] = set()
        building: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (output, elements filled)
        # Shard names are zero-padded, so sorted order is write order: the pieces of a split
        # tensor arrive one after the other.
        for filename, keys in sorted(_keys_by_shard(index, wanted).items()):
            loaded = _load_shard(folder, filename, files, keys)
            for name in whole_by_file.get(filename, []):
                if name not in loaded:
                    raise _corrupt(folder, f"{filename} lacks tensor {name!r}")
                seen.add(name)
                yield name, loaded.pop(name)
            for name, piece in by_file.get(filename, []):
                spec = split[name]
                if name not in building:
                    out = torch.empty(spec["shape"], dtype=_dtype(spec["dtype"]))
                    building[name] = (out, 0)
                out, filled = building[name]
                part = loaded.pop(piece["key"], None)
                if part is None or piece["start"] != filled or part.numel() != piece["stop"] - piece["start"]:
                    raise _corrupt(folder, f"{filename}: piece {piece['key']!r} of {name!r} is missing or out of place")
                out.view(-1)[piece["start"] : piece["stop"]] = part
                filled = piece["stop"]
                if filled == out.numel():
                    del building[name]
                    seen.add(name)
                    yield name, out
                else:
                    building[name] = (out, filled)
            del loaded
    except CheckpointError:
        raise
    except _READ_ERRORS as exc:
        raise _corrupt(folder, f"{type(exc).__name__}: {exc}") from None
    missing = expected - seen
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks tensors {sorted(missing)[:3]}")


def verify_checkpoint(folder: str | Path) -> None:
    """Check one checkpoint without loading its tensors: index.json, then every file it lists
    against its recorded size and crc32 (read in chunks), then that each shard holds the tensors
    the index places in it (its header only). Holds one read chunk, not a shard, in memory: a
    report can check a run's checkpoints beside a live training process. Raises CheckpointError."""
    folder = Path(folder)
    try:
        index = _read_index(folder)
        files = index.get("files")
        for filename in files or {}:
            _verify(folder, filename, files, *_file_crc(folder / filename))
        for filename, keys in sorted(_keys_by_shard(index, lambda name: True).items()):
            with safe_open(str(folder / filename), framework="pt") as f:
                missing = keys - set(f.keys())
            if missing:
                raise _corrupt(folder, f"{filename} lacks tensor {sorted(missing)[0]!r}")
    except CheckpointError:
        raise
    except _READ_ERRORS as exc:
        raise _corrupt(folder, f"{type(exc).__name__}: {exc}") from None


def read_state(folder: str | Path) -> dict:
    """state.json of one checkpoint, verified against index.json; raises CheckpointError."""
    folder = Path(folder)
    try:
        files = _read_index(folder).get("files")
        data = (folder / STATE).read_bytes()
        _verify(folder, STATE, files, len(data), zlib.crc32(data))
        state = json.loads(data)
        if not isinstance(state, dict):
            raise TypeError(f"{STATE} holds no JSON object")
        return state
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _corrupt(folder, f"{type(exc).__name__}: {exc}") from None


def read_checkpoint(folder: Path, prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (those under `prefix`, or all) and state of one checkpoint folder.

    CheckpointError if anything read is missing or corrupt.
    """
    state = read_state(folder)
    return dict(iter_tensors(folder, prefix)), state


# What applying a checkpoint's tensors can raise when they do not fit what they are loaded
# into (load_state_dict: missing or unexpected keys, shapes; an optimiser state that does not
# match its parameters).
_APPLY_ERRORS = (RuntimeError, KeyError, ValueError, TypeError, IndexError)


def load_latest(
    run_dir: str | Path,
    warn=print,
    prefix: str | None = None,
    use: Callable[[Path, dict[str, torch.Tensor], dict], None] | None = None,
    accept: Callable[[dict], bool] | None = None,
) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """(folder, tensors, state) of the newest checkpoint that reads back whole and applies.

    Newest means the highest step: the `latest` pointer is only checked against it (a pointer
    that is unreadable, names no checkpoint or an older one is reported through `warn`).
    A damaged checkpoint is reported through `warn` and the previous one is tried.

    prefix: read only the tensors under it (see `iter_tensors`), e.g. 'ema/' for sampling, a
    quarter of the bytes of a training state of weights, EMA and two Adam moments; "reads
    back whole" then means: state.json and the shards holding those tensors.
    use(folder, tensors, state): applies the checkpoint (load_state_dict ...); when it raises
    what loading into a model raises, the checkpoint counts as damaged too.
    accept(state): checkpoints it refuses are passed over without a warning.

    Returns None when the run has no checkpoint folder (or none accepted). Raises
    CheckpointError, naming them, when there are checkpoints and none of them loads: a run
    whose checkpoints are all damaged must not quietly start again from step 0 over them.
    """
    root = checkpoint_root(run_dir)
    folders = list_checkpoints(run_dir)
    damaged: list[str] = []
    for i, folder in enumerate(folders):
        try:
            state = read_state(folder)
            if accept is not None and not accept(state):
                continue
            tensors = dict(iter_tensors(folder, prefix))
            if use is not None:
                use(folder, tensors, state)
        except CheckpointError as exc:
            reason = str(exc)
        except _APPLY_ERRORS as exc:
            reason = f"{folder}: checkpoint does not load ({type(exc).__name__}: {_first_line(exc)})"
        else:
            _check_pointer(root, folder, {f.name for f in folders}, warn)
            return folder, tensors, state
        damaged.append(folder.name)
        then = "trying the previous checkpoint" if i + 1 < len(folders) else "no older checkpoint"
        warn(f"warning: {reason}; {then}")
    if damaged:
        raise CheckpointError(
            f"{root}: no checkpoint of this run loads ({', '.join(damaged)} damaged, see the warnings above); "
            "they are left as they are: restore them from a backup, or move them away to start the run again"
        )
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _check_pointer(root: Path, loaded: Path, names: set[str], warn) -> None:
    """Warn when `latest` disagrees with the checkpoint that loaded (it is not used otherwise)."""
    if not (root / LATEST).exists():
        return
    named = _read_pointer(root, LATEST)
    if named is None or named not in names:
        what = "is unreadable" if named is None else f"names {named}, which does not exist"
        warn(f"warning: {root / LATEST} {what}; using {loaded.name}, the newest checkpoint that loads")
    elif _step_of(root / named) < _step_of(loaded):
        warn(f"warning: {root / LATEST} names {named}, but {loaded.name} is newer and loads; using {loaded.name}")


def load_named(run_dir: str | Path, name: str) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """(folder, tensors, state) of the checkpoint `name`: 'latest', 'best' or 'step_00000100'.

    No fallback: a missing pointer, a missing folder or a damaged checkpoint raises CheckpointError.
    """
    root = checkpoint_root(run_dir)
    if name in (LATEST, BEST):
        target = _read_pointer(root, name)
        if target is None:
            raise CheckpointError(f"{root / name}: no {name} checkpoint recorded in this run (pointer missing or unreadable)")
    elif _STEP_NAME.fullmatch(name):
        target = name
    else:
        raise CheckpointError(f"{root}: unknown checkpoint name {name!r} (latest, best or step_NNNNNNNN)")
    folder = root / target
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint {name!r} does not exist")
    tensors, state = read_checkpoint(folder)
    return folder, tensors, state


def load_weights(
    run_dir: str | Path,
    module: torch.nn.Module,
    prefix: str,
    missing: str,
    restore: Callable[[dict], None] | None = None,
    *,
    assign: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load into `module` the `prefix` tensors ('ema/') of the newest checkpoint of another run that
    reads back whole (`load_latest`: damaged ones are reported on stderr and older ones tried);
    `restore(state)` gets that checkpoint's state. Returns (its tensors, its state);
    CheckpointError(`missing`) when the run has no checkpoint. `assign` hands the tensors to a
    module built on the meta device as they are."""

    def use(folder: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
        module.load_state_dict(split_prefix(tensors, prefix), assign=assign)
        if restore is not None:
            restore(state)

    found = load_latest(run_dir, warn=lambda m: print(m, file=sys.stderr), prefix=prefix, use=use)
    if found is None:
        raise CheckpointError(missing)
    return found[1], found[2]
