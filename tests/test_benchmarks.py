"""The step-overhead benchmark runs, reports sane numbers, and its naive reference really is SAM."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
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


def _table_rows(md: str) -> list[list[str]]:
    """The rows of the first Markdown table in ``md`` (header and rule left out)."""
    lines = md.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("| check |"))
    rows = []
    for x in lines[start + 2:]:
        if not x.startswith("|"):
            break
        rows.append([c.strip() for c in x.strip("|").split(" | ")])
    return rows


def test_gpu_check_dry_run_runs_every_check_and_writes_the_summary(tmp_path):
    """CI runs the prepared GPU run as it is, on the CPU at toy sizes: every check runs (the CUDA
    tests are collected and skip), and summary.json / summary.md have one entry per check."""
    gpu_check = _load("gpu_check")
    out = tmp_path / "results"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=170, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 170
    summary = json.loads((out / "summary.json").read_text())
    names = [c.name for c in gpu_check.checks(dry=True)]
    assert summary["mode"] == "dry-run" and summary["ok"] is True
    assert [c["name"] for c in summary["checks"]] == names
    assert {"cuda_tests", "fp16_integrations", "step_overhead_resnet18", "step_overhead_vit_s16", "flat_lora_step",
            "hessian"} == set(names)
    checks = {c["name"]: c for c in summary["checks"]}
    for name, c in checks.items():
        assert c["status"] in ("passed", "skipped"), (name, c["reason"])
        assert c["seconds"] > 0 and c["budget_s"] > 0
        assert (out / c["stdout"]).exists() and (out / c["stderr"]).exists()
        assert c["artifacts"] and all((out / a).exists() for a in c["artifacts"]), name
        assert all(claim["met"] is None for claim in c["claims"])  # toy sizes judge nothing
    for name in ("cuda_tests", "fp16_integrations"):  # collected, and honest about skipping
        counts = checks[name]["headline"]
        assert counts["total"] > 0 and counts["failed"] == counts["errors"] == 0
        if not torch.cuda.is_available():
            assert checks[name]["status"] == "skipped" and counts["skipped"] == counts["total"]
            assert checks[name]["headline_text"] == f"0 passed, 0 failed, {counts['total']} skipped"
    assert checks["fp16_integrations"]["headline"]["total"] == 3
    for name in ("step_overhead_resnet18", "step_overhead_vit_s16"):
        c = checks[name]
        assert c["status"] == "passed" and c["headline"]["model"].endswith("-toy") and c["headline"]["amp"] == "bf16"
        methods = c["headline"]["methods"]
        assert {"base", "sam", "naive-sam"} <= set(methods) and methods["base"]["x_base"] == 1.0
        assert all(m["x_base"] is not None and m["x_base"] > 0 for m in methods.values())
        assert methods["sam"]["fb_per_step"] == 2.0
    flat = checks["flat_lora_step"]["headline"]
    assert flat["candidates"]["lora"]["x_lora"] == 1.0 and flat["flatlora_time_ratio"] > 0
    assert flat["flatlora_memory_ratio"] is None  # no CUDA memory on a CPU: reported as such, not as a number
    hess = checks["hessian"]["headline"]
    assert all(v is not None and v > 0 for v in hess["speedups"].values()) and hess["hvps"]["lanczos"] >= 1

    md = (out / "summary.md").read_text()
    rows = _table_rows(md)
    assert [r[0] for r in rows] == names
    assert [r[1] for r in rows] == [checks[n]["status"] for n in names]
    assert all(len(r) == 4 and float(r[2]) > 0 and r[3] for r in rows)
    assert "dry run" in md.splitlines()[0]


def _command(name: str, code: str, budget: float = 30.0):
    gpu_check = _load("gpu_check")
    return gpu_check.Check(name, name, "command", lambda py, out: [py, "-c", code], budget)


def test_gpu_check_runs_every_check_after_a_failure_and_a_timeout(tmp_path):
    """A failing check and one that runs past its budget (its child process too) are recorded as such,
    and the checks after them still run."""
    gpu_check = _load("gpu_check")
    pid_file = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
            f" open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    selected = [_command("fails", "import sys; print('bad'); sys.exit(3)"), _command("hangs", hang, budget=3.0),
                _command("passes", "print('fine')")]
    summary = gpu_check.run_all(selected, tmp_path / "out", sys.executable, dry=True, log=lambda *_: None)
    got = {c["name"]: c for c in summary["checks"]}
    assert [c["name"] for c in summary["checks"]] == ["fails", "hangs", "passes"]
    assert got["fails"]["status"] == "failed" and got["fails"]["returncode"] == 3
    assert "exit status 3" in got["fails"]["reason"]
    assert got["hangs"]["status"] == "timeout" and 3 <= got["hangs"]["seconds"] < 30
    assert got["passes"]["status"] == "passed" and got["passes"]["headline_text"] == "fine"
    assert summary["ok"] is False and summary["counts"] == {"passed": 1, "skipped": 0, "failed": 1, "timeout": 1}
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:  # the timed-out check's own child was stopped with it
        try:
            state = Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {child} of the timed-out check is still running")
    rows = _table_rows((tmp_path / "out" / "summary.md").read_text())
    assert [(r[0], r[1]) for r in rows] == [("fails", "failed"), ("hangs", "timeout"), ("passes", "passed")]
    # A deadline for the whole run: a check with under 5 s left is not started, and says so.
    summary = gpu_check.run_all([_command("late", "print(1)")], tmp_path / "out2", sys.executable, dry=True,
                                deadline_s=1.0, log=lambda *_: None)
    assert summary["checks"][0]["status"] == "timeout" and "not started" in summary["checks"][0]["reason"]


def test_gpu_check_reads_pytest_failures_from_the_junit_report(tmp_path):
    gpu_check = _load("gpu_check")
    test = tmp_path / "test_two.py"
    test.write_text("def test_ok():\n    assert True\n\n\ndef test_bad():\n    assert 1 == 2\n")
    check = gpu_check.Check("two", "two", "pytest",
                            lambda py, out: [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test),
                                             f"--junitxml={out / 'two.xml'}"], 60, "two.xml")
    out = tmp_path / "out"
    out.mkdir()
    res = gpu_check.run_check(check, out, sys.executable, dry=True)
    assert res.status == "failed" and res.headline["passed"] == 1 and res.headline["failed"] == 1
    assert res.headline_text == "1 passed, 1 failed, 0 skipped"


def test_gpu_check_gpu_commands_name_existing_files_and_known_flags(capsys):
    """The GPU run (which CI cannot run) calls only files that exist, with flags the scripts accept."""
    gpu_check = _load("gpu_check")
    gpu = gpu_check.checks(dry=False)
    assert [c.name for c in gpu] == [c.name for c in gpu_check.checks(dry=True)]
    assert sum(c.budget_s for c in gpu) <= 540  # under 9 minutes on one H100/H200
    for c in gpu:
        argv = c.command("python", Path("/out"))
        paths = [a.split("::")[0] for a in argv[1:] if a.split("::")[0].endswith(".py")]
        assert paths and all((BENCH.parent / p).exists() for p in paths), (c.name, paths)
        if c.kind != "bench":
            assert argv[1:3] == ["-m", "pytest"]
            continue
        assert "--device" in argv and argv[argv.index("--device") + 1] == "cuda"
        module = _load(Path(argv[1]).stem)
        with pytest.raises(SystemExit):
            module.main(["--help"])
        help_text = capsys.readouterr().out
        flags = [a for a in argv if a.startswith("--")]
        assert flags and all(f in help_text for f in flags), (c.name, [f for f in flags if f not in help_text])
