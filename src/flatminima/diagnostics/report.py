"""One call that answers "is this minimum flat?": run a chosen set of diagnostics on a model, a
loss and data, and write ``report.json`` plus one figure per diagnostic (and ``.npz`` arrays for
the landscapes) into a folder. The CLI's ``flatminima diagnose`` is a thin shell over it.

    fm.diagnostics.report(model, loss_fn, data, "out/", diagnostics=["hessian", "trace", "sharpness"])

Each entry of :data:`DIAGNOSTICS` maps to one function of :mod:`flatminima.diagnostics` with the
settings in :data:`DEFAULTS` (override any of them with ``options={"sharpness": {"rho": 0.1}}``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .._files import write_text
from ..core.validation import check
from . import hessian, landscape, plots, robustness, sharpness
from .objective import LossFn, ParamSpec

#: Settings per diagnostic (the keyword arguments of its function).
DEFAULTS: dict[str, dict[str, Any]] = {
    "hessian": {"k": 3, "tol": 1e-3},
    "trace": {"probes": 50, "rtol": 0.02, "min_probes": 10},
    "density": {"probes": 2, "steps": 40},
    "batch_hessian": {"tol": 1e-2},
    "sharpness": {"rho": 0.05, "steps": 5},
    "average_sharpness": {"sigma": 0.01, "samples": 8},
    "robustness": {"budgets": {2: [0.0, 0.1, 0.5, 1.0], "inf": [0.0, 1e-3, 3e-3]}, "steps": 5},
    "curve": {"samples": 4, "steps": 5},
    "landscape_1d": {},
    "landscape_2d": {"alphas": [i / 10 - 1 for i in range(21)], "betas": [i / 10 - 1 for i in range(21)]},
}
DIAGNOSTICS = tuple(DEFAULTS)
#: What :func:`report` runs unless told otherwise (the cheap, telling ones).
DEFAULT_DIAGNOSTICS = ("hessian", "trace", "sharpness", "average_sharpness", "landscape_1d")


def _run_one(name: str, model, loss_fn, data, params, metric_fn, mode, seed, settings, distributed=None) -> Any:
    # settings (options=) win over the report's own arguments
    common = {"params": params, "mode": mode, "seed": seed, "distributed": distributed, **settings}
    if name == "hessian":
        return hessian.top_eigenvalues(model, loss_fn, data, **common)
    if name == "trace":
        return hessian.hessian_trace(model, loss_fn, data, **common)
    if name == "density":
        return hessian.spectral_density(model, loss_fn, data, **common)
    if name == "batch_hessian":
        return hessian.batch_top_eigenvalues(model, loss_fn, data, **common)
    if name == "sharpness":
        return sharpness.worst_case_sharpness(model, loss_fn, data, **common)
    if name == "average_sharpness":
        return sharpness.average_sharpness(model, loss_fn, data, **common)
    if name == "robustness":
        return robustness.corruption_robustness(model, loss_fn, data, metric_fn=metric_fn, **common)
    if name == "curve":
        return robustness.perturbation_curve(model, loss_fn, data, **common)
    if name in ("landscape_1d", "landscape_2d"):
        return landscape.loss_landscape(model, loss_fn, data, metric_fn=metric_fn, **common)
    raise AssertionError(name)


def _figure(name: str, result: Any, out: Path) -> Optional[str]:
    path = out / f"{name}.png"
    if name == "density":
        return plots.plot_density(result, path)
    if name == "batch_hessian":
        return plots.plot_batch_eigenvalues({"model": result}, path)
    if name == "curve":
        return plots.plot_perturbation_curve(result, path)
    if name.startswith("landscape"):
        landscape.save_npz(result, out / f"{name}.npz")
        return plots.plot_landscape(result, path, log=name == "landscape_2d")
    return None


def summary_row(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a report: ``lambda_max``, ``trace`` (± ``trace_stderr``),
    ``sharpness`` (worst case), ``average_sharpness`` (± stderr), where they were computed."""
    row: dict[str, Any] = {}
    if "hessian" in results:
        row["lambda_max"] = float(results["hessian"].values[0])
    if "trace" in results:
        row["trace"], row["trace_stderr"] = results["trace"].trace, results["trace"].stderr
    if "sharpness" in results:
        row["sharpness"] = results["sharpness"].sharpness
    if "average_sharpness" in results:
        row["average_sharpness"] = results["average_sharpness"].sharpness
        row["average_sharpness_stderr"] = results["average_sharpness"].stderr
    if "batch_hessian" in results:
        row["lambda_max_batch_median"] = results["batch_hessian"].median
    return row


def report(model, loss_fn: LossFn, data: Any, out_dir: Optional[str | Path] = None,
           diagnostics: Sequence[str] = DEFAULT_DIAGNOSTICS, params: ParamSpec = None,
           metric_fn: Optional[Callable] = None, mode: str = "eval", seed: int = 0,
           options: Optional[dict[str, dict[str, Any]]] = None, figures: bool = True,
           log: Optional[Callable[[str], None]] = None, distributed: Optional[bool] = None) -> dict[str, Any]:
    """Run ``diagnostics`` (names from :data:`DIAGNOSTICS`) on ``model`` and return
    ``{"results": name → result, "summary": headline numbers, "seconds": name → wall time}``.
    With ``out_dir``: ``report.json`` (every result's ``to_dict()``), a PNG per diagnostic that has
    a figure (without matplotlib they are skipped with a note) and ``.npz`` arrays for landscapes.
    ``options`` overrides :data:`DEFAULTS` per diagnostic; ``distributed`` is every diagnostic's
    (reduce over the ranks' data; None: when a process group is initialized; every rank calls
    ``report``, and only one should pass ``out_dir``). The model is left as it was."""
    check("diagnostics", isinstance(diagnostics, (list, tuple)) and len(diagnostics) > 0
          and all(d in DIAGNOSTICS for d in diagnostics), diagnostics,
          f"a non-empty list of: {', '.join(DIAGNOSTICS)}")
    options = options or {}
    check("options", isinstance(options, dict) and all(k in DIAGNOSTICS and isinstance(v, dict)
                                                         for k, v in options.items()),
          options, f"a dict: diagnostic name ({', '.join(DIAGNOSTICS)}) → dict of settings")
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results, seconds, files = {}, {}, {}
    for name in diagnostics:
        started = time.perf_counter()
        results[name] = _run_one(name, model, loss_fn, data, params, metric_fn, mode, seed,
                                 {**DEFAULTS[name], **options.get(name, {})}, distributed)
        seconds[name] = time.perf_counter() - started
        if log:
            log(f"{name}: {seconds[name]:.1f} s")
        if out is not None and figures:
            try:
                figure = _figure(name, results[name], out)
            except ImportError as exc:
                figure = None
                if log:
                    log(f"{name}: figure not written ({exc})")
            if figure:
                files[name] = Path(figure).name
    summary = summary_row(results)
    if out is not None:
        payload = {"summary": summary, "seconds": seconds, "figures": files,
                   "settings": {n: {**DEFAULTS[n], **options.get(n, {})} for n in diagnostics},
                   "results": {n: r.to_dict() for n, r in results.items()}}
        write_text(out / "report.json", json.dumps(payload, indent=1, default=str))
    return {"results": results, "summary": summary, "seconds": seconds}
