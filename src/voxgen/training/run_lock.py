"""One trainer per run folder: a lock file holding the trainer's process id.

Two trainers on one folder would overwrite each other's checkpoints and history. The lock is
a POSIX record lock (`lockf`) on RUN/train.lock: the kernel releases it when the process
ends, however it ends, so a killed trainer never leaves a stale lock; unlike `flock`, it is
not inherited by forked data-loader workers (which would hold it after a kill of the main
process) and network file systems (NFS) support it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from voxgen.errors import VoxgenError, WriteError

LOCK = "train.lock"


class RunBusy(VoxgenError):
    """Another process is training in this run folder."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's lock for the block; RunBusy when another process holds it."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WriteError(f"{path}: not written: {exc.strerror or exc}") from None
    try:
        _take(fd, path, run_dir)
        yield
    finally:
        os.close(fd)


def _take(fd: int, path: Path, run_dir) -> None:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            return  # no locking on this file system (ENOLCK): the run goes on unlocked
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        raise RunBusy(
            f"{run_dir}: another trainer is running in this run folder (process {holder}, lock {path}); "
            "wait for it to end or stop it"
        ) from None
    with contextlib.suppress(OSError):  # the process id is for people; the lock is what counts
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
