"""One trainer per run folder: a lock file holding the trainer's process id.

Two trainers on one folder would overwrite each other's checkpoints and history. The lock is
a POSIX record lock (`lockf`) on RUN/train.lock: the kernel releases it when the process
ends, however it ends, so a killed trainer never leaves a stale lock; unlike `flock`, it is
not inherited by forked data-loader workers (which would hold it after a kill of the main
process) and network file systems (NFS) support it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from voxgen.errors import VoxgenError
from voxgen.files import LockHeld, process_lock

LOCK = "train.lock"


class RunBusy(VoxgenError):
    """Another process is training in this run folder."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's lock for the block; RunBusy when another process holds it."""
    path = Path(run_dir) / LOCK
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(process_lock(path))
        except LockHeld as held:
            raise RunBusy(
                f"{run_dir}: another trainer is running in this run folder (process {held.holder}, lock {path}); "
                "wait for it to end or stop it"
            ) from None
        yield
