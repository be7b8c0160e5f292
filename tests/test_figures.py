"""The experiment's figures, read back from their matplotlib artists: one colour per method across
every figure, non-finite interpolation points marked and counted, every evaluation in view, the
continual curves told apart and their tasks named, the 2-D landscape's labels apart."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.colors import to_hex  # noqa: E402

from flatminima.diagnostics import plots as diagnostic_plots  # noqa: E402
from flatminima.diagnostics.landscape import Interpolation, Landscape  # noqa: E402
from flatminima.experiment import flatness_figures, plots  # noqa: E402

METHODS = ["sgd", "sam", "asam"]
TASKS = ["classes 0-1", "classes 2-3", "classes 4-5"]


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the plot functions save, kept open to read its artists."""
    import matplotlib.pyplot as plt

    close, figures = plt.close, []
    monkeypatch.setattr(plt, "close", lambda *_: None)  # the artists stay readable
    for module, name in ((plots, "save_figure"), (flatness_figures, "save_figure"), (diagnostic_plots, "_save")):
        def keep(fig, *args, save=getattr(module, name)):
            figures.append(fig)
            return save(fig, *args)
        monkeypatch.setattr(module, name, keep)
    yield figures
    for fig in figures:
        close(fig)


def _record(method, seed, evals=3, acc0=0.1):
    steps = 30
    return {"method": method, "seed": seed, "registry_name": "base" if method == "sgd" else method,
            "curves": {"train_loss": [2.0 / (1 + 0.1 * s) + 0.01 * seed for s in range(steps)],
                       "eval_step": list(np.linspace(0, steps, evals).astype(int)),
                       "test_acc": [acc0] + [0.8 + 0.05 * k / evals + 0.01 * seed for k in range(1, evals)]},
            "final": {"test_acc": 0.85, "train_loss": 0.6, "test_loss": 0.5, "time_per_step_s": 0.01,
                      "train_time_s": 0.3},
            "diagnostics": {"summary": {"lambda_max": 10.0 - METHODS.index(method) + seed, "trace": 90.0 + seed}}}


def _continual_record(method, strategy, seed):
    T = len(TASKS)
    acc = [[0.9 if i <= j else 0.5 for i in range(T)] for j in range(T)]  # equal for every group: overlapping
    return {"method": method, "seed": seed, "strategy": strategy, "scenario": "task", "tasks": TASKS,
            "order": TASKS, "registry_name": "base" if method == "sgd" else method,
            "accuracy": {"task": acc}, "lambda_max": {"lora": [1.0, 2.0, 3.0]}}


