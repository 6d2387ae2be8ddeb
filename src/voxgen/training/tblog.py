"""TensorBoard logging that a failing disk cannot turn into a crash.

TensorBoard's writer appends events from a background thread. When a write fails (disk
full, I/O error) that thread dies with a traceback on stderr, and the next logging call in
the training loop raises. Logs are worth less than the run: the first failure is reported
as one warning and logging stops; history.json and the checkpoints go on recording the run,
and their writes stop it cleanly (exit 2) if the disk stays full.
"""

from __future__ import annotations

import threading
from pathlib import Path


class TensorBoardLog:
    def __init__(self, folder: str | Path, purge_step: int | None, warn) -> None:
        self._warn = warn
        self._writer = None
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_failed
        from torch.utils.tensorboard import SummaryWriter

        try:
            self._writer = SummaryWriter(str(folder), purge_step=purge_step)
        except Exception as exc:
            self._stopped(exc)

    def _thread_failed(self, args) -> None:
        # The writer thread's death is reported by the next call in the main thread (below).
        if type(args.thread).__name__ != "_AsyncWriterThread":
            self._previous_hook(args)

    def _guarded(self, call) -> None:
        if self._writer is None:
            return
        try:
            call()
        except Exception as exc:  # any failure of the event writer, its thread's included
            self._stopped(exc)

    def _stopped(self, exc: Exception) -> None:
        self._writer = None
        reason = getattr(exc, "strerror", None) or exc
        self._warn(f"warning: TensorBoard logging stopped ({reason}); training goes on, history.json records validation")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._guarded(lambda: self._writer.add_scalar(tag, value, step))

    def add_image(self, tag: str, image, step: int, dataformats: str) -> None:
        self._guarded(lambda: self._writer.add_image(tag, image, step, dataformats=dataformats))

    def add_event(self, event) -> None:
        self._guarded(lambda: self._writer._get_file_writer().add_event(event))

    def close(self) -> None:
        self._guarded(lambda: self._writer.close())
        self._writer = None
        if threading.excepthook == self._thread_failed:
            threading.excepthook = self._previous_hook


class NoLog:
    """The log of a process that does not write one (all but the first of a torchrun job)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_image(self, *args, **kwargs) -> None:
        pass

    def add_event(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
