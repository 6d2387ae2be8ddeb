"""`voxgen status --run DIR`: a running, a stopped, a finished and a crashed run, each as it is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console
from test_trainer import TINY

from voxgen.cli import main
from voxgen.config import compose
from voxgen.training.status import run_status
from voxgen.training.trainer import train


def _start(root, run_dir):
    """A long `voxgen train` in its own process, returned once its first checkpoint is committed."""
    args = [sys.executable, "-m", "voxgen.cli", "train", *TINY, f"data.root={root}", f"run.dir={run_dir}"]
    args += ["training.steps=100000", "training.val_every=5", "training.checkpoint_every=5", "training.log_every=1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoints" / "latest").exists():
        time.sleep(0.1)
    time.sleep(1.0)  # a few more logged steps for the speed
    assert proc.poll() is None, proc.stderr.read()
    return proc


def test_a_running_run_then_the_same_run_stopped_by_sigterm(phantom_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = _start(phantom_root, run_dir)
    try:
        status = run_status(run_dir)
        assert status.state == "training" and f"process {proc.pid}" in status.detail
        assert status.steps == 100000 and status.step >= 5 and status.seconds_per_step > 0
        assert main(["status", "--run", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert "to go" in out and "checkpoint  step_" in out and "validation  step" in out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 75
    stopped = run_status(run_dir)
    assert stopped.state == "stopped" and "SIGTERM" in stopped.detail and stopped.step >= status.step


def test_a_crashed_run_says_its_process_is_gone(phantom_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(phantom_root, run_dir)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    status = run_status(run_dir)
    assert status.state == "ended without a word" and f"({proc.pid} on " in status.detail
    assert status.step >= 5 and status.checkpoint == f"step_{status.step:08d}"


def test_a_finished_run_with_its_validation_and_guards(phantom_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = compose([], [*TINY, f"data.root={phantom_root}", f"run.dir={run_dir}", "training.steps=6", "training.val_every=3"])
    train(cfg, Console(file=open(os.devnull, "w")))
    status = run_status(run_dir)
    assert (status.state, status.step, status.steps) == ("finished", 6, 6)
    assert status.validation["step"] == 6 and "skipped_spike" in status.guards
    assert main(["status", "--run", str(run_dir), "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {tmp_path}: not a run folder (no config.yaml)"


def test_a_failed_run_names_its_error(phantom_root, tmp_path, monkeypatch):
    from voxgen.training.trainer import Trainer

    def broken(self, *args, **kwargs):
        raise RuntimeError("the loss went to the moon\nsecond line")

    monkeypatch.setattr(Trainer, "_loop", broken)
    run_dir = tmp_path / "run"
    cfg = compose([], [*TINY, f"data.root={phantom_root}", f"run.dir={run_dir}", "training.steps=4", "training.val_every=2"])
    with pytest.raises(RuntimeError):
        train(cfg, Console(file=open(os.devnull, "w")))
    status = run_status(run_dir)
    assert status.state == "failed" and status.detail == "the loss went to the moon"
