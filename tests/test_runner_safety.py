"""The runner trusts nothing it did not check: names never become paths, finished units are
validated before reuse, every output is written atomically, user text reaches matplotlib as plain
text, config values are refused before torch sees them, and one output folder takes one run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import flatminima.experiment as experiment
from flatminima import _files
from flatminima.cli import main
from flatminima.experiment import ExperimentConfig, preset, run_experiment

FAST = {"methods": {"sgd": {}}, "seeds": [0], "epochs": 1, "diagnostics": [], "tensorboard": False}


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


# --------------------------------------------------------------------------------------------
# names


def test_a_config_name_never_writes_outside_out(tmp_path, monkeypatch):
    """A single run named ``../../escaped`` and both members of a suite named with an absolute
    path: every new file lands under --out, each suite member in its own folder."""
    work = tmp_path / "work"
    (work / "deep").mkdir(parents=True)
    relative, absolute = work / "relative.json", work / "absolute.json"
    relative.write_text(json.dumps({**FAST, "name": "../../escaped"}))
    absolute_name = str(tmp_path / "absolute-name")
    absolute.write_text(json.dumps({**FAST, "name": absolute_name}))
    monkeypatch.setitem(experiment.PRESETS, "quick_b", experiment.PRESETS["quick"])
    monkeypatch.setitem(experiment.SUITES, "pair", ("quick", "quick_b"))
    before = _files_under(tmp_path)
    one, two = work / "deep" / "one", work / "deep" / "two"
    assert main(["run", str(relative), "--preset", "quick", "--out", str(one), "--no-progress"]) == 0
    assert main(["run", str(absolute), "--preset", "pair", "--out", str(two), "--no-progress"]) == 0
    new = _files_under(tmp_path) - before
    assert new and all(one in p.parents or two in p.parents for p in new), sorted(map(str, new))
    assert json.loads((one / "results.json").read_text())["config"]["name"] == "../../escaped"
    for member in ("quick", "quick_b"):
        assert json.loads((two / member / "results.json").read_text())["config"]["name"] == absolute_name


def test_a_name_is_a_label_of_one_line():
    for bad in ("", "   ", "two\nlines", 5):
        with pytest.raises(ValueError, match=r"Invalid name: .*\(expected a non-empty one-line string\)"):
            ExperimentConfig.from_dict({"name": bad}, base=preset("quick"))
    assert ExperimentConfig.from_dict({"name": "cost $\\nosuchsymbol$ run"}, base=preset("quick")).name


# --------------------------------------------------------------------------------------------
# finished units are checked before they are trusted


def _quick(out: Path, **changes) -> ExperimentConfig:
    values = {**FAST, "methods": {"sgd": {}, "sam": {"rho": 0.05}}, "diagnostics": ["interpolation"],
              "out_dir": str(out), **changes}
    return ExperimentConfig.from_dict(values, base=preset("quick"))


def _run(config: ExperimentConfig) -> tuple[dict, list[str]]:
    lines: list[str] = []
    return run_experiment(config, progress=False, log=lines.append), lines


def test_broken_records_and_checkpoints_are_redone_saying_why(tmp_path):
    config = _quick(tmp_path)
    first, _ = _run(config)
    runs = tmp_path / "runs"
    acc = {r["method"]: r["final"]["test_acc"] for r in first["records"]}
    stamps = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}

    # An intact folder: nothing is redone.
    again, lines = _run(config)
    assert not [line for line in lines if line.startswith("redoing")]
    assert {p.name: p.stat().st_mtime_ns for p in runs.iterdir()} == stamps

    # The edit: test_acc 7.5 (SAM reported at 750 %); and a missing key.
    sam = json.loads((runs / "sam_seed0.json").read_text())
    sam["final"]["test_acc"] = 7.5
    (runs / "sam_seed0.json").write_text(json.dumps(sam))
    sgd = json.loads((runs / "sgd_seed0.json").read_text())
    del sgd["curves"]
    (runs / "sgd_seed0.json").write_text(json.dumps(sgd))
    result, lines = _run(config)
    assert "redoing sam_seed0: final.test_acc is 7.5 (expected an accuracy in [0, 1])" in lines
    assert "redoing sgd_seed0: curves is missing" in lines
    assert {r["method"]: r["final"]["test_acc"] for r in result["records"]} == acc  # retrained: same numbers
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert all(0 <= row["test_acc_mean"] <= 1 for row in summary)

    # A truncated checkpoint (interpolation needs it) and an empty one: redone, not a crash.
    data = (runs / "sam_seed0.pt").read_bytes()
    (runs / "sam_seed0.pt").write_bytes(data[: len(data) // 2])
    (runs / "sgd_seed0.pt").write_bytes(b"")
    result, lines = _run(config)
    problems = {line.split(":")[0]: line for line in lines if line.startswith("redoing")}
    assert set(problems) == {"redoing sam_seed0", "redoing sgd_seed0"}, lines
    assert "does not load" in problems["redoing sam_seed0"]
    assert "the file is empty" in problems["redoing sgd_seed0"]
    assert set(torch.load(runs / "sam_seed0.pt", weights_only=True)) == set(
        torch.load(runs / "sgd_seed0.pt", weights_only=True))
    assert "sam" in result["table"]


@pytest.fixture(scope="module")
def sgd_record(tmp_path_factory):
    from flatminima import runner

    config = _quick(tmp_path_factory.mktemp("record"), methods={"sgd": {}}, diagnostics=[])
    return _run(config)[0]["records"][0], runner.plan_units(config)[0]


@pytest.mark.parametrize("edit, reason", [
    (lambda r: r.update(seed=1), "seed is 1 (expected 0)"),
    (lambda r: r["curves"]["test_acc"].__setitem__(0, -0.1), "curves.test_acc[0] is -0.1 (expected accuracies in [0, 1])"),
    (lambda r: r["curves"]["train_loss"].pop(), "curves.train_loss is 'a list of 21' (expected a list of 22 of numbers)"),
    (lambda r: r["final"].update(time_per_step_s="fast"), "final.time_per_step_s is 'fast' (expected a finite time >= 0)"),
    (lambda r: r["final"].update(test_loss=-1.0), "final.test_loss is -1.0 (expected a loss >= 0)"),
])
def test_record_checks_name_the_key(sgd_record, edit, reason):
    from flatminima.experiment.records import record_problem

    record, unit = sgd_record
    assert record_problem(record, unit) is None
    edited = json.loads(json.dumps(record))
    edit(edited)
    assert record_problem(edited, unit) == reason


def test_a_diverged_run_is_a_result_not_a_broken_record():
    from flatminima import runner
    from flatminima.experiment.records import record_problem

    unit = runner.Unit("sgd", 0)
    record = {"unit": "sgd_seed0", "method": "sgd", "seed": 0, "registry_name": "base", "hyperparameters": {},
              "base_optimizer": {}, "curves": {"train_loss": [float("nan")], "eval_step": [0, 1],
                                               "test_acc": [0.1, 0.1], "test_loss": [2.3, float("nan")]},
              "final": {"test_acc": 0.1, "test_loss": float("nan"), "train_loss": float("inf"), "steps": 1,
                        "train_time_s": 0.5, "time_per_step_s": 0.5}}
    assert record_problem(json.loads(json.dumps(record)), unit) is None


def test_a_continual_unit_resumes_and_an_edited_one_is_redone(tmp_path):
    pytest.importorskip("peft")
    from flatminima import runner
    from flatminima.experiment.records import record_problem
    from flatminima.continual.tasks import load_sequence

    config = ExperimentConfig.from_dict({
        "name": "c", "task": "split_digits", "task_options": {"test_subset": 30}, "model": "resnet_lora",
        "model_options": {"width": 8, "blocks": [1], "r": 2}, "methods": {"sgd": {}}, "seeds": [0], "epochs": 1,
        "batch_size": 32, "lr": 0.1, "eval_every": 4, "eval_batch_size": 100, "diagnostics_samples": 32,
        "out_dir": str(tmp_path), "tensorboard": False,
        "continual": {"strategies": ["seq-lora"], "hessian": ["lora"], "hessian_options": {"tol": 0.1, "max_iter": 4}}})
    record = _run(config)[0]["records"][0]
    unit = runner.plan_units(config, load_sequence(config.task, **config.task_options))[0]
    assert record_problem(json.loads(json.dumps(record)), unit) is None
    _, lines = _run(config)
    assert "resuming: 1 of 1 units already finished" in lines[0] and not any("redoing" in line for line in lines)
    edited = json.loads(json.dumps(record))
    edited["accuracy"]["task"][2][1] = 1.5
    assert record_problem(edited, unit) == "accuracy.task[2][1] is 1.5 (expected accuracies in [0, 1])"
    edited["accuracy"]["task"][2][1] = 0.5
    del edited["per_task"][3]["curves"]
    assert record_problem(edited, unit) == "per_task[3].curves is missing"
    edited = json.loads(json.dumps(record))
    edited["lambda_max"]["lora"].pop()
    assert record_problem(edited, unit) == "lambda_max.lora is 'a list of 4' (expected a list of 5 of numbers)"
    (tmp_path / "runs" / f"{unit.id}.json").write_text(json.dumps(edited))
    _, lines = _run(config)
    assert f"redoing {unit.id}: lambda_max.lora is 'a list of 4' (expected a list of 5 of numbers)" in lines


# --------------------------------------------------------------------------------------------
# atomic writes


def test_outputs_replace_a_symlink_and_leave_no_temporary_files(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere.json"
    out.mkdir()
    elsewhere.write_text("keep me")
    (out / "results.json").symlink_to(elsewhere)
    run_experiment(ExperimentConfig.from_dict({**FAST, "out_dir": str(out)}, base=preset("quick")),
                   progress=False, log=lambda _: None)
    assert elsewhere.read_text() == "keep me"
    assert not (out / "results.json").is_symlink() and json.loads((out / "results.json").read_text())["summary"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    for name in ("results.json", "results.md", "results.csv", "report.html", "runs/sgd_seed0.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_an_interrupted_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "results.md"
    _files.write_text(target, "old table\n")
    with pytest.raises(KeyboardInterrupt):
        with _files.atomic_path(target) as tmp:
            tmp.write_text("new ta")  # killed mid-write
            raise KeyboardInterrupt
    assert target.read_text() == "old table\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]
    _files.save_torch({"w": torch.arange(3.0)}, tmp_path / "m.pt")
    assert torch.equal(_files.load_state_dict(tmp_path / "m.pt")["w"], torch.arange(3.0))


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_run(tmp_path):
    (tmp_path / "runs").mkdir()
    stale = [tmp_path / "runs" / ".sgd_seed0.json.k3_x9ab2.tmp", tmp_path / ".learning_curves.png.0a1b2c3d.tmp.png"]
    kept = [tmp_path / "runs" / ".notes.tmp", tmp_path / "runs" / "sgd_seed0.json"]
    for p in stale + kept:
        p.write_text("x")
    assert sorted(_files.remove_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


# --------------------------------------------------------------------------------------------
# user text in figures


def test_a_dollar_in_a_name_is_drawn_as_text(tmp_path):
    pytest.importorskip("matplotlib")
    from flatminima.experiment.plots import plot_learning_curves, plot_sharpness

    name = "cost $\\nosuchsymbol$ run"
    records = [{"method": name, "seed": s, "curves": {"train_loss": [1.0, 0.5, 0.25, 0.2], "eval_step": [0, 4],
                                                       "test_acc": [0.1, 0.8 + 0.01 * s]},
                "diagnostics": {"summary": {"lambda_max": 3.0 + s}}} for s in (0, 1)]
    plot_learning_curves(records, tmp_path / "curves.png", title=f"{name}: digits / mlp")
    plot_sharpness(records, tmp_path / "sharpness.png")
    for png in ("curves.png", "sharpness.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from flatminima.experiment.plots import plain

    assert plain(name) == "cost \\$\\nosuchsymbol\\$ run"


# --------------------------------------------------------------------------------------------
# values refused before torch sees them


@pytest.mark.parametrize("change, message", [
    ({"model_options": {"hidden": -5}}, "Invalid model_options.hidden: -5 (expected an int >= 1)"),
    ({"model_options": {"depth": 1.5}}, "Invalid model_options.depth: 1.5"),
    ({"model": "resnet", "model_options": {"blocks": [0]}}, "Invalid model_options.blocks: [0]"),
    ({"model": "minilm_lora", "model_options": {"dropout": 1.0}}, "Invalid model_options.dropout: 1.0"),
    ({"device": "cudaXYZ"}, "Invalid device: 'cudaXYZ'"),
    ({"device": "cuda:-1"}, "Invalid device: 'cuda:-1'"),
    ({"seeds": [2**70]}, f"Invalid seeds: [{2**70}] (expected a non-empty list of distinct ints in [0, 4294967295])"),
    ({"seeds": [True]}, "Invalid seeds: [True]"),
])
def test_values_that_would_fail_inside_torch_are_refused_naming_the_field(change, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        ExperimentConfig.from_dict(change, base=preset("quick"))


def test_every_model_option_has_a_check():
    import inspect

    for name in experiment.available_models():
        params = [p for p in inspect.signature(experiment.MODELS.get(name)).parameters if p != "data"]
        assert set(params) <= set(experiment.MODEL_OPTION_CHECKS), (name, params)


def test_an_absent_cuda_device_is_refused_naming_the_field():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=r"Invalid device: 'cuda:%d'" % count):
        experiment.resolve_device(f"cuda:{count}")


# --------------------------------------------------------------------------------------------
# one run per output folder


def test_a_second_run_into_one_out_is_refused_naming_the_holder(tmp_path):
    config = ExperimentConfig.from_dict({**FAST, "out_dir": str(tmp_path)}, base=preset("quick"))
    with _files.OutputLock(tmp_path):
        with pytest.raises(ValueError, match=rf"another flatminima run, pid {os.getpid()}, is writing there"):
            run_experiment(config, progress=False, log=lambda _: None)
        assert not (tmp_path / "results.json").exists()
    # Released (as the OS releases it when a run dies): the next run proceeds, whatever pid the file holds.
    (tmp_path / _files.OutputLock.NAME).write_text("999999999\n")
    run_experiment(config, progress=False, log=lambda _: None)
    assert (tmp_path / "results.json").is_file()
