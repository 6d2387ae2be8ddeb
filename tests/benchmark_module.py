"""Load a script of benchmarks/ as a module, for the tests of the benchmarks."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
