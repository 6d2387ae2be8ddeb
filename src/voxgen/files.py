"""Files written whole or not at all, and one error for a write that fails.

Every file of a run (config, history, samples, figures, reports) is written through
`atomic_path`: into a temporary file beside it, fsynced, renamed into place, the folder
fsynced. A kill leaves the old file or the new one, never half of one; a failed write (disk
full, read-only folder, I/O error) removes the temporary file and raises `WriteError`, which
the command line prints as one `error:` line (exit 2).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
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


class LockHeld(Exception):
    """Another process holds the lock; `holder` is what it wrote into the lock file (its process id)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def process_lock(path: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold a POSIX record lock (`lockf`) on the file `path` for the block.

    The kernel releases it when the process ends, however it ends, so a killed process never
    leaves a stale lock; unlike `flock`, forked children (data-loader workers) do not inherit it,
    and network file systems support it. It excludes other processes only. Another holder:
    LockHeld (wait=False) or a wait until it lets go. A file system without locking (ENOLCK):
    the block runs unlocked. The holder's process id and host are written into the file, for
    messages. WriteError when the file cannot be created.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WriteError(f"{path}: not written: {exc.strerror or exc}") from None
    try:
        if _lock(fd, wait):
            with contextlib.suppress(OSError):  # the process id is for people; the lock is what counts
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _lock(fd: int, wait: bool) -> bool:
    """Take the lock of `fd`; False when the file system has none; LockHeld when taken and not `wait`."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            return False
        if not wait:
            raise LockHeld(os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown") from None
        fcntl.lockf(fd, fcntl.LOCK_EX)
    return True
