"""Checkpoint store: one folder per checkpoint, written whole or not at all.

    RUN/checkpoints/step_00000100/
        tensors-00001-of-00002.safetensors   tensors, in files of at most max_shard_bytes
        index.json                           tensor -> shard, pieces of split tensors, size and crc32 of every file
        state.json                           everything else (step, data position, metrics, config, versions)
    RUN/checkpoints/latest                   name of the newest complete checkpoint
    RUN/checkpoints/best                     name of the checkpoint with the lowest best_metric

No file, safetensors header included, is larger than max_shard_bytes: a tensor that does not
fit in one file is cut into flat pieces, each in its own shard, and put back together on load.

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place;
`latest` is replaced atomically last. A failed write (disk full, I/O error) removes what it wrote
and leaves the previous checkpoint and `latest` as they were. Reading checks every file's size
and crc32 against index.json, so a truncated or bit-flipped shard is reported, and
`load_latest` falls back to the previous checkpoint. Nothing is pickled: tensors go to
safetensors, the rest to JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from voxgen.errors import CheckpointError

INDEX = "index.json"
STATE = "state.json"
LATEST = "latest"
BEST = "best"
FORMAT = 2  # 1: weight_map only, no sizes or checksums (still readable)
DEFAULT_MAX_SHARD_BYTES = int(1.9 * 2**30)
MIN_SHARD_BYTES = 2**20
# Room left beyond the bytes of the checkpoint itself: file-system metadata, and the logs and
# TensorBoard events the run keeps writing next to it.
FREE_SPACE_MARGIN = 64 * 2**20
# Tells other safetensors readers (transformers, the safetensors CLI) that these are torch tensors.
_SAFETENSORS_METADATA = {"format": "pt"}
_STEP_NAME = re.compile(r"step_(\d+)")
_IO_CHUNK = 16 * 2**20
# Upper bound of one header entry without its key and shape:
# "KEY":{"dtype":"F8_E4M3FNUZ","shape":[...],"data_offsets":[20 digits,20 digits]}, is 95 bytes.
_ENTRY_BYTES = 128
# The header's length prefix, braces, the metadata entry and the alignment padding.
_HEADER_FIXED_BYTES = 8 + 8 + 8 + len(json.dumps({"__metadata__": _SAFETENSORS_METADATA}))


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sizes(needs: int, free: int) -> str:
    """'needs 1.2 GiB, 0.3 GiB free' (MiB when both are under 1 GiB)."""
    unit, scale = ("GiB", 2**30) if max(needs, free) >= 2**30 else ("MiB", 2**20)
    return f"needs {needs / scale:.1f} {unit}, {free / scale:.1f} {unit} free"


# ---- planning: which bytes go in which file --------------------------------------------


@dataclass
class _Piece:
    name: str  # the tensor's name in the checkpoint
    key: str  # its name inside the shard file
    start: int | None = None  # flat element range of a split tensor; None: the whole tensor
    stop: int | None = None


def _entry_bytes(key: str, shape) -> int:
    # json.dumps escapes non-ASCII as \uXXXX, never shorter than the UTF-8 safetensors writes.
    return _ENTRY_BYTES + len(json.dumps(key)) + sum(len(str(int(d))) + 1 for d in shape)


def _plan(tensors: dict[str, torch.Tensor], max_bytes: int) -> tuple[list[list[_Piece]], list[int]]:
    """Shards (lists of pieces) and an upper bound of each shard's file size, header included."""
    capacity = max_bytes - _HEADER_FIXED_BYTES
    shards: list[list[_Piece]] = [[]]
    used = [0]

    def new_shard() -> None:
        if shards[-1]:
            shards.append([])
            used.append(0)

    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        cost = _entry_bytes(name, tensor.shape) + nbytes
        if cost > capacity - used[-1] and cost <= capacity:
            new_shard()
        if cost <= capacity - used[-1]:
            shards[-1].append(_Piece(name, name))
            used[-1] += cost
            continue
        # Larger than a whole file: flat pieces, each filling a fresh shard, the last one
        # leaving its shard open to the tensors that follow.
        new_shard()
        n, esize, start = tensor.numel(), tensor.element_size(), 0
        while start < n:
            key = f"{name}#{start}"
            room = (capacity - _entry_bytes(key, [n])) // esize
            if room <= 0:
                raise CheckpointError(f"tensor {name!r}: its name alone does not fit in a {max_bytes}-byte shard")
            stop = min(n, start + room)
            shards[-1].append(_Piece(name, key, start, stop))
            used[-1] += _entry_bytes(key, [n]) + (stop - start) * esize
            start = stop
            if start < n:
                new_shard()
    keys = [p.key for shard in shards for p in shard]
    if len(set(keys)) != len(keys):
        clashes = sorted({k for k in keys if keys.count(k) > 1})
        raise CheckpointError(f"tensor names clash with the names of split pieces: {clashes[:3]}")
    return shards, [_HEADER_FIXED_BYTES + u for u in used]


