"""Stopping a run at a step boundary: stop signals and the exit codes of `voxgen train`."""

from __future__ import annotations

import os
import signal
import threading

# Exit codes of `voxgen train` (docs/reliability.md). 0: training.steps reached.
# Ctrl-C after the checkpoint is saved: 128 + SIGINT, what a shell reports for a program Ctrl-C ended.
EXIT_INTERRUPTED = 130
# SIGTERM/SIGUSR1 (a scheduler's warning) or --stop-at after the checkpoint is saved: EX_TEMPFAIL of
# sysexits.h, "temporary failure, retry"; job scripts resubmit on it (voxgen/config/slurm/train.sbatch).
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """SIGINT, SIGTERM and SIGUSR1 ask the run to stop at the next step boundary and save.

    The first signal is kept with the phase of the run it arrived in (`phase()` at that moment).
    A later SIGINT aborts at once (a user who presses Ctrl-C twice means it); other repeats are
    ignored, because SLURM follows its warning signal with SIGTERM at the time limit and that
    must not cut the checkpoint short. `pending`: signals that arrived before the handlers were
    installed (the command line records them from its start), read when they are installed.
    """

    def __init__(self, phase=lambda: "start-up", pending: list[int] | None = None) -> None:
        self.signum: int | None = None
        self.phase: str | None = None
        self._phase_of = phase
        self._pending = pending if pending is not None else []
        self._previous: dict = {}
        self._arrivals: int | None = None  # read end of the wakeup pipe
        self._previous_wakeup_fd = -1

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_PREEMPTED

    def adopt(self, signum: int) -> None:
        """Stop as if `signum` had arrived here: it reached another process of the same job."""
        if self.signum is None:
            self.signum, self.phase = signum, f"{self._phase_of()}, sent to another process of the job"

    def _first_arrived(self, signum: int) -> int:
        """The stop signal that arrived first among those not yet handled (see the class doc)."""
        arrived = bytearray()
        while self._arrivals is not None:
            try:
                chunk = os.read(self._arrivals, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            arrived += chunk
        # Other signals with Python handlers (SIGCHLD of data-loader workers) are there too.
        return next((s for s in arrived if s in STOP_SIGNALS), signum)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum, self.phase = self._first_arrived(signum), self._phase_of()

    def __enter__(self) -> StopRequest:
        if self._pending:
            self.signum, self.phase = self._pending[0], "start-up"
        if threading.current_thread() is threading.main_thread():
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            os.set_blocking(write_end, False)
            self._arrivals = read_end
            self._previous_wakeup_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self._arrivals is not None:
            os.close(signal.set_wakeup_fd(self._previous_wakeup_fd))
            os.close(self._arrivals)
            self._arrivals = None
