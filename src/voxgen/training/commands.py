"""The body of `voxgen train` (arguments as `voxgen.cli` parses them)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def run_train(args) -> int:
    """The body of `voxgen train`; with `--run RUN` (or `diffrs.run=RUN`), the DiffRS head of that run,
    whose data and folder come from the run and whose accuracy on held-out volumes is measured once
    the trainer returns (docs/diffrs.md)."""
    run = args.run or _override(args.overrides, "diffrs.run")
    if not run:
        return _with_signals_noted(args)
    from voxgen.tasks.diffrs_head import head_accuracy, head_overrides, report_line

    args.overrides, head_dir = head_overrides(run, args.overrides)
    code = _with_signals_noted(args)
    if code == 0 and not args.dry_run:
        print(report_line(head_accuracy(head_dir)))
    return code


def _override(overrides: list[str], key: str) -> str | None:
    """The value of the last `key=VALUE` among the overrides, as written."""
    values = [text.split("=", 1)[1].strip() for text in overrides if text.split("=", 1)[0].strip() == key]
    return values[-1] if values else None


def _with_signals_noted(args) -> int:
    # A scheduler's SIGTERM or SIGUSR1 can come while torch is still importing; note it here and
    # let the trainer act on it (checkpoint, exit 75) instead of dying without one.
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda received, frame: pending.append(received)) for s in (signal.SIGTERM, signal.SIGUSR1)}
    code = None
    try:
        code = _train_run(args, pending)
        return code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, _leaving(code, handler))


def _leaving(code: int | None, handler):
    """The stop signals' handler for the rest of this process. A torchrun worker that stopped with
    its checkpoint committed keeps ignoring them: torchrun sends SIGTERM to the workers still
    exiting once the first has exited, and dying of it would turn this process's 75 into 143."""
    from voxgen.training.distributed import world_from_env
    from voxgen.training.signals import EXIT_PREEMPTED

    return signal.SIG_IGN if code == EXIT_PREEMPTED and world_from_env().distributed else handler


def _train_run(args, pending: list[int]) -> int:
    from rich.console import Console

    from voxgen.config import compose, to_yaml
    from voxgen.training.distributed import world_from_env
    from voxgen.training.trainer import train

    files = list(args.config)
    saved = saved_config(args.overrides)
    if saved is not None:
        files.insert(0, saved)
    cfg = compose(files, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    result = train(cfg, Console(stderr=True), stop_at=args.stop_at, pending_signals=pending)
    if result.interrupted:
        return result.exit_code
    last = result.history[-1] if result.history else {}
    if world_from_env().main:  # one summary and one report for a torchrun job, not one per process
        print(f"trained {result.step} steps in {result.run_dir}; val loss {last.get('val_loss', float('nan')):.4f}")
        if cfg.run.report:
            from voxgen.reports.run_report import try_write_run_report

            report, reason = try_write_run_report(result.run_dir)
            print(f"report: {report}" if report else f"no report written: {reason}")
    return 0


def saved_config(overrides) -> Path | None:
    """A run folder's own config is the base when training resumes in it.

    run.dir is read as the config reads it (the override's text, `~` expanded); the last
    run.dir override wins, as it does in the config.
    """
    from voxgen.config.compose import parse_override

    run_dirs = [parse_override(text)[1] for text in overrides if text.strip().startswith("run.dir=")]
    if not run_dirs or not isinstance(run_dirs[-1], str):
        return None
    path = Path(os.path.expanduser(run_dirs[-1])) / "config.yaml"
    return path if path.is_file() else None


def run_status(args) -> int:
    """`voxgen status --run DIR ...`: each run's screen (voxgen.training.status), a blank line between."""
    from voxgen.training.status import format_status
    from voxgen.training.status import run_status as status_of

    screens = ["\n".join(format_status(status_of(run))) for run in args.run]
    print("\n\n".join(screens))
    return 0
