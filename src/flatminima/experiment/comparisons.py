"""Paired comparisons over seeds: each method against the reference method (the plain base
optimizer) on the seeds both ran, so that the seed-to-seed variation they share cancels.

For a metric with values ``a_s`` (method) and ``b_s`` (reference) on ``n`` common seeds, the
difference ``d_s = a_s − b_s`` has mean ``d̄`` and sample standard deviation ``s_d``; its 95 %
interval is Student's ``d̄ ± t_{0.975, n−1} · s_d / √n`` (the paired t-test at level 0.05 rejects
"no difference" exactly when the interval excludes 0). Flatness measures (λ_max, trace) differ by
orders of magnitude between methods, so they are compared as ratios: the same interval on
``log a_s − log b_s``, exponentiated (a geometric-mean ratio).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from .records import group_records
from .tables import Cell, Table, mean_std, reference_method

#: ``t_{0.975, df}`` for df = 1..30 (two-sided 95 %); beyond, the Cornish–Fisher expansion below.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df >= 1`` degrees of freedom (4 decimals up to 30;
    above, ``z + (z³ + z) / (4 df) + (5z⁵ + 16z³ + 3z) / (96 df²)`` with ``z = 1.95996``, within 1e-4)."""
    if df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``{"n", "mean", "std", "ci"}`` of ``a − b`` over pairs; ``ci`` (the 95 % t-interval) and
    ``std`` are None for fewer than two pairs."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must be non-empty and of one length, got {len(a)} and {len(b)}")
    n = len(a)
    mean, std = mean_std([x - y for x, y in zip(a, b)])
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci": None}
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci": (mean - half, mean + half)}


def verdict(ci: Optional[Sequence[float]]) -> str:
    """"higher" when the interval lies above 0, "lower" below, else "not established"."""
    if ci is None:
        return "not established (one seed)"
    return "higher" if ci[0] > 0 else "lower" if ci[1] < 0 else "not established"


def _final(key: str) -> Callable[[dict], Optional[float]]:
    return lambda r: r["final"].get(key)


def _summary(key: str) -> Callable[[dict], Optional[float]]:
    return lambda r: r.get("diagnostics", {}).get("summary", {}).get(key)


#: The compared metrics: (title, value of a record, "difference" in points of % or "ratio").
METRICS = (("test accuracy", _final("test_acc"), "difference"),
           ("train accuracy", _final("train_acc"), "difference"),
           ("wrong labels memorized", _final("memorized"), "difference"),
           ("λ_max", _summary("lambda_max"), "ratio"),
           ("tr(H)", _summary("trace"), "ratio"))


def _cell(values: list[tuple[float, float]], kind: str) -> tuple[Cell, Optional[dict]]:
    if not values:
        return Cell("–", n=0), None
    if kind == "ratio":
        if any(a <= 0 or b <= 0 for a, b in values):
            return Cell("– (not > 0)", n=0), None
        d = paired_difference([math.log(a) for a, _ in values], [math.log(b) for _, b in values])
        text = f"×{math.exp(d['mean']):.2f}"
        if d["ci"] is not None:
            text += f" [{math.exp(d['ci'][0]):.2f}, {math.exp(d['ci'][1]):.2f}]"
        return Cell(text, math.exp(d["mean"]), n=d["n"]), d
    d = paired_difference([100 * a for a, _ in values], [100 * b for _, b in values])
    text = f"{d['mean']:+.2f}" + ("" if d["ci"] is None else f" [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]")
    return Cell(text, d["mean"], d["std"], d["n"]), d


def _compare(label: str, runs: Sequence[dict], against: str, reference: Sequence[dict]) -> dict[str, Any]:
    by_seed = {r["seed"]: r for r in reference}
    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    row: dict[str, Any] = {"method": label, "reference": against, "seeds": [r["seed"] for r, _ in pairs],
                           "metrics": {}}
    for title, get, kind in METRICS:
        values = [(a, b) for r, q in pairs if (a := get(r)) is not None and (b := get(q)) is not None]
        cell, stats = _cell(values, kind)
        if stats is not None:
            row["metrics"][title] = {"kind": kind, "text": cell.text, **stats}
    return row


def paired_comparisons(records: Sequence[dict], pairs: Sequence[Sequence[str]] = ()) -> list[dict[str, Any]]:
    """Per method other than the reference, then per ``[label, other]`` of ``pairs`` (both methods
    must have run; others are skipped), and per metric both have: the paired statistics
    (:func:`paired_difference`, in points of % or on the log scale for ratios) over common seeds,
    as ``{"method", "reference", "seeds", "metrics": {title: {"kind", "text", "n", "mean", "std",
    "ci"}}}``. Continual records are compared per task by their own tables: none here."""
    if "accuracy" in records[0]:
        return []
    groups = group_records(records)
    ref = reference_method(records)
    out = [_compare(label, runs, ref, groups[ref]) for label, runs in groups.items()
           if ref is not None and label != ref]
    out += [_compare(a, groups[a], b, groups[b]) for a, b in pairs if a in groups and b in groups]
    return out


def paired_table(records: Sequence[dict], pairs: Sequence[Sequence[str]] = ()) -> Optional[Table]:
    """The paired comparisons as a table (None without two common seeds in any): Δ in points of %
    and ratios, each with its 95 % t-interval, and the verdict on test accuracy."""
    rows = [c for c in paired_comparisons(records, pairs) if len(c["seeds"]) >= 2]
    if not rows:
        return None
    titles = [t for t, _, _ in METRICS if any(t in c["metrics"] for c in rows)]
    heads = ["method vs reference", "seeds"] + [f"Δ {t} (pp)" if kind == "difference" else f"{t} ratio"
                                                for t, _, kind in METRICS if t in titles] + ["test accuracy"]
    table_rows = []
    for c in rows:
        cells = [Cell(f"{c['method']} vs {c['reference']}"), Cell(str(len(c["seeds"])), float(len(c["seeds"])))]
        cells += [Cell(c["metrics"][t]["text"], c["metrics"][t]["mean"]) if t in c["metrics"] else Cell("–", n=0)
                  for t in titles]
        acc = c["metrics"].get("test accuracy")
        cells.append(Cell(verdict(acc["ci"]) if acc else "–"))
        table_rows.append(cells)
    ref = reference_method(records)
    against = f"Each method against {ref}" + (", and the pairs asked for," if pairs else "") if ref else "Each pair"
    return Table("paired", "Paired comparison", f"{against} on the same seeds: mean paired "
                 "difference (accuracies, in points of %) or geometric-mean ratio (flatness) [95 % paired "
                 "t-interval]; the verdict says higher or lower only where the interval excludes 0:",
                 heads, table_rows)
