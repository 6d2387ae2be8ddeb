"""Small data folders shared by the data tests (tiny shapes keep the suite fast)."""

from __future__ import annotations

import shutil

import pytest

from voxgen.data import make_phantoms

SHAPE = (16, 20, 16)


@pytest.fixture(scope="session")
def small_phantoms(tmp_path_factory):
    """A read-only phantom folder: 3 cases (1 train, 1 val, 1 test) at 16x20x16."""
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "data", cases=3, shape=SHAPE, seed=0)


@pytest.fixture
def data_copy(small_phantoms, tmp_path):
    """A private, writable copy of the phantom folder, for tests that break it."""
    root = tmp_path / "data"
    shutil.copytree(small_phantoms, root)
    return root
