r"""Continual-learning metrics from an accuracy matrix.

The input is the accuracy matrix ``a`` of a sequence of ``T`` tasks, with

    a[j][i] = accuracy on task i (its test set) after training on tasks 0..j,    j, i = 0..T-1.

Rows are "after task j", columns are "on task i". The diagonal ``a[i][i]`` is each task's accuracy
right after it was learned; the upper triangle (``i > j``) holds accuracies on tasks not yet
trained on (used by forward transfer); the last row is the final model.

Metrics (all accuracies in [0, 1]; ``NaN`` where a metric is undefined):

* average accuracy (ACC, Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018)::

      ACC = 1/T * sum_{i=0}^{T-1} a[T-1][i]

* average incremental accuracy (AAA, Rebuffi et al. 2017, iCaRL): ``A_j = 1/(j+1) sum_{i<=j} a[j][i]``
  (the tasks seen so far), ``AAA = 1/T sum_j A_j``; PyCIL (Zhou et al. 2023) weights ``A_j`` by the
  test-set sizes (``weights=``). The final average accuracy (FAA) is ``A_{T-1}`` = ACC (no alias).

* learning accuracy (LA, Riemer et al. 2019, "Learning to Learn without Forgetting by Maximizing
  Transfer and Minimizing Interference")::

      LA = 1/T * sum_{i=0}^{T-1} a[i][i]

* backward transfer (BWT, Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual
  Learning"), negative when learning later tasks hurts earlier ones; undefined for T = 1::

      BWT = 1/(T-1) * sum_{i=0}^{T-2} (a[T-1][i] - a[i][i])

* forgetting (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning"): the drop from a
  task's best accuracy since it was learned to its final accuracy; undefined for T = 1::

      f_i = max_{l in {i, ..., T-2}} a[l][i] - a[T-1][i],        i = 0..T-2
      F   = 1/(T-1) * sum_{i=0}^{T-2} f_i

  The paper writes the maximum over all ``l < T-1``; in its setting ``a[l][i]`` is only measured
  for ``l >= i``. Here the upper triangle may hold accuracies of a task *before* it was trained on,
  which are not knowledge that can be forgotten, so the maximum runs over ``l >= i`` only.
  ``f_i`` is negative when the final accuracy beats every earlier one (positive backward transfer).

* forward transfer (FWT, Lopez-Paz & Ranzato 2017): how much training on tasks 0..i-1 helps task
  i before it is trained on, relative to a baseline accuracy ``b_i`` the caller states (GEM: the
  randomly initialised model; others: a model trained on task i alone); undefined for T = 1 or
  without a baseline::

      FWT = 1/(T-1) * sum_{i=1}^{T-1} (a[i-1][i] - b_i)

:func:`continual_metrics` returns all of them; :func:`save_accuracy_matrix` writes the matrix as
CSV / JSON (+ a PNG heatmap when matplotlib is installed); :func:`format_metrics_table` makes a
Markdown table of mean ± std over seeds. matplotlib is imported lazily (Agg backend).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .._files import write_text
from ..core.validation import check, check_described

__all__ = ["average_accuracy", "average_incremental_accuracy", "learning_accuracy", "backward_transfer",
           "forgetting", "forgetting_per_task", "forward_transfer", "continual_metrics", "save_accuracy_matrix",
           "plot_accuracy_matrix", "format_metrics_table"]

_NAN = float("nan")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _to_numpy(value: Any) -> Any:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        return value.detach().cpu().numpy()
    return value


def _as_accuracy_matrix(a: Any) -> np.ndarray:
    """``a`` (nested lists / numpy / torch) as a float64 ``T x T`` array, validated."""
    expected = "a square T x T matrix (T >= 1) of finite accuracies in [0, 1]"
    m = _as_array("a", a, expected)
    check_described("a", m.ndim == 2 and m.shape[0] == m.shape[1] and m.shape[0] >= 1, f"array of shape {m.shape}",
                    expected)
    check_described("a", bool(np.all(np.isfinite(m))), f"{_short(m.tolist())} contains NaN or inf", expected)
    check_described("a", m.min() >= 0.0 and m.max() <= 1.0, f"values range over [{m.min():g}, {m.max():g}]",
                    f"{expected}; accuracies as fractions, not percent")
    return m


def _as_array(name: str, value: Any, expected: str) -> np.ndarray:
    """``value`` (nested lists / numpy / torch) as a float64 array, or ``ValueError`` naming ``name``."""
    try:
        return np.array(_to_numpy(value), dtype=np.float64)
    except (TypeError, ValueError) as e:
        check_described(name, False, _short(value), f"{expected}; {e}")
        raise


def _as_baseline(baseline: Any, T: int) -> np.ndarray:
    expected = f"a vector of {T} finite accuracies in [0, 1], one per task"
    b = _as_array("baseline", baseline, expected)
    check_described("baseline", b.ndim == 1 and b.shape[0] == T, f"array of shape {b.shape}", expected)
    check_described("baseline", bool(np.all(np.isfinite(b))) and b.min() >= 0.0 and b.max() <= 1.0,
                    _short(b.tolist()), expected)
    return b


def average_accuracy(a: Any) -> float:
    """Average accuracy of the final model over all tasks: ``ACC = 1/T sum_i a[T-1][i]``
    (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018)."""
    m = _as_accuracy_matrix(a)
    return float(m[-1].mean())


def average_incremental_accuracy(a: Any, weights: Any = None) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017, iCaRL): ``AAA = 1/T sum_j A_j`` with
    ``A_j = 1/(j+1) sum_{i<=j} a[j][i]``, the accuracy on the tasks seen after step j. ``weights``:
    None (each task counts alike) or the ``T`` test-set sizes ``n_i`` (PyCIL's sample-weighted
    accuracy, ``A_j = sum_{i<=j} n_i a[j][i] / sum_{i<=j} n_i``)."""
    m = _as_accuracy_matrix(a)
    T = m.shape[0]
    w = np.ones(T)
    if weights is not None:
        expected = f"None or {T} positive finite numbers (the test-set size of each task)"
        w = _as_array("weights", weights, expected)
        check_described("weights", w.ndim == 1 and w.shape[0] == T and bool(np.all(np.isfinite(w)))
                        and bool(np.all(w > 0)), _short(w.tolist()), expected)
    seen = np.tril(np.ones((T, T)))  # row j: the tasks i <= j
    return float(((seen * w * m).sum(1) / (seen * w).sum(1)).mean())


