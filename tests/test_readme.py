"""The README's code and the examples run as written."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import flatminima as fm

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    return model, x, y


def test_readme_quick_start_runs():
    model, x, y = toy()
    before = [p.detach().clone() for p in model.parameters()]
    namespace = {"model": model, "loader": [(x[:16], y[:16]), (x[16:], y[16:])]}
    exec(python_blocks()[0], namespace)
    assert isinstance(namespace["opt"], fm.SAM)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_readme_explicit_form_runs():
    model, x, y = toy()
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1))

    def compute_loss(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    exec(python_blocks()[1], {"model": model, "batch": (x, y), "compute_loss": compute_loss, "opt": opt})
    assert opt.step_count == 1


def test_readme_train_step_runs():
    model, x, y = toy()
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    namespace = {"model": model, "opt": opt, "loss_fn": lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                 "micro_batches": [(x[:16], y[:16]), (x[16:], y[16:])], "torch": torch, "fm": fm}
    exec(python_blocks()[2], namespace)
    assert namespace["result"].loss.isfinite()


def test_own_loop_example_trains_on_digits_in_both_forms():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        example = runpy.run_path(str(ROOT / "examples" / "own_loop.py"))
    finally:
        sys.path.pop(0)
    closure_acc = example["main"](["--epochs", "3"])
    explicit_acc = example["main"](["--epochs", "3", "--explicit"])
    assert closure_acc > 0.85
    assert closure_acc == explicit_acc  # the two forms share one implementation


def test_readme_diagnostics_block_runs(tmp_path, monkeypatch):
    model, x, y = toy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.chdir(tmp_path)
    namespace = {"model": model, "fm": fm, "loader": [(x[:16], y[:16]), (x[16:], y[16:])],
                 "loss_fn": lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])}
    exec(python_blocks()[5], namespace)
    assert len(namespace["top"].values) == 3 and namespace["summary"]["summary"]["lambda_max"] > 0
    assert (tmp_path / "diagnostics" / "report.json").exists()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_readme_averaging_block_runs():
    model, x, y = toy()
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)

    def closure(xb, yb):
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        return loss.detach()

    namespace = {"model": model, "fm": fm, "opt": opt, "closure": closure, "loader": [(x[:16], y[:16]), (x[16:], y[16:])],
                 "val_batch": (x[:8], y[:8])}
    exec(python_blocks()[3], namespace)
    assert namespace["swa"].n_averaged == 1 and isinstance(namespace["averaged"], nn.Module)
    assert 0.0 <= opt.param_groups[0]["rho"] <= 0.5


def test_readme_continual_block_runs():
    """Split digits with O-LoRA + SAM on a LoRA ResNet: the matrix is 5 × 5 and the metrics are its own."""
    pytest.importorskip("peft")
    from flatminima.continual import continual_metrics
    from flatminima.data import load_digits
    from flatminima.experiment import build_model

    torch.manual_seed(0)
    peft_model = build_model("resnet_lora", load_digits(), width=8, blocks=[1], r=2)
    namespace = {"peft_model": peft_model, "fm": fm, "torch": torch}
    exec(python_blocks()[4], namespace)
    accuracy = namespace["accuracy"]
    assert len(accuracy) == 5 and all(len(row) == 5 for row in accuracy)
    expected = continual_metrics(accuracy)
    for key in ("average_accuracy", "learning_accuracy", "backward_transfer", "forgetting"):
        assert namespace["metrics"][key] == expected[key]
    assert accuracy[0][0] > 0.9  # the first task (digits 0 and 1) is learned


TIMING_COLUMNS = ("time/step vs sgd", "ms/step")


def _tables(markdown: str) -> list[list[list[str]]]:
    """The markdown tables of ``markdown`` as rows of cells, timing columns left out."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            header, rows = current[0], [r for r in current[1:] if not set("".join(r)) <= set("-: ")]
            keep = [i for i, h in enumerate(header) if h not in TIMING_COLUMNS]
            tables.append([[r[i] for i in keep] for r in [header, *rows]])
            current = []
    return tables


def test_readme_quick_tables_equal_a_fresh_run(tmp_path, capsys):
    from flatminima.cli import main

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- quick-tables -->")[1].split("<!-- /quick-tables -->")[0]
    command = re.search(r"`flatminima run (--preset quick [^`]*) --out /tmp/quick`", text).group(1).split()
    assert main(["run", *command, "--out", str(tmp_path / "quick"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    expected = _tables(block)
    assert len(expected) == 2
    assert _tables(printed)[:2] == expected
