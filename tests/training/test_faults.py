"""Fault injection: kills, preemption signals, failing disks, NaN losses, spikes and collapse.

Process tests run `voxgen train` (through `voxgen.cli.main`, as the console script does) in
processes forked from one pre-imported server: each restart is a new process that shares no
state with the previous one, without paying the ~4 s of importing torch each time.
"""

import contextlib
import errno
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import SafetensorError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_trainer import TINY

from voxgen import checkpoint as store
from voxgen.checkpoint import write as store_write
from voxgen.cli import main
from voxgen.config import compose
from voxgen.errors import TrainingCollapsed
from voxgen.training.signals import EXIT_PREEMPTED
from voxgen.training.state import lr_at
from voxgen.training.trainer import Trainer, train

pytestmark = pytest.mark.slow

# 8^3 volumes: steps are cheap next to checkpoint writes, so kills often land inside one.
SMALL = [*TINY, "data.shape=[8,8,8]", "training.device=cpu"]
# Checkpoint every step; validation and a sample mosaic often enough to be hit by signals.
CHAIN = [
    *SMALL,
    "training.steps=60",
    "training.checkpoint_every=1",
    "training.val_every=5",
    "training.mosaic_every=10",
    "training.log_every=1",
]
KILLS = 8

SERVER = r"""
import json, os, sys, traceback
import torch, torch.utils.tensorboard
import voxgen.training.trainer
from voxgen import cli
# What every run imports or builds first, done once here: MONAI's networks and the lazy machinery
# torch loads with its first optimizer (seconds per forked run otherwise).
import voxgen.diffusion.spaces, voxgen.models, voxgen.tasks.regress
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = cli.main(request["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Processes:
    """Starts `voxgen` runs as fresh processes forked from a server that imported voxgen once."""

    def __init__(self, folder: Path):
        script = folder / "server.py"
        script.write_text(SERVER)
        # One thread per process: the same arithmetic in every process, and no oversubscription.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.server = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        assert ready, "no reply from the process server"
        return json.loads(self.server.stdout.readline())

    def start(self, argv: list[str], log: Path) -> int:
        self.server.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
        self.server.stdin.flush()
        return self._reply(120)["pid"]

    def wait(self, timeout: float = 300) -> int:
        """Exit code of the running process; -N when signal N ended it."""
        return self._reply(timeout)["code"]

    def run(self, argv: list[str], log: Path) -> int:
        self.start(argv, log)
        return self.wait()

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    p = Processes(tmp_path_factory.mktemp("server"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference(processes, phantom_root, tmp_path_factory):
    """CHAIN run straight through, in one process."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code = processes.run(["train", *CHAIN, f"data.root={phantom_root}", f"run.dir={run_dir}"], run_dir.parent / "log")
    assert code == 0, (run_dir.parent / "log").read_text()
    return run_dir


def _quiet():
    return Console(file=open(os.devnull, "w"))


def _final_tensors_equal(a_dir, b_dir) -> None:
    _, a, state_a = store.load_latest(a_dir)
    _, b, state_b = store.load_latest(b_dir)
    assert state_a["step"] == state_b["step"]
    assert set(a) == set(b)
    for name in a:  # model, EMA, optimiser, RNG
        assert torch.equal(a[name], b[name]), name
    for key in ("history", "rng", "guards", "lr_scale", "epoch", "batch_index"):
        assert state_a[key] == state_b[key], key


def _latest_step(run_dir) -> int | None:
    try:
        return int((store.checkpoint_root(run_dir) / "latest").read_text().strip().removeprefix("step_"))
    except (OSError, ValueError):
        return None


def _writing(root: Path) -> bool:
    """A checkpoint write is under way (or was killed): its temporary folder exists."""
    try:
        return any(re.fullmatch(r"\.step_\d+\.tmp", name) for name in os.listdir(root))
    except OSError:
        return False


def _text(log: Path) -> str:
    return log.read_text().replace("\n", "") if log.exists() else ""


# ---- SIGKILL ---------------------------------------------------------------------------------