def learning_accuracy(a: Any) -> float:
    """Learning accuracy, each task's accuracy right after it was learned:
    ``LA = 1/T sum_i a[i][i]`` (Riemer et al. 2019, "Learning to Learn without Forgetting by
    Maximizing Transfer and Minimizing Interference")."""
    m = _as_accuracy_matrix(a)
    return float(np.diag(m).mean())


def backward_transfer(a: Any) -> float:
    """Backward transfer (GEM, Lopez-Paz & Ranzato 2017):
    ``BWT = 1/(T-1) sum_{i=0}^{T-2} (a[T-1][i] - a[i][i])``.

    Negative when later tasks hurt earlier ones (forgetting), positive when they help. ``NaN`` for
    ``T = 1``: there is no earlier task, so the metric is undefined (not zero).
    """
    m = _as_accuracy_matrix(a)
    T = m.shape[0]
    if T == 1:
        return _NAN
    return float((m[-1, :-1] - np.diag(m)[:-1]).mean())


def forgetting_per_task(a: Any) -> list[float]:
    """Forgetting of each task (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning"):
    ``f_i = max_{l in {i..T-2}} a[l][i] - a[T-1][i]`` for ``i < T-1``, the drop from the task's
    best accuracy since it was learned (the maximum excludes rows ``l < i``, recorded before task i
    was trained on) to its final accuracy; negative when the final accuracy is the best. The last
    task has not been followed by any training, so its entry is ``NaN``. Returns a list of length T.
    """
    m = _as_accuracy_matrix(a)
    T = m.shape[0]
    out = [float(m[i:T - 1, i].max() - m[T - 1, i]) for i in range(T - 1)]
    return out + [_NAN]


def forgetting(a: Any) -> float:
    """Average forgetting (Chaudhry et al. 2018): ``F = 1/(T-1) sum_{i=0}^{T-2} f_i`` with
    ``f_i = max_{l in {i..T-2}} a[l][i] - a[T-1][i]`` (see :func:`forgetting_per_task`).
    ``NaN`` for ``T = 1`` (undefined: no task has been followed by further training)."""
    per_task = forgetting_per_task(a)
    if len(per_task) == 1:
        return _NAN
    return float(np.mean(per_task[:-1]))


