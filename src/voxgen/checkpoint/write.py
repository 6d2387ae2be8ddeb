"""Writing a checkpoint: a whole folder or nothing, then the `latest` pointer.

A checkpoint is written into `.step_N.tmp/`, every file fsynced, then renamed into place;
`latest` is replaced atomically last. A failed write (disk full, I/O error) removes what it
wrote and leaves the previous checkpoint and `latest` as they were.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from voxgen.checkpoint.layout import (
    _IO_CHUNK,
    _STEP_NAME,
    BEST,
    INDEX,
    LATEST,
    STATE,
    _file_crc,
    _read_pointer,
    _step_of,
    checkpoint_folder,
    checkpoint_root,
    index_crc,
    json_bytes,
)
from voxgen.checkpoint.plan import _SAFETENSORS_METADATA, Part, _index, _index_part, _plan, _shard_name, _shard_payload
from voxgen.errors import CheckpointError
from voxgen.files import fsync, permissions

DEFAULT_MAX_SHARD_BYTES = int(1.9 * 2**30)
MIN_SHARD_BYTES = 2**20
# Room left beyond the bytes of the checkpoint itself: file-system metadata, and the logs and
# TensorBoard events the run keeps writing next to it.
FREE_SPACE_MARGIN = 64 * 2**20


def _sizes(needs: int, free: int) -> str:
    """'needs 1.2 GiB, 0.3 GiB free' (MiB when both are under 1 GiB)."""
    unit, scale = ("GiB", 2**30) if max(needs, free) >= 2**30 else ("MiB", 2**20)
    return f"needs {needs / scale:.1f} {unit}, {free / scale:.1f} {unit} free"


def _write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a new file and fsync it: the JSON files and the pointers."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less the umask, as any file
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view[:_IO_CHUNK])
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


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
    # safetensors creates its files 0600; give shards the permissions of the run's other files.
    os.chmod(path, permissions())
    fsync(path)
    return _file_crc(path)


def _write_pointer(root: Path, pointer: str, name: str) -> None:
    """Point `latest` or `best` at the folder `name`, atomically (write aside, fsync, rename)."""
    tmp = root / f".{pointer}.tmp"
    tmp.unlink(missing_ok=True)
    _write_bytes(tmp, (name + "\n").encode())
    os.replace(tmp, root / pointer)
    fsync(root)


def _remove_stale(root: Path) -> None:
    """Leftovers of writes and deletions that were killed: temporary folders and pointers,
    folders being deleted, set-aside folders."""
    for path in root.iterdir():
        if re.fullmatch(r"\.step_\d+\.(tmp|trash)", path.name) and path.is_dir():
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


def remove_leftovers(run_dir: str | Path) -> None:
    """Clear what killed writes and deletions left behind (the trainer calls it at start)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        _remove_stale(root)


