"""The experiment runner: YAML configs, method grids, resuming a killed run, continual experiments end
to end (accuracy matrices, metrics, figures), TensorBoard scalars and the HTML report in a browser."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatminima import runner
from flatminima.cli import main
from flatminima.continual.metrics import continual_metrics
from flatminima.experiment import ExperimentConfig, preset, run_experiment
from helpers import browser_page_problems, chromium_driver

REPO = Path(__file__).resolve().parents[1]

QUICK_YAML = """\
methods:
  sgd: {}
  sam: {rho: 0.05, grid: {rho: [0.02, 0.1]}}
seeds: [0, 1]
epochs: 3
diagnostics: []
"""


def test_yaml_config_and_method_grid(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(QUICK_YAML)
    config = ExperimentConfig.load(path, base=preset("quick"))
    assert list(config.expanded_methods()) == ["sgd", "sam-rho0.02", "sam-rho0.1"]
    assert config.method_spec("sam-rho0.1")[2] == {"rho": 0.1}
    assert [u.id for u in runner.plan_units(config)][:3] == ["sgd_seed0", "sam-rho0.02_seed0", "sam-rho0.1_seed0"]
    for text, message in [("methods: {sam: {grid: {rho: []}}}", r"methods\.sam\.grid"),
                          ("methods: {sam: {grid: {rho: [-1.0]}}}", r"methods\.sam-rho-1\.0: .*rho"),
                          ("epochs: [", "not valid YAML"),
                          ("continual: {strategies: [x-lora]}", r"Invalid continual\.strategies"),
                          ("continual: {nope: 1}", r"Invalid continual field: 'nope'"),
                          ("{task: digits, continual: {}}", r"Invalid task: 'digits' \(expected a task sequence")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            ExperimentConfig.load(path, base=preset("quick"))


def test_fingerprint_follows_the_settings_that_shape_a_unit():
    config = preset("quick")
    unit = runner.plan_units(config)[1]
    same = ExperimentConfig.from_dict({"out_dir": "/elsewhere", "seeds": [0, 5], "tensorboard": False}, base=config)
    other_lr = ExperimentConfig.from_dict({"lr": 0.01}, base=config)
    other_method = ExperimentConfig.from_dict({"methods": {**config.methods, unit.label: {"rho": 0.2}}}, base=config)
    assert runner.fingerprint(same, unit) == runner.fingerprint(config, unit)
    assert runner.fingerprint(other_lr, unit) != runner.fingerprint(config, unit)
    assert runner.fingerprint(other_method, unit) != runner.fingerprint(config, unit)
    # resolved values: SAM's default rho spelled out, or a global lr the method overrides, change nothing
    spelled = ExperimentConfig.from_dict({"methods": {**config.methods, unit.label: {"rho": 0.05, "norm": 2}}},
                                         base=config)
    own_lr = ExperimentConfig.from_dict({"methods": {**config.methods, unit.label: {"rho": 0.05, "lr": 0.05}}},
                                        base=config)
    assert runner.fingerprint(spelled, unit) == runner.fingerprint(config, unit)
    assert runner.fingerprint(ExperimentConfig.from_dict({"lr": 0.01}, base=own_lr), unit) == \
        runner.fingerprint(own_lr, unit) == runner.fingerprint(config, unit)
    assert len(runner.fingerprint(config, unit)) == 64


def _table_without_timing(out: Path) -> list[tuple]:
    summary = json.loads((out / "results.json").read_text())["summary"]
    return [(r["method"], r["test_acc_mean"], r["test_acc_std"], r["train_loss_mean"], r["train_loss_std"],
             r["test_loss_mean"]) for r in summary]


def test_a_killed_run_resumes_from_its_last_finished_unit(tmp_path):
    """SIGKILL a real `flatminima run` after its first unit; the rerun loads what is finished, trains
    the rest, and ends with the same table as an uninterrupted run (timings aside)."""
    config = tmp_path / "exp.yaml"
    config.write_text("methods: {sgd: {}, sam: {rho: 0.05}}\nseeds: [0, 1]\nepochs: 6\ndiagnostics: []\n")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    command = [sys.executable, "-m", "flatminima", "run", str(config), "--preset", "quick", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((killed / "runs").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (killed / "runs").glob("*.json")}
    assert 1 <= len(done) < 4, done  # killed mid-way
    assert not (killed / "results.json").exists() and not list((killed / "runs").glob(".*tmp*"))

    partial = subprocess.run(command + ["--out", str(killed), "--report-only"], env=env, capture_output=True, text=True)
    assert partial.returncode == 0 and f"{len(done)} runs (0 trained now)" in partial.stdout, partial.stderr
    left = [u for u in ("sgd_seed0", "sam_seed0", "sgd_seed1", "sam_seed1") if f"{u}.json" not in done]
    assert f"warning: {4 - len(done)} of 4 units are missing from these tables: {', '.join(left)}." in partial.stdout
    assert json.loads((killed / "results.json").read_text())["unfinished"][0]["unit"] == left[0]
    assert {p.name: p.stat().st_mtime_ns for p in (killed / "runs").glob("*.json")} == done
    assert subprocess.run(command + ["--out", str(whole)], env=env, capture_output=True).returncode == 0
    resumed = subprocess.run(command + ["--out", str(killed)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(done)} of 4 units already finished" in resumed.stdout
    assert f"4 runs ({4 - len(done)} trained now)" in resumed.stdout
    assert {p: (killed / "runs" / p).stat().st_mtime_ns for p in done} == done  # not trained again
    assert _table_without_timing(killed) == _table_without_timing(whole)
    # the wall time covers both invocations: the sum of the units' own
    results = json.loads((killed / "results.json").read_text())
    walls = [json.loads((killed / "runs" / f"{u}.json").read_text())["provenance"]["wall_time_s"]
             for u in ("sgd_seed0", "sam_seed0", "sgd_seed1", "sam_seed1")]
    assert results["invocations"] == 2 and results["unit_wall_time_s"] == pytest.approx(sum(walls))
    for name in ("sgd_seed0", "sam_seed1"):
        a, b = (json.loads((out / "runs" / f"{name}.json").read_text()) for out in (whole, killed))
        assert a["curves"] == b["curves"] and a["fingerprint"] == b["fingerprint"]


@pytest.fixture(scope="module")
def continual_run(tmp_path_factory):
    """Split digits (5 tasks × 2 classes) on a LoRA ResNet: SGD and SAM × sequential LoRA and O-LoRA,
    2 seeds, λ_max after each task, every figure and the report."""
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("continual")
    config = ExperimentConfig.from_dict({
        "name": "continual-test", "task": "split_digits", "task_options": {"test_subset": 30}, "model": "resnet_lora",
        "model_options": {"width": 8, "blocks": [1], "r": 2}, "methods": {"sgd": {}, "sam": {"rho": 0.05}},
        "seeds": [0, 1], "epochs": 1, "batch_size": 32, "lr": 0.1, "eval_every": 4, "eval_batch_size": 100,
        "diagnostics_samples": 32, "out_dir": str(out), "tensorboard": False,
        "continual": {"strategies": ["seq-lora", "o-lora"], "strategy_options": {"o-lora": {"orth_weight": 0.1}},
                      "hessian": ["lora", "all"], "hessian_options": {"tol": 1e-2, "max_iter": 12}}})
    result = run_experiment(config, progress=False, log=lambda _: None)
    return config, result, out


def test_continual_records_hold_the_matrices_and_their_metrics(continual_run):
    config, result, out = continual_run
    records = result["records"]
    assert [r["unit"] for r in records[:4]] == [
        f"{m}_{s}_classes01-classes23-classes45-classes67-classes89_seed0" for s in ("seq-lora", "o-lora")
        for m in ("sgd", "sam")]
    for r in records:
        assert r["scenario"] == "task" and set(r["accuracy"]) == {"task", "class"}
        for scenario, matrix in r["accuracy"].items():
            assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
            assert all(0.0 <= a <= 1.0 for row in matrix for a in row)
            expected = continual_metrics(matrix, r["baseline"][scenario])
            for key in ("average_accuracy", "learning_accuracy", "backward_transfer", "forgetting", "forward_transfer"):
                assert r["metrics"][scenario][key] == pytest.approx(expected[key], abs=1e-12)
        # task-incremental accuracy is at least the class-incremental one (the mask only removes rivals)
        assert all(t >= c for rt, rc in zip(r["accuracy"]["task"], r["accuracy"]["class"]) for t, c in zip(rt, rc))
        assert r["final"]["test_acc"] == r["metrics"]["task"]["average_accuracy"]
        assert len(r["lambda_max"]["lora"]) == len(r["lambda_max"]["all"]) == 5
        assert all(v > 0 and math.isfinite(v) for v in r["lambda_max"]["lora"])
        # the full model's curvature bounds the LoRA subspace's (a Rayleigh quotient over a subspace)
        assert all(a >= 0.98 * lo for a, lo in zip(r["lambda_max"]["all"], r["lambda_max"]["lora"]))
        assert len(r["per_task"]) == 5 and r["final"]["steps"] == sum(p["final"]["steps"] for p in r["per_task"])


def test_continual_outputs_tables_matrices_and_figures(continual_run):
    config, result, out = continual_run
    md = (out / "results.md").read_text()
    assert "Continual metrics (task-incremental" in md and "evaluated class-incremental" in md
    assert "| sam / o-lora |" in md and "Top Hessian eigenvalue (all parameters)" in md
    saved = json.loads((out / "matrices" / "sam__o-lora.json").read_text())
    mats = [r["accuracy"]["task"] for r in result["records"] if r["method"] == "sam" and r["strategy"] == "o-lora"]
    expected = [sum(m[j][i] for m in mats) / 2 for j in range(5) for i in range(5)]
    assert [a for row in saved["matrix"] for a in row] == pytest.approx(expected, abs=1e-12)
    for name in ("continual.png", "matrices/sgd__seq-lora.png", "report.html"):
        assert (out / name).stat().st_size > 1000, name


def test_continual_report_reads_well_in_a_headless_browser(continual_run):
    config, result, out = continual_run
    driver = chromium_driver()
    try:
        page = browser_page_problems(driver, (out / "report.html").resolve().as_uri())
    finally:
        driver.quit()
    assert page["title"] == "continual-test: split_digits / resnet_lora"
    assert not page["broken_images"] and not page["dead_links"] and not page["errors"], page
    assert page["images"] == 1 + 8  # the continual curves and one accuracy matrix per method × strategy × evaluation
    headers = page["tables"]
    assert headers[0][:2] == ["method", "test accuracy (%)"]
    assert ["label", "ACC", "LA", "BWT", "forgetting", "FWT", "seeds"] in headers
    assert "sam / o-lora" in page["text"] and "Configuration" in page["text"]


def test_tensorboard_scalars_follow_the_record(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = ExperimentConfig.from_dict({"methods": {"sgd": {}}, "seeds": [0], "epochs": 2, "diagnostics": [],
                                         "out_dir": str(tmp_path), "tensorboard": True}, base=preset("quick"))
    record = run_experiment(config, progress=False, log=lambda _: None)["records"][0]
    events = EventAccumulator(str(tmp_path / "tensorboard" / "sgd_seed0"))
    events.Reload()
    loss = events.Scalars("train_loss")
    assert [e.step for e in loss] == list(range(1, len(record["curves"]["train_loss"]) + 1))
    assert [e.value for e in loss] == pytest.approx(record["curves"]["train_loss"], rel=1e-6)
    assert [e.value for e in events.Scalars("test_acc")] == pytest.approx(record["curves"]["test_acc"], rel=1e-6)


def test_cli_runs_a_yaml_config_and_a_suite_writes_one_folder_each(tmp_path, capsys, monkeypatch):
    path = tmp_path / "exp.yaml"
    path.write_text("methods: {sgd: {}}\nseeds: [0]\nepochs: 1\ndiagnostics: []\n")
    assert main(["run", str(path), "--preset", "quick", "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    assert (tmp_path / "one" / "report.html").is_file()
    ran = ExperimentConfig.from_dict({"out_dir": str(tmp_path / "one")}, base=ExperimentConfig.load(path, preset("quick")))
    assert ExperimentConfig.load(tmp_path / "one" / "config.yaml") == ran  # the saved config reruns it
    import flatminima.experiment as experiment

    monkeypatch.setitem(experiment.SUITES, "pair", ("quick", "continual_quick"))
    assert main(["run", "--preset", "pair", "--methods", "sgd", "--epochs", "1", "--out", str(tmp_path / "two"),
                 "--no-progress"]) == 0
    assert (tmp_path / "two" / "quick" / "report.html").is_file()
    assert (tmp_path / "two" / "continual_quick" / "matrices" / "sgd__o-lora.csv").is_file()
    monkeypatch.setitem(experiment.SUITES, "twice", ("quick", "quick"))
    with pytest.raises(ValueError, match="distinct names"):
        experiment.suite("twice")


def test_config_files_document_every_field():
    doc = (REPO / "docs" / "configuration.md").read_text()
    from dataclasses import fields

    from flatminima.experiment.continual_settings import ContinualSettings

    for f in fields(ExperimentConfig) + fields(ContinualSettings):
        assert re.search(rf"\| `{f.name}` \|", doc), f"docs/configuration.md lacks the field {f.name}"


# --------------------------------------------------------------------------------------------
# stale units, the plan view, the CSV


FAST = {"methods": {"sgd": {}, "sam": {"rho": 0.05}}, "seeds": [0], "epochs": 1, "diagnostics": [],
        "tensorboard": False}


def _config(out: Path, **changes) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**FAST, "out_dir": str(out), **changes}, base=preset("quick"))


def test_an_edited_config_never_tabulates_the_old_units(tmp_path):
    """Edit SAM's rho after a run: --report-only leaves the stale unit out, naming the change;
    a run retrains it (and only it); editing epochs makes every unit stale."""
    lines: list[str] = []
    first = run_experiment(_config(tmp_path), progress=False, log=lines.append)
    sgd_mtime = (tmp_path / "runs" / "sgd_seed0.json").stat().st_mtime_ns
    edited = _config(tmp_path, methods={"sgd": {}, "sam": {"rho": 0.1}})
    lines.clear()
    report = run_experiment(edited, progress=False, log=lines.append, train=False)
    assert [r["unit"] for r in report["records"]] == ["sgd_seed0"] and "| sam |" not in report["table"]
    assert "not reported (stale) sam_seed0: its record was made with other settings (method.rho 0.05 → 0.1)" in lines
    assert "warning: 1 of 2 units are missing from these tables: sam_seed0." in lines
    assert "**Partial:** 1 of 2 units are missing" in (tmp_path / "results.md").read_text()
    lines.clear()
    again = run_experiment(edited, progress=False, log=lines.append)
    assert "retraining sam_seed0: its record was made with other settings (method.rho 0.05 → 0.1)" in lines
    assert "resuming: 1 of 2 units already finished" in " ".join(lines)
    assert (tmp_path / "runs" / "sgd_seed0.json").stat().st_mtime_ns == sgd_mtime  # not retrained
    sam = json.loads((tmp_path / "runs" / "sam_seed0.json").read_text())
    assert sam["hyperparameters"] == {"rho": 0.1} and sam["provenance"]["unit_settings"]["method"]["rho"] == 0.1
    assert again["records"][0]["final"] == first["records"][0]["final"]
    with pytest.raises(ValueError, match=r"\(2 of its units were trained with other settings\)"):
        run_experiment(_config(tmp_path, epochs=2), progress=False, log=lambda _: None, train=False)


def test_show_lists_done_stale_broken_and_missing_units_without_writing(tmp_path):
    from flatminima.experiment import format_show, show_plan

    run_experiment(_config(tmp_path), progress=False, log=lambda _: None)
    (tmp_path / "runs" / "sam_seed0.json").write_text("{truncated")
    (tmp_path / "runs" / "sgd_seed0.json").touch()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    wider = _config(tmp_path, methods={"sgd": {}, "sam": {"rho": 0.05}, "asam": {"rho": 0.5}}, seeds=[0, 1])
    rows = show_plan(wider)
    assert [(r["unit"], r["status"]) for r in rows] == [
        ("sgd_seed0", "done"), ("sam_seed0", "broken"), ("asam_seed0", "missing"),
        ("sgd_seed1", "missing"), ("sam_seed1", "missing"), ("asam_seed1", "missing")]
    assert rows[0]["note"].startswith("test acc 0.") and rows[0]["method"] == "sgd" and rows[0]["seed"] == 0
    assert rows[1]["note"] == "sam_seed0.json does not read as JSON (JSONDecodeError)"
    stale = show_plan(_config(tmp_path, epochs=2))
    assert stale[0]["status"] == "stale" and stale[0]["note"] == "epochs 1 → 2"
    text = format_show(wider, rows)
    assert text.splitlines()[:2] == [f"quick: digits / mlp -> {tmp_path}", "6 units: 1 done, 1 broken, 4 to train"]
    assert re.search(r"^sam_seed0 +sam +0 +broken +sam_seed0\.json does not read", text, re.M)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, no lock taken


def test_results_csv_holds_the_flatness_columns(tmp_path):
    from flatminima.experiment.tables import CSV_FIELDS

    run_experiment(_config(tmp_path, diagnostics=["hessian"]), progress=False, log=lambda _: None)
    import csv

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_FIELDS and [r["method"] for r in rows] == ["sgd", "sam"]
    assert {"lambda_max_mean", "lambda_max_std", "trace_mean", "sharpness_mean"} <= set(CSV_FIELDS)
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert float(rows[1]["lambda_max_mean"]) == pytest.approx(summary[1]["lambda_max_mean"]) and \
        float(rows[1]["lambda_max_mean"]) > 0
    assert rows[1]["lambda_max_std"] == "0.0" and rows[1]["trace_mean"] == ""  # one seed; trace not measured
    results_table = (tmp_path / "results.md").read_text().split("Flatness")[0]
    assert "| sam |" in results_table and "±" not in results_table  # one seed: the mean alone
