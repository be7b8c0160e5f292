"""The three HTML reports as a reader sees them, in headless Chromium: the main job's (from a tiny
real run), a continual experiment's and one with non-finite interpolation points (from synthetic
records, written by the same ``write_results``), and ``flatminima diagnose``'s. Each page's tables
must hold the cells of the table data, its figures must decode, its captions must say what the
figures show."""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import pytest
import torch
from helpers import chromium_driver

from flatminima.cli import main as cli
from flatminima.continual.metrics import continual_metrics
from flatminima.diagnostics.landscape import Interpolation
from flatminima.experiment import (
    ExperimentConfig,
    preset,
    run_experiment,
    write_results,
)
from flatminima.experiment.plots import method_colours
from flatminima.experiment.tables import experiment_tables

pytest.importorskip("matplotlib")

#: Every table of the page: caption, header cells, body cells (text and swatch colour).
TABLES_JS = """return [...document.querySelectorAll('table')].map(t => ({
    caption: t.caption ? t.caption.textContent : '',
    head: [...t.querySelectorAll('thead th')].map(c => c.textContent),
    rows: [...t.querySelectorAll('tbody tr')].map(r => [...r.children].map(c => c.textContent)),
    swatches: [...t.querySelectorAll('tbody tr')].map(r => {
        const s = r.querySelector('.swatch'); return s ? getComputedStyle(s).backgroundColor : null; })}))"""


def _rgb(hex_colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)))