def delete_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder: renamed to a trash name first, so a kill half-way through
    leaves a name that `remove_leftovers` sweeps, never a half checkpoint under a step name."""
    trash = folder.with_name(f".{folder.name}.trash")
    os.replace(folder, trash)
    fsync(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def discard_after(run_dir: str | Path, kept: Path) -> list[Path]:
    """Delete the checkpoints newer than `kept`, pointing `latest` at it first (a rollback
    abandons the steps after it). Returns the deleted folders."""
    root = checkpoint_root(run_dir)
    newer = [p for p in root.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir() and _step_of(p) > _step_of(kept)]
    if not newer:
        return []
    _write_pointer(root, LATEST, kept.name)
    for folder in newer:
        delete_checkpoint(folder)
    return newer


@dataclass(frozen=True)
class Writers:
    """The processes that write one checkpoint together (a sharded run): each writes the slices
    of tensors it holds (`parts`) into files of its own; the first also writes the tensors every
    process holds alike, state.json and index.json, and moves the folder into place. `gather`
    brings every process's value to the first (None elsewhere); `all_ok` is True on every
    process when it is True on every process. One process is a world of one writer."""

    rank: int = 0
    size: int = 1
    gather: Callable[[Any], list | None] = field(default=lambda value: [value])
    all_ok: Callable[[bool], bool] = field(default=lambda ok: ok)

    @property
    def first(self) -> bool:
        return self.rank == 0


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    writers: Writers = Writers(),
    parts: dict[str, Part] | None = None,
) -> Path:
    """Write a complete checkpoint for `step` and point `latest` at it; returns its folder.

    tensors: name -> tensor (any device, any shape); state: JSON-able. Raises CheckpointError,
    with nothing changed on disk, when the cap is below 1 MiB, the disk has too little free
    space, or any write fails.

    Several `writers`: every process calls this with its own `tensors`; those named in `parts`
    are its slices of larger tensors, the others are written by the first process only (they are
    the same everywhere). A failure on any process fails the checkpoint on all.
    """
    root = checkpoint_root(run_dir)
    name = checkpoint_folder(run_dir, step).name
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < MIN_SHARD_BYTES:
        raise CheckpointError(f"{root}: max_shard_bytes={max_shard_bytes} is below the minimum of {MIN_SHARD_BYTES} (1 MiB)")
    parts = parts or {}
    if not writers.first:  # what every process holds alike is the first one's to write
        tensors = {k: t for k, t in tensors.items() if k in parts}
    state_bytes = json_bytes(state)  # unserialisable state fails here, before the disk is touched
    shards, bounds = _plan(tensors, max_shard_bytes, parts)
    local_needs = sum(bounds) + 256 * sum(map(len, shards))
    needs = sum(writers.gather(local_needs) or []) + len(state_bytes) + 4096
    tmp, final, aside = root / f".{name}.tmp", root / name, root / f".{name}.old"

    # 1. The first process makes room and the temporary folder; the others wait for it.
    previous = intact = error = None
    if writers.first:
        try:
            previous, intact = _prepare(root, name, tmp, needs)
        except CheckpointError as exc:
            error = exc
    if not writers.all_ok(error is None):
        raise error or CheckpointError(f"checkpoint {final} not written: the first process of the run could not prepare it")

    # 2. Every process writes its shard files.
    doing, files, filenames = f"creating {tmp.name}", {}, []
    try:
        for i, pieces in enumerate(shards, start=1):
            filename = _shard_name(i, len(shards), writers.rank if writers.size > 1 else None)
            doing = f"writing {filename}"
            size, crc = _write_shard(tmp / filename, _shard_payload(pieces, tensors, parts))
            if size > max_shard_bytes:  # the header bound in _plan is wrong if this happens
                raise CheckpointError(f"checkpoint {final}: {filename} has {size} bytes, over max_shard_bytes={max_shard_bytes}")
            files[filename] = {"bytes": size, "crc32": crc}
            filenames.append(filename)
    except OSError as exc:
        error = CheckpointError(
            f"checkpoint {final} not written: {exc.strerror or exc} while {doing} "
            f"({_sizes(needs, _free_bytes(root))} in {root}); {intact or 'the previous checkpoint is intact'}"
        )
    except CheckpointError as exc:
        error = exc
    local_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    written = writers.gather((files, _index_part(shards, filenames, tensors, parts), local_bytes))
    if not writers.all_ok(error is None):
        if writers.first:
            with contextlib.suppress(OSError):
                _roll_back(root, tmp, None, aside)
        raise error or CheckpointError(f"checkpoint {final} not written: a write failed on another process of the run")

    # 3. The first process writes state.json and index.json and moves the folder into place.
    if writers.first:
        try:
            all_files = {k: v for f, _, _ in written for k, v in f.items()}
            index = _index([part for _, part, _ in written], all_files, sum(b for _, _, b in written))
            _commit(root, name, tmp, state_bytes, index, previous, intact, needs)
        except CheckpointError as exc:
            error = exc
    if not writers.all_ok(error is None):
        raise error or CheckpointError(f"checkpoint {final} not written: the first process of the run could not commit it")
    return final


def _prepare(root: Path, name: str, tmp: Path, needs: int) -> tuple[str | None, str]:
    """Make the checkpoint's temporary folder once the disk has room for `needs` bytes;
    (the checkpoint `latest` names now, words saying it stays intact)."""
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
    try:
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {root / name} not written: {exc.strerror or exc} while creating {tmp.name}; {intact}"
        ) from None
    return previous, intact


def _commit(root: Path, name: str, tmp: Path, state_bytes: bytes, index: dict, previous: str | None, intact: str, needs: int):
    """state.json and index.json into the written folder, then the folder into place and `latest`."""
    final, aside = root / name, root / f".{name}.old"
    installed = False
    doing = f"writing {STATE}"
    try:
        index["files"][STATE] = {"bytes": len(state_bytes), "crc32": zlib.crc32(state_bytes)}
        _write_bytes(tmp / STATE, state_bytes)
        doing = f"writing {INDEX}"
        index["index_crc32"] = index_crc(index)
        _write_bytes(tmp / INDEX, json_bytes(index))
        fsync(tmp)
        doing = "moving the folder into place"
        if final.exists():  # the same step saved again: keep the old one until the new one is in
            os.replace(final, aside)
        os.replace(tmp, final)
        installed = True
        fsync(root)
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
            raise CheckpointError(f"checkpoint {final} written but not synced to disk: {exc.strerror or exc}") from None
        raise CheckpointError(
            f"checkpoint {final} not written: {exc.strerror or exc} while {doing} ({_sizes(needs, free_now)} in {root}); {intact}"
        ) from None
    shutil.rmtree(aside, ignore_errors=True)


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
