"""Figures for experiment reports. matplotlib is an optional extra, imported when a figure is drawn
(Agg backend unless one is already chosen), so the core library does not depend on it.

One method, one colour: :func:`method_colours` gives each method label of an experiment a fixed
colour (in the config's method order), and every figure and the HTML report of the experiment use
that mapping; a continual run's strategies differ by marker and line style, not by colour.

User text (experiment names, method labels, task names) is drawn as plain text: a ``$`` is escaped
(:func:`plain`), so mathtext never parses it and a name such as ``cost $\\nosuchsymbol$ run`` cannot
fail the figure. Figures are written atomically (:func:`flatminima._files.atomic_path`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .._files import atomic_path
from ..continual.metrics import save_accuracy_matrix
from ..diagnostics.plots import nonfinite_points, plain_log_ticks, plot_interpolations
from .figure_style import (STRATEGY_STYLES, figures_skipped, method_colours, plain, pyplot, save_figure,
                           task_labels)
from .flatness_figures import write_flatness_figures
from .records import group_records
from .report import Figure
from .tables import evaluations, mean_matrices, reference_method

#: Flatness measures drawn by :func:`plot_sharpness`: (summary key, axis title).
SHARPNESS_PANELS = (("lambda_max", "top Hessian eigenvalue λ_max"), ("trace", "Hessian trace"),
                    ("sharpness", "worst-case sharpness"), ("average_sharpness", "average sharpness"))


def _band(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over seeds (curves truncated to the shortest)."""
    n = min(len(c) for c in curves)
    stacked = np.asarray([c[:n] for c in curves], dtype=float)
    return stacked.mean(0), stacked.std(0)


