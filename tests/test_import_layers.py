"""Dependencies point one way: over every import of the package and of data_prep (function-level
and TYPE_CHECKING imports included, read from each module's AST), no module imports one of a
higher layer, and no two modules import each other through any chain (inside a layer too).

The layers, lowest first. A module may import its own layer and those below it. The first
match of a module's dotted name (itself or its package) decides its layer."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    ("base", ["deberta_ds", "deberta_ds.errors", "deberta_ds.config", "deberta_ds.relative_position",
              "deberta_ds.atomic_files", "deberta_ds.content_hash", "deberta_ds.parallel_env", "deberta_ds.resources",
              "deberta_ds.safe_load", "deberta_ds.extras"]),
    ("kernels", ["deberta_ds.kernels"]),
    ("parallel", ["deberta_ds.parallel"]),
    ("data", ["deberta_ds.data"]),  # below the model, which takes IGNORE_INDEX from it
    ("model", ["deberta_ds.model"]),
    ("checkpoint formats", ["deberta_ds.checkpoint_reader", "deberta_ds.hf_format"]),
    ("training", ["deberta_ds.training", "deberta_ds.downstream.in_training"]),  # the trainer starts the suite
    ("tools", ["deberta_ds.native_checkpoint", "deberta_ds.convert", "deberta_ds.finetune", "deberta_ds.onnx_export",
               "deberta_ds.hf_tokenizer", "deberta_ds.hf_oracle", "deberta_ds.train", "deberta_ds.downstream",
               "deberta_ds.evaluate"]),
    ("offline data preparation", ["data_prep"]),
]


def layer_of(module: str) -> int:
    """The layer index of a dotted module name; the most specific entry wins."""
    matches = [(len(name), index) for index, (_, names) in enumerate(LAYERS) for name in names
               if module == name or module.startswith(name + ".")]
    if not matches:
        raise KeyError(module)
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every project module `path` imports, anywhere in it (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> set[str]:
    """The project modules a module of `package` with this source imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("deberta_ds", "data_prep")}


def project_modules() -> list[Path]:
    return sorted(p for root in ("deberta_ds", "data_prep") for p in (REPO / root).rglob("*.py"))


def upward_imports() -> list[str]:
    violations = []
    for path in project_modules():
        importer = module_name(path)
        for imported in sorted(imports_of(path)):
            if layer_of(imported) > layer_of(importer):
                violations.append(f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {imported} "
                                  f"({LAYERS[layer_of(imported)][0]})")
    return violations


def test_every_module_has_a_layer():
    unplaced = []
    for path in project_modules():
        try:
            layer_of(module_name(path))
        except KeyError:
            unplaced.append(module_name(path))
    assert not unplaced, f"modules missing from LAYERS: {unplaced}"


def test_no_module_imports_one_of_a_higher_layer():
    assert upward_imports() == []


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle of `graph` (module -> modules it imports), one sorted list of modules per
    strongly connected component of two or more modules or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                lowest[module] = min(lowest[module], lowest[imported])
            elif imported in stack:
                lowest[module] = min(lowest[module], index[imported])
        if lowest[module] == index[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1 or module in graph.get(module, ()):
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(cycles)


def test_no_import_cycle_between_modules():
    graph = {module_name(path): imports_of(path) for path in project_modules()}
    assert import_cycles(graph) == []


@pytest.mark.parametrize("graph, cycles", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),       # a chain closes the circle
    ({"a": {"a"}, "b": {"c"}, "c": {"b", "d"}, "d": set()}, [["a"], ["b", "c"]]),
])
def test_the_cycle_finder_finds_direct_and_chained_cycles(graph, cycles):
    assert import_cycles(graph) == cycles


def test_the_scan_sees_type_checking_imports():
    """The circle parallel/random.py <-> parallel/state.py ran through a TYPE_CHECKING import."""
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from deberta_ds.parallel.state import MPU\n"
    assert imports_in(source, "deberta_ds.parallel") == {"deberta_ds.parallel.state"}


def test_the_training_package_imports_neither_convert_nor_native_checkpoint():
    training = [p for p in project_modules() if module_name(p).startswith("deberta_ds.training")]
    assert len(training) > 10
    for path in training:
        assert not imports_of(path) & {"deberta_ds.convert", "deberta_ds.native_checkpoint"}, path


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from deberta_ds.convert import to_hf\n", {"deberta_ds.convert"}),
    ("class A:\n    def f(self):\n        import deberta_ds.native_checkpoint\n", {"deberta_ds.native_checkpoint"}),
    ("from deberta_ds import native_checkpoint\n", {"deberta_ds.native_checkpoint"}),
    ("from ..checkpoint_reader import read_state\n", {"deberta_ds.checkpoint_reader"}),
    ("from . import engines\n", {"deberta_ds.training.engines"}),
    ("import numpy\nimport deberta_ds.model.rtd\n", {"deberta_ds.model.rtd"}),
])
def test_the_scan_sees_function_level_package_and_relative_imports(source, expected):
    """The scanner itself, for a module of deberta_ds.training: imports inside functions, of a
    module through its package, and relative ones are all found, and each would be upward."""
    assert imports_in(source, "deberta_ds.training") == expected
    if "convert" in source or "native_checkpoint" in source:
        assert all(layer_of(name) > layer_of("deberta_ds.training.trainer") for name in expected)
