"""One call that answers "is this minimum flat?": run a chosen set of diagnostics on a model, a
loss and data, and write ``report.json`` plus one figure per diagnostic (and ``.npz`` arrays for
the landscapes) into a folder. The CLI's ``flatminima diagnose`` is a thin shell over it, and also
writes ``report.html`` from the same result: a table per diagnostic (:func:`report_sections`) and
its figure.

    fm.diagnostics.report(model, loss_fn, data, "out/", diagnostics=["hessian", "trace", "sharpness"])

Each entry of :data:`DIAGNOSTICS` maps to one function of :mod:`flatminima.diagnostics` with the
settings in :data:`DEFAULTS` (override any of them with ``options={"sharpness": {"rho": 0.1}}``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

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


#: Section title and what it shows, per diagnostic (the HTML report's).
TITLES = {
    "hessian": ("Top Hessian eigenvalues", "The largest eigenvalues of the Hessian of the loss (λ_max first): "
                "the curvature along the sharpest directions; a flat minimum has small ones."),
    "trace": ("Hessian trace", "The sum of all Hessian eigenvalues (Hutchinson's estimator): the curvature "
              "summed over every direction."),
    "density": ("Hessian spectral density", "The distribution of the Hessian's eigenvalues (stochastic Lanczos "
                "quadrature): the bulk near 0 and the outliers."),
    "batch_hessian": ("λ_max per batch", "The top Hessian eigenvalue of the loss on each evaluation batch alone."),
    "sharpness": ("Worst-case sharpness", "The highest rise of the loss within a ball of radius ρ around the "
                  "weights (projected gradient ascent)."),
    "average_sharpness": ("Average sharpness", "The mean rise of the loss under random Gaussian weight noise of "
                          "scale σ."),
    "robustness": ("Robustness to weight corruption", "Loss and metric after random and adversarial corruptions "
                   "of the weights within each budget, per norm."),
    "curve": ("Loss under perturbation", "Loss against the size of a random and of an adversarial perturbation."),
    "landscape_1d": ("Loss landscape (1-D)", "The loss along one filter-normalized random direction, "
                     "L(w + α·d)."),
    "landscape_2d": ("Loss landscape (2-D)", "The loss on a plane through the weights spanned by two "
                     "filter-normalized random directions, L(w + α·d₁ + β·d₂)."),
}
#: The caption of each diagnostic's figure.
CAPTIONS = {
    "density": "Spectral density on a log axis; the Ritz nodes as a rug.",
    "batch_hessian": "Histogram of λ_max over the batches, with the median marked.",
    "curve": "Perturbed loss against the radius (log axis): random directions (mean ± standard error) and the "
             "adversarial one; the dotted line is the clean loss.",
    "landscape_1d": "The loss (and the metric, dashed, on the right axis) along the direction; α = 0 is the model.",
    "landscape_2d": "log10 of the loss: contours (labelled lines every other level; ★ the model) and the surface.",
}


#: How the report names the headline numbers of :func:`summary_row`.
SUMMARY_LABELS = {"lambda_max": "λ_max (top Hessian eigenvalue)", "trace": "Hessian trace",
                  "trace_stderr": "Hessian trace: standard error", "sharpness": "worst-case sharpness",
                  "average_sharpness": "average sharpness",
                  "average_sharpness_stderr": "average sharpness: standard error",
                  "lambda_max_batch_median": "λ_max per batch: median"}


def _facts(*pairs: tuple[str, Any]) -> dict[str, Any]:
    return {"columns": ["quantity", "value"], "rows": [list(p) for p in pairs]}


def _without_empty_columns(columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    """A table without the columns that are None in every row."""
    keep = [i for i in range(len(columns)) if any(row[i] is not None for row in rows)]
    return {"columns": [columns[i] for i in keep], "rows": [[row[i] for i in keep] for row in rows]}


def _tables(name: str, r: Any) -> list[dict[str, Any]]:
    """The tables of one diagnostic's result: ``{"columns", "rows", "caption"}`` of plain values."""
    if name == "hessian":
        rows = [[k + 1, float(v), bool(c), float(e)] for k, (v, c, e) in enumerate(zip(r.values, r.converged,
                                                                                      r.residuals))]
        return [{"columns": ["k", "eigenvalue", "converged", "residual"], "rows": rows,
                 "caption": f"{r.algorithm} ({r.method}) on {r.numel:,} parameters: {r.iterations} iterations, "
                            f"{r.hvps} Hessian-vector products."}]
    if name == "trace":
        return [_facts(("trace", r.trace), ("standard error", r.stderr), ("probes", r.probes),
                       ("converged", bool(r.converged)), ("Hessian-vector products", r.hvps), ("parameters", r.numel),
                       ("curvature", r.method))]
    if name == "density":
        nodes = r.nodes[r.weights > 0]
        return [_facts(("smallest Ritz node", float(nodes.min()) if len(nodes) else None),
                       ("largest Ritz node", float(nodes.max()) if len(nodes) else None), ("kernel width", r.sigma),
                       ("Hessian-vector products", r.hvps), ("parameters", r.numel))]
    if name == "batch_hessian":
        rows = [[i + 1, int(n), float(v), bool(c)] for i, (n, v, c) in enumerate(zip(r.batch_sizes, r.values,
                                                                                   r.converged))]
        return [_facts(("batches", len(r.values)), ("median", r.median), ("min", r.min), ("max", r.max)),
                {"columns": ["batch", "examples", "λ_max", "converged"], "rows": rows, "caption": "Per batch:"}]
    if name == "sharpness":
        return [_facts(("sharpness", r.sharpness), ("loss L(w)", r.loss),
                       ("highest loss in the ball", r.perturbed_loss), ("ρ", r.rho), ("norm", r.norm),
                       ("scale", r.scale), ("‖ε‖ of the highest point", r.perturbation_norm),
                       ("ascent steps", r.steps), ("step size", r.step_size))]
    if name == "average_sharpness":
        return [_facts(("average sharpness", r.sharpness), ("standard error", r.stderr), ("loss L(w)", r.loss),
                       ("mean perturbed loss", r.perturbed_loss), ("σ", r.sigma), ("scale", r.scale),
                       ("samples", r.samples))]
    if name == "robustness":
        clean = {"kind": "clean", "loss": r.clean_loss, "metric": r.clean_metric}
        columns = [c for c in r.COLUMNS if r.relative or c != "absolute_budget"]
        rows = [[row.get(c) for c in columns] for row in [clean, *r.rows]]
        table = _without_empty_columns([c.replace("_", " ") for c in columns], rows)
        return [{**table, "caption": f"{'Relative' if r.relative else 'Absolute'} budgets; {r.samples} random "
                                     f"sample(s) per budget, {r.steps} ascent steps for the adversarial corruption."}]
    if name == "curve":
        rows = [[float(a), float(b), None if e != e else float(e), float(c)]
                for a, b, e, c in zip(r.radii, r.random_loss, r.random_stderr, r.adversarial_loss)]
        return [{"columns": ["radius ‖ε‖₂", "random: loss", "random: standard error", "adversarial: loss"],
                 "rows": rows, "caption": f"Clean loss {r.clean_loss:.4g}; {r.samples} random direction(s), "
                                          f"{r.steps} ascent steps."}]
    if name == "landscape_1d" and r.betas is None:
        metric = r.metric if r.metric is not None else [None] * len(r.alphas)
        rows = [[float(a), float(v), None if m is None else float(m)] for a, v, m in zip(r.alphas, r.loss, metric)]
        return [{"columns": ["α", "loss", "metric"], "rows": rows,
                 "caption": f"{r.space} parameters, direction norm {float(r.direction_norms[0]):.4g}."}]
    loss = np.asarray(r.loss, dtype=float)
    i, j = np.unravel_index(int(np.nanargmin(loss)), loss.shape) if np.isfinite(loss).any() else (0, 0)
    where = f"α = {float(r.alphas[i]):.3g}, β = {float(r.betas[j]):.3g}" if r.betas is not None else ""
    finite = loss[np.isfinite(loss)]
    return [_facts(("grid", " × ".join(str(n) for n in loss.shape)), ("loss at the model", r.clean_loss),
                   ("lowest loss on the grid", float(finite.min()) if len(finite) else None), ("at", where),
                   ("highest loss on the grid", float(finite.max()) if len(finite) else None),
                   ("points not finite", int((~np.isfinite(loss)).sum())), ("parameters", r.space),
                   ("cos(d₁, d₂)", r.cosine), ("direction norms", [float(n) for n in r.direction_norms]))]


