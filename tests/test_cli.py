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


# -- overrides, --dry-run and show -------------------------------------------------------------

def _resolve(argv: list[str]) -> dict:
    """The configs ``flatminima run ARGV`` would run, resolved as the command line does."""
    from flatminima import commands
    from flatminima.cli import build_parser

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    commands.split_items(parser, args, extra)
    return commands.resolve_experiments(args)


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def test_overrides_set_typed_nested_values_on_top_of_the_file_and_the_saved_config_shows_them(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({**FAST, "methods": {"sgd": {}, "sam": {"rho": 0.05}}, "epochs": 3,
                                      "model_options": {"hidden": 16, "depth": 1}}))
    out = tmp_path / "out"
    argv = ["run", str(config), "--preset", "quick", "methods.sam.rho=0.1", "epochs=1", "seeds=[0,1]",
            "lr=5e-2", "model_options.hidden=24", "--out", str(out), "--no-progress"]
    (resolved,) = _resolve(argv).values()
    assert resolved.methods == {"sgd": {}, "sam": {"rho": 0.1}} and resolved.epochs == 1
    assert resolved.seeds == [0, 1] and resolved.lr == 0.05 and isinstance(resolved.lr, float)
    assert resolved.model_options == {"hidden": 24, "depth": 1}  # the file's depth kept
    assert resolved.batch_size == 64 and resolved.out_dir == str(out)  # the preset's, the flag's
    assert main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["methods"]["sam"]["rho"] == 0.1 and saved["epochs"] == 1 and saved["seeds"] == [0, 1]
    assert saved["model_options"] == {"hidden": 24, "depth": 1}
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == ["sam_seed0.json", "sam_seed1.json", "sgd_seed0.json", "sgd_seed1.json"]
    record = json.loads((out / "runs" / "sam_seed1.json").read_text())
    assert record["config"]["epochs"] == 1 and record["config"]["methods"]["sam"] == {"rho": 0.1}


def test_flags_are_overrides_applied_before_the_items(tmp_path):
    base = ["run", "--preset", "quick", "--out", str(tmp_path)]
    assert _resolve(base + ["--epochs", "3"])["quick"].epochs == 3
    assert _resolve(base + ["--epochs", "3", "epochs=2"])["quick"].epochs == 2
    assert _resolve(base + ["epochs=2", "--epochs", "3"])["quick"].epochs == 2
    assert _resolve(base + ["epochs=2", "epochs=4"])["quick"].epochs == 4  # a later item wins
    # --methods picks labels (the tuned settings of one the preset lacks); an item then tunes one.
    methods = _resolve(base + ["--methods", "sgd,lpfsgd", "methods.lpfsgd.samples=2"])["quick"].methods
    assert methods == {"sgd": {}, "lpfsgd": {"sigma": 0.001, "samples": 2}}
    # A grid set by overrides expands like one in a file.
    config = _resolve(base + ["--methods", "sam", "methods.sam.grid.rho=[0.02,0.1]"])["quick"]
    assert list(config.expanded_methods()) == ["sam-rho0.02", "sam-rho0.1"]
    # A suite: every member gets the overrides, each in its own folder under --out.
    suite = _resolve(["run", "--out", str(tmp_path), "seeds=[3]"])
    assert {m: (c.seeds, c.out_dir) for m, c in suite.items()} == {
        "fashion": ([3], str(tmp_path / "fashion")), "continual": ([3], str(tmp_path / "continual"))}


def test_bad_overrides_are_the_config_files_errors_naming_the_key(tmp_path, capsys):
    def from_file(values: dict) -> str:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(values))
        return _error(capsys, ["run", str(path), "--preset", "quick", "--dry-run"])

    def from_items(*items: str) -> str:
        return _error(capsys, ["run", "--preset", "quick", "--dry-run", *items])

    assert from_items("epochz=3") == from_file({"epochz": 3})
    assert from_items("epochz=3").startswith("flatminima: error: Invalid config field: 'epochz' (expected one of name, ")
    line = from_items("epochz.inner=3")
    assert line.startswith("flatminima: error: Invalid config field: 'epochz.inner' (expected one of name, ")
    assert from_items("epochs=0") == "flatminima: error: epochs=0: " + from_file({"epochs": 0})[len("flatminima: error: "):]
    line = from_items("task_options.bogus=1")
    file_line = from_file({"task_options": {"bogus": 1}})
    assert line == file_line.replace("error: ", "error: task_options.bogus=1: ", 1)
    assert "Invalid task_options key: 'bogus' (expected one of " in line
    assert from_items("methods.sam.rhoo=0.1").startswith(
        "flatminima: error: methods.sam.rhoo=0.1: methods.sam: Invalid hyperparameter 'rhoo' for sam")
    assert from_items("epochs.x=1") == ("flatminima: error: Invalid override: 'epochs.x' (expected a key into a "
                                        "mapping; epochs is 10, not a mapping)")
    assert from_items("seeds=[0,").startswith("flatminima: error: Invalid override: 'seeds=[0,' (expected KEY=VALUE")
    assert from_items("--epochs", "2", "epochs=x").startswith("flatminima: error: epochs=x: Invalid epochs: 'x'")
    assert _error(capsys, ["run", "epochs=1", str(tmp_path / "a.yaml")]) == (
        f"flatminima: error: Invalid config: {str(tmp_path / 'a.yaml')!r} (expected one config file, before the "
        "KEY=VALUE overrides)")


