"""What an adversary tried on run folders, checkpoints, signals and disks, each reproduced.

Every test here failed before the fix it names: damaged checkpoints that made a run start
over, damaged pointers, an index trusted without a checksum, `scancel` with data workers,
overrides that changed the network of a run, failing writes outside checkpoints,
non-finite training that ended 0, and smaller faults (leftovers of deletions, a second
trainer, file modes, endless validation).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from voxgen import checkpoint as store
from voxgen.checkpoint.layout import json_bytes
from voxgen.cli import main
from voxgen.config import compose
from voxgen.errors import TrainingCollapsed, TrainingDiverged
from voxgen.training.signals import EXIT_PREEMPTED, StopRequest
from voxgen.training.trainer import Trainer, validation_loss

pytestmark = pytest.mark.slow

BASE = [
    "data.shape=[8,8,8]",
    "model.channels=[8,16]",
    "model.attention_levels=[false,false]",
    "model.norm_num_groups=4",
    "model.num_head_channels=8",
    "training.batch_size=2",
    "training.lr=2e-3",
    "training.warmup_steps=2",
    "training.val_batches=1",
    "training.val_every=5",
    "training.checkpoint_every=5",
    "training.device=cpu",
    "sample.steps=2",
    "run.report=false",  # tested on its own (tests/reports)
]


def _argv(root, run_dir, *extra) -> list[str]:
    return ["train", *BASE, f"data.root={root}", f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def finished(phantom_root, tmp_path_factory) -> Path:
    """A 10-step run with checkpoints at steps 5 and 10 (the two it keeps)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(_argv(phantom_root, run_dir, "training.steps=10")) == 0
    return run_dir


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _root(run_dir) -> Path:
    return store.checkpoint_root(run_dir)


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x04
    path.write_bytes(bytes(data))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


# ---- 1. no readable checkpoint --------------------------------------------------------------


def test_a_run_whose_checkpoints_all_fail_stops_naming_them_and_trains_over_nothing(phantom_root, run, capsys):
    for name in ("step_00000005", "step_00000010"):
        _flip(next((_root(run) / name).glob("tensors-*.safetensors")))
    before = _snapshot(_root(run))
    capsys.readouterr()
    assert main(_argv(phantom_root, run, "training.steps=15")) == 2
    err = capsys.readouterr().err
    [line] = _errors(err)
    assert "no checkpoint of this run loads" in line and "step_00000010" in line and "step_00000005" in line
    assert "step 0:" not in err and err.count("warning:") == 2
    assert _snapshot(_root(run)) == before  # nothing trained over them
    # `sample` names the damage too, instead of "no checkpoint yet".
    assert main(["sample", "--run", str(run), "--num", "1"]) == 2
    [line] = _errors(capsys.readouterr().err)
    assert "no checkpoint of this run loads" in line


# ---- 2. damaged pointers ----------------------------------------------------------------------


