"""The API reference builds from the docstrings (``docs/api/build.py``, pdoc) with no warning and no
broken cross-reference, and holds the pages and names users look for."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

pytest.importorskip("pdoc")

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "docs" / "api" / "build.py"


def _builder():
    spec = importlib.util.spec_from_file_location("api_docs_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    return out, _builder().build(out)


def test_the_reference_builds_without_warnings_or_broken_references(reference):
    _, result = reference
    assert result["warnings"] == []
    assert result["broken"] == []
    assert result["skipped"] == []  # CI installs every extra: every module is documented


def test_the_reference_has_the_pages_and_names_users_look_for(reference):
    out, result = reference
    for page, names in {"flatminima.html": ["SAM", "TrainStep", "create", "MRWP", "FlatLoRA"],
                        "flatminima/lora.html": ["support", "LoRALayer", "lora_layers", "QKVLoRA"],
                        "flatminima/diagnostics.html": ["top_eigenvalues"],
                        "flatminima/experiment/config.html": ["ExperimentConfig"],
                        "flatminima/experiment/loggers.html": ["RunLogger", "MLflowLogger", "WandbLogger"],
                        "flatminima/integrations/hf.html": []}.items():
        html = (out / page).read_text(encoding="utf-8")
        missing = [n for n in names if f'id="{n}"' not in html]
        assert not missing, (page, missing)
    assert "flatminima.core.validation" in result["modules"] and len(result["modules"]) > 60
    assert not any(part.startswith("_") for name in result["modules"] for part in name.split("."))
    # Sphinx roles become links, `~` included: the loggers page links the units module's function.
    loggers = (out / "flatminima/experiment/loggers.html").read_text(encoding="utf-8")
    assert '<a href="units.html#unit_settings">' in loggers
    assert (out / "index.html").is_file() and (out / "search.js").stat().st_size > 10_000


def test_a_missing_extra_leaves_its_module_out_and_says_which_install(tmp_path):
    code = ("import json, sys, importlib.util\n"
            "for name in ('transformers', 'accelerate', 'lightning', 'deepspeed'): sys.modules[name] = None\n"
            f"spec = importlib.util.spec_from_file_location('b', {str(BUILD)!r})\n"
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
            f"print(json.dumps(b.build(__import__('pathlib').Path({str(tmp_path)!r}), 'flatminima.integrations')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["modules"] == ["flatminima.integrations"] and result["warnings"] == [] and result["broken"] == []
    skipped = dict(line.split(": ", 1) for line in result["skipped"])
    assert sorted(skipped) == ["flatminima.integrations.accelerate", "flatminima.integrations.deepspeed",
                               "flatminima.integrations.hf", "flatminima.integrations.lightning"]
    assert "pip install 'flatminima[deepspeed]'" in skipped["flatminima.integrations.deepspeed"]
    assert (tmp_path / "flatminima" / "integrations.html").is_file()
    assert not (tmp_path / "flatminima" / "integrations" / "hf.html").exists()


#: What a docstring or comment must not say: the names of the notes and papers the library was
#: built from ("seed 004"), internal design documents, tracker issues. It cites the paper instead.
INTERNAL = re.compile(r"\bseeds? ?0\d\d\b|\bseed \d{3}'s|DESIGN\.md|\bdesign doc|\bissue ?#?\d|the user's notes",
                      re.IGNORECASE)


def test_docstrings_and_comments_cite_papers_not_internal_notes():
    found = []
    for path in sorted((REPO / "src" / "flatminima").rglob("*.py")):
        with tokenize.open(path) as f:
            for token in tokenize.generate_tokens(f.readline):
                if token.type in (tokenize.STRING, tokenize.COMMENT) and INTERNAL.search(token.string):
                    found.append(f"{path.relative_to(REPO)}:{token.start[0]}: {INTERNAL.search(token.string).group(0)}")
    assert not found, found
    assert INTERNAL.search("GA-SAM (seed 002, §2.4)") and INTERNAL.search("Seed 004's claims")
    assert not INTERNAL.search("seeded by (seed, step)") and not INTERNAL.search("seed 0 and 1")
