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
    fig = plt.figure(figsize=(11, 4.5), constrained_layout=True)
    ax = fig.add_subplot(1, 2, 1)
    filled = ax.contourf(A, B, loss, levels=levels, cmap="viridis")
    ax.contour(A, B, loss, levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(filled, ax=ax, label=label)
    ax.plot([0.0], [0.0], marker="*", color="red", ms=10)
    ax.set(xlabel="α (direction 1)", ylabel="β (direction 2)", title=f"contour ({result.space})")
    ax3 = fig.add_subplot(1, 2, 2, projection="3d")
    ax3.plot_surface(A, B, loss, cmap="viridis", linewidth=0, antialiased=True)
    ax3.set(xlabel="α", ylabel="β", zlabel=label, title="surface")
    return _save(fig, path, title)


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
    method's step statistics (‖g‖, ‖ε‖, sharpness, cosine), from a :class:`TrainingLog`."""
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


def plot_interpolations(results: dict[str, Any], path: PathLike, title: Optional[str] = None,
                        log: bool = True) -> str:
    """Several :class:`~.landscape.Interpolation` curves in one figure (name → result), e.g. from
    an SGD minimum (t = 0) to each flat-minima method's minimum (t = 1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, r in results.items():
        ax.plot(r.ts, r.loss, lw=1.6, label=f"{name} (‖Δθ‖ = {r.distance:.3g})")
    for t in (0.0, 1.0):
        ax.axvline(t, color="grey", lw=0.8, ls=":")
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="t  (θ(t) = (1 − t)·θ_a + t·θ_b)", ylabel="loss", title="linear interpolation between minima")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)
