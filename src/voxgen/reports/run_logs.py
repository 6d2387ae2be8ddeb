"""What a run's logs say: scalar curves and guard events, from RUN/tb and RUN/history.json.

Curves come from TensorBoard's `EventAccumulator`, which shows what TensorBoard shows: after a
rollback or a resume, the steps a restart abandoned are hidden (the trainer writes a restart
marker, `SessionLog.START`, at the step it goes back to) and the replayed steps take their place.

Guard events are read from the raw event stream instead, in the order it was written, because
the abandoned steps are where the trouble was: the non-finite losses that caused a rollback were
logged in the steps the rollback then abandoned. The guards log cumulative counters
(`voxgen.training.guards.Guards.scalars`), so an event is a step at which a counter went up:

- normally at the logged step where the higher count first appears (with training.log_every > 1
  the event happened within the log_every steps up to it);
- when the log went back (a restart marker at or below the highest step logged so far) and the
  first counts after it show a new rollback, everything counted since the last logged step
  happened in the steps the rollback abandoned: the events are placed at the step after the
  last one logged before it, which is the rollback's own step when every step is logged (the
  trainer rolls back before that step's log line). A restart without a new rollback (a resume
  after a kill) does not move anything.

Collapse checks are validations (history.json) whose predictions' spread fell below
guards.collapse_std_ratio of the target's, counted by the same rule as
`Guards.check_collapse`; a run that stopped with an error (RUN/process.json) is an event at its
last step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from voxgen.reports.svg_chart import Marker

COUNTERS = {
    "guards/skipped_nonfinite": "nonfinite",
    "guards/skipped_spike": "spike",
    "guards/rollbacks": "rollback",
    "guards/rebaselines": "rebaseline",
}


@dataclass
class RunLogs:
    """Scalars by tag as (step, value) lists sorted by step, validation records, guard events."""

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    events: list[Marker] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        steps = [s for points in self.scalars.values() for s, _ in points]
        steps += [int(r.get("step", 0)) for r in self.history]
        steps += [m.step for m in self.events]
        return max(steps, default=0)


def _event_files(tb: Path) -> list[Path]:
    # TensorBoard reads a folder's event files in name order (their names start with the time).
    return sorted(p for p in tb.glob("events.out.tfevents.*") if p.is_file())


def read_curves(tb: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of RUN/tb as TensorBoard shows it (abandoned steps purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        out[tag] = sorted((int(e.step), float(e.value)) for e in acc.Scalars(tag))
    return out


def _scalar(value) -> float:
    if value.HasField("simple_value"):
        return float(value.simple_value)
    from tensorboard.util.tensor_util import make_ndarray

    return float(make_ndarray(value.tensor).reshape(-1)[0])


def raw_stream(tb: Path):
    """("restart", step, None) and ("scalar", step, (tag, value)) in the order they were written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in _event_files(tb):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                yield "restart", int(event.step), None
            elif event.HasField("summary"):
                for value in event.summary.value:
                    if value.HasField("simple_value") or value.HasField("tensor"):
                        yield "scalar", int(event.step), (value.tag, _scalar(value))


def guard_events(stream) -> list[Marker]:
    """Guard counter increases of a raw event stream (see the module doc for where they are placed)."""
    counts = dict.fromkeys(COUNTERS, 0.0)
    logged = 0  # highest step logged since the last restart marker that went back
    went_back: tuple[int, int] | None = None  # (last step logged before it, the restart's step)
    group_step: int | None = None
    group: dict[str, float] = {}
    events: list[Marker] = []

    def close_group() -> None:
        nonlocal went_back
        if group_step is None or not group:
            return
        rises = {tag: value - counts[tag] for tag, value in group.items() if value > counts[tag]}
        counts.update(group)
        at, note, back_to = group_step, "", None
        if went_back is not None and "guards/rollbacks" in rises:
            last, restart = went_back
            at, back_to = last + 1, restart - 1
            note = f"; counted in the steps after {last}, which the rollback abandoned"
        went_back = None
        for tag, rise in rises.items():
            kind = COUNTERS[tag]
            text = f"{tag} rose to {counts[tag]:g}{note}"
            if kind == "rollback" and back_to is not None:
                text = f"rolled back to step {back_to}; {text}"
            events.append(Marker(at, kind, text, int(round(rise))))

    for kind, step, payload in stream:
        if kind == "restart":
            close_group()
            group_step, group = None, {}
            if step <= logged:
                went_back = (logged, step)
                logged = step - 1
            continue
        tag, value = payload
        if tag in COUNTERS and math.isfinite(value):
            if step != group_step:
                close_group()
                group_step, group = step, {}
            group[tag] = value
        logged = max(logged, step)
    close_group()
    return events


def collapse_events(history: list[dict], ratio: float, warmup_steps: int) -> list[Marker]:
    """Validations that count towards the collapse guard (Guards.check_collapse's rule)."""
    if ratio <= 0:
        return []
    out, seen_spread = [], False
    for record in history:
        pred, target = record.get("prediction_std"), record.get("target_std")
        if not isinstance(pred, int | float) or not isinstance(target, int | float) or target <= 0:
            continue
        step = int(record.get("step", 0))
        if pred >= ratio * target:
            seen_spread = True
            continue
        if seen_spread or step > warmup_steps:
            share = 100.0 * pred / target
            out.append(Marker(step, "low-spread", f"predictions' std is {share:.1f}% of the target's (limit {100 * ratio:g}%)"))
    return out


def failure_event(process: dict) -> list[Marker]:
    """The error a run stopped with (RUN/process.json state 'failed'), at its last step."""
    if process.get("state") != "failed":
        return []
    error = str(process.get("error", ""))
    kind = "collapse" if "collapsed" in error else "diverged" if "diverged" in error else "failed"
    return [Marker(int(process.get("step", 0)), kind, error or "the run failed")]


def read_run_logs(run_dir: Path, collapse_ratio: float = 0.0, warmup_steps: int = 0) -> RunLogs:
    """Curves, validation history and events of a run folder; what cannot be read goes to `problems`."""
    logs = RunLogs()
    tb = run_dir / "tb"
    if tb.is_dir() and _event_files(tb):
        try:
            logs.scalars = read_curves(tb)
            logs.events = guard_events(raw_stream(tb))
        except Exception as exc:  # a damaged event file: the rest of the report is still worth having
            logs.problems.append(f"{tb}: TensorBoard log not fully readable ({type(exc).__name__}: {exc})")
    else:
        logs.problems.append(f"{tb}: no TensorBoard event files")
    history = run_dir / "history.json"
    if history.is_file():
        try:
            data = json.loads(history.read_text())
            logs.history = [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []
        except (OSError, ValueError) as exc:
            logs.problems.append(f"{history}: not readable ({exc})")
    logs.events += collapse_events(logs.history, collapse_ratio, warmup_steps)
    process = run_dir / "process.json"
    if process.is_file():
        try:
            logs.events += failure_event(json.loads(process.read_text()))
        except (OSError, ValueError) as exc:
            logs.problems.append(f"{process}: not readable ({exc})")
    logs.events.sort(key=lambda m: (m.step, m.kind))
    return logs
