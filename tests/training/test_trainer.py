"""End-to-end training on tiny phantoms: it learns, it resumes, it survives Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

from voxgen import checkpoint as store
from voxgen.config import compose
from voxgen.training.signals import EXIT_INTERRUPTED
from voxgen.training.trainer import train

TINY = [
    "data.shape=[16,16,16]",
    "model.channels=[8,16]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=8",
    "model.norm_num_groups=4",
    "training.batch_size=2",
    "training.lr=2e-3",
    "training.warmup_steps=5",
    "training.val_batches=2",
    "sample.steps=10",
    # The end-of-run report (planning the step's GPU memory, the viewer) is tested on its own:
    # a run's subprocess here would spend seconds on it.
    "run.report=false",
]


def _cfg(root, run_dir, *extra):
    return compose([], [*TINY, f"data.root={root}", f"run.dir={run_dir}", *extra])


def _quiet():
    return Console(file=open(os.devnull, "w"))


def test_resume_equals_uninterrupted_run(phantom_root, tmp_path):
    extra = ["training.steps=12", "training.val_every=4", "training.checkpoint_every=6"]
    train(_cfg(phantom_root, tmp_path / "a", *extra), _quiet())
    first = train(_cfg(phantom_root, tmp_path / "b", *extra), _quiet(), stop_at=5)
    assert first.interrupted and first.step == 5
    resumed = train(_cfg(phantom_root, tmp_path / "b", *extra), _quiet())
    assert resumed.resumed_from == 5 and resumed.step == 12
    _, a, state_a = store.load_latest(tmp_path / "a")
    _, b, state_b = store.load_latest(tmp_path / "b")
    assert set(a) == set(b)
    for name in a:  # weights, EMA, optimiser moments, RNG states
        assert torch.equal(a[name], b[name]), name
    assert state_a["history"] == state_b["history"]
    assert (state_a["epoch"], state_a["batch_index"]) == (state_b["epoch"], state_b["batch_index"])


@pytest.mark.slow
def test_training_learns_and_beats_an_untrained_model(phantom_root, tmp_path):
    from voxgen.diffusion.sampling import sample_volumes, sampling_settings
    from voxgen.quickstart import quality
    from voxgen.training.runs import load_run

    result = train(
        _cfg(phantom_root, tmp_path / "run", "training.steps=150", "training.val_every=50", "training.checkpoint_every=150"),
        _quiet(),
    )
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert last <= 0.5 * first, (first, last)
    cfg, parts, step = load_run(tmp_path / "run")
    sampling = sampling_settings(cfg.sample, parts.strategy, parts.mode.conditional)
    trained = sample_volumes(cfg, parts, 4, 0, sampling).volumes[parts.mode.generated[0]]
    q = quality(cfg, parts, trained, seed=0)
    assert q.trained * 2 <= q.untrained, q


def test_ctrl_c_saves_and_the_same_command_resumes(phantom_root, tmp_path, capsys):
    from voxgen.cli import main

    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "voxgen.cli",
        "train",
        *TINY,
        f"data.root={phantom_root}",
        f"run.dir={run_dir}",
        "training.steps=100000",
        "training.val_every=1000",
        "training.checkpoint_every=1000",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    # Wait until the step-0 validation is written, then interrupt somewhere in training.
    while time.time() < deadline and not (run_dir / "history.json").exists():
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "stopped at step" in err and "SIGINT" in err
    folder, _, state = store.load_latest(run_dir)
    stopped_at = state["step"]
    assert stopped_at >= 0
    # The same command with more steps; in this process, which needs no second start-up.
    more = [f"training.steps={stopped_at + 2}", "training.val_every=1000", "training.checkpoint_every=1000"]
    code = main([*args[3:-3], *more])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"resumed from {folder}" in err.replace("\n", "")
    assert store.load_latest(run_dir)[2]["step"] == stopped_at + 2


def test_bad_data_leaves_no_run_folder(phantom_root, tmp_path, capsys):
    import shutil

    from voxgen.cli import main

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    victim = sorted((root / "val").iterdir())[0] / "bravo.nii.gz"
    victim.write_bytes(b"not a NIfTI file")
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, f"data.root={root}", f"run.dir={run_dir}", "training.device=cpu"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(victim) in lines[0]
    assert not run_dir.exists()


def test_checkpoints_follow_the_config_keys(phantom_root, tmp_path):
    extra = [
        "training.steps=8",
        "training.val_every=2",
        "training.checkpoint_every=1",
        "checkpoint.keep_last=3",
        "checkpoint.best_metric=val_loss_ema",
        "training.device=cpu",
    ]
    result = train(_cfg(phantom_root, tmp_path, *extra), _quiet())
    kept = sorted(p.name for p in store.list_checkpoints(tmp_path))
    best_step = min(result.history[1:], key=lambda h: h["val_loss_ema"])["step"]
    assert kept == sorted({f"step_{s:08d}" for s in (6, 7, 8, best_step)})
    assert store.load_named(tmp_path, "best")[2]["step"] == best_step
    for folder in store.list_checkpoints(tmp_path):
        state = store.read_state(folder)
        # The latest validation record at the time of the save.
        assert state["metrics"] == [h for h in result.history if h["step"] <= state["step"]][-1]


def test_ema_copies_until_ema_start_then_moves_every_ema_update_every_steps(phantom_root, tmp_path, monkeypatch):
    """The seeds' EMA recipe (update after 100 steps, every 10), at test size: start 2, every 3."""
    from voxgen.training.ema import EMA

    calls = []
    for name in ("reset", "update"):
        real = getattr(EMA, name)
        monkeypatch.setattr(EMA, name, lambda self, model, real=real, name=name: (calls.append(name), real(self, model))[1])
    extra = ["training.steps=8", "training.val_every=8", "training.ema_start=2", "training.ema_update_every=3"]
    train(_cfg(phantom_root, tmp_path / "run", *extra), _quiet())
    # Steps 1-2 copy the weights; then steps 5 and 8 move the average.
    assert calls == ["reset", "reset", "update", "update"]


def test_ema_update_every_below_one_is_refused():
    from voxgen.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training.ema_update_every=0"):
        compose([], [*TINY, "training.ema_update_every=0"])
