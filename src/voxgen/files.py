"""Files written whole or not at all, and one error for a write that fails.

Every file of a run (config, history, samples, figures, reports) is written through
`atomic_path`: into a temporary file beside it, fsynced, renamed into place, the folder
fsynced. A kill leaves the old file or the new one, never half of one; a failed write (disk
full, read-only folder, I/O error) removes the temporary file and raises `WriteError`, which
the command line prints as one `error:` line (exit 2).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from voxgen.errors import WriteError


def fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries (after a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", mode: int = 0o666) -> Iterator[Path]:
    """A temporary path to write `path` through; it replaces `path` when the block ends.

    suffix: kept at the end of the temporary name, for writers that choose the format from
    it (nibabel: '.nii.gz'). mode: the file's permissions, less the umask (0o777: executable).
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, permissions(mode))  # mkstemp makes it 0600
        fsync(tmp)
        os.replace(tmp, path)
        tmp = None
        fsync(path.parent)
    except OSError as exc:
        raise WriteError(f"{path}: not written: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_atomic(path: str | Path, text: str | bytes) -> Path:
    """Write `path` whole or not at all (see `atomic_path`); WriteError when it cannot be written."""
    data = text if isinstance(text, bytes) else text.encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def permissions(mode: int = 0o666) -> int:
    """`mode` less the process's umask: what `open` would give a new file (0o644 under umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mode & ~mask
