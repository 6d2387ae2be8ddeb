"""`voxgen status --run DIR`: one screen per run, read from its folder while it trains or after.

What it reads, and why each is trustworthy:
- RUN/process.json, written by the trainer's first process when it starts ("training") and when it
  ends ("finished", "stopped" with the signal, or "failed" with the error): how the last process ended;
- the run's lock (voxgen.training.run_lock): whether a process holds the run now. The kernel drops
  the lock when a process dies, so "training" in process.json with a free lock means the process
  ended without a word (killed, out of memory, the machine went down);
- the newest checkpoint's state (step, guard totals), RUN/history.json (validations) and the
  TensorBoard log's train/loss wall times (seconds per step).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from voxgen import checkpoint as store
from voxgen.errors import VoxgenError
from voxgen.files import LockHeld, process_lock, write_atomic
from voxgen.training.run_lock import LOCK

PROCESS = "process.json"
# Seconds per step are the median over the newest logged steps.
TIMING_STEPS = 50


def write_process(run_dir: Path, state: str, step: int, steps: int, **extra) -> None:
    """RUN/process.json: the state of the run's last process (training, finished, stopped, failed)."""
    record = {"state": state, "step": step, "steps": steps, "pid": os.getpid(), "host": socket.gethostname()}
    record.update(time=time.time(), **extra)
    write_atomic(run_dir / PROCESS, json.dumps(record, indent=1) + "\n")


@dataclass
class RunStatus:
    run_dir: Path
    state: str  # training, finished, stopped, failed, ended without a word, not started
    detail: str
    step: int
    steps: int
    seconds_per_step: float | None = None
    checkpoint: str | None = None
    checkpoint_age: float | None = None
    validation: dict = field(default_factory=dict)
    guards: dict = field(default_factory=dict)


def _configured_steps(run_dir: Path) -> int:
    """training.steps of the run's saved config."""
    from omegaconf import OmegaConf

    return int(OmegaConf.load(run_dir / "config.yaml").training.steps)


def _committed_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint the `latest` pointer names (the newest committed one), or None."""
    pointer = store.checkpoint_root(run_dir) / "latest"
    try:
        folder = store.checkpoint_root(run_dir) / pointer.read_text().strip()
    except OSError:
        return None
    return folder if folder.is_dir() else None


def _lock_holder(run_dir: Path) -> str | None:
    """The process id holding the run's lock, or None when no process holds it."""
    path = run_dir / LOCK
    if not path.is_file():
        return None
    try:
        with process_lock(path):
            return None
    except LockHeld as held:
        return held.holder or "?"


def _seconds_per_step(run_dir: Path) -> float | None:
    """Median wall time between the newest logged training steps, from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run_dir / "tb"
    if not tb.is_dir():
        return None
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags().get("scalars", []):
        return None
    events = sorted(acc.Scalars("train/loss"), key=lambda e: e.wall_time)[-TIMING_STEPS:]
    rates = [(b.wall_time - a.wall_time) / (b.step - a.step) for a, b in zip(events, events[1:]) if b.step > a.step]
    return statistics.median(rates) if rates else None


def run_status(run_dir: str | Path) -> RunStatus:
    """The status of one run folder; VoxgenError when it is not one."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise VoxgenError(f"{run_dir}: not a run folder (no config.yaml)")
    process = json.loads((run_dir / PROCESS).read_text()) if (run_dir / PROCESS).is_file() else {}
    steps = int(process.get("steps") or _configured_steps(run_dir))
    step, checkpoint, age, guards = 0, None, None, {}
    newest = _committed_checkpoint(run_dir)
    if newest is not None:
        state = store.read_state(newest)
        step, checkpoint = int(state["step"]), newest.name
        age = time.time() - newest.stat().st_mtime
        guards = state.get("guards", {})
    history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else []
    holder = _lock_holder(run_dir)
    said = process.get("state")
    if holder is not None:
        state, detail = "training", f"process {holder} holds the run"
    elif said == "training":
        state = "ended without a word"
        detail = (
            f"its process ({process.get('pid')} on {process.get('host')}) is gone: killed, out of memory or the machine "
            "stopped; the same command resumes from the newest checkpoint"
        )
    elif said == "finished":
        state, detail = "finished", f"all {steps} steps"
    elif said == "stopped":
        state, detail = "stopped", f"by {process.get('by', 'request')}, with a checkpoint; the same command resumes"
    elif said == "failed":
        state, detail = "failed", process.get("error", "")
    elif newest is None:
        state, detail = "not started", "no checkpoint yet"
    else:  # a run from before process records: the checkpoints say how far it got
        state = "finished" if step >= steps else "ended"
        detail = f"at step {step}; how its last process ended is not recorded"
    return RunStatus(
        run_dir,
        state,
        detail,
        step,
        steps,
        _seconds_per_step(run_dir),
        checkpoint,
        age,
        history[-1] if history else {},
        guards,
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def format_status(s: RunStatus) -> list[str]:
    """The screen of one run, a line per topic."""
    lines = [f"{s.run_dir}", f"  state       {s.state}: {s.detail}"]
    share = f" ({100 * s.step / s.steps:.0f}%)" if s.steps else ""
    lines.append(f"  step        {s.step} / {s.steps or '?'}{share} (newest checkpoint)")
    if s.seconds_per_step is not None:
        eta = ""
        if s.state == "training" and s.steps > s.step:
            eta = f"; about {_duration((s.steps - s.step) * s.seconds_per_step)} to go"
        lines.append(f"  speed       {s.seconds_per_step:.3f} s / step over the newest logged steps{eta}")
    if s.checkpoint is not None:
        lines.append(f"  checkpoint  {s.checkpoint}, written {_duration(s.checkpoint_age)} ago")
    if s.validation:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in s.validation.items() if k != "step" and isinstance(v, int | float))
        lines.append(f"  validation  step {s.validation.get('step')}: {shown}")
    g = s.guards
    if g:
        lines.append(
            f"  guards      {g.get('skipped_nonfinite', 0)} non-finite and {g.get('skipped_spike', 0)} spiking steps "
            f"skipped, {g.get('rollbacks', 0)} rollbacks"
        )
    return lines
