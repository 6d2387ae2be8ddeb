"""Shared fixtures: tiny embedded data sets, made once per session."""

from __future__ import annotations

import pytest
import torch

# Tiny tensors: one thread is faster than two here, and leaves the other core to subprocesses.
torch.set_num_threads(1)

TINY_SHAPE = (16, 16, 16)


def pytest_collection_modifyitems(config, items):
    # Slow tests first: the workers of `pytest -n` then share them from the start, and the run
    # does not end with one worker on a long test while the other waits.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    from voxgen.data.phantoms import make_phantoms

    root = tmp_path_factory.mktemp("phantoms")
    make_phantoms(root, cases=8, shape=TINY_SHAPE, seed=0)
    return root


@pytest.fixture(scope="session")
def cohort_root(tmp_path_factory):
    from voxgen.data.cohort import make_cohort

    root = tmp_path_factory.mktemp("cohort")
    make_cohort(root, cases=12, shape=TINY_SHAPE, seed=0)
    return root


@pytest.fixture(scope="session")
def ct_pairs_root(tmp_path_factory):
    """Three source/target pairs of 4-slice slabs of the embedded head CT (train, val, test), 30 views."""
    from voxgen.data.ct import make_ct_pairs

    root = tmp_path_factory.mktemp("ct_pairs")
    make_ct_pairs(root, cases=3, slab=4, angles=30, seed=0)
    return root