def _window_means(values: Sequence[float], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Means of consecutive windows of per-step values, at each window's last step (1-based)."""
    v = np.asarray(values, dtype=float)
    n = len(v) // window * window
    means = v[:n].reshape(-1, window).mean(1)
    return np.arange(window, n + 1, window), means


def _by_key(records: Sequence[dict[str, Any]], key: Callable[[dict], str]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    return groups


def plot_learning_curves(records: Sequence[dict[str, Any]], path: os.PathLike | str, title: Optional[str] = None,
                         points: int = 40, colours: Optional[Mapping[str, str]] = None) -> os.PathLike | str:
    """Train loss (per-step loss averaged over windows, ~``points`` per curve, log scale) and test
    accuracy at every evaluation (each one marked; the axis spans all of them; with ``eval_train``
    the training-set accuracy dashed beside it) against the
    optimizer step: mean over seeds, shaded ±1 std, coloured by :func:`method_colours` (``colours``
    completed with any method it lacks). ``records`` are :func:`flatminima.experiment.run_one`
    records. Returns ``path``."""
    matplotlib, plt = pyplot()
    ticker = matplotlib.ticker

    by_method = _by_key(records, lambda r: r["method"])
    colours = method_colours(by_method, colours)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    low, high, trained = [], [], ""
    for label, runs in by_method.items():
        colour = colours[label]
        name = plain(f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        steps = len(runs[0]["curves"]["train_loss"])
        window = max(1, steps // points)
        x, _ = _window_means(runs[0]["curves"]["train_loss"], window)
        mean, std = _band([_window_means(r["curves"]["train_loss"], window)[1] for r in runs])
        x = x[:len(mean)]
        ax_loss.plot(x, mean, color=colour, label=name, lw=1.5)
        # on the log axis a band reaching 0 would stretch it to 1e-12: at most a decade below the mean
        ax_loss.fill_between(x, np.maximum(mean - std, 0.1 * mean), mean + std, color=colour, alpha=0.2, lw=0)
        x = np.asarray(runs[0]["curves"]["eval_step"])
        mean, std = _band([r["curves"]["test_acc"] for r in runs])
        x = x[:len(mean)]
        ax_acc.plot(x, 100 * mean, color=colour, label=name, lw=1.5, marker="o", ms=4)
        ax_acc.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=colour, alpha=0.2, lw=0)
        low.append(np.nanmin(100 * (mean - std)))
        high.append(np.nanmax(100 * (mean + std)))
        if all("train_acc" in r["curves"] for r in runs):  # eval_train: the labels trained on, dashed
            train, _ = _band([r["curves"]["train_acc"] for r in runs])
            ax_acc.plot(x, 100 * train[:len(x)], color=colour, lw=1.2, ls="--", marker="^", ms=3)
            low.append(np.nanmin(100 * train))
            high.append(np.nanmax(100 * train))
            trained = "accuracy (solid: test; dashed: train, labels trained on)"
    ax_loss.set(xlabel="optimizer step", ylabel="train loss (clean, window mean)", yscale="log", title="training loss")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy (%)", title=trained or "test accuracy")
    if low and np.isfinite(min(low)) and np.isfinite(max(high)):  # every evaluation in view, none cut off
        span = max(max(high) - min(low), 1.0)
        ax_acc.set_ylim(max(0.0, min(low) - 0.05 * span), min(100.0, max(high) + 0.05 * span))
    ax_acc.set_xlim(left=min(0.0, ax_acc.get_xlim()[0]))
    ax_loss.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax_loss.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_loss.yaxis.set_minor_formatter(ticker.NullFormatter())
    for ax in (ax_loss, ax_acc):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(plain(title))
    save_figure(fig, path)
    return path


def plot_sharpness(records: Sequence[dict[str, Any]], path: os.PathLike | str,
                   colours: Optional[Mapping[str, str]] = None) -> os.PathLike | str:
    """One bar panel per flatness measure in the runs' diagnostics (mean over seeds, ±1 std error
    bars, each seed as a dot), one bar per method (per method × strategy in a continual run,
    hatched by strategy), in the method's colour."""
    _, plt = pyplot()
    groups = group_records([r for r in records if "diagnostics" in r])
    colours = method_colours([rs[0]["method"] for rs in groups.values()], colours)
    strategies = list(dict.fromkeys(rs[0].get("strategy") for rs in groups.values()))
    panels = [(k, t) for k, t in SHARPNESS_PANELS
              if any(k in r["diagnostics"]["summary"] for rs in groups.values() for r in rs)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.6 * max(1, len(panels)), 3.6),
                             constrained_layout=True, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for i, runs in enumerate(groups.values()):
            summaries = [r["diagnostics"]["summary"] for r in runs]
            values = np.asarray([s[key] for s in summaries if s.get(key) is not None], dtype=float)
            if not len(values):
                continue
            hatch = [None, "//", "..", "xx", "\\\\"][strategies.index(runs[0].get("strategy")) % 5]
            ax.bar(i, values.mean(), yerr=values.std(ddof=1) if len(values) > 1 else 0,
                   color=colours[runs[0]["method"]], alpha=0.85, capsize=3, hatch=hatch, edgecolor="white")
            ax.plot(np.full(len(values), i), values, "k.", ms=4)
        ax.set_xticks(range(len(groups)), [plain(g) for g in groups], rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
    save_figure(fig, path)
    return path


def plot_continual(records: Sequence[dict[str, Any]], path: os.PathLike | str,
                   colours: Optional[Mapping[str, str]] = None) -> os.PathLike | str:
    """A continual run at a glance, one line per method × strategy (mean over seeds and orders,
    ±1 std error bars): the average accuracy on the tasks learned so far after each task, the
    accuracy on the first task after each task (forgetting made visible), and λ_max on the task
    just learned for each measured parameter space. Colour: method (:func:`method_colours`);
    marker and line style: strategy; the lines are offset a little along x so that equal values
    stay visible side by side. The x axis names the tasks (:func:`task_labels`); the legend sits
    below the panels."""
    _, plt = pyplot()
    groups = group_records(records)
    scenario = records[0]["scenario"]
    spaces = [s for s, v in records[0].get("lambda_max", {}).items() if v]
    panels = 2 + len(spaces)
    cols = min(panels, 2)  # two panels a row: readable at the report's width
    rows = -(-panels // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows + 0.5), layout="constrained",
                             squeeze=False)
    axes = grid.ravel()[:panels]
    for ax in grid.ravel()[panels:]:
        ax.set_visible(False)
    colours = method_colours([r["method"] for r in records], colours)
    strategies = list(dict.fromkeys(r.get("strategy") for r in records))
    names = task_labels(records)
    x = np.arange(1, len(names) + 1, dtype=float)
    width = min(0.4, 0.08 * (len(groups) - 1))

    def line(ax, values, offset, runs, label, log=False):
        values = np.asarray(values, dtype=float)
        mean, std = values.mean(0), values.std(0)
        marker, style = STRATEGY_STYLES[strategies.index(runs[0].get("strategy")) % len(STRATEGY_STYLES)]
        below = np.minimum(std, 0.67 * mean) if log else std  # a log axis has no room below 0
        ax.errorbar(x + offset, mean, yerr=[below, std], color=colours[runs[0]["method"]], marker=marker, ms=4.5,
                    ls=style, lw=1.4, capsize=2, elinewidth=0.8, label=label)

    for k, (g, runs) in enumerate(groups.items()):
        offset = -width / 2 + width * k / max(1, len(groups) - 1) if len(groups) > 1 else 0.0
        T = len(names)
        seen = [[100 * np.mean(r["accuracy"][scenario][j][:j + 1]) for j in range(T)] for r in runs]
        line(axes[0], seen, offset, runs, plain(g))
        line(axes[1], [[100 * r["accuracy"][scenario][j][0] for j in range(T)] for r in runs], offset, runs, plain(g))
        for ax, space in zip(axes[2:], spaces):
            line(ax, [r["lambda_max"][space] for r in runs], offset, runs, plain(g), log=True)
    axes[0].set(title="average accuracy on the tasks seen", ylabel="accuracy (%)")
    axes[1].set(title=plain(f"accuracy on the first task ({names[0]})"), ylabel="accuracy (%)")
    for ax, space in zip(axes[2:], spaces):
        ax.set(title=f"λ_max ({space} parameters), task just learned", yscale="log")
        values = np.asarray([v for r in records for v in r["lambda_max"][space]], dtype=float)
        plain_log_ticks(ax, values[np.isfinite(values) & (values > 0)])
    rotate = max(len(n) for n in names) > 6
    for ax in axes:
        ax.set_xlabel("after training on" if names[0] != "task 1" else "after training task (position in the order)")
        ax.set_xticks(x, [plain(n) for n in names], rotation=30 if rotate else 0, ha="right" if rotate else "center")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize="small")
    save_figure(fig, path)
    return path


def write_continual_figures(out: Path, records: Sequence[dict], log: Callable[[str], None],
                            colours: Optional[Mapping[str, str]] = None) -> list[Figure]:
    """Accuracy matrices under ``out/matrices/`` (CSV/JSON, and a PNG with matplotlib; per method ×
    strategy and evaluation, mean over seeds and orders: ``<group>`` for the training scenario,
    ``<group>__<evaluation>`` for the others) and ``out/continual.png`` (:func:`plot_continual`);
    returns the figures written with their captions, ``continual.png`` first."""
    scenario = records[0]["scenario"]
    names = task_labels(records)
    groups = group_records(records)
    figures = []
    for e in evaluations(records):  # the training scenario's matrices, then the other evaluations'
        for g, runs in groups.items():
            if not (runs := [r for r in runs if e in r.get("accuracy", {})]):
                continue
            name = g.replace(" / ", "__") + ("" if e == scenario else f"__{e}")
            paths = save_accuracy_matrix(mean_matrices(runs, e)[g], out / "matrices", task_names=names,
                                         name="".join(c if c.isalnum() or c in "-_." else "_" for c in name),
                                         extra={"group": g, "scenario": e, "averaged_over": len(runs)})
            if "png" in paths:
                figures.append(Figure(paths["png"], f"Accuracy matrix of {g} ({e}{'' if e == 'nme' else '-incremental'}"
                                      f"), mean over {len(runs)} run(s): row j, column i is the accuracy on task i "
                                      "after training task j.", small=True))
    try:
        path = plot_continual(records, out / "continual.png", colours)
    except ImportError as exc:
        log(figures_skipped(exc))
        return figures
    runs = sorted({len(rs) for rs in groups.values()})
    figures.insert(0, Figure(path, (
        f"Per method × strategy, the mean over {' or '.join(map(str, runs))} run(s) (seeds × task orders) with ±1 "
        f"std error bars: the average accuracy ({scenario}-incremental) on the tasks learned so far, the accuracy on "
        "the first task, and λ_max on the task just learned. Colour: method; marker and line style: strategy; the "
        "lines are offset slightly along x so that equal values stay visible side by side.")))
    return figures


def interpolation_caption(interpolation: Mapping[str, Any], reference: Optional[str], seed: int,
                          samples: Optional[int] = None) -> str:
    """The caption of ``interpolation.png``: what the curves are, and how many of their points
    are not finite (drawn as gaps and marked × on the top edge), where."""
    on = f"on the first {samples} test examples" if samples else "on the diagnostics data"
    text = (f"Loss along θ(t) = (1 − t)·θ_{reference} + t·θ_method, from the {reference} model (t = 0) to each "
            f"method's (t = 1), seed {seed}'s models, {on}; floating-point buffers (BatchNorm statistics) are "
            "interpolated too.")
    total = sum(len(r.loss) for r in interpolation.values())
    bad = nonfinite_points(dict(interpolation))
    if not bad:
        return f"{text} All {total} points are finite."
    where = "; ".join(f"{name} at t = {', '.join(f'{t:g}' for t in ts)}" for name, ts in bad.items())
    count = sum(map(len, bad.values()))
    return (f"{text} {count} of {total} points are not finite (NaN or ±inf): {where}. They are not drawn on the "
            "curves (gaps) and each is marked × on the top edge.")


def write_figures(out: Path, config: Any, records: Sequence[dict], interpolation: Optional[Mapping[str, Any]],
                  log: Callable[[str], None], colours: Optional[Mapping[str, str]] = None) -> dict[str, list[Figure]]:
    """Every figure of an experiment, with its caption, by report section: ``Results``
    (``learning_curves.png``), ``Flatness`` (``sharpness.png``, ``interpolation.png``) or
    ``Continual learning`` (:func:`write_continual_figures`). Without matplotlib the figures are
    skipped with one line to ``log``. ``colours``: the experiment's :func:`method_colours`."""
    figures: dict[str, list[Figure]] = {}
    samples = config.diagnostics_samples
    try:
        if config.continual:
            figures["Continual learning"] = write_continual_figures(out, records, log, colours)
            if any((r.get("flatness") or {}).get("quantities") for r in records):
                figures["Flatness across tasks"] = write_flatness_figures(out, records, colours)
        else:
            evals = sorted({len(r["curves"]["eval_step"]) for r in records})
            seeds = sorted({len(rs) for rs in group_records(records).values()})
            path = plot_learning_curves(records, out / "learning_curves.png", f"{config.name}: {config.task} / "
                                        f"{config.model}", colours=colours)
            figures["Results"] = [Figure(path, (
                "Training loss (the per-step loss averaged over windows, log scale) and test accuracy at each "
                f"evaluation ({' or '.join(map(str, evals))} per run, each marked), against the optimizer step; mean "
                f"over {' or '.join(map(str, seeds))} seed(s), shaded ±1 std."))]
        if any("diagnostics" in r for r in records):
            path = plot_sharpness(records, out / "sharpness.png", colours)
            figures.setdefault("Flatness", []).append(Figure(path, (
                f"Flatness at the end of training on the first {samples} test examples: bars are the mean over "
                "seeds, whiskers ±1 std, dots the seeds.")))
        if interpolation:
            ref = reference_method(records)
            with atomic_path(out / "interpolation.png", keep_suffix=True) as tmp:
                plot_interpolations(dict(interpolation), tmp, colours=dict(colours or {}),
                                    title=plain(f"from {ref} (t = 0) to each method (t = 1), seed {config.seeds[0]}"))
            figures.setdefault("Flatness", []).append(Figure(
                out / "interpolation.png", interpolation_caption(interpolation, ref, config.seeds[0], samples)))
    except ImportError as exc:
        log(figures_skipped(exc))
    return figures
