"""What every experiment figure shares: one colour per method, one marker and line style per
continual strategy, user text drawn literally, matplotlib imported on first use (an optional extra,
Agg backend unless one is already chosen), and atomic writes."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from .._extras import install_hint, require
from .._files import atomic_path

#: matplotlib's ``tab10`` colours, the palette of :func:`method_colours`.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
#: Marker and line style per continual strategy (in the config's strategy order).
STRATEGY_STYLES = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1, 1, 1))))


def method_colours(labels: Sequence[str], base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """A colour (``#rrggbb``) per method label: ``base``'s colours kept, then each new label, in
    order, the next colour of :data:`PALETTE` (cycling after ten). Build it once per experiment
    from the config's method order and pass it to every figure, so a method keeps its colour
    whichever methods a figure shows."""
    colours = dict(base or {})
    for label in labels:
        if label not in colours:
            colours[label] = PALETTE[len(colours) % len(PALETTE)]
    return colours


def figures_skipped(exc: ImportError) -> str:
    """The one line said when a figure library is missing, with the extra that brings it."""
    hint = "" if "pip install" in str(exc) else f"; {install_hint('plots')}"
    return f"figures not written ({exc}{hint})"


def plain(text: Any) -> str:
    """``text`` as matplotlib shows it literally: every ``$`` escaped, so no mathtext is parsed."""
    return str(text).replace("$", r"\$")


def pyplot():
    matplotlib = require("matplotlib", "plots", "the experiment figures")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker, for the callers

    return matplotlib, plt


def save_figure(fig, path: os.PathLike | str) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, keep_suffix=True) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


def task_labels(records: Sequence[dict[str, Any]]) -> list[str]:
    """The names of a continual run's tasks, in training order; ``task 1``, ``task 2``, ... when
    the runs trained several orders (averaged by position, the names differ)."""
    if len({tuple(r["order"]) for r in records}) == 1:
        return [str(t) for t in records[0]["tasks"]]
    return [f"task {i + 1}" for i in range(len(records[0]["tasks"]))]