def report_sections(results: dict[str, Any], figures: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
    """One section per diagnostic, in run order, for the HTML report: ``{"name", "title", "text",
    "tables": [{"columns", "rows", "caption"}], "figure", "caption"}``, plain values only (numbers,
    strings, booleans, None); ``figure``: the figure's file name from ``figures``, or None."""
    return [{"name": name, "title": TITLES[name][0], "text": TITLES[name][1], "tables": _tables(name, r),
             "figure": (figures or {}).get(name), "caption": CAPTIONS.get(name, "")} for name, r in results.items()]


def report(model, loss_fn: LossFn, data: Any, out_dir: Optional[str | Path] = None,
           diagnostics: Sequence[str] = DEFAULT_DIAGNOSTICS, params: ParamSpec = None,
           metric_fn: Optional[Callable] = None, mode: str = "eval", seed: int = 0,
           options: Optional[dict[str, dict[str, Any]]] = None, figures: bool = True,
           log: Optional[Callable[[str], None]] = None, distributed: Optional[bool] = None) -> dict[str, Any]:
    """Run ``diagnostics`` (names from :data:`DIAGNOSTICS`) on ``model`` and return
    ``{"results": name → result, "summary": headline numbers, "seconds": name → wall time,
    "settings": name → settings used, "figures": name → figure file, "sections":
    :func:`report_sections`}``.
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
    return {"results": results, "summary": summary, "seconds": seconds, "figures": files,
            "settings": {n: {**DEFAULTS[n], **options.get(n, {})} for n in diagnostics},
            "sections": report_sections(results, files)}
