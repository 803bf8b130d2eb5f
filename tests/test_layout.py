"""The layout rules of docs/DESIGN.md §11, checked on the source: every import, function-level ones included."""

import ast

import pytest
from conftest import ROOT

from lenvm_rl.cli import STAGES

PACKAGES = ("lenvm_rl", "rewards")
STAGE_MODULES = {module for module, _ in STAGES.values()} - {"lenvm_rl.cli"}
ENTRY_MODULES = {"lenvm_rl.cli", "lenvm_rl.__main__", "lenvm_rl.cpu_launch"}
PURE_MODULES = {"lenvm_rl.returns", "lenvm_rl.advantages", "lenvm_rl.segment_advantages", "rewards.scores"}
MAX_LINES = 400


def module_files() -> dict[str, object]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            files[name] = path
    return files


def imports(name: str, path) -> set[str]:
    """Every module of the two packages ``name`` imports, anywhere in the file (relative imports resolved)."""
    modules, found = module_files(), set()
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


GRAPH = {name: imports(name, path) for name, path in module_files().items()}


def test_stage_modules_are_the_cli_stages():
    assert STAGE_MODULES <= set(GRAPH)


def test_no_import_circles():
    def cycle_from(start, node, path):
        for target in GRAPH[node]:
            if target == start:
                return path + [target]
            if target not in path:
                found = cycle_from(start, target, path + [target])
                if found:
                    return found
        return None

    cycles = [" -> ".join(c) for c in (cycle_from(m, m, [m]) for m in GRAPH) if c]
    assert not cycles


def test_no_stage_imports_another_and_libraries_import_no_stage():
    wrong = [
        f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets if b in STAGE_MODULES and a not in ENTRY_MODULES
    ]
    assert not wrong


def test_rewards_is_the_leaf():
    assert not [
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        if a.startswith("rewards")
        for b in targets
        if b.startswith("lenvm_rl")
    ]


@pytest.mark.parametrize("name", sorted(PURE_MODULES))
def test_pure_math_imports_no_trainer_accelerate_or_io(name):
    tree = ast.parse(module_files()[name].read_text())
    roots = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not roots & {"transformers", "trl", "accelerate", "datasets", "json", "os", "pathlib"}


def test_no_module_over_400_lines():
    long = {name: n for name, path in module_files().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long
