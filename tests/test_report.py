"""The diagnostics report, the main job's flatness section and `flatminima diagnose`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from flatminima.cli import main as cli
from flatminima.diagnostics import accuracy, hessian
from flatminima.diagnostics.report import DIAGNOSTICS, report
from flatminima.experiment.report import write_diagnose_report

pytest.importorskip("matplotlib")


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,))
    return model, [(x[:24], y[:24]), (x[24:], y[24:])]


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_report_runs_every_diagnostic_writes_files_and_leaves_the_model_alone(tmp_path):
    model, data = _model_and_data()
    model.train()
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    out = report(model, _loss, data, tmp_path, diagnostics=list(DIAGNOSTICS), metric_fn=accuracy,
                 options={"landscape_2d": {"alphas": [-0.5, 0.0, 0.5], "betas": [-0.5, 0.0, 0.5]},
                          "trace": {"probes": 10}, "density": {"probes": 1, "steps": 10}})
    assert set(out["results"]) == set(DIAGNOSTICS)
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["results"]) == set(DIAGNOSTICS) and saved["summary"] == pytest.approx(out["summary"])
    for name in ("density", "batch_hessian", "curve", "landscape_1d", "landscape_2d"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (tmp_path / "landscape_2d.npz").exists()
    # the headline numbers are those of the functions themselves, with the report's settings
    top = hessian.top_eigenvalues(model, _loss, data, k=3, tol=1e-3)
    assert out["summary"]["lambda_max"] == pytest.approx(float(top.values[0]), rel=1e-9)
    assert out["summary"]["sharpness"] == out["results"]["sharpness"].sharpness
    # the HTML report's sections: one per diagnostic, in run order, holding the results' own numbers
    sections = {s["name"]: s for s in out["sections"]}
    assert list(sections) == list(DIAGNOSTICS)
    assert [row[1] for row in sections["hessian"]["tables"][0]["rows"]] == list(out["results"]["hessian"].values)
    robustness = out["results"]["robustness"]
    table = sections["robustness"]["tables"][0]
    kinds, losses = table["columns"].index("kind"), table["columns"].index("loss")
    assert [r[kinds] for r in table["rows"]] == ["clean"] + [r["kind"] for r in robustness.rows]
    assert [r[losses] for r in table["rows"]] == [robustness.clean_loss] + [r["loss"] for r in robustness.rows]
    assert dict(sections["sharpness"]["tables"][0]["rows"])["sharpness"] == out["summary"]["sharpness"]
    for name, section in sections.items():
        assert section["figure"] == (f"{name}.png" if name in ("density", "batch_hessian", "curve", "landscape_1d",
                                                                "landscape_2d") else None)
        assert section["figure"] is None or (tmp_path / section["figure"]).is_file()
    page = write_diagnose_report(tmp_path, out, "diagnose <test>")
    html = page.read_text(encoding="utf-8")
    assert html.count("<section id=") == 1 + len(DIAGNOSTICS) + 1  # summary, one each, provenance
    assert html.count("<img src=\"data:image/png;base64,") == 5 and "diagnose &lt;test&gt;" in html
    assert "Robustness to weight corruption" in html and ">adversarial</td>" in html


def test_report_rejects_unknown_diagnostics_and_options(tmp_path):
    model, data = _model_and_data()
    with pytest.raises(ValueError, match="diagnostics"):
        report(model, _loss, data, diagnostics=["hessian", "flatness"])
    with pytest.raises(ValueError, match="options"):
        report(model, _loss, data, diagnostics=["hessian"], options={"hesian": {"k": 2}})
    assert not any(tmp_path.iterdir())


def test_main_job_flatness_section_and_diagnose_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["run", "--preset", "quick", "--methods", "sgd,sam", "--seeds", "0", "--epochs", "1",
                "--save-models", "--out", str(out), "--no-progress"]) == 0
    table = (out / "results.md").read_text()
    assert "Flatness at the end of training" in table and "λ_max" in table and "| sam |" in table
    results = json.loads((out / "results.json").read_text())
    assert set(results["diagnostics"]) == {"sgd_seed0", "sam_seed0"}
    assert set(results["interpolation"]) == {"sam"}
    assert (out / "interpolation.png").exists() and (out / "runs" / "sam_seed0.pt").exists()
    # the interpolation's endpoint t = 1 is the SAM model itself
    curve = results["interpolation"]["sam"]
    assert curve["ts"][0] == -0.5 and len(curve["loss"]) == 21
    capsys.readouterr()
    diag = tmp_path / "diag"
    assert cli(["diagnose", "--preset", "quick", "--checkpoint", str(out / "runs" / "sam_seed0.pt"),
                "--diagnostics", "hessian,sharpness", "--samples", "256", "--out", str(diag)]) == 0
    saved = json.loads((diag / "report.json").read_text())
    # the same model and data as the run's own diagnostics: the same λ_max
    assert saved["summary"]["lambda_max"] == pytest.approx(results["diagnostics"]["sam_seed0"]["summary"]["lambda_max"],
                                                           rel=1e-3)  # both to the requested tol = 1e-3
    with pytest.raises(SystemExit):
        cli(["diagnose", "--preset", "quick", "--diagnostics", "hessian,nope", "--out", str(diag)])


def test_batches_and_iterables_of_batches_are_told_apart():
    from flatminima.diagnostics import batch_size, is_batch

    x, y = torch.zeros(4, 2), torch.zeros(4)
    inputs = {"input_ids": torch.zeros(4, 7, dtype=torch.long)}
    assert is_batch(x) and is_batch((x, y)) and is_batch([x, y]) and is_batch(inputs) and is_batch((inputs, y))
    assert not is_batch([(x, y), (x, y)]) and not is_batch([inputs, inputs]) and not is_batch(iter([]))
    assert batch_size((inputs, y)) == 4 and batch_size(inputs) == 4 and batch_size((x, y)) == 4
