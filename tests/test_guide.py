"""docs/adding-a-method.md is true: its code runs as written, its MyVaSSO is fm.VaSSO step for step,
and every ``flatminima.…`` name and repository path it mentions exists.

The guide registers ``"my-vasso"`` in the global method registry; the fixture unregisters it
afterwards (``tests/test_methods.py`` and ``tests/test_validation.py`` walk ``fm.available()`` and
must never see it).
"""

from __future__ import annotations

import importlib
import io
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import flatminima as fm

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "adding-a-method.md"


def guide_text() -> str:
    return GUIDE.read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", guide_text(), flags=re.S)


@pytest.fixture(scope="module")
def guide():
    """The namespace of the guide's code blocks, executed in order; its method unregistered after."""
    names = fm.available()
    namespace: dict = {"__name__": "adding_a_method"}
    try:
        for i, block in enumerate(python_blocks()):
            exec(compile(block, f"{GUIDE.name}[block {i}]", "exec"), namespace)
        yield namespace
    finally:
        if "my-vasso" in fm.available():
            assert fm.unregister("my-vasso") is namespace["MyVaSSO"]
    assert fm.available() == names
    assert "my-vasso" not in fm.available()


def test_the_guide_has_its_code_blocks():
    assert len(python_blocks()) >= 5


def test_the_guide_registers_its_method(guide):
    assert fm.get("my-vasso") is guide["MyVaSSO"]
    assert guide["MyVaSSO"].method_name == "my-vasso"
    assert issubclass(guide["MyVaSSO"], fm.FlatOptimizer)
    assert fm.hyperparameters("my-vasso") == fm.hyperparameters("vasso")


def test_the_guides_tests_pass(guide):
    tests = [name for name, obj in guide.items() if name.startswith("test_") and callable(obj)]
    assert "test_my_vasso_is_its_closed_form" in tests and "test_my_vasso_matches_the_official_code" in tests
    for name in tests:
        guide[name]()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)

    def closure(self):
        loss = nn.functional.cross_entropy(self.net(self.x), self.y)
        loss.backward()
        return loss.detach()


@pytest.mark.parametrize("make_base, hp", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3), {"rho": 0.05, "theta": 0.9}),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2), {"rho": 0.1, "theta": 0.5, "normalization": "per_tensor"}),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-2), {"theta": 0.7, "ascent_weight_decay": True}),
], ids=["sgd", "adamw-per-tensor", "ascent-weight-decay"])
def test_my_vasso_is_vasso_bit_for_bit(guide, make_base, hp):
    nets = [Net(), Net()]
    ours = guide["MyVaSSO"](make_base(nets[0].parameters()), **hp)
    real = fm.VaSSO(make_base(nets[1].parameters()), **hp)
    for _ in range(5):
        losses = [opt.step(net.closure) for opt, net in zip((ours, real), nets)]
        assert torch.equal(*losses)
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(a, b)
    # the same state under the guide's own namespace, and a resume that continues identically
    sd_ours, sd_real = ours.state_dict()["flatminima"], real.state_dict()["flatminima"]
    assert sd_ours["method"] == "my-vasso" and sd_real["method"] == "vasso"
    assert sd_ours["state"].keys() == sd_real["state"].keys()
    for i, s in sd_ours["state"].items():
        assert set(s) == {"myvasso.ema"} and torch.equal(s["myvasso.ema"], sd_real["state"][i]["vasso.ema"])
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    again = Net()
    again.load_state_dict(nets[0].state_dict())
    resumed = guide["MyVaSSO"](make_base(again.parameters()), **hp)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    for opt, net in ((ours, nets[0]), (resumed, again)):
        for _ in range(2):
            opt.step(net.closure)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), again.parameters()))


