"""The experiment runner: data loaders, config validation, the `flatminima run` job end to end."""

import gzip
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flatminima import data
from flatminima.cli import main
from flatminima.experiment import ExperimentConfig, preset, summarize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_idx(path, array, magic_dtype=0x08):
    header = bytes([0, 0, magic_dtype, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(folder, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": np.arange(n_train) % 10,
              "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": np.arange(n_test) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in data.FASHION_FILES.items():
        write_idx(folder / name, arrays[key])
    return arrays


# --------------------------------------------------------------------------------------------
# data


def test_read_idx_parses_shape_and_values(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    write_idx(tmp_path / "x.gz", images)
    out = data.read_idx(tmp_path / "x.gz", ndim=3)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_read_idx_rejects_bad_magic_ndim_and_truncation(tmp_path):
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x01\x00\x08\x01" + struct.pack(">i", 3) + b"abc")
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(tmp_path / "bad.gz")
    write_idx(tmp_path / "labels.gz", np.arange(5))
    with pytest.raises(ValueError, match="expected 3"):
        data.read_idx(tmp_path / "labels.gz", ndim=3)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">i", 10) + b"abc")
    with pytest.raises(ValueError, match="body has 3 bytes"):
        data.read_idx(tmp_path / "short.gz")


def test_fashion_loader_reads_root_and_caches_prepared_tensors(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.FASHION_ENV, raising=False)
    arrays = write_fashion(tmp_path / "fm")
    ds = data.load_fashion_mnist(root=tmp_path / "fm", fetch=False)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train_labels"])
    pixels = arrays["train_images"] / 255.0
    expected = (arrays["test_images"] / 255.0 - pixels.mean()) / pixels.std(ddof=1)
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), expected, atol=1e-5)
    cached = list((tmp_path / "cache" / "flatminima" / "fashion-mnist").glob("prepared-*.pt"))
    assert len(cached) == 1
    again = data.load_fashion_mnist(root=tmp_path / "fm", fetch=False)
    assert torch.equal(again.x_train, ds.x_train)
    assert data.load_fashion_mnist(root=tmp_path / "fm", subset=3, fetch=False).x_train.shape[0] == 3


def test_fashion_loader_env_var_and_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data.images, "FASHION_PACKAGE_DIR", tmp_path / "no-package")
    monkeypatch.setenv(data.FASHION_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*torchvision"):
        data.load_fashion_mnist(fetch=False)
    write_fashion(tmp_path / "env")
    monkeypatch.setenv(data.FASHION_ENV, str(tmp_path / "env"))
    assert data.load_fashion_mnist(fetch=False).source == str(tmp_path / "env")


def test_fashion_loader_fills_cache_with_apt_get_download(tmp_path, monkeypatch):
    """No folder has the files: `apt-get download` + `dpkg -x` (faked here) fill the user cache."""
    write_fashion(tmp_path / "payload")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text('#!/bin/sh\n[ "$1 $2" = "download dataset-fashion-mnist" ] || exit 1\n'
                                     "touch dataset-fashion-mnist_1_all.deb\n")
    (bin_dir / "dpkg").write_text(f'#!/bin/sh\n[ "$1" = "-x" ] || exit 1\nmkdir -p "$3/usr/share/datasets"\n'
                                  f'cp -r {tmp_path / "payload"} "$3/usr/share/datasets/fashion-mnist"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.FASHION_ENV, raising=False)
    monkeypatch.setattr(data.images, "FASHION_PACKAGE_DIR", tmp_path / "no-package")
    ds = data.load_fashion_mnist()
    assert ds.source == str(tmp_path / "cache" / "flatminima" / "fashion-mnist") and ds.x_train.shape[0] == 6


def test_digits_shapes_split_and_determinism():
    a, b = data.load_task("digits"), data.load_digits()
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.y_train.dtype == torch.int64 and set(a.y_test.tolist()) == set(range(10))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert abs(a.x_train.mean().item()) < 1e-5 and abs(a.x_train.std().item() - 1) < 1e-5
    sub = a.subset(100)
    assert sub.x_train.shape[0] == 100 and torch.equal(sub.y_train, a.subset(100).y_train)


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="Invalid task: 'cifar'.*digits, fashion_mnist"):
        data.load_task("cifar")


# --------------------------------------------------------------------------------------------
# config


def test_config_files_match_presets():
    from flatminima.experiment import PRESETS

    examples = {"t5_continual"}  # read by examples/t5_continual.py, not a runner preset
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in examples) == sorted(PRESETS)
    for name in PRESETS:
        assert ExperimentConfig.load(CONFIGS / f"{name}.yaml") == preset(name), name