@pytest.mark.parametrize("yaml_installed", [True, False])
def test_override_values_read_as_yaml_with_or_without_pyyaml(monkeypatch, yaml_installed):
    from flatminima.experiment.overrides import parse_override

    if yaml_installed:
        pytest.importorskip("yaml")
    else:
        monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    cases = {"0.1": 0.1, "1e-3": 0.001, "-2": -2, ".5": 0.5, "true": True, "False": False, "null": None, "~": None,
             "": None, "cuda:1": "cuda:1", "my run": "my run", "'7'": "7", "[0,1]": [0, 1], "[]": [],
             "[a, 'b,c', [1, 2]]": ["a", "b,c", [1, 2]], "{rho: 0.1, grid: {rho: [0.01, 0.1]}}":
             {"rho": 0.1, "grid": {"rho": [0.01, 0.1]}}}
    for text, value in cases.items():
        override = parse_override(f"methods.sam.rho={text}")
        assert override.key == "methods.sam.rho" and override.value == value, text
        assert type(override.value) is type(value), text


def test_dry_run_prints_the_job_matrix_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["run", "--preset", "quick", "--out", str(out), "--dry-run", "--methods", "sgd,sam",
                 "seeds=[0,1]", "methods.sam.grid.rho=[0.02,0.1]"]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert f"quick: digits / mlp -> {out}" in text and "6 units: 0 done, 6 to train" in text
    units = [line.split()[0] for line in text.splitlines() if "_seed" in line]
    assert units == ["sgd_seed0", "sam-rho0.02_seed0", "sam-rho0.1_seed0",
                     "sgd_seed1", "sam-rho0.02_seed1", "sam-rho0.1_seed1"]
    assert text.rstrip().endswith("dry run: nothing trained or written")


def test_show_on_a_half_done_folder_names_done_stale_and_missing_units(tmp_path, capsys):
    out = tmp_path / "half"
    common = ["--preset", "quick", "--out", str(out), "--methods", "sgd,sam", "diagnostics=[]", "tensorboard=false"]
    assert main(["run", *common, "seeds=[0]", "epochs=1", "--no-progress"]) == 0
    capsys.readouterr()
    before = _listing(out)
    assert main(["show", *common, "seeds=[0,1]", "epochs=1"]) == 0
    rows = {line.split()[0]: line.split()[3:] for line in capsys.readouterr().out.splitlines() if "_seed" in line}
    assert {u: r[0] for u, r in rows.items()} == {"sgd_seed0": "done", "sam_seed0": "done",
                                                  "sgd_seed1": "missing", "sam_seed1": "missing"}
    assert rows["sgd_seed0"][1:3] == ["test", "acc"] and 0.0 < float(rows["sgd_seed0"][3]) <= 1.0
    assert main(["show", *common, "seeds=[0,1]", "epochs=2", "methods.sam.rho=0.1"]) == 0
    text = capsys.readouterr().out
    assert "4 units: 0 done, 2 stale, 2 to train" in text
    line = next(x for x in text.splitlines() if x.startswith("sam_seed0"))
    assert line.split()[3] == "stale" and "epochs 1 → 2" in line and "rho 0.05 → 0.1" in line
    assert _listing(out) == before  # show reads only


# -- a fast, torch-free parser; the lazy package ------------------------------------------------

PUBLIC_API = ['AESAM', 'ASAM', 'Base', 'CFlat', 'EMA', 'FisherSAM', 'FlatLoRA', 'FlatOptimizer', 'FriendlySAM', 'GAM',
              'GASAM', 'GSAM', 'IndexedDataset', 'LETS', 'LPFSGD', 'LayerSAM', 'LookSAM', 'MESA', 'MRWP',
              'MultiStepSAM', 'Pass', 'RWP', 'RandomSearchSAM', 'SAF', 'SAM', 'SAMLoRA', 'SSAM', 'SWA', 'SWAD', 'Scale',
              'StepResult', 'StochasticSAM', 'TrainStep', 'VaSSO', 'WSAM', 'available', 'create', 'diagnostics', 'get',
              'hyperparameters', 'lora', 'params_by_name', 'register', 'schedules', 'train_step', 'trajectory_kl',
              'unregister', 'update_bn']


