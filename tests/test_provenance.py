"""What each unit record says about where its numbers came from, and how the tables print them:
provenance fields and hashes, the data fingerprint, one precision per column, progress lines."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from flatminima.data import Dataset
from flatminima.experiment import ExperimentConfig, preset, run_experiment
from flatminima.experiment import provenance as prov
from flatminima.experiment.progress import Progress, clock_text
from flatminima.experiment.tables import (experiment_tables, flatness_table, format_column, results_table,
                                          stat_cells, tables_markdown)

FAST = {"methods": {"sgd": {}, "sam": {"rho": 0.05}}, "seeds": [0], "epochs": 1, "diagnostics": [],
        "tensorboard": False}


# --------------------------------------------------------------------------------------------
# provenance


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("provenance")
    config = ExperimentConfig.from_dict({**FAST, "out_dir": str(out)}, base=preset("quick"))
    return config, run_experiment(config, progress=False, log=lambda _: None), out


def test_every_record_holds_its_provenance(quick_run):
    config, result, out = quick_run
    for record in result["records"]:
        p = json.loads((out / "runs" / f"{record['unit']}.json").read_text())["provenance"]
        assert set(p) >= {"config", "config_sha256", "git", "packages", "python", "device", "data", "invocation",
                          "seeds", "unit_settings", "fingerprint", "wall_time_s"}
        assert p["config_sha256"] == prov.sha256_json(prov.resolved_config(config)) and len(p["config_sha256"]) == 64
        assert p["fingerprint"] == record["fingerprint"]
        # the resolved config: every field, methods after the grid with the base optimizer and the defaults
        assert set(p["config"]) == set(config.to_dict())
        assert p["config"]["methods"]["sam"] == {"method": "sam", "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                                                 "weight_decay": 0.0005, "rho": 0.05, "norm": 2,
                                                 "normalization": "global", "different_batches": False}
        assert p["packages"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
        assert set(p["packages"]) == {"torch", "flatminima", "transformers", "peft", "numpy"}
        assert p["device"]["type"] == "cpu" and p["device"]["name"] and p["seeds"] == {"unit": 0, "experiment": [0]}
        assert p["data"]["name"] == "digits" and p["data"]["files"] == {} and len(p["data"]["tensors_sha256"]) == 64
        assert set(p["git"]) == {"commit", "dirty"} and 0 < p["wall_time_s"] < 120
    summary = json.loads((out / "results.json").read_text())["provenance"]
    assert summary["units"] == summary["recorded"] == 2 and summary["invocations"] == 1
    assert len(summary["config_sha256"]) == 1 and len(summary["data"]) == 1


def test_the_config_hash_follows_every_field():
    config = preset("quick")
    base = prov.sha256_json(prov.resolved_config(config))
    assert prov.sha256_json(prov.resolved_config(preset("quick"))) == base
    for change in ({"lr": 0.01}, {"epochs": 3}, {"methods": {**config.methods, "sam": {"rho": 0.1}}},
                   {"out_dir": "/elsewhere"}, {"task_options": {"test_size": 400}}):
        assert prov.sha256_json(prov.resolved_config(ExperimentConfig.from_dict(change, base=config))) != base, change
    # a method's default spelled out is the same method
    spelled = ExperimentConfig.from_dict({"methods": {**config.methods, "sam": {"rho": 0.05, "norm": 2}}}, base=config)
    assert prov.sha256_json(prov.resolved_config(spelled)) == base


def test_git_state_is_none_outside_a_checkout_and_without_git(tmp_path, monkeypatch):
    assert prov.git_state(str(tmp_path)) == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the path: still no exception
    assert prov.git_state(str(tmp_path / "x")) == {"commit": None, "dirty": None}


def test_the_data_fingerprint_hashes_the_files_and_a_bounded_sample(tmp_path):
    archive = tmp_path / "sentences.tar.gz"
    archive.write_bytes(b"some bytes of a data file")
    x = torch.arange(5000 * 3, dtype=torch.float32).reshape(5000, 3)
    y = torch.arange(5000) % 10
    ds = Dataset("toy", x, y, x[:10].clone(), y[:10].clone(), 10, (3,), str(archive))
    fp = prov.data_fingerprint(ds)
    assert fp["files"] == {"sentences.tar.gz": hashlib.sha256(b"some bytes of a data file").hexdigest()}
    assert fp["sample_rows"] == prov.SAMPLE_ROWS == 1024 and fp["source"] == str(archive)
    sampled = torch.linspace(0, 4999, 1024).round().long()
    unsampled = next(i for i in range(5000) if i not in set(sampled.tolist()))
    x2 = x.clone()
    x2[unsampled, 0] += 1  # outside the sample of the inputs: the same fingerprint (bounded cost)
    assert prov.data_fingerprint(Dataset("toy", x2, y, x[:10], y[:10], 10, (3,), str(archive)))["tensors_sha256"] \
        == fp["tensors_sha256"]
    x2[sampled[7], 1] += 1
    y2 = y.clone()
    y2[unsampled] = 3 if y2[unsampled] != 3 else 4  # labels are hashed whole
    for changed in (Dataset("toy", x2, y, x[:10], y[:10], 10, (3,), str(archive)),
                    Dataset("toy", x, y2, x[:10], y[:10], 10, (3,), str(archive))):
        assert prov.data_fingerprint(changed)["tensors_sha256"] != fp["tensors_sha256"]
    archive.write_bytes(b"other bytes")
    assert prov.data_fingerprint(ds)["files"]["sentences.tar.gz"] == hashlib.sha256(b"other bytes").hexdigest()


# --------------------------------------------------------------------------------------------
# tables: one precision per column, the mean alone over one seed


def _record(method: str, seed: int, acc: float, loss: float, time: float, **diagnostics) -> dict:
    record = {"method": method, "registry_name": "base" if method == "sgd" else "sam", "hyperparameters": {},
              "seed": seed, "unit": f"{method}_seed{seed}",
              "final": {"test_acc": acc, "test_loss": 1.0, "train_loss": loss, "time_per_step_s": time,
                        "train_time_s": 10 * time}}
    if diagnostics:
        record["diagnostics"] = {"summary": diagnostics}
    return record


RECORDS = [_record("sgd", 0, 0.90, 0.30, 0.010, lambda_max=12.0, trace=1.9e-4, sharpness=0.5),
           _record("sgd", 1, 0.92, 0.31, 0.011, lambda_max=13.0, trace=2.0e-4),
           _record("sgd", 2, 0.94, 0.35, 0.012, lambda_max=14.0, trace=1.8e-4, sharpness=0.7),
           _record("sam", 0, 0.955, 0.2, 0.020, lambda_max=8.0, sharpness=0.4)]


def test_a_table_prints_three_seeds_as_mean_and_std_and_one_seed_as_the_mean():
    assert results_table(RECORDS).markdown() == "\n".join([
        "| method | test accuracy (%) | final train loss | time/step vs sgd | ms/step | seeds |",
        "|---|---:|---:|---:|---:|---:|",
        "| sgd | 92.0 ± 2.0 | 0.320 ± 0.026 | 1.00 | 11.0 | 3 |",
        "| sam | 95.5 | 0.200 | 1.82 | 20.0 | 1 |"])
    table = flatness_table(RECORDS, samples=256)
    assert table.markdown() == "\n".join([
        "Flatness at the end of training (first 256 test examples, mean ± std over seeds):", "",
        "| method | λ_max | tr(H) (×10⁻⁴) | worst-case sharpness (ρ = 0.05) |",
        "|---|---:|---:|---:|",
        "| sgd | 13.0 ± 1.0 | 1.90 ± 0.10 | 0.600 ± 0.141 (n=2) |",
        "| sam | 8.0 | – | 0.400 |"])
    cell = table.rows[0][2]
    assert (cell.mean, cell.n) == (pytest.approx(1.9e-4), 3) and cell.std == pytest.approx(1e-5)
    assert table.rows[1][1].std is None and table.rows[1][1].n == 1  # one value: no std
    assert [t.key for t in experiment_tables(RECORDS, 256)] == ["results", "flatness"]
    assert tables_markdown(experiment_tables(RECORDS, 256)).count("| sam |") == 2


def test_each_column_has_one_precision():
    assert format_column([91.2, 88.0]) == (1, 0)
    assert format_column([0.001899, 0.0015]) == (5, 0)  # was "0.001899 ± 5.6e-06"
    assert format_column([0.00019]) == (2, -4)
    assert format_column([123456.0]) == (2, 5)
    assert format_column([0.0, math.nan]) == (2, 0)
    cells, exponents = stat_cells([[[8.804, 10.1, 7.5], [7.0]], [[0.001899, 0.001905, 0.001893], [0.0015]]])
    assert [c.text for c in cells[0]] == ["8.80 ± 1.30", "0.00190 ± 0.00001"]  # was "8.804 ± 1.3"
    assert [c.text for c in cells[1]] == ["7.00", "0.00150"] and exponents == [0, 0]
    assert stat_cells([[[math.nan, 1.0], []]])[0][1][0].text == "–"


# --------------------------------------------------------------------------------------------
# progress lines


def test_progress_lines_count_units_elapsed_time_and_eta():
    now = [0.0]
    lines: list[str] = []
    shown = Progress(2, 10, progress=False, log=lines.append, interval=30.0, clock=lambda: now[0])
    shown.start("sgd_seed0")
    for _ in range(4):
        now[0] += 10.0
        shown.step({"step": 1})
    final = {"test_acc": 0.9, "train_loss": 0.25, "time_per_step_s": 0.004}
    # every 30 s within a unit; the ETA scales the time by the steps left of all units (17 of 20)
    assert lines == ["  sgd_seed0: step 3/10 (30%); elapsed 0:30, ETA 2:50"]
    now[0] += 60.0
    shown.finish("sgd_seed0", final)
    assert lines[-1] == "[1/2] sgd_seed0: test acc 0.9000, train loss 0.2500, 4.0 ms/step; elapsed 1:40, ETA 1:40"
    shown.start("sam_seed0")
    now[0] += 3700.0
    shown.finish("sam_seed0", final)
    assert lines[-1].endswith("elapsed 1:03:20, ETA 0:00") and lines[-1].startswith("[2/2] sam_seed0:")
    assert clock_text(59.6) == "1:00" and clock_text(3600) == "1:00:00"


def test_a_run_logs_progress_lines_when_output_is_not_a_terminal(tmp_path, capsys):
    from flatminima.cli import main

    assert main(["run", "--preset", "quick", "--methods", "sgd,sam", "--seeds", "0", "--epochs", "1",
                 "--out", str(tmp_path), "--device", "cpu"]) == 0  # captured: stderr is not a terminal, no bar
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in lines] == ["[1/2] sgd_seed0", "[2/2] sam_seed0"]
    assert all("; elapsed " in line and ", ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0:00") and "step/s" not in captured.err  # no tqdm bar
    assert Path(tmp_path / "results.csv").is_file()
