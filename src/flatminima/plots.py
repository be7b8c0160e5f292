"""Figures for experiment reports. matplotlib is imported lazily (Agg backend), so the core library
does not depend on it."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np


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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for i, (label, runs) in enumerate(by_method.items()):
        colour = colours(i % 10)
        name = f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
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
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