def test_damaged_latest_and_best_pointers_are_ignored_with_a_warning(phantom_root, run, tmp_path, capsys):
    (_root(run) / "latest").write_bytes(b"ste\xf0_00000010\n")
    (_root(run) / "best").write_bytes(b"step_0000\x00010\n")
    capsys.readouterr()
    out = tmp_path / "samples"
    assert main(["sample", "--run", str(run), "--num", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "latest is unreadable; using step_00000010" in err.replace("\n", "") and (out / "mosaic.png").is_file()
    assert main(_argv(phantom_root, run, "training.steps=15")) == 0
    err = capsys.readouterr().err.replace("\n", "")
    assert "latest is unreadable" in err and "resumed from" in err and "step_00000010 (step 10 of 15)" in err
    assert (_root(run) / "latest").read_text() == "step_00000015\n"
    assert (_root(run) / "best").read_text().startswith("step_")  # rewritten by retention


def test_latest_naming_an_older_checkpoint_does_not_win_over_the_newest(run):
    (_root(run) / "latest").write_text("step_00000005\n")  # stale, or damaged into another valid name
    warnings = []
    folder, _, state = store.load_latest(run, warn=warnings.append)
    assert state["step"] == 10 and len(warnings) == 1 and "names step_00000005, but step_00000010 is newer" in warnings[0]


# ---- 3. index.json verified -------------------------------------------------------------------


def _index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def test_a_bit_flip_that_makes_a_duplicate_tensor_name_is_caught(run):
    folder = _root(run) / "step_00000010"
    text = (folder / "index.json").read_text()
    names = sorted(_index(folder)["weight_map"])
    # Two names one character apart, as one flipped bit makes them: json.loads would keep one
    # entry and the other tensor would silently drop out of the checkpoint.
    a, b = next((x, y) for x in names for y in names if x != y and len(x) == len(y) and sum(p != q for p, q in zip(x, y)) == 1)
    (folder / "index.json").write_text(text.replace(f'"{a}"', f'"{b}"', 1))
    warnings = []
    _, _, state = store.load_latest(run, warn=warnings.append)
    assert state["step"] == 5 and len(warnings) == 1
    assert "step_00000010" in warnings[0] and f"duplicate key {b!r}" in warnings[0]


def test_an_index_without_its_file_checksums_is_refused_and_a_flipped_shard_never_loads(run):
    folder = _root(run) / "step_00000010"
    index = _index(folder)
    del index["files"]
    (folder / "index.json").write_bytes(json_bytes(index))
    _flip(next(folder.glob("tensors-*.safetensors")))
    warnings = []
    _, _, state = store.load_latest(run, warn=warnings.append)
    assert state["step"] == 5 and "index.json" in warnings[0] and "step_00000010" in warnings[0]


def test_a_checkpoint_that_does_not_fit_the_model_falls_back_to_the_previous_one(phantom_root, run, capsys):
    # Intact files, checksums right, but one weight of the wrong shape: load_state_dict refuses it.
    folder = _root(run) / "step_00000010"
    tensors, state = store.read_checkpoint(folder)
    name = next(k for k in tensors if k.startswith("model/") and tensors[k].dim() > 1)
    tensors[name] = tensors[name].flatten()
    store.save_checkpoint(run, 10, tensors, state)
    capsys.readouterr()
    assert main(_argv(phantom_root, run, "training.steps=12")) == 0
    err = capsys.readouterr().err.replace("\n", "")
    assert "step_00000010: checkpoint does not load (RuntimeError" in err and "step_00000005 (step 5 of 12)" in err


# ---- 4. signals ------------------------------------------------------------------------------------


def test_sigterm_to_the_process_group_with_data_workers_checkpoints_and_exits_75(phantom_root, tmp_path):
    run_dir = tmp_path / "run"
    argv = _argv(phantom_root, run_dir, "training.steps=100000", "data.num_workers=2", "training.val_every=100000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "voxgen.cli", *argv], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.time() + 120
    # Wait until training runs with its two workers alive, then signal the whole group, as scancel does.
    while time.time() < deadline and len(children.read_text().split()) < 2:
        time.sleep(0.05)
    assert len(children.read_text().split()) >= 2, "no data workers"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err and "stopped at step" in err and "SIGTERM" in err, err[-3000:]
    assert store.load_latest(run_dir) is not None


def test_the_first_of_two_stop_signals_is_reported_even_when_both_arrive_in_one_long_step():
    # Python runs the handlers of signals that arrived during one C call in signal-number
    # order: SIGUSR1 (10) before SIGTERM (15), whatever came first.
    a = torch.randn(1600, 1600) / 50
    with StopRequest() as stop:
        sender = subprocess.Popen(["sh", "-c", f"sleep 0.3; kill -TERM {os.getpid()}; sleep 0.1; kill -USR1 {os.getpid()}"])
        start = time.perf_counter()
        while sender.poll() is None or time.perf_counter() - start < 0.6:
            torch.linalg.matrix_power(a, 300)  # about a second in one call
    assert stop.name == "SIGTERM"


# ---- 5. overrides that change the network --------------------------------------------------------


def test_an_override_that_changes_the_network_is_refused_before_anything_is_written(phantom_root, run, tmp_path, capsys):
    before = (run / "config.yaml").read_bytes(), _snapshot(_root(run))
    capsys.readouterr()
    assert main(["train", f"run.dir={run}", "model.channels=[8,32]", "run.seed=3"]) == 2
    [line] = _errors(capsys.readouterr().err)
    assert "model.channels [8, 16] -> [8, 32]" in line and "run.seed 0 -> 3" in line and "new run.dir" in line
    assert ((run / "config.yaml").read_bytes(), _snapshot(_root(run))) == before
    # The documented plain commands still work; allowed changes are taken.
    assert main(["train", f"run.dir={run}", "training.steps=12", "training.lr=1e-3", "checkpoint.keep_last=3"]) == 0
    assert main(["sample", "--run", str(run), "--num", "1", "--out", str(tmp_path / "s")]) == 0


# ---- 6. writes other than checkpoints ------------------------------------------------------------


def _failing_write_bytes(name: str, code: int):
    original = Path.write_bytes

    def write_bytes(self, data):
        if name in self.name:
            original(self, data[: len(data) // 2])
            raise OSError(code, os.strerror(code))
        return original(self, data)

    return write_bytes


@pytest.mark.parametrize(
    "name, steps, code",
    [("config.yaml", 15, errno.ENOSPC), ("history.json", 15, errno.ENOSPC), ("history.json", 15, errno.EROFS)],
)
def test_a_failing_write_of_config_or_history_stops_in_one_line(phantom_root, run, monkeypatch, capsys, name, steps, code):
    monkeypatch.setattr(Path, "write_bytes", _failing_write_bytes(name, code))
    capsys.readouterr()
    assert main(_argv(phantom_root, run, f"training.steps={steps}")) == 2
    [line] = _errors(capsys.readouterr().err)
    assert f"{name}: not written: {os.strerror(code)}" in line
    assert not [p.name for p in run.rglob(".*") if p.is_file() and ".tmp" in p.name]
    monkeypatch.undo()
    assert main(_argv(phantom_root, run, f"training.steps={steps}")) == 0  # space freed: it resumes


def test_a_failing_tensorboard_writer_warns_once_and_training_goes_on(phantom_root, tmp_path, monkeypatch, capsys):
    from tensorboard.summary.writer import record_writer

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    capsys.readouterr()
    assert main(_argv(phantom_root, tmp_path / "run", "training.steps=10", "training.log_every=1")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err
    assert err.count("TensorBoard logging stopped") == 1 and "No space left on device" in err


# ---- 7. non-finite training ----------------------------------------------------------------------


def _trainer(phantom_root, run_dir, *extra) -> Trainer:
    return Trainer(compose([], [*BASE, f"data.root={phantom_root}", f"run.dir={run_dir}", *extra]), _quiet())


def test_endless_rollbacks_stop_the_run(phantom_root, tmp_path):
    trainer = _trainer(phantom_root, tmp_path, "training.steps=200", "guards.max_consecutive_skips=2", "guards.max_rollbacks=2")
    trainer.task.model.register_forward_hook(
        lambda m, i, out: out * float("nan") if m.training and trainer.position.step >= 5 else None
    )
    with pytest.raises(TrainingDiverged, match=r"after 2 rollbacks \(guards.max_rollbacks=2\)"):
        trainer.fit()
    assert trainer.lr_scale == 0.25 and store.load_latest(tmp_path)[2]["step"] == 5


def test_a_nan_validation_loss_counts_as_collapse(phantom_root, tmp_path):
    trainer = _trainer(phantom_root, tmp_path, "training.steps=20")
    trainer.task.model.register_forward_hook(
        lambda m, i, out: out * float("nan") if not m.training and trainer.position.step >= 10 else None
    )
    with pytest.raises(TrainingCollapsed, match="collapsed at step 10: validation loss is nan"):
        trainer.fit()


def test_non_finite_weights_are_never_saved_and_the_run_does_not_end_0(phantom_root, tmp_path, monkeypatch, capsys):
    import voxgen.training.trainer as trainer_module

    original = trainer_module.train_step

    def poisoned(parts, optimizer, batch, generator, *args, **kwargs):
        result = original(parts, optimizer, batch, generator, *args, **kwargs)
        if optimizer.state and max(s["step"] for s in optimizer.state.values()) >= 7:
            with torch.no_grad():  # what an infinite learning rate does to the weights
                next(parts.model.parameters()).fill_(float("inf"))
        return result

    monkeypatch.setattr(trainer_module, "train_step", poisoned)
    assert main(_argv(phantom_root, tmp_path / "run", "training.steps=10", "training.checkpoint_every=4")) == 2
    [line] = _errors(capsys.readouterr().err)
    assert "training diverged at step 8: the model weights are not finite" in line and "step_00000004" in line
    _, tensors, state = store.load_latest(tmp_path / "run")
    assert state["step"] == 4 and all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())


# ---- 8. smaller ones -----------------------------------------------------------------------------


def test_a_half_deleted_checkpoint_is_swept_at_start_and_shards_have_the_usual_mode(phantom_root, run, capsys):
    # A kill during retention's deletion leaves the renamed folder, half empty.
    trash = _root(run) / ".step_00000003.trash"
    trash.mkdir()
    (trash / "tensors-00002-of-00002.safetensors").write_bytes(b"half")
    assert main(_argv(phantom_root, run, "training.steps=15")) == 0
    assert not trash.exists()
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {oct(p.stat().st_mode & 0o777) for p in _root(run).rglob("*") if p.is_file()}
    assert modes == {oct(0o666 & ~umask)}, modes


def test_a_second_trainer_on_the_same_run_folder_exits_2_naming_the_first(phantom_root, run, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from voxgen.training.run_lock import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(_argv(phantom_root, run, "training.steps=15")) == 2
        [line] = _errors(capsys.readouterr().err)
        assert f"another trainer is running in this run folder (process {holder.pid} on" in line
    finally:
        holder.kill()
        holder.wait()
    assert main(_argv(phantom_root, run, "training.steps=15")) == 0  # the lock went with its process


def test_validation_batches_are_capped_at_the_split(phantom_root, tmp_path):
    trainer = _trainer(phantom_root, tmp_path, "training.val_batches=1000000")
    forwards = []
    trainer.task.model.register_forward_hook(lambda m, i, out: forwards.append(1))
    started = time.perf_counter()
    validation_loss(trainer.task, trainer.val_set, 2, 1_000_000, 0, "cpu")
    assert len(forwards) == -(-len(trainer.val_set) // 2) and time.perf_counter() - started < 30