def _kill_at_random_moments(processes, argv: list[str], run_dir: Path, logs: Path, kills: int, steps: int, seed: int):
    """Start `argv` kills + 1 times, SIGKILL each but the last at a random moment (start-up, inside a
    checkpoint write, mostly while training), and check every restart resumes from the newest
    committed checkpoint. Returns (kills inside a checkpoint write, the steps resumed from)."""
    rng = random.Random(seed)
    inside_writes, resumed, expected = 0, [], None
    for segment in range(kills + 1):
        log = logs / f"segment{segment:02d}.log"
        pid = processes.start(argv, log)
        if segment == kills:
            code = processes.wait()
            assert code == 0, log.read_text()
        else:
            started, before = time.monotonic(), _latest_step(run_dir)
            if segment % 6 == 5:
                # Any moment from the process start: start-up, data check, restore ...
                time.sleep(rng.uniform(0.0, 2.0))
            elif segment % 3 == 1:
                # ... inside its first checkpoint write, a few milliseconds after the write's
                # temporary folder appears ...
                root = store.checkpoint_root(run_dir)
                while not _writing(root) and time.monotonic() - started < 60:
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, 0.01))
            else:
                # ... or, mostly, while it trains: after its first checkpoint, a random delay.
                while _latest_step(run_dir) == before and time.monotonic() - started < 60:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.5))
            committed = _latest_step(run_dir)
            with contextlib.suppress(ProcessLookupError):  # it finished early: the assert below says so
                os.kill(pid, signal.SIGKILL)
            code = processes.wait()
            assert code == -signal.SIGKILL, f"segment {segment} ended by itself ({code}): {log.read_text()}"
            inside_writes += _writing(store.checkpoint_root(run_dir))
        m = re.search(rf"resumed from \S+ \(step (\d+) of {steps}\)", _text(log))
        if expected is not None and (m or segment == kills):  # else killed before it restored
            # The restart resumed from the newest checkpoint that the kill left committed.
            assert m, log.read_text()
            resumed.append(int(m.group(1)))
            assert int(m.group(1)) == expected
        if segment < kills:
            found = store.load_latest(run_dir, warn=lambda m: None)
            after = found[2]["step"] if found else 0
            # A kill never takes away what was committed before it (the kill may land in a
            # write that commits one more step before it dies: `after` may exceed `committed`).
            assert after >= (committed or 0), (after, committed)
            expected = after if found else None
    print(f"\n{kills} kills, {inside_writes} inside a checkpoint write; resumed from steps {resumed}")
    return inside_writes, resumed


def test_sigkill_at_random_moments_loses_at_most_the_steps_since_the_last_checkpoint(
    processes, reference, phantom_root, tmp_path
):
    run_dir = tmp_path / "run"
    argv = ["train", *CHAIN, f"data.root={phantom_root}", f"run.dir={run_dir}"]
    inside_writes, resumed = _kill_at_random_moments(processes, argv, run_dir, tmp_path, KILLS, 60, seed=20240611)
    assert inside_writes >= 1, inside_writes
    assert len(set(resumed)) >= 4  # the kills were spread over the run
    _final_tensors_equal(reference, run_dir)


def test_a_regression_run_killed_at_random_moments_resumes_bit_identical(processes, tmp_path):
    """The same faults on task=regress (X-ray to CT): the guarantees are the trainer's, not the task's."""
    from tiny_regress import TINY_REGRESS, make_regress_root

    root = make_regress_root(tmp_path / "data")
    chain = [*TINY_REGRESS, f"data.root={root}", "training.device=cpu", "training.steps=30", "training.checkpoint_every=1"]
    chain += ["training.val_every=5", "training.log_every=1"]
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    assert processes.run(["train", *chain, f"run.dir={straight}"], tmp_path / "straight.log") == 0
    inside_writes, resumed = _kill_at_random_moments(
        processes, ["train", *chain, f"run.dir={run_dir}"], run_dir, tmp_path, 3, 30, 5
    )
    assert len(set(resumed)) >= 2
    _final_tensors_equal(straight, run_dir)


# ---- SIGTERM / SIGUSR1 -----------------------------------------------------------------------


