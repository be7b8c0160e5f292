"""The summary of an experiment's runs: means and stds over seeds, the Markdown tables and the result files."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import methods as _methods
from .._files import atomic_path, write_json, write_text
from .config import ExperimentConfig


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def reference_method(records: list[dict]) -> Optional[str]:
    """The label (method, or method / strategy) of the first run of the plain base optimizer (the
    timing reference)."""
    from ..runner import record_group

    for r in records:
        if _methods.get(r["registry_name"]) is _methods.Base:
            return record_group(r)
    return None


def summarize(records: list[dict]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): metric means and standard deviations over seeds and
    the mean time per step relative to the reference method (NaN without one)."""
    from ..runner import record_group

    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(record_group(r), []).append(r)
    ref = reference_method(records)
    ref_time = _mean_std([r["final"]["time_per_step_s"] for r in by_method[ref]])[0] if ref else math.nan
    rows = []
    for label, runs in by_method.items():
        row: dict[str, Any] = {"method": label, "registry_name": runs[0]["registry_name"],
                               "hyperparameters": runs[0]["hyperparameters"], "seeds": [r["seed"] for r in runs]}
        for key in ("test_acc", "test_loss", "train_loss", "time_per_step_s"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r["final"][key] for r in runs])
        row["time_ratio"] = row["time_per_step_s_mean"] / ref_time
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], reference: Optional[str] = None) -> str:
    """The Markdown results table."""
    ref = reference or "the base optimizer"
    lines = [f"| method | test accuracy (%) | final train loss | time/step vs {ref} | ms/step | seeds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} "
                     f"| {r['train_loss_mean']:.4f} ± {r['train_loss_std']:.4f} | {r['time_ratio']:.2f} "
                     f"| {1000 * r['time_per_step_s_mean']:.1f} | {len(r['seeds'])} |")
    return "\n".join(lines)


#: Headline diagnostics in the results table: (summary key, column title).
DIAGNOSTIC_COLUMNS = (("lambda_max", "λ_max"), ("trace", "tr(H)"), ("sharpness", "worst-case sharpness (ρ = 0.05)"),
                      ("average_sharpness", "average sharpness (σ = 0.01)"), ("lambda_max_batch_median", "median λ_max per batch"))


def diagnostics_table(records: list[dict]) -> str:
    """Markdown: the per-run diagnostics, mean ± std over seeds (empty without diagnostics)."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        if "diagnostics" in r:
            by_method.setdefault(r["method"], []).append(r["diagnostics"]["summary"])
    if not by_method:
        return ""
    columns = [(k, t) for k, t in DIAGNOSTIC_COLUMNS if any(k in s for runs in by_method.values() for s in runs)]
    lines = ["| method | " + " | ".join(t for _, t in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, runs in by_method.items():
        cells = []
        for key, _ in columns:
            values = [s[key] for s in runs if s.get(key) is not None]
            mean, std = _mean_std(values) if values else (math.nan, math.nan)
            cells.append(f"{mean:.4g} ± {std:.2g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_CSV_FIELDS = ["method", "registry_name", "test_acc_mean", "test_acc_std", "test_loss_mean", "test_loss_std",
               "train_loss_mean", "train_loss_std", "time_per_step_s_mean", "time_per_step_s_std", "time_ratio",
               "seeds", "hyperparameters"]


def write_results(out: Path, config: ExperimentConfig, records: list[dict], wall_time: float,
                  device: Optional[torch.device] = None, log: Callable[[str], None] = print,
                  interpolation: Optional[dict[str, Any]] = None) -> str:
    """Write ``config.yaml``, ``results.{json,csv,md}``, the figures (``learning_curves.png``, ``sharpness.png``,
    ``interpolation.png``; for continual runs ``continual.png`` and the accuracy matrices under
    ``matrices/``; skipped, with a note, without matplotlib) and the self-contained ``report.html``
    into ``out``; return the Markdown tables."""
    from .. import runner

    rows = summarize(records)
    ref = reference_method(records)
    table = format_table(rows, ref)
    write_json(out / "results.json", {
        "config": config.to_dict(), "reference": ref, "wall_time_s": wall_time, "summary": rows,
        "runs": [f"runs/{r['unit']}.json" for r in records],
        "diagnostics": {r["unit"]: r["diagnostics"] for r in records if "diagnostics" in r},
        "continual": {r["unit"]: {"accuracy": r["accuracy"], "metrics": r["metrics"], "lambda_max": r["lambda_max"]}
                      for r in records if "accuracy" in r},
        "interpolation": {k: v.to_dict() for k, v in (interpolation or {}).items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}},
        indent=1)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, _CSV_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(r[k]) if k in ("seeds", "hyperparameters") else r[k] for k in _CSV_FIELDS})
    write_text(out / "results.csv", text.getvalue())
    per_task = " per task" if config.continual else ""
    header = (f"# {config.name}: {config.task}, {config.model}, {config.epochs} epochs{per_task}, "
              f"{len(config.seeds)} seed(s)\n\n")
    if config.continual:
        table = "Test accuracy = average accuracy over all tasks after the last one.\n\n" + table
    extra = []
    flatness = diagnostics_table(records)
    if flatness:
        extra.append(("Flatness", f"Flatness at the end of training (first {config.diagnostics_samples} test "
                                  f"examples, mean ± std over seeds):\n\n{flatness}"))
    if config.continual:
        ref_rows = [r for r in rows if r["method"] == ref]
        extra.append(("Continual learning", runner.continual_tables(
            records, ref_rows[0]["time_per_step_s_mean"] if ref_rows else None)))
    full = table + "".join(f"\n\n{text}" for _, text in extra)
    write_text(out / "results.md", header + full + "\n")
    figures: list[Path] = []
    try:
        from ..plots import plot_learning_curves, plot_sharpness

        if config.continual:
            figures += runner.write_continual_figures(out, records, log)
        else:
            plot_learning_curves(records, out / "learning_curves.png",
                                 title=f"{config.name}: {config.task} / {config.model}")
            figures.append(out / "learning_curves.png")
        if flatness:
            figures.append(plot_sharpness(records, out / "sharpness.png"))
        if interpolation:
            from ..diagnostics.plots import plot_interpolations

            with atomic_path(out / "interpolation.png", keep_suffix=True) as tmp:
                plot_interpolations(interpolation, tmp,
                                    title=f"from {ref} (t = 0) to each method (t = 1), seed {config.seeds[0]}")
            figures.append(out / "interpolation.png")
    except ImportError as exc:
        log(runner.figures_skipped(exc))
    runner.write_config(out, config)
    runner.write_report(out, config, table, extra, figures,
                        notes=f"{len(records)} runs; wall time {wall_time:.0f} s on {device}.")
    return full
