"""Figures for the diagnostics. matplotlib is an optional extra: it is imported
when a figure is drawn (Agg backend unless one is already chosen), never by the library itself.

Each function takes a result of :mod:`flatminima.diagnostics` and a path, writes a PNG (or any
format matplotlib infers from the suffix) and returns the path.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np

from .._extras import require

PathLike = Union[str, os.PathLike]


def _pyplot():
    matplotlib = require("matplotlib", "plots", "flatminima.diagnostics.plots")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: PathLike, title: Optional[str]) -> str:
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return os.fspath(path)


def _metric_axis(ax, x, metric, label: str = "metric"):
    """The metric on a twin y-axis (dashed), when there is one."""
    if metric is None:
        return
    twin = ax.twinx()
    twin.plot(x, metric, color="tab:orange", ls="--", lw=1.5, label=label)
    twin.set_ylabel(label, color="tab:orange")


def plot_landscape(result: Any, path: PathLike, title: Optional[str] = None, log: bool = False,
                   levels: int = 30) -> str:
    """A :class:`~.landscape.Landscape`: the 1-D curve ``L(w + α·d)`` (metric on a twin axis), or
    for a 2-D slice a contour plot and a 3-D surface side by side (Li et al. 2018; m-RWP Fig. A6).
    ``log``: plot ``log10`` of the loss (sharp basins span decades)."""
    plt = _pyplot()
    loss = np.log10(np.maximum(result.loss, 1e-12)) if log else np.asarray(result.loss)
    label = "log10 loss" if log else "loss"
    if result.betas is None:
        fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
        ax.plot(result.alphas, loss, color="tab:blue", lw=1.8, marker="o", ms=3)
        ax.axvline(0.0, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="α (filter-normalized direction)", ylabel=label, title=f"1-D slice ({result.space})")
        ax.grid(True, alpha=0.3)
        _metric_axis(ax, result.alphas, result.metric)
        return _save(fig, path, title)
    A, B = np.meshgrid(result.alphas, result.betas, indexing="ij")
    fig = plt.figure(figsize=(11.5, 4.8), constrained_layout=True)
    ax = fig.add_subplot(1, 2, 1)
    filled = ax.contourf(A, B, loss, levels=levels, cmap="viridis")
    # A few labelled contour lines (not every filled level), spaced so their labels do not collide.
    lines = ax.contour(A, B, loss, levels=min(levels, 8), colors="k", linewidths=0.5, negative_linestyles="solid")
    ax.clabel(lines, lines.levels[::2], inline=True, inline_spacing=6, fontsize=7, fmt="%.3g")
    fig.colorbar(filled, ax=ax, label=label)
    ax.plot([0.0], [0.0], marker="*", color="red", ms=10)
    ax.set(xlabel="α (direction 1)", ylabel="β (direction 2)", title=f"contour ({result.space})")
    ax3 = fig.add_subplot(1, 2, 2, projection="3d")
    ax3.plot_surface(A, B, loss, cmap="viridis", linewidth=0, antialiased=True)
    _sparse_3d_ticks(ax3)
    ax3.set_xlabel("α", labelpad=2)
    ax3.set_ylabel("β", labelpad=2)
    ax3.set_zlabel(label, labelpad=6)
    ax3.set_title("surface")
    ax3.set_box_aspect(None, zoom=0.92)  # room for the z label inside the axes
    return _save(fig, path, title)


def _sparse_3d_ticks(ax) -> None:
    """At most four ticks per axis of a 3-D plot, in a small font: their labels do not overlap."""
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(4))
    ax.tick_params(labelsize=7, pad=0)


def plain_log_ticks(ax, values: np.ndarray) -> None:
    """Plain tick labels on a log y axis (``0.6``, not ``6×10⁻¹``), enough of them whatever the
    span of ``values`` (positive, finite): the minor ticks labelled too within a decade, ticks at
    1, 2 and 5 × 10ᵏ over up to 2.5 decades, the decades beyond."""
    from matplotlib import ticker

    plain = ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
    decades = float(np.log10(values.max() / values.min())) if len(values) else 0.0
    if 1 <= decades < 2.5:
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if decades < 1 else ticker.NullFormatter())


def plot_interpolation(result: Any, path: PathLike, title: Optional[str] = None) -> str:
    """An :class:`~.landscape.Interpolation`: loss along ``(1 − t)·θ_a + t·θ_b`` with the endpoints
    marked (metric on a twin axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    ax.plot(result.ts, result.loss, color="tab:blue", lw=1.8, marker="o", ms=3, label="loss")
    for t, name in ((0.0, "θ_a"), (1.0, "θ_b")):
        ax.axvline(t, color="grey", lw=0.8, ls=":")
        ax.annotate(name, (t, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom")
    ax.set(xlabel="t", ylabel="loss", title=f"linear interpolation (‖θ_b − θ_a‖ = {result.distance:.3g})")
    ax.grid(True, alpha=0.3)
    _metric_axis(ax, result.ts, result.metric)
    return _save(fig, path, title)


def plot_perturbation_curve(result: Any, path: PathLike, title: Optional[str] = None) -> str:
    """A :class:`~.robustness.PerturbationCurve` (m-RWP Fig. A1): perturbed loss against ``‖ε‖₂`` on
    a log axis, random (mean ± standard error) and adversarial."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    keep = result.radii > 0  # a log axis has no room for radius 0
    r, mean = result.radii[keep], result.random_loss[keep]
    err = np.nan_to_num(result.random_stderr[keep])
    ax.plot(r, mean, color="tab:blue", marker="o", ms=3, label="random (RWP)")
    ax.fill_between(r, mean - err, mean + err, color="tab:blue", alpha=0.25, lw=0)
    ax.plot(r, result.adversarial_loss[keep], color="tab:red", marker="s", ms=3, label="adversarial (AWP)")
    ax.axhline(result.clean_loss, color="grey", lw=0.8, ls=":", label="clean")
    ax.set(xscale="log", xlabel="perturbation radius ‖ε‖₂", ylabel="E[L(w + ε)]", title="loss under perturbation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)


def plot_shift_trial(result: Any, path: PathLike, title: Optional[str] = None) -> str:
    """A :class:`~.shift.ShiftTrial` (GA-SAM Fig. 1): training, test and shifted training loss along
    the line from the training minimum (t = 0) to the test minimum (t = 1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    ax.plot(result.ts, result.train_loss, lw=1.8, label="training loss L(w; D)")
    ax.plot(result.ts, result.test_loss, lw=1.8, label="test loss L(w; D*)")
    ax.plot(result.ts, result.shifted_train_loss, lw=1.5, ls="--", label="shifted training loss L(w − δ; D) + C")
    for t in (0.0, 1.0):
        ax.axvline(t, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="t  (θ(t) = (1 − t)·θ + t·θ*)", ylabel="loss",
           title=f"distribution shift (‖δ‖ = {result.delta_norm:.3g})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)


def plot_shift_strength(result: Any, path: PathLike, title: Optional[str] = None) -> str:
    """A :class:`~.shift.ShiftStrength` (GA-SAM Fig. 2): ``‖δ_η‖₂`` against ``η`` with the fitted
    line through the origin."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    ax.scatter(result.etas, result.delta_norms, s=14, label="‖δ_η‖₂")
    x = np.linspace(0.0, max(1.0, float(np.max(result.etas))), 50)
    ax.plot(x, result.slope * x, color="tab:red", lw=1.2, label=f"{result.slope:.3g}·η (r² = {result.r2:.3f})")
    ax.set(xlabel="mixing ratio η", ylabel="‖δ‖₂", title="corruption strength vs shift strength")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)


def plot_training_log(log: Any, path: PathLike, title: Optional[str] = None) -> str:
    """Per-layer gradient norms over training (heatmap, log10; GA-SAM Figs. 4–5) beside the
    method's step statistics (‖g‖, ‖ε‖, sharpness, cosine), from a
    :class:`~flatminima.diagnostics.training.TrainingLog`."""
    plt = _pyplot()
    stats = {k: v for k, v in log.statistics.items() if any(x is not None for x in v)}
    fig, axes = plt.subplots(1, 2 if stats else 1, figsize=(12 if stats else 6.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    norms = np.array(log.grad_norms, dtype=float).T  # layers × steps
    with np.errstate(divide="ignore", invalid="ignore"):
        image = ax.imshow(np.log10(norms), aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(log.steps[0] - 0.5, log.steps[-1] + 0.5, len(log.layer_names) - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label="log10 ‖∇_layer L‖")
    if len(log.layer_names) <= 30:
        ax.set_yticks(range(len(log.layer_names)), log.layer_names, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title("gradient norm per layer")
    if stats:
        ax = axes[0, 1]
        for key, values in sorted(stats.items()):
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(log.steps, y, label=key)
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=7)
        ax.set_title("step statistics")
    fig.tight_layout()
    return _save(fig, path, title)


def plot_density(result: Any, path: PathLike, title: Optional[str] = None) -> str:
    """A :class:`~.hessian.SpectralDensity`: the SLQ density of the Hessian spectrum on a log axis
    (the bulk near 0 and the outliers span decades), with the Ritz nodes as a rug."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    ax.semilogy(result.grid, np.maximum(result.density, 1e-12), color="tab:blue", lw=1.5)
    nodes = result.nodes[result.weights > 0]
    ax.plot(nodes, np.full_like(nodes, 1e-12 if not len(result.density) else max(result.density.min(), 1e-12)),
            "|", color="tab:red", ms=10, alpha=0.6)
    ax.set(xlabel="eigenvalue", ylabel="density", title=f"Hessian spectral density (SLQ, {result.numel:,} params)")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path, title)


def plot_batch_eigenvalues(results: dict[str, Any], path: PathLike, title: Optional[str] = None) -> str:
    """The dominant Hessian eigenvalue per evaluation batch as a distribution:
    one histogram per entry of ``results`` (name → :class:`~.hessian.BatchEigenvalues`) with its
    median, min and max."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    values = [np.asarray(r.values, dtype=float) for r in results.values()]
    bins = np.histogram_bin_edges(np.concatenate(values), bins=min(30, max(5, sum(map(len, values)) // 2)))
    for name, v in zip(results, values):
        patch = ax.hist(v, bins=bins, alpha=0.45, label=f"{name}: median {np.median(v):.3g} [{v.min():.3g}, {v.max():.3g}]")
        ax.axvline(np.median(v), color=patch[2][0].get_facecolor(), lw=1.5)
    ax.set(xlabel="λ_max on one batch", ylabel="batches", title="dominant Hessian eigenvalue per batch")
    ax.legend(fontsize="small")
    return _save(fig, path, title)


def nonfinite_points(results: dict[str, Any]) -> dict[str, list[float]]:
    """Per curve of ``results`` (name → :class:`~.landscape.Interpolation`), the ``t`` where the
    loss is not finite (NaN, e.g. a diverged model, or ±inf); names without any are left out."""
    out = {}
    for name, r in results.items():
        loss = np.asarray([np.nan if v is None else v for v in r.loss], dtype=float)
        bad = [float(t) for t, v in zip(r.ts, loss) if not np.isfinite(v)]
        if bad:
            out[name] = bad
    return out


def plot_interpolations(results: dict[str, Any], path: PathLike, title: Optional[str] = None,
                        log: bool = True, colours: Optional[dict[str, Any]] = None) -> str:
    """Several :class:`~.landscape.Interpolation` curves in one figure (name → result), e.g. from
    an SGD minimum (t = 0) to each flat-minima method's minimum (t = 1). ``colours``: name →
    matplotlib colour (default: the ``tab10`` colours in order). A point whose loss is not finite
    is not drawn on the curve (a gap) but marked ``×`` on the top edge at its ``t``, and the
    legend counts them (:func:`nonfinite_points`)."""
    plt = _pyplot()
    from matplotlib.transforms import blended_transform_factory

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    top = blended_transform_factory(ax.transData, ax.transAxes)
    bad = nonfinite_points(results)
    finite = np.concatenate([np.asarray([np.nan if v is None else v for v in r.loss], dtype=float)
                             for r in results.values()] or [np.zeros(0)])
    finite = finite[np.isfinite(finite) & (finite > 0)]
    for i, (name, r) in enumerate(results.items()):
        colour = (colours or {}).get(name, f"C{i % 10}")
        loss = np.asarray([np.nan if v is None else v for v in r.loss], dtype=float)
        label = f"{name} (‖Δθ‖ = {r.distance:.3g})"
        if name in bad:
            label += f"; {len(bad[name])} of {len(loss)} points not finite (×)"
        loss[~np.isfinite(loss)] = np.nan
        ax.plot(r.ts, loss, lw=1.6, color=colour, label=label, marker="o", ms=2.5)  # a lone point shows too
        if name in bad:
            ax.plot(bad[name], np.ones(len(bad[name])), transform=top, ls="none", marker="x", ms=7, mew=1.8,
                    color=colour, clip_on=False)
    for t in (0.0, 1.0):
        ax.axvline(t, color="grey", lw=0.8, ls=":")
    if log and len(finite):
        ax.set_yscale("log")
        plain_log_ticks(ax, finite)
    ax.set(xlabel="t  (θ(t) = (1 − t)·θ_a + t·θ_b)", ylabel="loss", title="linear interpolation between minima")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)