def test_sigterm_and_sigusr1_at_random_moments_checkpoint_and_exit_75(processes, reference, phantom_root, tmp_path):
    rng = random.Random(7)
    run_dir = tmp_path / "run"
    argv = ["train", *CHAIN, f"data.root={phantom_root}", f"run.dir={run_dir}"]
    stops, phases = 0, []
    for segment in range(6):
        log = tmp_path / f"segment{segment:02d}.log"
        pid = processes.start(argv, log)
        signum = (signal.SIGTERM, signal.SIGUSR1)[segment % 2]
        if segment % 4 == 3:
            time.sleep(rng.uniform(0.3, 2.0))  # from the process start: often still starting up
        else:
            started, before = time.monotonic(), _latest_step(run_dir)
            while _latest_step(run_dir) == before and time.monotonic() - started < 60:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))  # while it trains, validates, samples or saves
        with contextlib.suppress(ProcessLookupError):  # finished already: code 0 below
            os.kill(pid, signum)
        code = processes.wait()
        text = _text(log)
        if code == 0:  # reached training.steps before or while the signal came
            break
        assert code == EXIT_PREEMPTED, text
        stops += 1
        m = re.search(rf"stopped at step (\d+) \({signum.name} during ([a-z\- ]+?)(?: at step \d+| \d+)?\)", text)
        assert m, text
        phases.append(m.group(2))
        # The checkpoint is at the step reached, and it is the one the next process resumes.
        assert store.load_latest(run_dir)[2]["step"] == int(m.group(1))
    else:
        code = processes.run(argv, tmp_path / "last.log")
        assert code == 0
    print(f"\n{stops} stops by signal, during: {phases}")
    assert stops >= 4
    _final_tensors_equal(reference, run_dir)


def _signal_during(monkeypatch, target: str, attribute: str, at_step, trainer_ref: dict, signum):
    """Wrap `target.attribute` so that it sends `signum` to this process when the trainer is at
    `at_step`, from inside the wrapped work (validation or sampling)."""
    import importlib

    module = importlib.import_module(target)
    original = getattr(module, attribute)

    def wrapped(*args, **kwargs):
        if trainer_ref["trainer"].position.step == at_step and not trainer_ref.get("sent"):
            trainer_ref["sent"] = True
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, attribute, wrapped)


@pytest.mark.parametrize(
    "signum, target, attribute, at, phase",
    [
        (signal.SIGUSR1, "voxgen.training.trainer", "validation_loss", 10, "validation at step 10"),
        (signal.SIGTERM, "voxgen.diffusion.generate", "generate", 5, "sampling at step 5"),
    ],
    ids=["sigusr1-in-validation", "sigterm-in-sampling"],
)
def test_a_signal_during_validation_or_sampling_stops_right_after_it(
    phantom_root, tmp_path, monkeypatch, signum, target, attribute, at, phase
):
    extra = [*SMALL, "training.steps=14", "training.val_every=5", "training.mosaic_every=5", "training.checkpoint_every=7"]
    train(compose([], [*extra, f"data.root={phantom_root}", f"run.dir={tmp_path / 'straight'}"]), _quiet())
    cfg = compose([], [*extra, f"data.root={phantom_root}", f"run.dir={tmp_path / 'run'}"])
    ref: dict = {}
    with monkeypatch.context() as patch:
        _signal_during(patch, target, attribute, at, ref, signum)
        ref["trainer"] = trainer = Trainer(cfg, Console(file=open(tmp_path / "console.txt", "w"), width=300))
        result = trainer.fit()
    assert ref["sent"]
    assert result.exit_code == EXIT_PREEMPTED and result.stopped_by == signum.name
    assert result.step == at
    assert f"stopped at step {at} ({signum.name} during {phase})" in (tmp_path / "console.txt").read_text()
    _, _, state = store.load_latest(tmp_path / "run")
    assert state["step"] == at
    # The interrupted work finished (validation at step 10 is in the saved history), no step
    # ran after it.
    assert [h["step"] for h in state["history"]] == [s for s in (0, 5, 10) if s <= at]
    resumed = train(cfg, _quiet())
    assert resumed.exit_code == 0 and resumed.resumed_from == at
    _final_tensors_equal(tmp_path / "straight", tmp_path / "run")


