"""Where a unit's numbers came from, stored in its record under ``"provenance"``.

* ``config``: the resolved configuration, every field after the defaults, the preset, the config
  file and the command line, with ``methods`` as trained: one entry per label after the grid, each
  ``{"method": <registry name>, <base-optimizer settings>, <hyperparameters, defaults filled in>}``
  (:func:`resolved_config`); ``config_sha256``: the SHA-256 of its canonical JSON (sorted keys);
* ``git``: ``{"commit", "dirty"}`` of the checkout the package was imported from (``git rev-parse
  HEAD``; dirty: ``git status --porcelain`` lists anything), both None when the package is not in
  a git checkout or git is missing (:func:`git_state`);
* ``packages``: the installed versions of torch, flatminima, transformers, peft and numpy (None when
  absent) and ``python``;
* ``device``: ``{"type", "name", "threads"}`` (the CUDA device's name on a GPU);
* ``data``: :func:`data_fingerprint` of the task: SHA-256 of each data file the task was read from
  (the Fashion-MNIST idx files, the VADER archive) and of a bounded sample of its tensors;
* ``invocation``: ``{"id", "started_at"}`` of the ``run`` that trained the unit;
* per unit: ``seeds`` (the unit's seed and the experiment's list), ``unit_settings`` (what the
  unit's fingerprint hashes: :func:`flatminima.experiment.units.unit_settings`), ``fingerprint`` and
  ``wall_time_s`` (training, evaluation, diagnostics and checkpoint of the unit).

:func:`provenance_summary` condenses the records of an experiment for ``results.json`` and the report.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import platform
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import methods as _methods
from ..data import FASHION_FILES, Dataset
from .config import ExperimentConfig

#: Distributions whose versions every record holds.
PACKAGES = ("torch", "flatminima", "transformers", "peft", "numpy")
#: Rows of each input tensor hashed into the data fingerprint (evenly spaced; labels are hashed whole).
SAMPLE_ROWS = 1024
#: Arguments of a method's constructor the runner sets itself (not configuration).
_RUNNER_SET = ("self", "base", "common", "model", "scope", "seed", "total_steps")


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON types: mappings with string keys, lists for tuples and sets, strings
    for paths and anything else JSON cannot hold."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((json_safe(v) for v in value), key=str)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def sha256_json(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (sorted keys, no spaces)."""
    text = json.dumps(json_safe(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def method_defaults(name: str) -> dict[str, Any]:
    """The constructor defaults of method ``name``'s own hyperparameters that are plain values
    (numbers, strings, None and lists of them; a callable default has no stable text)."""
    params = inspect.signature(_methods.get(name).__init__).parameters
    return {p.name: p.default for p in params.values()
            if p.name not in _RUNNER_SET and p.kind is not inspect.Parameter.VAR_KEYWORD and _plain(p.default)
            and p.default is not inspect.Parameter.empty}


def resolved_method(config: ExperimentConfig, label: str) -> dict[str, Any]:
    """Method ``label`` as trained: ``{"method": <registry name>, **base settings, **hyperparameters}``,
    the method's defaults filled in."""
    name, base, hyper = config.method_spec(label)
    return json_safe({"method": name, **base, **method_defaults(name), **hyper})


def resolved_config(config: ExperimentConfig) -> dict[str, Any]:
    """Every field of ``config`` (JSON-safe), ``methods`` expanded and resolved (:func:`resolved_method`)."""
    values = json_safe(config.to_dict())
    values["methods"] = {label: resolved_method(config, label) for label in config.expanded_methods()}
    return values


@functools.lru_cache(maxsize=8)
def git_state(path: Optional[str] = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: this package), None for
    both when it is not tracked in one, git is missing or fails; never raises."""
    folder = Path(path) if path else Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20,
                                  env=env)
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        return done.stdout if done.returncode == 0 else None

    # The folder must be tracked: a package installed into a virtual environment inside some other
    # checkout is not that checkout's code.
    if git("ls-files", "--error-unmatch", "--", ".") is None:
        return {"commit": None, "dirty": None}
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    return {"commit": commit.strip() if commit else None, "dirty": None if status is None else bool(status.strip())}


def package_versions() -> dict[str, Optional[str]]:
    """The installed version of each of :data:`PACKAGES` (None when it is not installed)."""
    versions: dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(device: torch.device) -> dict[str, Any]:
    """``{"type", "name", "threads"}``: the CUDA device's name, else the CPU's (``platform``)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    else:
        name = _cpu_name()
    return {"type": device.type, "name": name, "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else ``platform``'s processor or machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: os.PathLike | str) -> str:
    """SHA-256 of a file's bytes (computed once per process for a given size and mtime)."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def data_files(source: str) -> dict[str, str]:
    """SHA-256 by file name of the files a dataset was read from: ``source`` itself when it is a
    file (the VADER archive), the Fashion-MNIST idx files when it is a folder holding them;
    empty otherwise (scikit-learn's bundled digits)."""
    path = Path(source) if source else None
    try:
        if path is not None and path.is_file():
            return {path.name: file_sha256(path)}
        if path is not None and path.is_dir():
            return {name: file_sha256(path / name) for name in FASHION_FILES.values() if (path / name).is_file()}
    except OSError:
        pass
    return {}


def _hash_tensor(digest: "hashlib._Hash", name: str, tensor: torch.Tensor, whole: bool) -> None:
    n = tensor.shape[0] if tensor.dim() else 1
    if not whole and n > SAMPLE_ROWS:
        tensor = tensor[torch.linspace(0, n - 1, SAMPLE_ROWS, device=tensor.device).round().long()]
    digest.update(f"{name}:{tensor.dtype}:{n}:{tuple(tensor.shape[1:])};".encode())
    digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def _hash_dataset(digest: "hashlib._Hash", data: Dataset, prefix: str = "") -> None:
    if hasattr(data, "fingerprint"):  # streamed from disk: its files' own fingerprint
        digest.update(f"{prefix}files:{data.fingerprint()};".encode())
        return
    for split in ("x_train", "y_train", "x_test", "y_test"):
        value = getattr(data, split)
        items = sorted(value.items()) if isinstance(value, dict) else [("", value)]
        for key, tensor in items:
            _hash_tensor(digest, f"{prefix}{split}{'.' + key if key else ''}", tensor, split.startswith("y"))


def data_fingerprint(data: Any) -> dict[str, Any]:
    """What a unit was trained on: for a :class:`~flatminima.data.Dataset`, or a continual task
    sequence (anything with ``.tasks`` of ``.data`` datasets), ``{"name", "source", "files",
    "tensors_sha256", "sample_rows"}``. ``files``: :func:`data_files` of the source; ``tensors_sha256``:
    SHA-256 over every split's dtype, shape and bytes — all labels, and :data:`SAMPLE_ROWS` evenly
    spaced rows of each input tensor (every row of a smaller one) — after the task's options and
    ``train_subset`` are applied, task after task for a sequence."""
    digest = hashlib.sha256()
    if hasattr(data, "tasks"):
        for j, task in enumerate(data.tasks):
            _hash_dataset(digest, task.data, f"{j}:{task.name}:")
        source = data.tasks[0].data.source if data.tasks else ""
    else:
        _hash_dataset(digest, data)
        source = data.source
    return {"name": data.name, "source": source, "files": data_files(source), "tensors_sha256": digest.hexdigest(),
            "sample_rows": SAMPLE_ROWS}


def run_provenance(config: ExperimentConfig, device: torch.device, data: Any) -> dict[str, Any]:
    """The provenance every unit trained by this invocation shares (see the module's docstring)."""
    resolved = resolved_config(config)
    return {"config": resolved, "config_sha256": sha256_json(resolved), "git": git_state(),
            "packages": package_versions(), "python": platform.python_version(), "device": device_info(device),
            "data": data_fingerprint(data),
            "invocation": {"id": uuid.uuid4().hex,
                           "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            "command": _command()}


def _command() -> list[str]:
    """The command line of this process (``python -m flatminima`` for the module's entry point)."""
    if not sys.argv or not sys.argv[0]:
        return []
    first = Path(sys.argv[0])
    program = ["python", "-m", first.parent.name] if first.name == "__main__.py" else [first.name]
    return [*program, *sys.argv[1:]]


def unit_provenance(shared: dict[str, Any], config: ExperimentConfig, seed: int, settings: dict[str, Any],
                    fingerprint: str, wall_time_s: float) -> dict[str, Any]:
    """One unit's provenance: ``shared`` (:func:`run_provenance`) and the unit's own fields."""
    return {**shared, "seeds": {"unit": seed, "experiment": list(config.seeds)}, "unit_settings": settings,
            "fingerprint": fingerprint, "wall_time_s": wall_time_s}


def _distinct(values: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def provenance_summary(records: Sequence[dict]) -> dict[str, Any]:
    """What the records of an experiment were made with, for ``results.json`` and the report:

    ``{"units", "recorded", "invocations", "unit_wall_time_s", "config_sha256", "git", "packages",
    "devices", "data"}``: the number of records and of those with provenance, of distinct ``run``
    invocations among them, the sum of the units' wall times (a unit without provenance counts its
    training time), and the distinct values, in first-seen order, of the config hash, the git state
    (``{"commit", "dirty"}``), the package versions, the device names and the data fingerprints
    (``{"name", "tensors_sha256", "files"}``). More than one value of a field means the units were
    made under different conditions (resumed after an upgrade, on another machine, ...)."""
    prov = [r["provenance"] for r in records if isinstance(r.get("provenance"), dict)]
    wall = sum(r["provenance"]["wall_time_s"] if isinstance(r.get("provenance"), dict)
               and r["provenance"].get("wall_time_s") is not None else r["final"]["train_time_s"] for r in records)
    return {
        "units": len(records), "recorded": len(prov),
        "invocations": len(_distinct([p.get("invocation", {}).get("id") for p in prov])),
        "unit_wall_time_s": wall,
        "config_sha256": _distinct([p.get("config_sha256") for p in prov]),
        "git": _distinct([p.get("git") for p in prov]),
        "packages": _distinct([p.get("packages") for p in prov]),
        "devices": _distinct([f"{d.get('type')}: {d.get('name')}" for p in prov if (d := p.get("device") or {})]),
        "data": _distinct([{k: (p.get("data") or {}).get(k) for k in ("name", "tensors_sha256", "files")}
                           for p in prov]),
    }


def format_provenance(summary: dict[str, Any]) -> str:
    """:func:`provenance_summary` as short Markdown lines (for ``results.md``)."""
    def one(values: list, show) -> str:
        return ", ".join(show(v) for v in values) if values else "not recorded"

    def git(g: Optional[dict]) -> str:
        if not g or g.get("commit") is None:
            return "not a git checkout"
        return g["commit"][:12] + (" (with uncommitted changes)" if g.get("dirty") else "")

    def packages(p: Optional[dict]) -> str:
        return " ".join(f"{k} {v}" for k, v in (p or {}).items() if v is not None)

    def data(d: dict) -> str:
        return f"{d.get('name')} (tensors {str(d.get('tensors_sha256'))[:16]})"

    lines = [f"- units: {summary['units']} ({summary['recorded']} with provenance), trained in "
             f"{summary['invocations']} invocation(s), {summary['unit_wall_time_s']:.1f} s of unit wall time",
             f"- config SHA-256: {one(summary['config_sha256'], lambda h: str(h)[:16])}",
             f"- code: {one(summary['git'], git)}",
             f"- packages: {one(summary['packages'], packages)}",
             f"- device: {one(summary['devices'], str)}",
             f"- data: {one(summary['data'], data)}"]
    return "\n".join(lines)
