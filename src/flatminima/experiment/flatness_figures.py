"""The per-task flatness figures of a continual experiment: one heatmap per measured T×T matrix
(λ_max, trace, the loss barrier on the line between checkpoints) and the scatter of each task's
λ_max right after it was learned against its forgetting at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .._files import write_text
from ..continual.flatness import flatness_forgetting_correlation, flatness_forgetting_points
from .figure_style import STRATEGY_STYLES, method_colours, plain, pyplot, save_figure, task_labels
from .records import group_records
from .report import Figure
from .tables import mean_flatness

#: Per-task flatness quantities as the figures name them.
FLATNESS_TITLES = {"lambda_max": "λ_max", "trace": "tr(H)", "line": "loss barrier"}


def plot_flatness_matrix(matrix: Sequence[Sequence[Optional[float]]], path: os.PathLike | str,
                         task_names: Sequence[str], title: str, label: str) -> os.PathLike | str:
    """Heatmap of a per-task flatness matrix (row j: after task j; column i: task i's loss): None
    cells (tasks not yet trained on, the barrier's diagonal) hatched, values to 3 significant digits,
    a log colour scale when all are positive and span a decade (curvatures), else a linear one."""
    matplotlib, plt = pyplot()
    from matplotlib.patches import Rectangle
    m = np.asarray([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    T = m.shape[0]
    finite = m[np.isfinite(m)]
    log = finite.size > 0 and bool(np.all(finite > 0)) and finite.max() > 10 * finite.min()
    side = min(14.0, max(4.5, 0.75 * T + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), layout="constrained")
    image = ax.imshow(np.ma.masked_invalid(m), cmap="magma", norm=matplotlib.colors.LogNorm() if log else None,
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label(plain(label))
    for j in range(T):
        for i in range(T):
            if not np.isfinite(m[j, i]):
                ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fc="white", ec="0.6", hatch="///", lw=0))
            elif T <= 30:
                r, g, b, _ = image.cmap(image.norm(m[j, i]))
                ax.text(i, j, f"{m[j, i]:.3g}", ha="center", va="center", fontsize=max(5.0, min(10.0, 110.0 / T)),
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    names, long = [plain(n) for n in task_names], max(map(len, task_names)) > 3
    ax.set_xticks(range(T), names, rotation=45 if long else 0, ha="right" if long else "center")
    ax.set_yticks(range(T), names)
    ax.set(xlabel="loss of task i", ylabel="after training task j", title=plain(title))
    save_figure(fig, path)
    return path


def write_flatness_figures(out: Path, records: Sequence[dict],
                           colours: Optional[Mapping[str, str]] = None) -> list[Figure]:
    """Per method × strategy, the mean flatness matrices of its runs that measured them (older runs
    are left out) as ``out/flatness/<group>.json`` and one :func:`plot_flatness_matrix` each; first,
    per parameter space with λ_max, :func:`plot_flatness_forgetting`."""
    names = task_labels(records)
    figures = []
    for g, runs in group_records(records).items():
        runs = [r for r in runs if (r.get("flatness") or {}).get("quantities")]
        if not runs:
            continue
        means = mean_flatness(runs)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in g.replace(" / ", "__"))
        write_text(out / "flatness" / f"{safe}.json", json.dumps(
            {"group": g, "tasks": names, "runs": len(runs), "quantities": means}, indent=2) + "\n")
        for key, matrix in means.items():
            quantity, space = key.split("/", 1)
            label = FLATNESS_TITLES.get(quantity, quantity) + ("" if quantity == "line" else f" ({space} parameters)")
            path = plot_flatness_matrix(matrix, out / "flatness" / f"{safe}__{key.replace('/', '_')}.png", names,
                                        f"{g}: {label}", label)
            what = ("the barrier of task i's loss on the line from the weights after task i to those after task j"
                    if quantity == "line" else f"{label} of task i's loss at the weights after task j")
            figures.append(Figure(path, f"{g}, mean over {len(runs)} run(s): {what}; hatched: undefined.", small=True))
    spaces = dict.fromkeys(k.split("/", 1)[1] for r in records for k in ((r.get("flatness") or {}).get("quantities")
                                                                         or {}) if k.startswith("lambda_max/"))
    for space in spaces:
        path = plot_flatness_forgetting(records, out / "flatness" / f"forgetting_vs_lambda_max_{space}.png", space,
                                        colours)
        figures.insert(0, Figure(path, (
            f"Each task's λ_max ({space} parameters) right after it was learned against its forgetting at the end "
            "(tasks before the last, every seed × order), per method × strategy; the legend gives Pearson's r "
            "with its 95 % bootstrap interval over units.")))
    return figures


def plot_flatness_forgetting(records: Sequence[dict[str, Any]], path: os.PathLike | str, space: str,
                             colours: Optional[Mapping[str, str]] = None) -> os.PathLike | str:
    """λ_max of each task right after it was learned (log x) against its forgetting at the end, one
    point per task × unit, coloured by method, marked by strategy; the legend gives each method ×
    strategy's Pearson r with its bootstrap 95 % interval over units."""
    _, plt = pyplot()
    groups = group_records(records)
    colours = method_colours([rs[0]["method"] for rs in groups.values()], colours)
    strategies = list(dict.fromkeys(rs[0].get("strategy") for rs in groups.values()))
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    for g, runs in groups.items():
        points = [flatness_forgetting_points(r, space) for r in runs]
        xs, ys = [x for p in points for x in p[0]], [100 * y for p in points for y in p[1]]
        if not xs:
            continue
        c = flatness_forgetting_correlation(runs, space)
        r = "r undefined" if c["pearson"] is None else f"r = {c['pearson']:+.2f}" + (
            "" if c["pearson_ci"] is None else f" [{c['pearson_ci'][0]:+.2f}, {c['pearson_ci'][1]:+.2f}]")
        marker = STRATEGY_STYLES[strategies.index(runs[0].get("strategy")) % len(STRATEGY_STYLES)][0]
        ax.scatter(xs, ys, color=colours[runs[0]["method"]], marker=marker, s=22, alpha=0.8, label=plain(f"{g}: {r}"))
    ax.set(xscale="log", xlabel=f"λ_max ({space} parameters) of task i right after learning it",
           ylabel="forgetting of task i at the end (%)", title="flatness against forgetting")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)
    return path
