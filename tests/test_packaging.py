"""The sdist and the wheel, built offline from a copy of the checkout with stray files planted in it:
the wheel carries every module and data file of the package, ``py.typed``, the licence and the
metadata; the sdist holds the package, the README, the docs, the changelog and the licence, and
nothing else; the wheel installed on its own imports and finds its report template."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "flatminima"
# Not copied: large, or made by tools (the planted strays below stand for them).
SKIP = {".git", ".venv", ".venv-timm", "results", "runs", "gpu_results", "build", "dist", ".cache", "__pycache__",
        ".pytest_cache", ".ruff_cache"}
STRAYS = [".venv/lib/site.py", "results/quick/results.json", "src/flatminima/__pycache__/cli.cpython-311.pyc",
          ".pytest_cache/v/cache/lastfailed", "docs/api/html/flatminima.html", "runs/sam_seed0.json",
          "src/flatminima/experiment/config.py~", "tests/test_extra.py", "build/lib/flatminima/__init__.py"]
SDIST_TOP = {"PKG-INFO", "pyproject.toml", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md",
             "docs", "src"}


def _package_files() -> list[str]:
    """Every file of the package in the checkout, relative to ``src/``, byte-code and editor backups aside."""
    return sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(("~", ".pyc")))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tree = tmp_path_factory.mktemp("checkout")
    shutil.copytree(REPO, tree, dirs_exist_ok=True,
                    ignore=lambda folder, names: [n for n in names if n in SKIP or n.endswith(".egg-info")
                                                  or (n == "html" and folder.endswith("api"))])
    for stray in STRAYS:
        (tree / stray).parent.mkdir(parents=True, exist_ok=True)
        (tree / stray).write_text("stray\n")
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(tree)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheel, = dist.glob("flatminima-*.whl")
    sdist, = dist.glob("flatminima-*.tar.gz")
    return wheel, sdist


def test_the_wheel_carries_the_package_its_data_and_the_licence(built):
    wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _package_files()
    assert "flatminima/py.typed" in expected and "flatminima/experiment/templates/report.html.j2" in expected
    missing = [f for f in expected if f not in names]
    assert not missing, missing
    info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
    assert f"{info}/licenses/LICENSE" in names
    package = {n for n in names if not n.startswith(info)}
    assert package == set(expected)  # nothing but the package's own files
    assert not any("__pycache__" in n or n.endswith((".pyc", "~")) or n.startswith("tests/") for n in names)


def test_the_wheel_metadata(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        licence = z.read(f"{info}/licenses/LICENSE").decode()
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    classifiers = meta.get_all("Classifier")
    for c in ("Typing :: Typed", "Operating System :: OS Independent", "Development Status :: 3 - Alpha",
              "Topic :: Scientific/Engineering :: Artificial Intelligence", "Programming Language :: Python :: 3.10",
              "Programming Language :: Python :: 3.13"):
        assert c in classifiers, c
    assert not any(c.startswith("License ::") for c in classifiers)  # PEP 639: the expression alone
    assert meta["Requires-Python"] == ">=3.10"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert set(urls) >= {"Homepage", "Documentation", "Changelog"}
    assert "loggers" in meta.get_all("Provides-Extra")
    assert any(r.startswith("wandb") and 'extra == "loggers"' in r for r in meta.get_all("Requires-Dist"))
    assert "flatminima = flatminima.cli:main" in entry_points


def test_the_sdist_holds_the_sources_and_no_stray_file(built):
    _, sdist = built
    with tarfile.open(sdist) as tar:
        names = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
    top = {n.split("/", 1)[0] for n in names}
    assert top <= SDIST_TOP, top - SDIST_TOP
    assert {"LICENSE", "CHANGELOG.md", "README.md", "docs/configuration.md", "docs/api.md",
            "docs/api/build.py"} <= set(names)
    assert set(_package_files()) <= {n.removeprefix("src/") for n in names}
    strays = [n for n in names if n in STRAYS or "__pycache__" in n or n.endswith((".pyc", "~"))
              or n.startswith(("tests", "docs/api/html", "results", "runs", "build/", ".venv"))]
    assert not strays, strays
    assert not any(n.startswith("src/") and not n.startswith(("src/flatminima/", "src/flatminima.egg-info/"))
                   for n in names)


def test_the_installed_wheel_works_without_the_checkout(built, tmp_path):
    wheel, _ = built
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)], check=True, timeout=300)
    code = ("import importlib.resources, flatminima, flatminima.experiment.report as report\n"
            "print(flatminima.__file__)\n"
            "print(importlib.resources.files('flatminima.experiment').joinpath('templates/report.html.j2').is_file())\n"
            "print(importlib.resources.files('flatminima').joinpath('py.typed').is_file())\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    where, template, typed = done.stdout.split()
    assert Path(where).is_relative_to(target)  # the wheel's copy, not the checkout's
    assert template == "True" and typed == "True"
