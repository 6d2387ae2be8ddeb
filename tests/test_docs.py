"""The README and the packaging say only what is true today."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from voxgen.cli import build_parser

ROOT = Path(__file__).parents[1]


def _commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)


def test_every_command_the_readme_shows_exists():
    shown = set(re.findall(r"`voxgen ([a-z-]+)", (ROOT / "README.md").read_text()))
    assert shown and shown <= _commands(), shown - _commands()


@pytest.mark.parametrize(
    "document, phrase",
    [
        ("docs/sampling.md", '"trailing"\nspacing of Lin'),  # the DDPM grid is their "linspace" spacing
        ("docs/sampling.md", "Heun / explicit trapezoid, EDM's deterministic sampler"),  # EDM takes Euler into t = 0
    ],
)
def test_docs_do_not_misname_what_the_code_does(document, phrase):
    assert phrase not in (ROOT / document).read_text()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# Declared for a dependency that needs it without requiring it: (module, the file of the dependency that imports it).
NEEDED_BY_A_DEPENDENCY = {"einops": ("einops", "monai/networks/blocks/selfattention.py")}


def test_every_declared_dependency_is_imported():
    import_names = {
        "nibabel": "nibabel",
        "nilearn": "nilearn",
        "omegaconf": "omegaconf",
        "safetensors": "safetensors",
        "torchdiffeq": "torchdiffeq",
        "tensorboard": "tensorboard",
        "rich": "rich",
        "matplotlib": "matplotlib",
        "numpy": "numpy",
        "scipy": "scipy",
        "scikit-image": "skimage",
        "scikit-learn": "sklearn",
        "pyyaml": "yaml",
        "torch": "torch",
        "monai": "monai",
    }
    code = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    for requirement in _pyproject()["project"]["dependencies"]:
        name = re.split(r"[<>=!\[ ]", requirement, maxsplit=1)[0].lower()
        if name in NEEDED_BY_A_DEPENDENCY:
            continue
        assert name in import_names, f"{name}: add its import name here"
        module = import_names[name]
        # nilearn is only located (find_spec), for the templates its wheel carries.
        used = rf"^\s*(import|from) {module}\b|find_spec\(\"{module}\"\)"
        assert re.search(used, code, re.MULTILINE), f"{requirement} is declared but never imported"


@pytest.mark.parametrize("name", sorted(NEEDED_BY_A_DEPENDENCY))
def test_a_dependency_declared_for_another_is_needed_by_it(name):
    import importlib.util

    module, user = NEEDED_BY_A_DEPENDENCY[name]
    site = Path(importlib.util.find_spec(user.split("/")[0]).origin).parent.parent
    assert re.search(rf"\b{module}\b", (site / user).read_text()), f"{user} no longer uses {module}"


def test_the_license_is_an_spdx_expression():
    # The table form (`license = {text = ...}`) makes setuptools 77+ print a deprecation block on every install.
    data = _pyproject()
    assert isinstance(data["project"]["license"], str)
    assert any(req.startswith("setuptools>=77") for req in data["build-system"]["requires"])
