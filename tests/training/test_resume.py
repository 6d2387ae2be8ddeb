"""Exact resume: a run cut into segments, each in a new process, equals one that ran straight."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from test_trainer import TINY, _quiet

from voxgen import checkpoint as store
from voxgen.config import compose
from voxgen.data.dataset import VolumeDataset
from voxgen.training.signals import EXIT_PREEMPTED
from voxgen.training.state import rng_from_checkpoint, rng_to_checkpoint
from voxgen.training.trainer import train

VOXGEN = str(Path(sys.executable).with_name("voxgen"))
# Every process of a comparison computes with the same number of threads: reductions split
# across threads may round differently.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN = [
    "training.steps=12",
    "training.val_every=4",
    "training.checkpoint_every=4",
    "checkpoint.keep_last=3",
    "training.log_every=1",
    "training.device=cpu",
]


def _voxgen_train(root, run_dir, *extra):
    args = [VOXGEN, "train", *TINY, *RUN, f"data.root={root}", f"run.dir={run_dir}", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)


def _scalars(run_dir, tag):
    """{step: value} of a TensorBoard tag, as TensorBoard shows it (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def _assert_same_checkpoint(a_dir, b_dir, name):
    _, a, state_a = store.load_named(a_dir, name)
    _, b, state_b = store.load_named(b_dir, name)
    assert set(a) == set(b)
    for key in a:  # weights, EMA, AdamW moments and step counts, torch RNG states
        assert torch.equal(a[key], b[key]), (name, key)
    state_a.pop("config"), state_b.pop("config")  # run.dir differs, nothing else may
    # Position in the data order, history, LR scale, guard state, Python and numpy RNG states.
    assert state_a == state_b, name


def test_segments_in_new_processes_equal_a_straight_run(phantom_root, tmp_path):
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    # The straight run in this process (one thread, as the others): only the segments need new ones.
    train(compose([], [*TINY, *RUN, f"data.root={phantom_root}", f"run.dir={straight}"]), _quiet())
    # 12 steps as 6 + 3 + 3: a resume, and a resume of a resume, each in a new process.
    first = _voxgen_train(phantom_root, chain, "--stop-at", "6")
    assert first.returncode == EXIT_PREEMPTED, first.stderr
    assert store.load_named(chain, "latest")[2]["step"] == 6
    second = _voxgen_train(phantom_root, chain, "--stop-at", "9")
    assert second.returncode == EXIT_PREEMPTED, second.stderr
    assert "(step 6 of 12)" in second.stderr.replace("\n", "")
    third = _voxgen_train(phantom_root, chain)
    assert third.returncode == 0, third.stderr
    assert "(step 9 of 12)" in third.stderr.replace("\n", "")

    _assert_same_checkpoint(straight, chain, "step_00000008")  # written by the first resumed process
    _assert_same_checkpoint(straight, chain, "step_00000012")  # ... and by the resume of the resume
    # Every step's loss (same batch, same noise, same weights) and learning rate.
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        a, b = _scalars(straight, tag), _scalars(chain, tag)
        assert sorted(a) == list(range(1, 13)), tag
        assert a == b, tag
    assert json.loads((straight / "history.json").read_text()) == json.loads((chain / "history.json").read_text())


def test_global_random_streams_continue_across_a_resume(phantom_root, tmp_path, monkeypatch):
    """An augmentation that draws from Python's, numpy's and torch's global generators sees the
    same draws whether the run was interrupted or not."""
    original = VolumeDataset.__getitem__
    draws = []

    def augmented(self, index):
        item = original(self, index)
        jitter = random.random() + float(np.random.rand()) + float(torch.rand(()))
        draws.append(jitter)
        item["bravo"] = item["bravo"] + 0.05 * jitter
        return item

    monkeypatch.setattr(VolumeDataset, "__getitem__", augmented)
    quiet = Console(file=open(os.devnull, "w"))
    extra = ["training.steps=8", "training.val_every=4", "training.checkpoint_every=4", "training.device=cpu"]
    train(compose([], [*TINY, f"data.root={phantom_root}", f"run.dir={tmp_path / 'a'}", *extra]), quiet)
    straight_draws, draws[:] = list(draws), []
    cfg_b = compose([], [*TINY, f"data.root={phantom_root}", f"run.dir={tmp_path / 'b'}", *extra])
    assert train(cfg_b, quiet, stop_at=5).interrupted
    first_draws, draws[:] = list(draws), []
    train(cfg_b, quiet)
    # The resumed process re-reads the data once (its check) before restoring the streams;
    # from then on its draws are the straight run's.
    resumed_draws = draws[len(draws) - (len(straight_draws) - len(first_draws)) :]
    assert first_draws + resumed_draws == straight_draws
    _, a, state_a = store.load_latest(tmp_path / "a")
    _, b, state_b = store.load_latest(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert state_a["rng"] == state_b["rng"]


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.randn(3)  # mid-stream, cached gaussian
    tensors, state = rng_to_checkpoint()
    tensors = {k: v.clone() for k, v in tensors.items()}
    state = json.loads(json.dumps(state))  # what state.json holds
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(2).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng_from_checkpoint(tensors, state)
    again = (random.random(), np.random.randn(3).tolist(), torch.rand(2).tolist())
    assert again == expected


def test_what_is_written_and_logged_may_change_on_resume_but_not_the_network(tmp_path):
    from voxgen.config.compose import to_yaml
    from voxgen.errors import ConfigError
    from voxgen.training.resume import check_resume

    run = [f"run.dir={tmp_path}", "model.channels=[16,32]", "model.attention_levels=[false,false]"]
    (tmp_path / "config.yaml").write_text(to_yaml(compose([], run)))
    check_resume(compose([], [*run, "run.report=false", "training.log_every=3", "training.steps=50"]), tmp_path)
    with pytest.raises(ConfigError, match=r"another model.channels: model.channels \[16, 32\] -> \[16, 64\]"):
        check_resume(compose([], [*run, "run.report=false", "model.channels=[16,64]"]), tmp_path)
