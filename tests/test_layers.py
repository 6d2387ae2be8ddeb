"""No module imports a higher layer (docs/architecture.md): the order is checked on every import,
module-level or inside a function, of every source file."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "voxgen"

# Lowest first. A module may import its own package and any lower layer.
LAYERS = [
    ("base", ["voxgen", "voxgen.errors", "voxgen.precision"]),
    ("files", ["voxgen.files"]),
    ("checkpoints", ["voxgen.checkpoint"]),
    ("figures", ["voxgen.reports"]),
    ("data and models", ["voxgen.data", "voxgen.models", "voxgen.evaluation.pixel"]),
    ("diffusion", ["voxgen.diffusion"]),
    ("tasks", ["voxgen.tasks"]),
    ("config", ["voxgen.config"]),
    ("training", ["voxgen.training"]),
    ("evaluation and memory", ["voxgen.evaluation", "voxgen.memory"]),
    ("run report", ["voxgen.reports.run_report"]),
    ("commands", ["voxgen.cli", "voxgen.quickstart", "voxgen.sample", "voxgen.slurm", "voxgen.training.commands"]),
]


def owner(module: str) -> tuple[int, str]:
    """(layer index, package) of a dotted module name: the longest listed prefix."""
    best = None
    for index, (_, packages) in enumerate(LAYERS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and (best is None or len(package) > len(best[1])):
                best = (index, package)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return best


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def voxgen_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of voxgen code in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "voxgen" else [f"voxgen.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.split(".")[0] == "voxgen"]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "voxgen"]
    return found


def violations(src: Path = SRC) -> list[str]:
    out = []
    for path in sorted(src.rglob("*.py")):
        source = module_name(path, src)
        layer, package = owner(source)
        for line, target in voxgen_imports(path):
            if target == "voxgen.__version__":
                target = "voxgen"
            target_layer, target_package = owner(target)
            if target_package != package and target_layer >= layer:
                relation = "a higher" if target_layer > layer else "the same"
                out.append(
                    f"{path.relative_to(src.parent)}:{line}: {source} ({LAYERS[layer][0]}) imports {target} "
                    f"({relation} layer, {LAYERS[target_layer][0]})"
                )
    return out


def test_no_module_imports_a_higher_layer():
    assert violations() == []


def test_the_check_finds_an_upward_import(tmp_path):
    # The check itself can fail: a planted import from diffusion up to training is reported.
    (tmp_path / "voxgen" / "diffusion").mkdir(parents=True)
    (tmp_path / "voxgen" / "diffusion" / "bad.py").write_text("def f():\n    from voxgen.training.step import train_step\n")
    assert violations(tmp_path / "voxgen") == [
        "voxgen/diffusion/bad.py:2: voxgen.diffusion.bad (diffusion) imports voxgen.training.step (a higher layer, training)"
    ]


def test_architecture_doc_lists_the_same_layers():
    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    for name, packages in LAYERS:
        assert name in text
        for package in packages:
            assert f"`{package}`" in text, package