def _lines(ax):
    return {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_one_method_one_colour_in_every_figure(tmp_path, drawn):
    colours = plots.method_colours(METHODS)
    assert colours == {"sgd": "#1f77b4", "sam": "#ff7f0e", "asam": "#2ca02c"}
    assert plots.method_colours(["x"], colours)["x"] == "#d62728"  # a new label takes the next free colour
    records = [_record(m, s) for s in (0, 1) for m in METHODS]
    plots.plot_learning_curves(records, tmp_path / "curves.png", colours=colours)
    plots.plot_sharpness(records, tmp_path / "sharpness.png", colours=colours)
    curve = Interpolation(ts=np.linspace(0, 1, 5), loss=np.ones(5), metric=None, distance=1.0, buffers="a")
    diagnostic_plots.plot_interpolations({"sam": curve, "asam": curve}, tmp_path / "interp.png", colours=colours)
    continual = [_continual_record(m, s, 0) for s in ("seq-lora", "o-lora") for m in METHODS[:2]]
    plots.plot_continual(continual, tmp_path / "continual.png", colours=colours)
    curves, sharpness, interp, cont = drawn
    loss, acc = curves.axes[:2]
    assert _lines(loss) == _lines(acc) == {f"{m} (2 seeds)": colours[m] for m in METHODS}
    for ax in sharpness.axes:  # one bar per method, in its colour
        assert [to_hex(p.get_facecolor(), keep_alpha=False) for p in ax.patches] == [colours[m] for m in METHODS]
    # SAM is not the first colour just because the reference is left out of this figure
    assert {k.split(" ")[0]: v for k, v in _lines(interp.axes[0]).items()} == {"sam": colours["sam"],
                                                                              "asam": colours["asam"]}
    for ax in [a for a in cont.axes if a.get_visible()]:
        lines = {c.get_label(): to_hex(c.lines[0].get_color()) for c in ax.containers}
        assert lines == {f"{m} / {s}": colours[m] for s in ("seq-lora", "o-lora") for m in METHODS[:2]}


def test_nonfinite_interpolation_points_are_marked_and_counted(tmp_path, drawn):
    ts = np.linspace(-0.5, 1.5, 21)
    loss = np.linspace(0.5, 0.7, 21)
    loss[[18, 20]] = [np.nan, np.inf]
    results = {"sam": Interpolation(ts, loss, None, 0.26, "a"),
               "asam": Interpolation(ts, np.linspace(0.5, 0.6, 21), None, 0.2, "a")}
    assert diagnostic_plots.nonfinite_points(results) == {"sam": [pytest.approx(1.3), pytest.approx(1.5)]}
    diagnostic_plots.plot_interpolations(results, tmp_path / "interp.png", colours={"sam": "#ff7f0e"})
    ax = drawn[0].axes[0]
    marks = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(marks) == 1 and to_hex(marks[0].get_color()) == "#ff7f0e"
    assert list(marks[0].get_xdata()) == pytest.approx([1.3, 1.5]) and list(marks[0].get_ydata()) == [1.0, 1.0]
    (x, y), = marks[0].get_transform().transform([[1.3, 1.0]])
    assert y == pytest.approx(ax.transAxes.transform([[0.0, 1.0]])[0][1])  # on the top edge, at its t
    assert x == pytest.approx(ax.transData.transform([[1.3, 0.6]])[0][0])
    assert not marks[0].get_clip_on()
    labels = [t.get_text() for t in ax.get_legend().texts]
    assert labels == ["sam (‖Δθ‖ = 0.26); 2 of 21 points not finite (×)", "asam (‖Δθ‖ = 0.2)"]
    caption = plots.interpolation_caption(results, "sgd", 0, 256)
    assert "2 of 42 points are not finite (NaN or ±inf): sam at t = 1.3, 1.5." in caption
    assert "first 256 test examples" in caption
    assert plots.interpolation_caption({"asam": results["asam"]}, "sgd", 0).endswith("All 21 points are finite.")


def test_every_test_accuracy_evaluation_is_in_view(tmp_path, drawn):
    records = [_record(m, 0, evals=3, acc0=0.08) for m in METHODS[:2]]
    plots.plot_learning_curves(records, tmp_path / "curves.png")
    acc = drawn[0].axes[1]
    low, high = acc.get_ylim()
    for line in acc.get_lines():
        x, y = line.get_xdata(), line.get_ydata()
        assert len(x) == 3 and line.get_marker() == "o"
        assert low < min(y) and max(y) < high  # the first point (8 %, step 0) too: no segment cut off
        assert acc.get_xlim()[0] <= 0 == x[0]


def test_a_wide_loss_band_keeps_the_log_axis_readable_and_train_accuracy_is_dashed(tmp_path, drawn):
    """Seeds far apart (std above the mean) must not stretch the log axis to 1e-12; with eval_train
    each method's training-set accuracy is drawn dashed beside its test accuracy."""
    records = [_record("sgd", s) for s in range(3)]  # one seed 100× the others: std above the mean
    records[2]["curves"]["train_loss"] = [v * 100 for v in records[2]["curves"]["train_loss"]]
    for r in records:
        r["curves"]["train_acc"] = [0.1, 0.6, 0.99]
    plots.plot_learning_curves(records, tmp_path / "curves.png")
    loss, acc = drawn[0].axes
    lowest_mean = min(min(line.get_ydata()) for line in loss.get_lines())
    assert loss.get_ylim()[0] > lowest_mean / 20
    dashed = [line for line in acc.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == pytest.approx([10.0, 60.0, 99.0])
    assert "dashed: train" in acc.get_title()


def test_continual_curves_are_told_apart_and_tasks_named(tmp_path, drawn):
    records = [_continual_record(m, s, seed) for seed in (0, 1) for s in ("seq-lora", "o-lora") for m in ("sgd", "sam")]
    plots.plot_continual(records, tmp_path / "continual.png")
    fig = drawn[0]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3 and axes[0].get_title() == "average accuracy on the tasks seen"
    for ax in axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == TASKS
        lines = [c.lines[0] for c in ax.containers]
        xs = [tuple(np.round(line.get_xdata(), 6)) for line in lines]
        assert len(lines) == 4 and len(set(xs)) == 4  # the same values, each drawn at its own offset
        styles = {(line.get_marker(), line.get_linestyle()) for line in lines}
        assert styles == {("o", "-"), ("s", "--")}
        assert ax.get_legend() is None  # the legend sits below the panels, over no curve
    assert [t.get_text() for t in fig.legends[0].texts] == ["sgd / seq-lora", "sam / seq-lora", "sgd / o-lora",
                                                          "sam / o-lora"]
    assert plots.task_labels(records) == TASKS
    shuffled = records + [{**records[0], "order": TASKS[::-1], "tasks": TASKS[::-1]}]
    assert plots.task_labels(shuffled) == ["task 1", "task 2", "task 3"]  # several orders: by position


def _overlapping(boxes):
    return [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


def test_landscape_2d_labels_do_not_overlap(tmp_path, drawn):
    alphas = betas = np.linspace(-1, 1, 21)
    A, B = np.meshgrid(alphas, betas, indexing="ij")
    loss = 0.3 + (A - 0.2) ** 2 + 2 * B ** 2 + 0.3 * A * B
    result = Landscape(alphas=alphas, betas=betas, loss=loss, metric=None, clean_loss=0.34, clean_metric=None,
                       space="trainable", one_d="filter", orthogonalized=True, direction_norms=np.ones(2),
                       cosine=0.0, seed=0)
    diagnostic_plots.plot_landscape(result, tmp_path / "two.png", log=True)
    fig = drawn[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    contour, surface = fig.axes[0], fig.axes[2]
    labels = [t for t in contour.texts if t.get_text()]
    assert 2 <= len(labels) and not _overlapping([t.get_window_extent(renderer) for t in labels])
    # The surface: at most four ticks per axis in view, in a small font (matplotlib's default nine
    # ran into each other and into the next axis's labels; 3-D labels have no reliable extent to compare).
    for axis in (surface.xaxis, surface.yaxis, surface.zaxis):
        low, high = sorted(axis.get_view_interval())
        ticks = [t for t, at in zip(axis.get_ticklabels(), axis.get_majorticklocs()) if low <= at <= high]
        assert 2 <= len(ticks) <= 4 and all(t.get_fontsize() == 7 for t in ticks), [t.get_text() for t in ticks]
    assert math.isclose(fig.get_size_inches()[0], 11.5)
