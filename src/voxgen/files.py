"""Files written whole or not at all."""

from __future__ import annotations

from pathlib import Path


def write_atomic(path: str | Path, text: str | bytes) -> Path:
    """Write `path` whole or not at all: a temporary file beside it, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    tmp.replace(path)
    return path