def test_my_vasso_commits_only_taken_steps(guide):
    """A step whose perturbed pass raises leaves the guide's EMA as it was (it is staged, not written),
    and the run then continues as fm.VaSSO's without the failed step."""
    nets = [Net(), Net()]
    ours = guide["MyVaSSO"](torch.optim.SGD(nets[0].parameters(), lr=0.1, momentum=0.9), theta=0.5)
    real = fm.VaSSO(torch.optim.SGD(nets[1].parameters(), lr=0.1, momentum=0.9), theta=0.5)
    for opt, net in zip((ours, real), nets):
        for _ in range(2):
            opt.step(net.closure)
    before = {p: {k: v.clone() for k, v in s.items()} for p, s in ours.method_state.items()}
    calls = [0]

    def failing():
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom")
        return nets[0].closure()

    with pytest.raises(RuntimeError, match="boom"):
        ours.step(failing)
    assert ours.step_count == 2 and before.keys() == ours.method_state.keys()
    assert all(torch.equal(v, ours.method_state[p][k]) for p, s in before.items() for k, v in s.items())
    for opt, net in zip((ours, real), nets):
        for _ in range(2):
            opt.step(net.closure)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def _resolve(dotted: str) -> object:
    """The object ``flatminima.a.b.C`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_flatminima_name_in_the_guide_exists():
    names = sorted(set(re.findall(r"\bflatminima(?:\.\w+)+", guide_text())))
    assert "flatminima.core.ascent.AscentLink" in names
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing


def test_every_fm_name_in_the_guide_exists():
    names = sorted(set(re.findall(r"\bfm((?:\.\w+)+)", guide_text())))
    assert [n for n in names if not _has_path(fm, n)] == []


def _has_path(obj, dotted: str) -> bool:
    for attr in dotted.strip(".").split("."):
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


EXTERNAL = {"solver/vasso.py"}  # the official VaSSO code, github.com/BingcongLi/VaSSO
PATH = re.compile(r"(?<![\w/.])((?:[\w-]+/)*[\w-]+\.(?:py|md|txt|toml|sh))\b")


def test_every_repository_path_in_the_guide_exists():
    """Paths are relative to the repository root; bare module names (``perturbations.py``) name the
    modules of ``src/flatminima/core/`` (the guide's table). ``EXTERNAL``: other repositories' files."""
    paths = sorted(set(PATH.findall(guide_text())) - EXTERNAL)
    assert "tests/test_methods.py" in paths and "scripts/constraints.txt" in paths
    core = ROOT / "src" / "flatminima" / "core"
    missing = [p for p in paths if not ((ROOT / p).exists() or ("/" not in p and (core / p).exists()))]
    assert not missing


def test_the_axis_table_names_live_where_it_says():
    """Each row of the axis table: the backticked names after ``module.py:`` are in that core module."""
    rows = [line for line in guide_text().splitlines() if re.match(r"\| [^|]+ \| [^|]+ \| `\w+\.py`", line)]
    assert len(rows) == 6
    for row in rows:
        cell = row.split(" | ")[2]
        stem = re.search(r"`(\w+)\.py`", cell).group(1)
        module = importlib.import_module(f"flatminima.core.{stem}")
        for name in re.findall(r"`([A-Z]\w+)`", cell.split(":", 1)[-1]):
            assert hasattr(module, name), (module.__name__, name)


@pytest.mark.parametrize("path, names", [
    ("tests/test_methods.py", ["CASES", "STRENGTH", "BAD", "test_registry_is_covered"]),
    ("tests/test_references.py", ["EXACT", "FLOAT32_NORM", "def kozistr", "def _infty", "importorskip"]),
    ("benchmarks/step_overhead.py", ["NOMINAL = {"]),
    ("docs/semantics.md", ["## Method details"]),
    ("README.md", ["## Methods", "| name | paper | perturbation / descent | cost per step |"]),
    ("src/flatminima/core/perturbations.py", ["def check_ascent"]),
    ("src/flatminima/core/plan.py", ["def abort"]),
    ("src/flatminima/core/state.py", ["def update(self, opt, params", "def read(self, opt, params",
                                      "def write(self, opt, params"]),
    ("src/flatminima/core/perturb.py", ["def stage", "self.memo", "def clean_grads", "def perturb("]),
    ("src/flatminima/core/perturb.py", ["self.opt, self.params, self.gidx"]),
    ("src/flatminima/core/validation.py", ["def check_range", "def check_choice", "def check_int"]),
    ("src/flatminima/methods/catalog.py", ["COMMON = (", "def per_tensor", "cls.method_name = name"]),
    ("src/flatminima/methods/direction.py", ['@register("vasso")', '@register("friendlysam", "fsam")']),
    ("src/flatminima/methods/multistep.py", ['strength_key="epsilon"']),
    ("scripts/setup.sh", ["--no-deps"]),
])
def test_the_names_the_guide_cites_from_other_files_exist(path, names):
    text = (ROOT / path).read_text()
    assert [n for n in names if n not in text] == []
