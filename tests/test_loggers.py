"""The experiment's loggers (config field ``loggers``): what each one records, read back from its own
files (TensorBoard's event files, MLflow's SQLite and file stores, W&B's offline run file), the
step axis they share, and the refusals: an unknown or repeated name, a missing package."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import pytest

from flatminima.cli import main
from flatminima.experiment import ExperimentConfig, preset, run_experiment
from flatminima.experiment.loggers import (RunLogger, RunLoggers, TensorBoardLogger, WandbLogger, record_scalars,
                                           selected_loggers, unit_params)
from flatminima.experiment.units import Unit

FAST = {"methods": {"sgd": {}}, "seeds": [0], "epochs": 1, "diagnostics": [], "tensorboard": False}

RECORD = {"curves": {"train_loss": [2.0, 1.5, 1.0], "eval_step": [0, 3], "test_acc": [0.1, 0.6],
                     "test_loss": [2.2, 1.1]},
          "final": {"test_acc": 0.6, "test_loss": 1.1, "train_loss": 1.0, "steps": 3, "diverged": False,
                    "lambda_max": float("nan")}}

CONTINUAL = {"tasks": ["a", "b"],
             "per_task": [{"curves": {"train_loss": [1.0, 0.5], "eval_step": [0, 2], "test_acc": [0.5, 0.9],
                                      "test_loss": [0.7, 0.3]}},
                          {"curves": {"train_loss": [0.8, 0.4, 0.2], "eval_step": [0, 3], "test_acc": [0.4, 0.8],
                                      "test_loss": [0.9, 0.4]}}],
             "accuracy": {"task": [[0.9, 0.5], [0.7, 0.8]]},
             "final": {"test_acc": 0.75, "train_loss": 0.2}}


def _run(tmp_path, **fields):
    config = ExperimentConfig.from_dict({**FAST, "out_dir": str(tmp_path), **fields}, base=preset("quick"))
    return config, run_experiment(config, progress=False, log=lambda _: None)["records"][0]


def test_record_scalars_share_one_step_axis():
    assert record_scalars(RECORD) == [
        (0, {"test_acc": 0.1, "test_loss": 2.2}), (1, {"train_loss": 2.0}), (2, {"train_loss": 1.5}),
        (3, {"train_loss": 1.0, "test_acc": 0.6, "test_loss": 1.1,  # NaN and bools are not scalars
             "final/test_acc": 0.6, "final/test_loss": 1.1, "final/train_loss": 1.0, "final/steps": 3.0})]
    points = dict(record_scalars(CONTINUAL))
    assert sorted(points) == [0, 1, 2, 3, 4, 5]
    assert points[2] == {"task0/train_loss": 0.5, "task0/test_acc": 0.9, "task0/test_loss": 0.3,  # end of task 0
                         "task1/test_acc": 0.4, "task1/test_loss": 0.9,  # task 1 evaluated before its first step
                         "task_accuracy/on_a": 0.9, "task_accuracy/on_b": 0.5}
    assert points[5] == {"task1/train_loss": 0.2, "task1/test_acc": 0.8, "task1/test_loss": 0.4,
                         "task_accuracy/on_a": 0.7, "task_accuracy/on_b": 0.8,
                         "final/test_acc": 0.75, "final/train_loss": 0.2}


def test_config_checks_the_loggers_field():
    assert ExperimentConfig().loggers == []
    assert ExperimentConfig.from_dict({"loggers": ["wandb", "mlflow"]}).loggers == ["wandb", "mlflow"]
    with pytest.raises(ValueError, match=r"Invalid loggers: \['neptune'\] \(expected a list of distinct names from: "
                       r"tensorboard, mlflow, wandb\)"):
        ExperimentConfig.from_dict({"loggers": ["neptune"]})
    for bad in (["mlflow", "mlflow"], "mlflow", [1]):
        with pytest.raises(ValueError, match="Invalid loggers"):
            ExperimentConfig.from_dict({"loggers": bad})
    with pytest.raises(ValueError, match="no tensorboard while the field tensorboard is false"):
        ExperimentConfig.from_dict({"loggers": ["tensorboard"], "tensorboard": False})
    # Which loggers a run opens: `tensorboard: true` is TensorBoard first; false none of it.
    config = ExperimentConfig.from_dict({"tensorboard": True, "loggers": ["mlflow"]})
    assert selected_loggers(config)[0] == "tensorboard"
    assert selected_loggers(ExperimentConfig.from_dict({"tensorboard": False})) == []


def test_a_missing_logger_package_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    config = ExperimentConfig.from_dict({**FAST, "loggers": ["wandb"]})
    with pytest.raises(ValueError, match=r"wandb is not \(pip install 'flatminima\[loggers\]'\)"):
        RunLoggers(config, tmp_path)
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({**FAST, "loggers": ["wandb"]}))
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(path), "--preset", "quick", "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flatminima: error: Invalid loggers: ['wandb']")
    assert "pip install 'flatminima[loggers]'" in err[0]
    assert not list((tmp_path / "out" / "runs").glob("*.json"))  # nothing trained


def test_unit_params_are_the_settings_that_shape_the_unit():
    config = ExperimentConfig.from_dict({**FAST, "methods": {"sam": {"rho": 0.07}}, "lr": 0.02}, base=preset("quick"))
    params = unit_params(config, Unit("sam", 0))
    assert params["unit"] == "sam_seed0" and params["label"] == "sam" and params["seed"] == "0"
    assert params["method.rho"] == "0.07" and params["method.lr"] == "0.02" and params["task"] == "digits"
    assert all(isinstance(v, str) for v in params.values()) and "out_dir" not in params and "loggers" not in params


def test_tensorboard_logger_writes_scalars_and_params(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    logger.log_params({"lr": "0.1", "seed": "3"}, "u")
    for step, values in record_scalars(CONTINUAL):
        logger.log_scalars(step, values, "u")
    logger.end_unit("u")
    events = EventAccumulator(str(tmp_path / "tensorboard" / "u"), size_guidance={"tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("task_accuracy/on_a")] == [(2, pytest.approx(0.9)),
                                                                                (5, pytest.approx(0.7))]
    assert [e.step for e in events.Scalars("task1/train_loss")] == [3, 4, 5]
    text = events.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| lr | 0.1 |" in text and "| seed | 3 |" in text


def test_mlflow_logger_records_one_run_per_unit(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    config, record = _run(tmp_path, loggers=["mlflow"], seeds=[0, 1], name="mlflow check")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store, inside --out
    experiment = client.get_experiment_by_name("mlflow check")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["sgd_seed0", "sgd_seed1"]
    run = runs["sgd_seed0"]
    assert run.info.status == "FINISHED" and run.data.tags["flatminima.unit"] == "sgd_seed0"
    assert run.data.params["seed"] == "0" and run.data.params["method.lr"] == str(config.lr)
    loss = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, len(record["curves"]["train_loss"]) + 1))
    assert [m.value for m in loss] == pytest.approx(record["curves"]["train_loss"])
    assert run.data.metrics["final/test_acc"] == pytest.approx(record["final"]["test_acc"])
    assert not list(Path.cwd().glob("mlruns")) and (tmp_path / "mlflow.db").is_file()


def test_mlflow_logger_takes_a_file_tracking_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from flatminima.experiment.loggers import MLflowLogger

    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match=r"Invalid loggers: 'mlflow' cannot use the tracking store 'file:.*"
                       r"set MLFLOW_TRACKING_URI to one that works"):
        MLflowLogger(tmp_path / "out", "exp")  # MLflow 3 keeps its file store behind a switch
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MLflowLogger(tmp_path / "out", "exp")
    logger.log_params({"rho": "0.05"}, "sam_seed0")
    for step, values in record_scalars(RECORD):
        logger.log_scalars(step, values, "sam_seed0")
    logger.close()
    client = MlflowClient(tracking_uri=uri)
    run, = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.data.params == {"rho": "0.05"} and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test_acc")] == [(0, 0.1), (3, 0.6)]
    assert not (tmp_path / "out" / "mlflow.db").exists()


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (``run-<id>.wandb``): a 7-byte header, then 32 KiB
    blocks of chunks, each ``crc32 (4) | length (2) | type (1: full, 2: first, 3: middle, 4: last)``."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += 32768 - pos % 32768
            continue
        pending = (data[pos + 7:pos + 7 + length] if kind in (1, 2) else pending + data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def test_wandb_logger_writes_an_offline_run_per_unit(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    _, record = _run(tmp_path / "out", loggers=["wandb"], name="wb")
    run_file, = (tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    run, = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.run_group, run.project) == ("sgd_seed0", "wb", "wb")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["seed"] == "0" and config["unit"] == "sgd_seed0" and config["method.method"] == "base"
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history.append(items)
    loss = [(h["_step"], h["train_loss"]) for h in history if "train_loss" in h]
    assert [s for s, _ in loss] == list(range(1, len(record["curves"]["train_loss"]) + 1))
    assert [v for _, v in loss] == pytest.approx(record["curves"]["train_loss"])
    assert history[-1]["final/test_acc"] == pytest.approx(record["final"]["test_acc"])


def test_wandb_adapter_against_a_stand_in_module(tmp_path, monkeypatch):
    calls = []

    class Error(Exception):
        pass

    class Run:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))
            self.config = types.SimpleNamespace(update=lambda values, **_: calls.append(("config", values)))

        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: Run(**kw), Settings=lambda **kw: kw,
                                 errors=types.SimpleNamespace(Error=Error))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    logger = WandbLogger(tmp_path, "exp")
    assert isinstance(logger, RunLogger)
    logger.log_params({"lr": "0.1"}, "u")
    logger.log_scalars(1, {"train_loss": 0.5}, "u")
    logger.log_scalars(2, {"train_loss": 0.25}, "u")
    logger.end_unit("u")
    init = calls[0][1]
    assert (init["project"], init["group"], init["name"], init["dir"], init["config"]) == ("exp", "exp", "u",
                                                                                          str(tmp_path), {"lr": "0.1"})
    assert init["settings"] == {"console": "off", "x_disable_stats": True, "silent": True}
    assert calls[1:] == [("log", 1, {"train_loss": 0.5}), ("log", 2, {"train_loss": 0.25}), ("finish",)]

    def refuse(**_):
        raise Error("api_key not configured (no-tty)")

    fake.init = refuse
    with pytest.raises(ValueError, match="WANDB_MODE=offline"):
        logger.log_scalars(1, {"x": 1.0}, "v")
