"""Names on disk and small helpers every part of the store shares.

RUN/checkpoints/step_NNNNNNNN/{tensors-*.safetensors, index.json, state.json}
RUN/checkpoints/{latest, best}     pointers: the name of one checkpoint folder, one line
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import torch

INDEX = "index.json"
STATE = "state.json"
LATEST = "latest"
BEST = "best"
FORMAT = 2  # 1: weight_map only, no sizes or checksums (still readable)
_STEP_NAME = re.compile(r"step_(\d+)")
# Bytes per read or write call: a checksum pass over a 1.9 GiB shard holds this much, not the file.
_IO_CHUNK = 16 * 2**20


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(folder: Path) -> int:
    """100 for RUN/checkpoints/step_00000100."""
    return int(_STEP_NAME.fullmatch(folder.name).group(1))


def _read_pointer(root: Path, pointer: str) -> str | None:
    """The folder name `latest` or `best` holds; None when the pointer is missing or empty."""
    try:
        return (root / pointer).read_text().strip() or None
    except OSError:
        return None


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


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """{'model/a.b': t} -> {'a.b': t} for prefix 'model/'; names without the prefix are dropped."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """{'a.b': t} -> {'model/a.b': t} for prefix 'model/'."""
    return {prefix + k: v for k, v in tensors.items()}