def _page(url: str) -> dict:
    """Open ``url`` in headless Chromium; what it shows: tables, images, figure captions, sections."""
    driver = chromium_driver()
    try:
        driver.get(url)
        js = driver.execute_script
        images = []
        for _ in range(50):  # data: URIs decode near-instantly; wait briefly anyway
            images = js("return [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            if all(c and w > 0 for c, w, _ in images):
                break
            time.sleep(0.1)
        return {"title": driver.title, "tables": js(TABLES_JS), "images": images,
                "captions": js("return [...document.querySelectorAll('figcaption')].map(c => c.textContent)"),
                "sections": js("return [...document.querySelectorAll('section h2')].map(h => h.textContent)"),
                "dead_links": js("return [...document.querySelectorAll('nav.toc a')].map(a => a.getAttribute('href'))"
                                 ".filter(h => !document.getElementById(h.slice(1)))"),
                "errors": [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]}
    finally:
        driver.quit()


def _check_common(page: dict, images: int) -> None:
    assert not page["errors"] and not page["dead_links"], page
    assert len(page["images"]) == images and all(c and w > 0 and h > 0 for c, w, h in page["images"]), page["images"]
    assert page["sections"][-1] == "How this was produced"


def _check_tables(page: dict, tables: list, colours: dict) -> list:
    """The page's tables start with ``tables`` (the data), cell for cell; returns the rest."""
    shown = page["tables"]
    for table, dom in zip(tables, shown):
        assert dom["caption"] == table.caption and dom["head"] == table.columns
        assert dom["rows"] == [[c.text for c in row] for row in table.rows], table.key
        assert dom["swatches"] == [_rgb(colours[row[0].text.split(" / ")[0]]) for row in table.rows]
    return shown[len(tables):]


# ------------------------------------------------------------------------------ the main job


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    config = ExperimentConfig.from_dict({"methods": {"sgd": {}, "sam": {"rho": 0.05}}, "seeds": [0], "epochs": 1,
                                         "out_dir": str(out), "tensorboard": False}, base=preset("quick"))
    result = run_experiment(config, progress=False, log=lambda _: None)
    return config, result, out


def test_main_job_report(quick_run):
    config, result, out = quick_run
    page = _page((out / "report.html").resolve().as_uri())
    assert page["title"] == "quick: digits / mlp"
    _check_common(page, images=3)
    tables = experiment_tables(result["records"], config.diagnostics_samples)
    assert [t.key for t in tables] == ["results", "flatness"]
    rest = _check_tables(page, tables, method_colours(["sgd", "sam"]))
    facts = dict(row for row in rest[0]["rows"])
    assert facts["rerun"] == f"flatminima run {out / 'config.yaml'}"
    assert facts["units"] == "2 (2 with provenance), trained in 1 invocation(s)"
    assert page["sections"] == ["Results", "Flatness", "How this was produced"]
    curves, sharpness, interpolation = page["captions"]
    assert curves.startswith("Training loss") and "(2 per run, each marked)" in curves
    assert curves.endswith("(learning_curves.png)")
    assert "first 256 test examples" in sharpness and sharpness.endswith("(sharpness.png)")
    assert "from the sgd model (t = 0)" in interpolation and "All 21 points are finite." in interpolation


def test_diagnose_report(quick_run, tmp_path, capsys):
    config, result, out = quick_run
    diag = tmp_path / "diag"
    assert cli(["diagnose", "--preset", "quick", "--checkpoint", str(out / "runs" / "sam_seed0.pt"),
                "--diagnostics", "hessian,sharpness,robustness,landscape_1d", "--samples", "128",
                "--out", str(diag)]) == 0
    assert f"report in {diag / 'report.html'}" in capsys.readouterr().out
    saved = json.loads((diag / "report.json").read_text())
    page = _page((diag / "report.html").resolve().as_uri())
    assert page["title"] == "diagnose: digits / mlp"
    _check_common(page, images=1)  # the 1-D landscape
    assert page["sections"] == ["Summary", "Top Hessian eigenvalues", "Worst-case sharpness",
                                "Robustness to weight corruption", "Loss landscape (1-D)", "How this was produced"]
    summary, seconds, eigen, sharp, robust, line, facts = page["tables"]
    assert summary["rows"][0] == ["λ_max (top Hessian eigenvalue)", f"{saved['summary']['lambda_max']:.4g}"]
    assert [r[0] for r in seconds["rows"]] == ["hessian", "sharpness", "robustness", "landscape_1d"]
    assert [r[1] for r in eigen["rows"]] == [f"{v:.4g}" for v in saved["results"]["hessian"]["values"]]
    assert dict(sharp["rows"])["sharpness"] == f"{saved['results']['sharpness']['sharpness']:.4g}"
    # the robustness results, a row per (norm, budget, kind) after the clean one
    rows = saved["results"]["robustness"]["rows"]
    assert robust["head"] == ["norm", "budget", "kind", "loss", "metric", "metric change", "perturbation norm"]
    assert len(robust["rows"]) == 1 + len(rows) == 1 + 2 * 7
    assert robust["rows"][0][2:5] == ["clean", f"{saved['results']['robustness']['clean_loss']:.4g}",
                                      f"{saved['results']['robustness']['clean_metric']:.4g}"]
    for dom, row in zip(robust["rows"][1:], rows):
        assert dom[2] == row["kind"] and dom[3] == f"{row['loss']:.4g}"
    assert len(line["rows"]) == 21 and line["head"] == ["α", "loss", "metric"]
    assert page["captions"] == ["The loss (and the metric, dashed, on the right axis) along the direction; α = 0 "
                                "is the model. (landscape_1d.png)"]
    rerun = dict(facts["rows"])["rerun"]
    assert rerun.startswith("flatminima diagnose --preset quick --checkpoint ") and "--samples 128" in rerun


# ------------------------------------------------------------------------- synthetic records


def _final(acc: float, ms: float) -> dict:
    return {"test_acc": acc, "test_loss": 0.5, "train_loss": 0.4, "time_per_step_s": ms / 1000, "train_time_s": 1.0,
            "steps": 10}


def _continual_records() -> list[dict]:
    tasks = ["classes 0-1", "classes 2-3", "classes 4-5"]
    records = []
    for seed in (0, 1):
        for strategy in ("seq-lora", "o-lora"):
            for k, method in enumerate(("sgd", "sam")):
                base = 0.6 + 0.1 * k + 0.05 * seed + (0.02 if strategy == "o-lora" else 0.0)
                acc = [[base if i == j else (base - 0.2 if i < j else 0.5) for i in range(3)] for j in range(3)]
                metrics = {s: {k2: (None if isinstance(v, float) and math.isnan(v) else v)
                               for k2, v in continual_metrics(acc).items()} for s in ("task", "class")}
                records.append({
                    "unit": f"{method}_{strategy}_seed{seed}", "method": method, "seed": seed, "strategy": strategy,
                    "registry_name": "base" if method == "sgd" else "sam", "hyperparameters": {},
                    "scenario": "task", "tasks": tasks, "order": tasks, "accuracy": {"task": acc, "class": acc},
                    "metrics": metrics, "lambda_max": {"lora": [1.0 + k, 2.0 + seed, 3.0]},
                    "final": _final(metrics["task"]["average_accuracy"], 2.0 + k)})
    return records


def test_continual_report(tmp_path):
    config = ExperimentConfig.from_dict({"out_dir": str(tmp_path), "seeds": [0, 1]}, base=preset("continual_quick"))
    records = _continual_records()
    write_results(tmp_path, config, records, wall_time=3.0, device=torch.device("cpu"), log=lambda _: None)
    page = _page((tmp_path / "report.html").resolve().as_uri())
    _check_common(page, images=1 + 8)  # continual.png, one accuracy matrix per method × strategy × evaluation
    tables = experiment_tables(records, config.diagnostics_samples)
    rest = _check_tables(page, tables, method_colours(["sgd", "sam"]))
    assert len(rest) == 1  # then the provenance facts
    captions = [t["caption"] for t in page["tables"]]
    # "Training time" is the caption of its own table, apart from the metrics' captions
    assert captions[-2] == "Training time:" and [t.key for t in tables][-1] == "continual_time"
    assert sum("Training time" in c for c in captions) == 1
    assert captions[1].startswith("Continual metrics (task-incremental")
    assert page["sections"] == ["Results", "Continual learning", "How this was produced"]
    assert page["captions"][0].startswith("Per method × strategy, the mean over 2 run(s)")
    assert page["captions"][1:] == [
        f"Accuracy matrix of {g} ({e}-incremental), mean over 2 run(s): row j, column i is the accuracy on task i "
        f"after training task j. ({g.replace(' / ', '__')}{'' if e == 'task' else '__' + e}.png)"
        for e in ("task", "class") for g in ("sgd / seq-lora", "sam / seq-lora", "sgd / o-lora", "sam / o-lora")]


def test_nonfinite_interpolation_points_are_counted_in_the_report(tmp_path):
    config = ExperimentConfig.from_dict({"out_dir": str(tmp_path), "seeds": [0],
                                         "methods": {"sgd": {}, "sam": {"rho": 0.05}}}, base=preset("quick"))
    records = [{"unit": f"{m}_seed0", "method": m, "seed": 0, "registry_name": "base" if m == "sgd" else "sam",
                "hyperparameters": {}, "curves": {"train_loss": [2.0, 1.5, 1.0, 0.8], "eval_step": [0, 2, 4],
                                                  "test_acc": [0.1, 0.6, 0.8]}, "final": _final(0.8, 1.0)}
               for m in ("sgd", "sam")]
    ts = np.linspace(-0.5, 1.5, 21)
    loss = np.linspace(0.5, 3.0, 21)
    loss[[19, 20]] = np.nan  # diverged past t = 1.3
    interpolation = {"sam": Interpolation(ts, loss, None, 0.3, "interpolate")}
    write_results(tmp_path, config, records, wall_time=1.0, device=torch.device("cpu"), log=lambda _: None,
                  interpolation=interpolation)
    page = _page((tmp_path / "report.html").resolve().as_uri())
    _check_common(page, images=2)  # the learning curves and the interpolation
    assert "2 of 21 points are not finite (NaN or ±inf): sam at t = 1.4, 1.5." in page["captions"][1]
    assert page["captions"][1].endswith("marked × on the top edge. (interpolation.png)")


def test_without_matplotlib_the_report_has_its_tables_and_says_why_no_figures(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    config = ExperimentConfig.from_dict({"out_dir": str(tmp_path), "seeds": [0, 1]}, base=preset("continual_quick"))
    records = _continual_records()
    said = []
    write_results(tmp_path, config, records, wall_time=3.0, device=torch.device("cpu"), log=said.append)
    assert len(said) == 1 and said[0].startswith("figures not written (") and "'matplotlib'" in said[0]
    assert said[0].endswith("pip install 'flatminima[plots]')")
    assert not list(tmp_path.rglob("*.png")) and (tmp_path / "matrices" / "sgd__seq-lora.csv").is_file()
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<img" not in html and html.count("<table") == len(experiment_tables(records)) + 1
