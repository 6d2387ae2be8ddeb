"""Training in several processes (DDP over gloo on the CPU), started as torchrun starts them:
the same weights as one process with the whole batch, one coordinated stop, exact resume."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_resume import ENV, _assert_same_checkpoint
from test_trainer import TINY, _quiet

from voxgen import checkpoint as store
from voxgen.cli import main
from voxgen.config import compose
from voxgen.training.signals import EXIT_PREEMPTED
from voxgen.training.trainer import train

BIN = Path(sys.executable).parent
STEPS = 12
RUN = [
    f"training.steps={STEPS}",
    "training.val_every=2",
    "training.log_every=1",
    "training.device=cpu",
    "training.warmup_steps=2",
    # The default rate. Float32 sums of a batch of 4 and of two batches of 2 round differently,
    # and AdamW, dividing by the gradient's own size, turns those roundings into steps of up to
    # lr: after 10 steps at lr 2e-3 weights differed by up to 1.1e-5 (docs/distributed.md).
    "training.lr=1e-4",
    "checkpoint.keep_last=5",
    # So few steps at this rate keep the output near its zero start: not a collapse here.
    "guards.collapse_std_ratio=0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(root, run_dir, *extra) -> list[str]:
    return ["train", *TINY, *RUN, f"data.root={root}", f"run.dir={run_dir}", *extra]


def _start_ranks(root, run_dir, world: int, *extra) -> list[subprocess.Popen]:
    """`voxgen train` in `world` processes with the environment torchrun gives its workers."""
    port, procs = _free_port(), []
    for rank in range(world):
        env = {
            **ENV,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [str(BIN / "voxgen"), *_args(root, run_dir, *extra)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        out.append((p.returncode, err))
    return out


def _weights(run_dir, name):
    return store.load_named(run_dir, name)[1]


def _torchrun(root, run_dir, *extra) -> None:
    """A 2-process run launched by torchrun itself."""
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python", str(BIN / "voxgen")]
    done = subprocess.run([*command, *_args(root, run_dir, *extra)], capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, [line for line in done.stderr.splitlines() if "error" in line.lower()][:5]


def _single(root, run_dir) -> None:
    """One process with the whole batch of 4: this test's own (one thread, as the ranks run)."""
    _, *overrides = _args(root, run_dir, "training.batch_size=4", "training.checkpoint_every=10")
    result = train(compose([], overrides), _quiet())
    assert not result.interrupted


def _assert_close(a_dir, b_dir, name, atol=1e-6) -> None:
    """Weights, EMA and AdamW moments of two runs' checkpoints within `atol`; and trained (not the start)."""
    a, b = _weights(a_dir, name), _weights(b_dir, name)
    assert set(a) == set(b)
    for key in a:
        if key.startswith(("model/", "ema/", "optimizer/")):
            assert a[key].shape == b[key].shape, key
            assert torch.allclose(a[key].double(), b[key].double(), rtol=0, atol=atol), key
    assert any(k.startswith("optimizer/") and k.endswith("exp_avg") and a[k].abs().max() > 0 for k in a)


@pytest.mark.slow
def test_ddp_equals_one_process_stops_together_and_resumes_exactly(phantom_root, tmp_path):
    straight, single, stopped = tmp_path / "straight", tmp_path / "single", tmp_path / "stopped"
    _torchrun(phantom_root, straight, "training.batch_size=2", "training.checkpoint_every=10")
    # Only the first process writes: one checkpoint of each step, one TensorBoard file.
    names = sorted(p.name for p in store.checkpoint_root(straight).iterdir())
    assert names == ["best", "latest", "step_00000010", f"step_{STEPS:08d}"], names
    assert len(list((straight / "tb").iterdir())) == 1

    # The same samples as one process with the whole batch: the same weights after 10 steps.
    _single(phantom_root, single)
    _assert_close(single, straight, "step_00000010")
    history = [json.loads((d / "history.json").read_text()) for d in (single, straight)]
    for a, b in zip(*history):  # validation shares its batches the same way
        assert a["step"] == b["step"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)

    # SIGUSR1 to the second process only, as a scheduler may send it: both stop at the same
    # step with one checkpoint and exit 75; resumed, the run ends as the straight one.
    extra = ("training.batch_size=2", "training.checkpoint_every=1000")
    procs = _start_ranks(phantom_root, stopped, 2, *extra)
    deadline = time.monotonic() + 300
    while _validated_step(stopped) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _finish(procs)
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGUSR1)
    results = _finish(procs)
    assert [code for code, _ in results] == [EXIT_PREEMPTED, EXIT_PREEMPTED], [err[-2000:] for _, err in results]
    [folder] = store.list_checkpoints(stopped)
    stopped_at = store.read_state(folder)["step"]
    assert 2 <= stopped_at < STEPS
    assert "SIGUSR1" in results[0][1] and "another process" in results[0][1]
    results = _finish(_start_ranks(phantom_root, stopped, 2, *extra))
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    assert f"(step {stopped_at} of {STEPS})" in results[0][1].replace("\n", "")
    _assert_same_checkpoint(straight, stopped, f"step_{STEPS:08d}")


def _validated_step(run_dir) -> int:
    """The step of the run's newest validation (history.json is replaced whole), -1 before the first."""
    history = run_dir / "history.json"
    records = json.loads(history.read_text()) if history.exists() else []
    return records[-1]["step"] if records else -1


# Fewer steps than the DDP comparison: this test is about sharded state, which every step exercises alike.
FSDP_STEPS = 6
FSDP = (
    "training.batch_size=2",
    f"training.steps={FSDP_STEPS}",
    "training.checkpoint_every=10",
    "training.sharding=fsdp",
    "training.fsdp_unit_params=20000",  # four units and the root: several gathers a step, few enough to be quick
)


@pytest.mark.slow
def test_fsdp_trains_checkpoints_resumes_exactly_and_samples_in_one_process(phantom_root, tmp_path):
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    results = _finish(_start_ranks(phantom_root, straight, 2, *FSDP))
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    results = _finish(_start_ranks(phantom_root, chain, 2, *FSDP, "--stop-at", "3"))
    assert [code for code, _ in results] == [EXIT_PREEMPTED, EXIT_PREEMPTED], [err[-2000:] for _, err in results]
    results = _finish(_start_ranks(phantom_root, chain, 2, *FSDP))
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    _assert_same_checkpoint(straight, chain, f"step_{FSDP_STEPS:08d}")

    # Each process wrote its slices; read back they are whole tensors.
    folder = store.checkpoint_folder(straight, FSDP_STEPS)
    assert {p.name.split("-tensors")[0] for p in folder.glob("*.safetensors")} == {"rank-00000", "rank-00001"}

    assert main(["sample", "--run", str(straight), "--num", "1", "--out", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "sample_000_bravo.nii.gz").is_file()