def forward_transfer(a: Any, baseline: Any) -> float:
    """Forward transfer (GEM, Lopez-Paz & Ranzato 2017):
    ``FWT = 1/(T-1) sum_{i=1}^{T-1} (a[i-1][i] - b_i)``, the accuracy on task i just before it is
    trained on, relative to a baseline ``b_i``.

    ``baseline`` is the vector ``(b_0, ..., b_{T-1})`` (``b_0`` unused); the caller states what it
    is, e.g. the accuracy of the model at initialisation on task i (GEM) or of a model trained on
    task i alone. ``NaN`` when ``baseline`` is None or ``T = 1`` (undefined).
    """
    m = _as_accuracy_matrix(a)
    T = m.shape[0]
    if baseline is None:
        return _NAN
    b = _as_baseline(baseline, T)
    if T == 1:
        return _NAN
    return float((np.diag(m, k=1) - b[1:]).mean())


def continual_metrics(a: Any, baseline: Any = None, weights: Any = None) -> dict[str, Any]:
    """All the metrics of this module for one accuracy matrix (see the module docstring):

    ``{"T": int, "average_accuracy", "average_incremental_accuracy", "learning_accuracy",
    "backward_transfer", "forgetting", "forward_transfer": float, "forgetting_per_task":
    list[float]}``, ``NaN`` where undefined (``T = 1``; forward transfer without ``baseline``).
    ``average_accuracy`` is the final average accuracy (FAA); ``weights`` (test-set sizes) weight
    the average incremental accuracy only (:func:`average_incremental_accuracy`).
    """
    m = _as_accuracy_matrix(a)
    if baseline is not None:
        _as_baseline(baseline, m.shape[0])
    aaa = average_incremental_accuracy(m, weights)  # weights checked before any other work
    return {"T": int(m.shape[0]), "average_accuracy": average_accuracy(m), "average_incremental_accuracy": aaa,
            "learning_accuracy": learning_accuracy(m), "backward_transfer": backward_transfer(m),
            "forgetting": forgetting(m), "forward_transfer": forward_transfer(m, baseline),
            "forgetting_per_task": forgetting_per_task(m)}


def _task_names(task_names: Optional[Sequence[str]], T: int) -> list[str]:
    if task_names is None:
        return [f"task {i}" for i in range(T)]
    ok = not isinstance(task_names, str) and hasattr(task_names, "__len__") and len(task_names) == T \
        and all(isinstance(n, str) for n in task_names)
    check_described("task_names", ok, _short(task_names), f"None or {T} strings, one per task")
    return list(task_names)