def test_a_signal_during_the_closing_mosaic_exits_0(phantom_root, tmp_path, monkeypatch):
    extra = [*SMALL, "training.steps=6", "training.val_every=3", "training.checkpoint_every=3"]
    ref: dict = {}
    _signal_during(monkeypatch, "voxgen.diffusion.generate", "generate", 6, ref, signal.SIGTERM)
    ref["trainer"] = trainer = Trainer(compose([], [*extra, f"data.root={phantom_root}", f"run.dir={tmp_path}"]), _quiet())
    result = trainer.fit()
    assert ref["sent"] and not result.interrupted and result.exit_code == 0 and result.step == 6


# ---- the disk ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["ENOSPC", "EIO", "free space"])
def test_a_failing_save_stops_with_one_line_and_the_previous_checkpoint_loads(phantom_root, tmp_path, monkeypatch, capsys, fault):
    run_dir = tmp_path / "run"
    argv = [
        "train",
        *SMALL,
        "training.steps=8",
        "training.val_every=4",
        "training.checkpoint_every=2",
        f"data.root={phantom_root}",
        f"run.dir={run_dir}",
    ]
    # The store's two writers: safetensors for shards, its own for JSON. Each fault strikes
    # the checkpoint of step 4 half-way through a file, as a filling disk would.
    save_file, write_bytes, disk_usage = store_write.save_file, store_write._write_bytes, store_write.shutil.disk_usage

    def failing_shard(payload, path, metadata=None):
        save_file(payload, path, metadata=metadata)
        if fault == "ENOSPC" and Path(path).parent.name == ".step_00000004.tmp":
            os.truncate(path, os.path.getsize(path) // 2)
            # How safetensors reports a failed write: its own error carrying the OS error number.
            raise SafetensorError(
                f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error {errno.ENOSPC}) at path {str(path)!r}"
            )

    def failing_write(path, data):
        if fault == "EIO" and path.parent.name == ".step_00000004.tmp" and path.name == "state.json":
            write_bytes(path, data[: len(data) // 2])
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return write_bytes(path, data)

    def full_disk(path):
        usage = disk_usage(path)
        return usage._replace(free=2**20) if _latest_step(run_dir) == 2 else usage

    with monkeypatch.context() as patch:
        patch.setattr(store_write, "save_file", failing_shard)
        patch.setattr(store_write, "_write_bytes", failing_write)
        if fault == "free space":
            patch.setattr(store_write.shutil, "disk_usage", full_disk)
        capsys.readouterr()
        assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    reason = {"ENOSPC": "No space left on device", "EIO": "Input/output error", "free space": "not enough free space"}
    assert "step_00000004 not written" in lines[0] and reason[fault] in lines[0] and "step_00000002 is intact" in lines[0]
    folder, _, state = store.load_latest(run_dir)
    assert state["step"] == 2 and folder.name == "step_00000002"
    assert not [p for p in store.checkpoint_root(run_dir).iterdir() if p.name.startswith(".")]
    # With the disk fixed, the same command resumes from it and finishes.
    assert main(argv) == 0
    assert "(step 2 of 8)" in capsys.readouterr().err.replace("\n", "")


def test_no_checkpoint_file_exceeds_the_shard_cap(phantom_root, tmp_path):
    cap = 2**20
    cfg = compose(
        [],
        [
            *SMALL,
            "model.channels=[16,32]",
            "training.steps=1",
            f"checkpoint.max_shard_bytes={cap}",
            f"data.root={phantom_root}",
            f"run.dir={tmp_path}",
        ],
    )
    trainer = Trainer(cfg, _quiet())
    trainer.fit()
    folder, tensors, _ = store.load_latest(tmp_path)
    files = sorted(folder.iterdir())
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) >= 5, [f.name for f in files]
    assert max(f.stat().st_size for f in files) <= cap
    for name, value in trainer.task.model.state_dict().items():
        assert torch.equal(tensors[f"model/{name}"], value), name


# ---- stability ---------------------------------------------------------------------------------


def _inject(trainer, faults: dict[int, str]):
    """Corrupt the model's output on chosen training forwards (counted from 1): 'nan' or 'spike'."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if not module.training:
            return None
        calls["n"] += 1
        fault = faults.get(calls["n"])
        if fault == "nan":
            return output * float("nan")
        if fault == "spike":
            return output * 300.0
        return None

    trainer.task.model.register_forward_hook(hook)


def test_nan_losses_and_gradient_spikes_are_skipped_and_training_converges(phantom_root, tmp_path):
    cfg = compose(
        [],
        [
            *SMALL,
            "training.steps=80",
            "training.val_every=20",
            "training.checkpoint_every=40",
            "guards.spike_min_history=10",
            f"data.root={phantom_root}",
            f"run.dir={tmp_path}",
        ],
    )
    trainer = Trainer(cfg, _quiet())
    faults = {15: "nan", 33: "spike", 41: "nan", 42: "nan", 55: "spike", 70: "nan", 71: "spike"}
    _inject(trainer, faults)
    result = trainer.fit()
    g = trainer.guards
    assert (g.skipped_nonfinite, g.skipped_spike, g.rollbacks) == (4, 3, 0)
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert last <= 0.5 * first, (first, last)  # measured: 1.59 -> about 0.5
    assert all(torch.isfinite(p).all() for p in trainer.task.model.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.ema.module.parameters())
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert acc.Scalars("guards/skipped_nonfinite")[-1].value == 4
    assert acc.Scalars("guards/skipped_spike")[-1].value == 3


def test_a_run_of_skipped_steps_rolls_back_with_a_lower_learning_rate_and_resumes_exactly(phantom_root, tmp_path):
    extra = [
        *SMALL,
        "training.steps=24",
        "training.val_every=6",
        "training.checkpoint_every=5",
        "guards.max_consecutive_skips=3",
        "guards.rollback_lr_factor=0.5",
        "training.log_every=1",
    ]
    faults = {12: "nan", 13: "nan", 14: "nan"}  # forwards 12-14: steps 12-14, then a rollback
    out = tmp_path / "console.txt"
    trainer = Trainer(
        compose([], [*extra, f"data.root={phantom_root}", f"run.dir={tmp_path / 'a'}"]), Console(file=open(out, "w"), width=200)
    )
    _inject(trainer, faults)
    trainer.fit()
    assert "rolled back to step 10 after 3 skipped steps (at step 14); learning rate now 0.5x" in out.read_text()
    _, _, state = store.load_latest(tmp_path / "a")
    assert state["lr_scale"] == 0.5 and state["guards"]["rollbacks"] == 1 and state["step"] == 24
    # The same run stopped after the rollback and resumed in a new trainer (no faults left to
    # inject) ends identical: the LR scale and guard state came back with the checkpoint.
    cfg_b = compose([], [*extra, f"data.root={phantom_root}", f"run.dir={tmp_path / 'b'}"])
    first = Trainer(cfg_b, _quiet())
    _inject(first, faults)
    assert first.fit(stop_at=17).interrupted
    train(cfg_b, _quiet())
    _final_tensors_equal(tmp_path / "a", tmp_path / "b")
    acc = EventAccumulator(str(tmp_path / "a" / "tb"))
    acc.Reload()
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    # TensorBoard shows the replayed steps 11.. with the halved rate, not the abandoned ones.
    assert lr[11] == pytest.approx(0.5 * lr_at(10, 2e-3, 5, 24, 0.1), rel=1e-6)
    assert lr[5] == pytest.approx(lr_at(4, 2e-3, 5, 24, 0.1), rel=1e-6)


def test_collapse_to_the_mean_stops_the_run_and_names_the_step(phantom_root, tmp_path):
    cfg = compose(
        [],
        [
            *SMALL,
            "training.steps=40",
            "training.val_every=5",
            "training.checkpoint_every=5",
            "guards.collapse_patience=3",
            f"data.root={phantom_root}",
            f"run.dir={tmp_path}",
        ],
    )
    trainer = Trainer(cfg, _quiet())
    # From step 10 on the model outputs zeros: the predictions of the mean, whatever the input.
    trainer.task.model.register_forward_hook(lambda module, inputs, output: output * 0.0 if trainer.position.step >= 10 else None)
    with pytest.raises(TrainingCollapsed, match=r"training collapsed at step 20:") as info:
        trainer.fit()
    assert "\n" not in str(info.value)
    # The run keeps its checkpoints; the newest predates the verdict.
    _, _, state = store.load_latest(tmp_path)
    assert state["step"] == 15
    # Zero spread at step 0 too (the UNet's output layer starts at zero), not counted: warm-up.
    assert [h["step"] for h in state["history"] if h["prediction_std"] == 0.0] == [0, 10, 15]