@pytest.mark.parametrize("change, message", [
    ({"task": "cifar"}, "Invalid task: 'cifar'"),
    ({"model": "vit"}, "Invalid model: 'vit'"),
    ({"seeds": []}, "Invalid seeds"),
    ({"seeds": [0, 0]}, "Invalid seeds"),
    ({"epochs": 0}, "Invalid epochs: 0"),
    ({"batch_size": 64, "accumulation_steps": 5}, "Invalid accumulation_steps: 5"),
    ({"accumulation": "first"}, "Invalid accumulation: 'first'"),
    ({"lr": -1.0}, "Invalid lr: -1.0"),
    ({"lr_schedule": "step"}, "Invalid lr_schedule"),
    ({"device": "tpu"}, "Invalid device: 'tpu'"),
    ({"epochs_": 3}, "Invalid config field: 'epochs_'"),
    ({"model_options": {"widht": 8}}, "Invalid model_options key: 'widht' (expected one of hidden, depth)"),
    ({"task_options": {"root": "/x"}}, "Invalid task_options key: 'root'"),
    ({"methods": {"a/b": {"method": "sam"}}}, "Invalid method label: 'a/b'"),
    ({"methods": {}}, "Invalid methods"),
    ({"methods": {"foo": {}}}, "methods.foo: Invalid method name: 'foo'"),
    ({"methods": {"sam": {"rho": -0.1}}}, "methods.sam: Invalid rho: -0.1"),
    ({"methods": {"sam": {"radius": 0.1}}}, "methods.sam: Invalid hyperparameter 'radius'"),
    ({"methods": {"sam": {"momentum": 1.5}}}, "methods.sam: Invalid momentum: 1.5"),
])
def test_config_validation_names_the_field(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ExperimentConfig.from_dict(change, base=preset("quick"))


def test_cli_rejects_bad_override(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--preset", "quick", "--methods", "nosuchmethod", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "Invalid method name: 'nosuchmethod'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# end to end


def test_quick_run_end_to_end(tmp_path, capsys):
    rng_before = torch.get_rng_state()
    out = tmp_path / "out"
    assert main(["run", "--preset", "quick", "--methods", "sgd,sam", "--seeds", "0,1", "--epochs", "2",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert torch.equal(torch.get_rng_state(), rng_before)
    printed = capsys.readouterr().out
    for name in ("results.json", "results.csv", "results.md", "learning_curves.png",
                 "runs/sgd_seed0.json", "runs/sam_seed1.json"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "| sgd |" in table and "| sam |" in table and table.split("\n", 2)[2].strip() in printed
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["summary"]}
    assert set(rows) == {"sgd", "sam"} and results["reference"] == "sgd"
    for r in rows.values():
        assert 0.0 <= r["test_acc_mean"] <= 1.0 and r["seeds"] == [0, 1]
        assert math.isfinite(r["train_loss_mean"]) and r["time_per_step_s_mean"] > 0
    assert rows["sgd"]["time_ratio"] == 1.0
    assert rows["sgd"]["test_acc_mean"] > 0.8  # digits: 2 epochs of an MLP are far above chance
    run = json.loads((out / "runs" / "sam_seed1.json").read_text())
    steps = run["final"]["steps"]
    assert steps == 2 * (1437 // 64) and len(run["curves"]["train_loss"]) == steps
    assert run["curves"]["eval_step"][0] == 0 and run["curves"]["eval_step"][-1] == steps
    assert run["hyperparameters"] == {"rho": 0.05} and run["registry_name"] == "sam"
    assert rows["sgd"]["registry_name"] == "base"
    with open(out / "learning_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,") and len(csv_lines) == 3


def test_runs_are_reproducible_and_seeds_differ(tmp_path):
    config = ExperimentConfig.from_dict({"methods": {"sam": {"rho": 0.05}}, "seeds": [0, 1], "epochs": 2,
                                         "train_subset": 256, "out_dir": str(tmp_path)}, base=preset("quick"))
    from flatminima.experiment import run_one

    ds = data.load_digits().subset(256)
    a, b, c = (run_one(config, ds, "sam", s, torch.device("cpu")) for s in (0, 0, 1))
    assert a["curves"]["train_loss"] == b["curves"]["train_loss"]
    assert a["curves"]["train_loss"] != c["curves"]["train_loss"]


def test_summary_statistics():
    def record(method, seed, acc, t):
        return {"method": method, "registry_name": "base" if method == "sgd" else "sam", "hyperparameters": {},
                "seed": seed, "final": {"test_acc": acc, "test_loss": 1.0, "train_loss": 0.5, "time_per_step_s": t}}

    rows = summarize([record("sgd", 0, 0.8, 1.0), record("sam", 0, 0.9, 2.0),
                      record("sgd", 1, 0.6, 3.0), record("sam", 1, 0.7, 4.0)])
    assert [r["method"] for r in rows] == ["sgd", "sam"]
    assert rows[0]["test_acc_mean"] == pytest.approx(0.7) and rows[0]["test_acc_std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows[1]["time_ratio"] == pytest.approx(1.5)