def _python(code: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_help_and_version_do_not_import_torch_and_take_well_under_a_second():
    import time

    _python("import sys; from flatminima.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    for argv in (["--help"], ["run", "--help"], ["show", "--help"], ["--version"]):
        best = float("inf")
        for _ in range(3):  # the best of three: a loaded machine slows one start, not all
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-X", "importtime", "-m", "flatminima", *argv],
                                  capture_output=True, text=True, timeout=60)
            best = min(best, time.perf_counter() - started)
            assert done.returncode == 0, done.stderr[-2000:]
        imported = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")]
        assert "flatminima.cli" in imported and not [m for m in imported if m.split(".")[0] == "torch"], argv
        assert best < 1.0, (argv, best)
    assert "KEY=VALUE" in subprocess.run([sys.executable, "-m", "flatminima", "run", "--help"], capture_output=True,
                                         text=True, timeout=60).stdout


def test_the_lazy_package_keeps_the_public_api_and_the_registry():
    _python(f"""
import sys
import flatminima as fm
assert 'torch' not in sys.modules and fm.__version__
assert sorted(fm.__all__) == {PUBLIC_API!r}, sorted(fm.__all__)
from flatminima import SAM                      # the first attribute read loads everything
import flatminima.core, flatminima.methods, flatminima.lora, flatminima.engine, flatminima.averaging
import flatminima.trajectory, flatminima.lets
sources = [flatminima.core, flatminima.methods, flatminima.lora, flatminima.engine, flatminima.averaging,
           flatminima.trajectory, flatminima.lets]
for name in fm.__all__:
    value = getattr(fm, name)
    owners = [m for m in sources if getattr(m, name, None) is value]
    assert owners or name in ('diagnostics', 'lora'), name
assert SAM is fm.SAM is flatminima.methods.SAM and fm.lora is flatminima.lora and fm.diagnostics.hessian
assert {{'flatlora', 'samlora'}} <= set(fm.available()) and fm.get('flatlora') is fm.FlatLoRA
assert set(fm.__all__) <= set(dir(fm)) and 'methods' in dir(fm)
try:
    fm.no_such_name
except AttributeError as exc:
    assert "no attribute 'no_such_name'" in str(exc)
else:
    raise AssertionError('no AttributeError')
""")
    # A submodule imports on its own; the registry is complete after any attribute read.
    _python("import sys, flatminima.core; assert 'torch' in sys.modules; from flatminima import methods; "
            "assert 'flatlora' in methods.available()")
    _python("from flatminima.integrations.lightning import FlatMinimaModule; from flatminima import methods; "
            "import flatminima.methods.catalog as c; assert 'flatlora' in c.available()")


# -- list and diagnose --help ------------------------------------------------------------------

def test_list_prints_every_description_whole_wrapped_to_the_terminal(capsys, monkeypatch):
    from flatminima.experiment import PRESETS

    monkeypatch.setenv("COLUMNS", "100")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for name, make in PRESETS.items():
        assert " ".join(make.__doc__.split()) in flat, name
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 99
    assert "  flatlora         model (required), rho=0.05" in out


def test_diagnose_help_prints_its_default_as_typed(capsys):
    from flatminima.diagnostics.report import DEFAULT_DIAGNOSTICS

    with pytest.raises(SystemExit) as exit_:
        main(["diagnose", "--help"])
    assert exit_.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert f"(default: {','.join(DEFAULT_DIAGNOSTICS)})" in flat and "['" not in flat


def test_diagnose_takes_overrides(tmp_path, capsys):
    """A checkpoint of a narrower model than the preset's: ``model_options.*`` overrides make it fit."""
    out = tmp_path / "narrow"
    assert main(["run", "--preset", "quick", "--out", str(out), "--save-models", "--no-progress", "--methods", "sgd",
                 "seeds=[0]", "epochs=1", "diagnostics=[]", "tensorboard=false", "model_options.hidden=24"]) == 0
    checkpoint = str(out / "runs" / "sgd_seed0.pt")
    line = _error(capsys, ["diagnose", "--preset", "quick", "--checkpoint", checkpoint, "--out", str(tmp_path / "d")])
    assert "Invalid checkpoint" in line
    assert main(["diagnose", "--preset", "quick", "model_options.hidden=24", "--checkpoint", checkpoint,
                 "--diagnostics", "hessian", "out_dir=" + str(tmp_path / "d2"), "--samples", "64"]) == 0
    report = json.loads((tmp_path / "d2" / "report.json").read_text())
    assert report["summary"]["lambda_max"] > 0 and not (tmp_path / "d").exists()