def jsonable(value: Any) -> Any:
    """``value`` with NaN / inf floats as None and numpy scalars / arrays as Python objects."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def save_accuracy_matrix(a: Any, folder: os.PathLike | str, name: str = "accuracy_matrix",
                         task_names: Optional[Sequence[str]] = None,
                         extra: Optional[Mapping[str, Any]] = None) -> dict[str, Path]:
    """Write the accuracy matrix ``a`` (``a[j][i]``: accuracy on task i after training task j) to
    ``folder`` (created if missing):

    * ``<name>.csv``: header ``after \\ on,<task names>``, then one row per trained task j:
      ``<name of task j>,a[j][0],...,a[j][T-1]`` (floats written exactly, ``repr``);
    * ``<name>.json``: ``{"tasks": [...], "matrix": [[...]], "metrics": continual_metrics(a),
      **extra}``, NaN written as ``null``;
    * ``<name>.png``: :func:`plot_accuracy_matrix`, only when matplotlib is importable.

    Returns ``{"csv": path, "json": path[, "png": path]}``.
    """
    m = _as_accuracy_matrix(a)
    T = m.shape[0]
    tasks = _task_names(task_names, T)
    check("name", isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name
          and os.sep not in name, name, "a non-empty file name without a path separator")
    if extra is not None:
        check_described("extra", isinstance(extra, Mapping), _short(extra), "None or a dict")
        clash = sorted({"tasks", "matrix", "metrics"} & set(extra))
        check_described("extra", not clash, f"keys {clash}", "keys other than tasks, matrix, metrics")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    paths["csv"] = folder / f"{name}.csv"
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["after \\ on", *tasks])
    for j in range(T):
        writer.writerow([tasks[j], *(repr(float(v)) for v in m[j])])
    write_text(paths["csv"], table.getvalue())

    doc = {"tasks": tasks, "matrix": m.tolist(), "metrics": continual_metrics(m), **(extra or {})}
    paths["json"] = folder / f"{name}.json"
    write_text(paths["json"], json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n")

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return paths
    paths["png"] = folder / f"{name}.png"
    plot_accuracy_matrix(m, paths["png"], task_names=tasks, title=name.replace("_", " "))
    return paths


def plot_accuracy_matrix(a: Any, path: os.PathLike | str, task_names: Optional[Sequence[str]] = None,
                         title: Optional[str] = None) -> None:
    """Heatmap of the accuracy matrix (rows: after training task j, columns: accuracy on task i),
    ``viridis`` on a fixed 0-100 % scale, each cell annotated in % with one decimal, a colorbar,
    and the upper triangle (tasks not yet trained on) hatched and faded. The final ACC / BWT /
    forgetting are given under the plot. Written at dpi 120.
    """
    m = _as_accuracy_matrix(a)
    T = m.shape[0]
    tasks = _task_names(task_names, T)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    side = min(14.0, max(4.5, 0.75 * T + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    image = ax.imshow(100 * m, cmap=cmap, vmin=0.0, vmax=100.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("accuracy (%)")
    fontsize = max(5.0, min(10.0, 110.0 / T))
    for j in range(T):
        for i in range(T):
            future = i > j
            if future:  # not yet trained on: fade and hatch the cell
                ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, facecolor=(1, 1, 1, 0.55),
                                       edgecolor=(0.45, 0.45, 0.45), hatch="///", lw=0))
            if T <= 30:
                r, g, b, _ = cmap(m[j, i])
                light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
                colour = "0.25" if future else ("black" if light else "white")
                ax.text(i, j, f"{100 * m[j, i]:.1f}", ha="center", va="center", fontsize=fontsize,
                        color=colour, style="italic" if future else "normal",
                        fontweight="normal" if future else ("bold" if i == j else "normal"))
    # The diagonal (each task right after it was learned) framed.
    for i in range(T):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", lw=1.2))
    long = max(len(t) for t in tasks) > 3
    ax.set_xticks(range(T), tasks, rotation=45 if long else 0, ha="right" if long else "center")
    ax.set_yticks(range(T), tasks)
    ax.set(xlabel="accuracy on task i", ylabel="after training task j")
    ax.set_xticks(np.arange(-0.5, T, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, T, 1), minor=True)
    ax.grid(which="minor", color="white", lw=0.5, alpha=0.5)
    ax.tick_params(which="minor", length=0)
    metrics = continual_metrics(m)

    def pct(key: str, signed: bool = False) -> str:
        v = metrics[key]
        return "n/a" if math.isnan(v) else f"{100 * v:+.1f}%" if signed else f"{100 * v:.1f}%"

    caption = (f"ACC {pct('average_accuracy')}   LA {pct('learning_accuracy')}   "
               f"BWT {pct('backward_transfer', signed=True)}   forgetting {pct('forgetting')}")
    if T > 1:
        caption += "\nhatched: task not yet trained on; framed: right after training the task"
    ax.set_title(title or "accuracy matrix")
    fig.text(0.5, 0.0, caption, ha="center", va="top", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _mean_std(values: Sequence[float]) -> str:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return "–"
    x = 100 * np.asarray(finite)
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    text = f"{float(x.mean()):.2f} ± {std:.2f}"
    return text + (f" (n={len(finite)})" if len(finite) < len(values) else "")


_TABLE_COLUMNS = (("ACC", "average_accuracy"), ("LA", "learning_accuracy"), ("BWT", "backward_transfer"),
                  ("forgetting", "forgetting"), ("FWT", "forward_transfer"))


def format_metrics_table(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown table of continual-learning metrics, one row per label:

    ``| label | ACC | LA | BWT | forgetting | FWT | seeds |``

    ``results`` maps a label (method, configuration) to a list of :func:`continual_metrics` dicts,
    one per seed. Each cell is ``mean ± std`` over seeds in percent with 2 decimals (sample
    standard deviation, ``ddof = 1``; 0 for a single seed). Undefined (NaN / None) values are left
    out of the mean; a cell with no defined value reads ``–``, and one with fewer defined values
    than seeds says ``(n=k)``.
    """
    check_described("results", isinstance(results, Mapping), _short(results), "a dict label -> list of metric dicts")
    lines = ["| label | " + " | ".join(c for c, _ in _TABLE_COLUMNS) + " | seeds |",
             "|---|" + "---:|" * (len(_TABLE_COLUMNS) + 1)]
    for label, runs in results.items():
        ok = not isinstance(runs, Mapping) and isinstance(runs, Sequence) and bool(runs) \
            and all(isinstance(r, Mapping) for r in runs)
        check_described(f"results[{label!r}]", ok, _short(runs),
                        "a non-empty list of continual_metrics dicts, one per seed")
        cells = []
        for _, key in _TABLE_COLUMNS:
            values = [r.get(key) for r in runs]
            values = [_NAN if v is None else float(v) for v in values]
            cells.append(_mean_std(values))
        escaped = str(label).replace("|", "\\|")
        lines.append(f"| {escaped} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines) + "\n"
