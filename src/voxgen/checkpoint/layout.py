"""Names on disk and small helpers every part of the store shares.

RUN/checkpoints/step_NNNNNNNN/{tensors-*.safetensors, index.json, state.json}
RUN/checkpoints/{latest, best}     pointers: the name of one checkpoint folder, one line
RUN/checkpoints/.step_NNNNNNNN.trash   a checkpoint being deleted (renamed first, so a kill
                                       during the deletion never leaves a half checkpoint)
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch

INDEX = "index.json"
STATE = "state.json"
LATEST = "latest"
BEST = "best"
# 3: index.json carries its own crc32. 2: sizes and crc32 of the other files.
# 1: weight_map only, no sizes or checksums (still readable).
FORMAT = 3
_STEP_NAME = re.compile(r"step_(\d+)")
# Bytes per read or write call: a checksum pass over a 1.9 GiB shard holds this much, not the file.
_IO_CHUNK = 16 * 2**20


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_folder(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is (or will be)."""
    return checkpoint_root(run_dir) / f"step_{step:08d}"


def _step_of(folder: Path) -> int:
    """100 for RUN/checkpoints/step_00000100."""
    return int(_STEP_NAME.fullmatch(folder.name).group(1))


def _read_pointer(root: Path, pointer: str) -> str | None:
    """The folder name `latest` or `best` holds; None when the pointer is missing or holds
    anything but a checkpoint folder name (unreadable, damaged, empty).

    Pointers are hints: the checkpoints themselves are the truth, so a damaged pointer is
    ignored, never a reason to fail.
    """
    try:
        name = (root / pointer).read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_NAME.fullmatch(name) else None


def _file_crc(path: Path) -> tuple[int, int]:
    """(size in bytes, crc32) of a file, read in chunks into one reused buffer."""
    buffer = bytearray(_IO_CHUNK)
    view = memoryview(buffer)
    size = crc = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, crc


def json_bytes(data) -> bytes:
    """The one serialisation of the JSON files: index_crc32 is taken over these exact bytes."""
    return json.dumps(data, indent=1, sort_keys=True).encode()


def index_crc(index: dict) -> int:
    """crc32 of index.json's content without its own `index_crc32` entry."""
    return zlib.crc32(json_bytes({k: v for k, v in index.items() if k != "index_crc32"}))


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """{'model/a.b': t} -> {'a.b': t} for prefix 'model/'; names without the prefix are dropped."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """{'a.b': t} -> {'model/a.b': t} for prefix 'model/'."""
    return {prefix + k: v for k, v in tensors.items()}
