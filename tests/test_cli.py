"""The command line: one-line errors (exit status 2) for bad input, Ctrl-C that says how to resume
(exit status 130), a missing optional package that names its ``pip install``, and ``--version``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import flatminima
from flatminima.cli import main

FAST = {"methods": {"sgd": {}}, "seeds": [0], "epochs": 1, "diagnostics": [], "tensorboard": False}


def _error(capsys, argv: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    return lines[0]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"flatminima {flatminima.__version__}"


def test_bad_config_files_are_one_line_errors_naming_the_file(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    line = _error(capsys, ["run", str(folder), "--out", str(tmp_path / "o")])
    assert line.startswith("flatminima: error: Invalid config: ") and str(folder) in line

    binary = tmp_path / "exp.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    line = _error(capsys, ["run", str(binary), "--out", str(tmp_path / "o")])
    assert str(binary) in line and "a YAML (.yaml, .yml) or JSON (.json) file" in line and "not UTF-8" in line

    misnamed = tmp_path / "exp.toml"
    misnamed.write_text("epochs = 1\n")
    line = _error(capsys, ["run", str(misnamed), "--out", str(tmp_path / "o")])
    assert line == (f"flatminima: error: Invalid config: {str(misnamed)!r} "
                    "(expected a YAML (.yaml, .yml) or JSON (.json) file)")

    unreadable = tmp_path / "secret.json"
    unreadable.write_text("{}")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # root reads any file: make this one unreadable
    line = _error(capsys, ["run", str(unreadable), "--out", str(tmp_path / "o")])
    assert str(unreadable) in line and "Permission denied" in line


def test_an_out_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(FAST))
    for out in (blocker / "out", "/proc/flatminima-cannot-write-here"):
        line = _error(capsys, ["run", str(config), "--preset", "quick", "--out", str(out), "--no-progress"])
        assert line.startswith(f"flatminima: error: Invalid out_dir: {str(out)!r} (expected a folder that can be "
                               "created and written"), line


def test_checkpoints_that_do_not_fit_say_why(tmp_path, capsys):
    config = tmp_path / "wide.json"
    config.write_text(json.dumps({**FAST, "name": "wide", "model_options": {"hidden": 32, "depth": 1}}))
    out = tmp_path / "wide"
    assert main(["run", str(config), "--preset", "quick", "--out", str(out), "--save-models", "--no-progress"]) == 0
    capsys.readouterr()
    checkpoint = out / "runs" / "sgd_seed0.pt"
    line = _error(capsys, ["diagnose", "--preset", "quick", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "d")])
    assert f"Invalid checkpoint: {str(checkpoint)!r} (it was saved by the experiment 'wide', digits / mlp " in line
    assert "'hidden': 32" in line and "--preset quick builds digits / mlp" in line
    assert line.endswith(f"use --config {out / 'config.yaml'})")

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    line = _error(capsys, ["diagnose", "--preset", "quick", "--checkpoint", str(empty), "--out", str(tmp_path / "d")])
    assert line.startswith(f"flatminima: error: Invalid checkpoint: {str(empty)!r}") and "the file is empty" in line
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    line = _error(capsys, ["diagnose", "--preset", "quick", "--checkpoint", str(garbage), "--out", str(tmp_path / "d")])
    assert "it does not load" in line


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import flatminima.experiment as experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run_experiment", interrupted)
    try:
        line = _error(capsys, ["run", "--preset", "quick", "--out", str(tmp_path)], code=130)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command line as a traceback")
    assert line == "flatminima: interrupted; rerun the same command to resume"


def test_a_missing_extra_names_its_pip_install(tmp_path):
    """``flatminima run --preset quick`` without scikit-learn (the digits data): one line naming
    ``pip install 'flatminima[experiments]'``, no traceback."""
    code = ("import sys; sys.modules['sklearn'] = None; from flatminima.cli import main; "
            f"sys.exit(main(['run', '--preset', 'quick', '--out', {str(tmp_path)!r}, '--no-progress']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flatminima: error: "), done.stderr
    assert "'sklearn'" in lines[0] and "pip install 'flatminima[experiments]'" in lines[0]
