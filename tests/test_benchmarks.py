"""The step-overhead benchmark runs, reports sane numbers, and its naive reference really is SAM."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import flatminima as fm
from flatminima.models import SmallCNN

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _closure(model, x, y):
    def closure(backward=True):
        loss = nn.functional.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_naive_reference_takes_the_same_steps_as_fm_sam(weight_decay):
    NaiveSAM = _load("naive_sam").NaiveSAM
    torch.manual_seed(0)
    template = SmallCNN(1, 3, width=4, side=8).double()
    batches = [(torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(4)]
    models, opts = [], []
    for kind in ("fm", "naive"):
        model = SmallCNN(1, 3, width=4, side=8).double()
        model.load_state_dict(template.state_dict())
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay)
        opts.append(fm.SAM(base, rho=0.05) if kind == "fm" else NaiveSAM(base, rho=0.05))
        models.append(model)
    for step in range(5):
        x, y = batches[step % len(batches)]
        losses = [opt.step(_closure(model, x, y)) for model, opt in zip(models, opts)]
        assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-12)
    moved = 0.0
    for (name, a), b, t in zip(models[0].state_dict().items(), models[1].state_dict().values(),
                               template.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
            moved = max(moved, (a - t).abs().max().item())
    assert moved > 1e-3  # the steps really moved the weights


def test_naive_reference_differs_from_the_base_step():
    """The comparison above is not vacuous: with rho > 0 SAM's step is not SGD's."""
    NaiveSAM = _load("naive_sam").NaiveSAM
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    a, b = SmallCNN(1, 3, width=4, side=8).double(), SmallCNN(1, 3, width=4, side=8).double()
    b.load_state_dict(a.state_dict())
    NaiveSAM(torch.optim.SGD(a.parameters(), lr=0.1), rho=0.5).step(_closure(a, x, y))
    fm.Base(torch.optim.SGD(b.parameters(), lr=0.1)).step(_closure(b, x, y))
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert diff > 1e-6


def test_quick_benchmark_reports_finite_times_and_unit_base_ratio(tmp_path):
    bench = _load("step_overhead")
    out = tmp_path / "overhead.json"
    results = bench.main(["--device", "cpu", "--quick", "--quiet", "--methods", "sam,naive-sam,looksam",
                          "--json", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["models"]) == set(results["models"]) and len(saved["models"]) == 1
    (model,) = saved["models"].values()
    ref = model["reference"]
    for key in ("fb_ms", "fwd_ms", "upd_ms", "base_ms"):
        assert math.isfinite(ref[key]) and ref[key] > 0, key
    rows = {r["method"]: r for r in model["rows"]}
    assert list(rows) == ["base", "sam", "naive-sam", "looksam"]
    assert rows["base"]["ratio_base"] == 1.0
    for name, r in rows.items():
        assert math.isfinite(r["ms"]) and r["ms"] > 0, name
        assert math.isfinite(r["floor_ms"]) and r["floor_ms"] > 0, name
        assert math.isfinite(r["ratio_floor"]) and r["ratio_floor"] > 0, name
        assert r["peak_mib"] > 0, name
    assert rows["base"]["fb_per_step"] == 1.0
    assert rows["sam"]["fb_per_step"] == 2.0 and rows["naive-sam"]["fb_per_step"] == 2.0
    assert rows["sam"]["fwd_per_step"] == 0.0
    # floors are measured for the pass patterns the methods ran
    assert rows["base"]["patterns"] == {"1fb+0fwd": 1.0} and rows["sam"]["patterns"] == {"2fb+0fwd": 1.0}
    assert {"1 fb + upd", "2 fb + upd"} <= set(ref["floors_ms"])
    assert all(math.isfinite(v) and v > 0 for v in ref["floors_ms"].values())
    # the table printed for the model has a row per method
    table = results["tables"][0]
    assert "| naive-sam |" in table and "| base |" in table and "× floor" in table


def test_flat_lora_benchmark_quick_prints_its_table():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    bench = _load("flat_lora_step")
    result = bench.main(["--quick", "--rounds", "1", "--block", "1", "--layers", "3", "--hidden", "32"])
    rows = {r["candidate"]: r for r in result["rows"]}
    assert list(rows) == ["lora", "flatlora", "flatlora[torch]", "ref:store", "ref:randn"]
    assert rows["lora"]["ratio"] == 1.0 and all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows.values())
    assert rows["lora"]["us_per_layer"] == 0.0 and all(math.isfinite(r["us_per_layer"]) for r in rows.values())
    assert "| flatlora |" in result["table"] and "+µs/layer" in result["table"] and "3 layers" in result["table"]


def test_hessian_benchmark_quick_prints_its_table(tmp_path):
    bench = _load("hessian_top_eigenvalue")
    out = tmp_path / "hessian.json"
    bench.main(["--quick", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert "lanczos" in json.dumps(saved) and "pyhessian-power" in json.dumps(saved)


def test_gpu_check_dry_run_names_only_files_that_exist():
    """The prepared GPU run prints its commands without running them, and every script it names exists."""
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any("tests/test_cuda.py" in x for x in lines) and any("step_overhead.py --device cuda" in x for x in lines)
    paths = {p for x in lines for p in re.findall(r"[\w/]+\.(?:py|sh)", x)}
    assert paths and all((BENCH.parent / p).exists() for p in paths), paths
