"""Figures for experiment reports. matplotlib is imported lazily (Agg backend), so the core library
does not depend on it.

User text (experiment names, method labels, task names) is drawn as plain text: a ``$`` is escaped
(:func:`plain`), so mathtext never parses it and a name such as ``cost $\\nosuchsymbol$ run`` cannot
fail the figure. Figures are written atomically (:func:`flatminima._files.atomic_path`)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from ._extras import require
from ._files import atomic_path


def plain(text: Any) -> str:
    """``text`` as matplotlib shows it literally: every ``$`` escaped, so no mathtext is parsed."""
    return str(text).replace("$", r"\$")


def _pyplot():
    matplotlib = require("matplotlib", "plots", "the experiment figures")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _save(fig, path: os.PathLike | str) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, keep_suffix=True) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


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


def plot_learning_curves(records: Sequence[dict[str, Any]], path: os.PathLike | str, title: Optional[str] = None,
                         points: int = 40) -> None:
    """Train loss (per-step loss averaged over windows, ~``points`` per curve, log scale) and test
    accuracy against the optimizer step: mean over seeds, shaded ±1 std, one colour per method.

    ``records`` are :func:`flatminima.experiment.run_one` records.
    """
    matplotlib, plt = _pyplot()
    import matplotlib.ticker

    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for i, (label, runs) in enumerate(by_method.items()):
        colour = colours(i % 10)
        name = plain(f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        steps = len(runs[0]["curves"]["train_loss"])
        window = max(1, steps // points)
        x, _ = _window_means(runs[0]["curves"]["train_loss"], window)
        mean, std = _band([_window_means(r["curves"]["train_loss"], window)[1] for r in runs])
        x = x[:len(mean)]
        ax_loss.plot(x, mean, color=colour, label=name, lw=1.5)
        ax_loss.fill_between(x, np.maximum(mean - std, 1e-12), mean + std, color=colour, alpha=0.2, lw=0)
        x = np.asarray(runs[0]["curves"]["eval_step"])
        mean, std = _band([r["curves"]["test_acc"] for r in runs])
        x = x[:len(mean)]
        ax_acc.plot(x, 100 * mean, color=colour, label=name, lw=1.5, marker="o", ms=2.5)
        ax_acc.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=colour, alpha=0.2, lw=0)
    ax_loss.set(xlabel="optimizer step", ylabel="train loss (clean, window mean)", yscale="log", title="training loss")
    ax_acc.set(xlabel="optimizer step", ylabel="test accuracy (%)", title="test accuracy")
    # Early evaluations sit near chance level; zoom on the range where the final accuracies lie.
    finals = [100 * np.mean([r["curves"]["test_acc"][-1] for r in runs]) for runs in by_method.values()]
    if finals:
        ax_acc.set_ylim(max(0.0, min(finals) - 10.0), min(100.0, max(finals) + 3.0))
    ax_loss.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax_loss.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in (ax_loss, ax_acc):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(plain(title))
    _save(fig, path)


def _groups(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    from .runner import record_group

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(record_group(r), []).append(r)
    return groups


#: Flatness measures drawn by :func:`plot_sharpness`: (summary key, axis title).
SHARPNESS_PANELS = (("lambda_max", "top Hessian eigenvalue λ_max"), ("trace", "Hessian trace"),
                    ("sharpness", "worst-case sharpness"), ("average_sharpness", "average sharpness"))


def plot_sharpness(records: Sequence[dict[str, Any]], path: os.PathLike | str) -> os.PathLike | str:
    """One bar panel per flatness measure in the runs' diagnostics (mean over seeds, ±1 std error
    bars, each seed as a dot), one bar per method."""
    _, plt = _pyplot()
    groups = {g: [r["diagnostics"]["summary"] for r in rs if "diagnostics" in r] for g, rs in _groups(records).items()}
    groups = {g: s for g, s in groups.items() if s}
    panels = [(k, t) for k, t in SHARPNESS_PANELS if any(k in s for runs in groups.values() for s in runs)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.6 * max(1, len(panels)), 3.6),
                             constrained_layout=True, squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (key, title) in zip(axes[0], panels):
        for i, runs in enumerate(groups.values()):
            values = np.asarray([s[key] for s in runs if s.get(key) is not None], dtype=float)
            if not len(values):
                continue
            ax.bar(i, values.mean(), yerr=values.std(ddof=1) if len(values) > 1 else 0, color=colours(i % 10),
                   alpha=0.8, capsize=3)
            ax.plot(np.full(len(values), i), values, "k.", ms=4)
        ax.set_xticks(range(len(groups)), [plain(g) for g in groups], rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
    _save(fig, path)
    return path


def plot_continual(records: Sequence[dict[str, Any]], path: os.PathLike | str) -> os.PathLike | str:
    """A continual run at a glance, one line per method × strategy (mean over seeds and orders, ±1
    std band): the average accuracy on the tasks learned so far after each task, the accuracy on the
    first task after each task (forgetting made visible), and λ_max on the task just learned for
    each measured parameter space. Several task orders are averaged by position (the first task of
    each order). Colour: method; line style: strategy."""
    _, plt = _pyplot()
    groups = _groups(records)
    scenario = records[0]["scenario"]
    spaces = [s for s, v in records[0].get("lambda_max", {}).items() if v]
    panels = 2 + len(spaces)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), constrained_layout=True, squeeze=False)
    axes = axes[0]
    colours = plt.get_cmap("tab10")
    T = len(records[0]["tasks"])
    x = np.arange(1, T + 1)

    def band(ax, values, colour, style, label, log=False):
        values = np.asarray(values, dtype=float)
        mean, std = values.mean(0), values.std(0)
        ax.plot(x, mean, style, marker="o", ms=3, color=colour, label=label)
        low = np.maximum(mean - std, mean / 3) if log else mean - std  # a log axis has no room below 0
        ax.fill_between(x, low, mean + std, color=colour, alpha=0.12, lw=0)

    # One colour per method, one line style per strategy.
    methods = list(dict.fromkeys(r["method"] for r in records))
    strategies = list(dict.fromkeys(r.get("strategy") for r in records))
    styles = ["-", "--", ":", "-."]
    for g, runs in groups.items():
        colour = colours(methods.index(runs[0]["method"]) % 10)
        style = styles[strategies.index(runs[0].get("strategy")) % len(styles)]
        seen = [[100 * np.mean(r["accuracy"][scenario][j][:j + 1]) for j in range(T)] for r in runs]
        band(axes[0], seen, colour, style, plain(g))
        band(axes[1], [[100 * r["accuracy"][scenario][j][0] for j in range(T)] for r in runs], colour, style, plain(g))
        for ax, space in zip(axes[2:], spaces):
            band(ax, [r["lambda_max"][space] for r in runs], colour, style, plain(g), log=True)
    axes[0].set(title="average accuracy on the tasks seen", ylabel="accuracy (%)")
    axes[1].set(title="accuracy on the first task", ylabel="accuracy (%)")
    for ax, space in zip(axes[2:], spaces):
        ax.set(title=f"λ_max ({space} parameters), task just learned", yscale="log")
    for ax in axes:
        ax.set(xlabel="after task")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(fig, path)
    return path