def _shard_name(i: int, n: int) -> str:
    return f"tensors-{i:05d}-of-{n:05d}.safetensors"


def _index(shards: list[list[_Piece]], tensors: dict[str, torch.Tensor], files: dict[str, dict]) -> dict:
    """index.json: where each tensor lives, how split ones are put back, size and crc32 of every file."""
    weight_map: dict[str, str] = {}
    split: dict[str, dict] = {}
    for i, pieces in enumerate(shards, start=1):
        filename = _shard_name(i, len(shards))
        for p in pieces:
            if p.start is None:
                weight_map[p.name] = filename
                continue
            t = tensors[p.name]
            dtype = str(t.dtype).removeprefix("torch.")
            entry = split.setdefault(p.name, {"dtype": dtype, "shape": list(t.shape), "pieces": []})
            entry["pieces"].append({"file": filename, "key": p.key, "start": p.start, "stop": p.stop})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"format": FORMAT, "total_bytes": total, "weight_map": weight_map, "split_tensors": split, "files": files}


def _shard_payload(pieces: list[_Piece], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tensors reach the host one shard at a time, so host memory holds one shard, not the state.
    payload = {}
    for p in pieces:
        t = tensors[p.name].detach()
        if p.start is not None:
            t = t.contiguous().view(-1)[p.start : p.stop]
        payload[p.key] = t.to("cpu").contiguous()
    return payload


# ---- writing ------------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a new file and fsync it: the JSON files and the pointers."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view[:_IO_CHUNK])
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_crc(path: Path) -> tuple[int, int]:
    """(size, crc32) of a file, read in chunks into one reused buffer."""
    buffer = bytearray(_IO_CHUNK)
    view = memoryview(buffer)
    size = crc = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, crc


def _write_shard(path: Path, payload: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Write one safetensors shard, fsync it; (size, crc32) of the bytes now in the file.

    safetensors streams the tensors to the file, and the checksum is taken by reading the file
    back (from the page cache). Serialising to a bytes object first would cost a shard-sized
    copy: 12 s of 26 s per 1.9 GiB shard on the 2-core benchmark machine.
    """
    try:
        save_file(payload, str(path), metadata=_SAFETENSORS_METADATA)
    except SafetensorError as exc:
        # safetensors reports a failed write (disk full, I/O error) as SafetensorError carrying
        # the OS error number; give it back its OSError shape so it is handled as any write.
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    _fsync_path(path)
    return _file_crc(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(data) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


def _read_pointer(root: Path, pointer: str) -> str | None:
    try:
        return (root / pointer).read_text().strip() or None
    except OSError:
        return None


def _write_pointer(root: Path, pointer: str, name: str) -> None:
    tmp = root / f".{pointer}.tmp"
    tmp.unlink(missing_ok=True)
    _write_bytes(tmp, (name + "\n").encode())
    os.replace(tmp, root / pointer)
    _fsync_path(root)


def _remove_stale(root: Path) -> None:
    """Leftovers of writes that were killed: temporary folders and pointers, set-aside folders."""
    for path in root.iterdir():
        if re.fullmatch(r"\.step_\d+\.tmp", path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name in (f".{LATEST}.tmp", f".{BEST}.tmp"):
            path.unlink(missing_ok=True)
        elif (m := re.fullmatch(r"\.(step_\d+)\.old", path.name)) and path.is_dir():
            # Set aside while a checkpoint of the same step replaced it; when the replacement
            # never arrived, it is the only copy.
            if (root / m.group(1)).exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, root / m.group(1))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a complete checkpoint for `step` and point `latest` at it; returns its folder.

    tensors: name -> tensor (any device, any shape); state: JSON-able. Raises CheckpointError,
    with nothing changed on disk, when the cap is below 1 MiB, the disk has too little free
    space, or any write fails.
    """
    root = checkpoint_root(run_dir)
    name = f"step_{step:08d}"
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < MIN_SHARD_BYTES:
        raise CheckpointError(f"{root}: max_shard_bytes={max_shard_bytes} is below the minimum of {MIN_SHARD_BYTES} (1 MiB)")
    state_bytes = _json_bytes(state)  # unserialisable state fails here, before the disk is touched
    shards, bounds = _plan(tensors, max_shard_bytes)
    needs = sum(bounds) + len(state_bytes) + 4096 + 256 * sum(map(len, shards))
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        free = shutil.disk_usage(root).free
    except OSError as exc:
        raise CheckpointError(f"checkpoint {root / name} not written: {exc.strerror or exc}") from None
    previous = _read_pointer(root, LATEST)
    intact = f"{previous} is intact" if previous else "there is no earlier checkpoint"
    if free < needs + FREE_SPACE_MARGIN:
        raise CheckpointError(
            f"checkpoint {root / name} not written: not enough free space ({_sizes(needs, free)} in {root}); {intact}"
        )

    tmp, final, aside = root / f".{name}.tmp", root / name, root / f".{name}.old"
    doing = f"creating {tmp.name}"
    installed = False
    try:
        tmp.mkdir()
        files: dict[str, dict] = {}
        for i, pieces in enumerate(shards, start=1):
            filename = _shard_name(i, len(shards))
            doing = f"writing {filename}"
            size, crc = _write_shard(tmp / filename, _shard_payload(pieces, tensors))
            if size > max_shard_bytes:  # the header bound in _plan is wrong if this happens
                raise CheckpointError(
                    f"checkpoint {root / name}: {filename} has {size} bytes, over max_shard_bytes={max_shard_bytes}"
                )
            files[filename] = {"bytes": size, "crc32": crc}
        doing = f"writing {STATE}"
        files[STATE] = {"bytes": len(state_bytes), "crc32": zlib.crc32(state_bytes)}
        _write_bytes(tmp / STATE, state_bytes)
        doing = f"writing {INDEX}"
        _write_bytes(tmp / INDEX, _json_bytes(_index(shards, tensors, files)))
        _fsync_path(tmp)
        doing = "moving the folder into place"
        if final.exists():  # the same step saved again: keep the old one until the new one is in
            os.replace(final, aside)
        os.replace(tmp, final)
        installed = True
        _fsync_path(root)
        if previous != name:  # a step saved again is already named
            doing = f"writing the {LATEST} pointer"
            _write_pointer(root, LATEST, name)
    except BaseException as exc:
        committed = installed and _read_pointer(root, LATEST) == name
        if not committed:
            with contextlib.suppress(OSError):  # what is left is removed by the next save
                _roll_back(root, tmp, final if installed else None, aside)
        if not isinstance(exc, OSError):
            raise
        free_now = _free_bytes(root)
        if committed:
            raise CheckpointError(
                f"checkpoint {root / name} written but not synced to disk: {exc.strerror or exc}"
            ) from None
        raise CheckpointError(
            f"checkpoint {root / name} not written: {exc.strerror or exc} while {doing} "
            f"({_sizes(needs, free_now)} in {root}); {intact}"
        ) from None
    shutil.rmtree(aside, ignore_errors=True)
    return final


def _roll_back(root: Path, tmp: Path, installed: Path | None, aside: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    (root / f".{LATEST}.tmp").unlink(missing_ok=True)
    if installed is not None:
        shutil.rmtree(installed, ignore_errors=True)
    if aside.exists() and not (root / aside.name[1:-4]).exists():
        os.replace(aside, root / aside.name[1:-4])


def _free_bytes(root: Path) -> int:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return 0


# ---- reading ------------------------------------------------------------------------------


def _step_of(folder: Path) -> int:
    return int(_STEP_NAME.fullmatch(folder.name).group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest (highest step) first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir() and (p / STATE).is_file()]
    return sorted(found, key=_step_of, reverse=True)


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


def _load_shard(folder: Path, filename: str, files: dict | None) -> dict[str, torch.Tensor]:
    """Tensors of one verified shard, in memory of their own."""
    if files is not None:
        _verify(folder, filename, files, *_file_crc(folder / filename))
    # load_file maps the file; the copies detach the tensors from it, so a file deleted or
    # truncated later cannot take them away.
    return {k: v.clone() for k, v in load_file(str(folder / filename)).items()}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"unknown dtype {name!r}")
    return dtype


def _read_index(folder: Path) -> dict:
    index = json.loads((folder / INDEX).read_text())
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise TypeError(f"{INDEX} has no weight_map")
    return index


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one checkpoint, read and verified one shard at a time.

    Holds at most one shard (and one split tensor being put back together) in memory, so a
    checkpoint larger than the host's memory can be inspected or compared. Raises CheckpointError.
    """
    folder = Path(folder)
    try:
        index = _read_index(folder)
        files = index.get("files")
        split = index.get("split_tensors", {})
        by_file: dict[str, list[tuple[str, dict]]] = {}
        for name, spec in split.items():
            for piece in spec["pieces"]:
                by_file.setdefault(piece["file"], []).append((name, piece))
        whole_by_file: dict[str, list[str]] = {}
        for name, filename in index["weight_map"].items():
            whole_by_file.setdefault(filename, []).append(name)
        seen: set[str] = set()
        building: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (output, elements filled)
        # Shard names are zero-padded, so sorted order is write order: the pieces of a split
        # tensor arrive one after the other.
        for filename in sorted(set(whole_by_file) | set(by_file)):
            loaded = _load_shard(folder, filename, files)
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
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise _corrupt(folder, f"{type(exc).__name__}: {exc}") from None
    missing = (set(index["weight_map"]) | set(split)) - seen
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks tensors {sorted(missing)[:3]}")


def read_state(folder: str | Path) -> dict:
    """state.json of one checkpoint, verified against index.json; raises CheckpointError."""
    folder = Path(folder)
    try:
        files = _read_index(folder).get("files")
        data = (folder / STATE).read_bytes()
        _verify(folder, STATE, files, len(data), zlib.crc32(data))
        return json.loads(data)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _corrupt(folder, f"{type(exc).__name__}: {exc}") from None


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and state of one checkpoint folder; CheckpointError if anything is missing or corrupt."""
    state = read_state(folder)
    return dict(iter_tensors(folder)), state


def load_latest(run_dir: str | Path, warn=print) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint that reads back whole, or None when the run has none.

    The `latest` pointer is tried first; a damaged checkpoint is reported through `warn` and
    the previous complete one is used.
    """
    candidates = list_checkpoints(run_dir)
    named = _read_pointer(checkpoint_root(run_dir), LATEST)
    if named is not None and checkpoint_root(run_dir) / named in candidates:
        candidates.remove(checkpoint_root(run_dir) / named)
        candidates.insert(0, checkpoint_root(run_dir) / named)
    for folder in candidates:
        try:
            tensors, state = read_checkpoint(folder)
        except CheckpointError as exc:
            warn(f"warning: {exc}; trying the previous checkpoint")
            continue
        return folder, tensors, state
    return None


def load_named(run_dir: str | Path, name: str) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """(folder, tensors, state) of the checkpoint `name`: 'latest', 'best' or 'step_00000100'.

    No fallback: a missing pointer, a missing folder or a damaged checkpoint raises CheckpointError.
    """
    root = checkpoint_root(run_dir)
    if name in (LATEST, BEST):
        target = _read_pointer(root, name)
        if target is None:
            raise CheckpointError(f"{root / name}: no {name} checkpoint recorded in this run")
    elif _STEP_NAME.fullmatch(name):
        target = name
    else:
        raise CheckpointError(f"{root}: unknown checkpoint name {name!r} (latest, best or step_NNNNNNNN)")
    folder = root / target
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint {name!r} does not exist")
    tensors, state = read_checkpoint(folder)
    return folder, tensors, state


# ---- retention ----------------------------------------------------------------------------


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
        shutil.rmtree(folder, ignore_errors=True)
        deleted.append(folder)
    return deleted


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints: `retain` without a best metric."""
    retain(run_dir, keep_last=keep, best_metric="")


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """{'model/a.b': t} -> {'a.b': t} for prefix 'model/'."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}
