"""A missing optional package ("extra") is named with the ``pip install`` that brings it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flatminima._extras import install_hint, require

# One fresh interpreter for every case: each blocks a package (sys.modules[name] = None makes its
# import raise, as if it were not installed), imports the integration and records the error; the
# order keeps every blocked package unimported until its case.
_SCRIPT = r"""
import importlib, json, sys
import flatminima
results = {"preloaded": sorted(m for m in ("accelerate", "transformers", "lightning", "deepspeed") if m in sys.modules)}

def attempt(block, target):
    sys.modules[block] = None
    try:
        importlib.import_module(target)
        return {"ok": True}
    except ImportError as error:
        return {"ok": False, "type": type(error).__name__, "message": str(error)}
    finally:
        del sys.modules[block]

results["deepspeed"] = attempt("deepspeed", "flatminima.integrations.deepspeed")
results["accelerate"] = attempt("accelerate", "flatminima.integrations.accelerate")
results["lightning"] = attempt("lightning", "flatminima.integrations.lightning")
sys.modules["transformers"] = None
results["accelerate_without_transformers"] = attempt("peft", "flatminima.integrations.accelerate")
results["transformers_imported"] = sorted(m for m in sys.modules if m.startswith("transformers.") )
results["hf"] = attempt("transformers", "flatminima.integrations.hf")
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def blocked_imports():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("integration, package, extra", [
    ("hf", "transformers", "hf"), ("lightning", "lightning", "lightning"),
    ("accelerate", "accelerate", "accelerate"), ("deepspeed", "deepspeed", "deepspeed")])
def test_missing_extra_names_the_pip_install(blocked_imports, integration, package, extra):
    result = blocked_imports[integration]
    assert not result["ok"] and result["type"] == "ModuleNotFoundError"
    assert f"pip install 'flatminima[{extra}]'" in result["message"]
    assert repr(package) in result["message"] or repr(f"{package}.pytorch") in result["message"]
    assert f"flatminima.integrations.{integration} needs it" in result["message"]


def test_accelerate_integration_imports_without_transformers(blocked_imports):
    assert blocked_imports["preloaded"] == []  # `import flatminima` loads no framework
    assert blocked_imports["accelerate_without_transformers"] == {"ok": True}
    assert blocked_imports["transformers_imported"] == []


def test_require_returns_the_module_or_names_the_extra():
    assert require("json", "hf") is json
    with pytest.raises(ModuleNotFoundError, match=r"'no_such_pkg_xyz'.*foo needs it.*pip install 'flatminima\[bar\]'"):
        require("no_such_pkg_xyz", "bar", "foo")
    assert install_hint("hf") == "pip install 'flatminima[hf]'"


def test_require_reraises_a_broken_installed_package_unchanged(tmp_path, monkeypatch):
    (tmp_path / "broken_pkg_xyz.py").write_text("raise ImportError('broken inside')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="^broken inside$"):
        require("broken_pkg_xyz", "bar")


def test_require_says_which_dependency_of_an_installed_package_is_missing(tmp_path, monkeypatch):
    (tmp_path / "needs_dep_xyz.py").write_text("import missing_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match=r"'needs_dep_xyz' could not be imported \(No module named "
                                                  r"'missing_dep_xyz'\).*pip install 'flatminima\[bar\]'"):
        require("needs_dep_xyz", "bar")
