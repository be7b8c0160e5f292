"""The numbers an experiment reports: means and standard deviations over seeds, as table *data*.

:func:`experiment_tables` turns the unit records into a list of :class:`Table` objects; the Markdown
of ``results.md`` is :meth:`Table.markdown` of each (:func:`tables_markdown`), and the HTML report
renders the same objects. Nothing here reads or writes a file.

How a number is printed (:func:`format_column`): every column has one precision, three significant
digits of the largest magnitude in it (``91.2``, ``0.0123``, ``12345``), and the standard deviation
has the decimals of the mean: ``91.2 ± 0.4``. A column whose largest value is below 0.001 or at
least 100,000 is printed in units of a power of ten named in its title (``λ_max (×10⁵)``: ``1.23``).
A cell over one run shows the value alone (no ``± 0``); a cell where some runs lack the value says
how many it averages, ``(n=2)``; a cell with no value reads ``–``. The standard deviation is the
sample one (``n − 1``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from .. import methods as _methods
from ..continual.flatness import flatness_forgetting_correlation
from ..continual.metrics import average_incremental_accuracy
from .records import DIAGNOSTIC_KEYS, group_records, record_group

#: Headline diagnostics in the flatness table: (``diagnostics.summary`` key, column title).
DIAGNOSTIC_COLUMNS = (("lambda_max", "λ_max"), ("trace", "tr(H)"), ("sharpness", "worst-case sharpness (ρ = 0.05)"),
                      ("average_sharpness", "average sharpness (σ = 0.01)"),
                      ("lambda_max_batch_median", "median λ_max per batch"))

#: The columns of ``results.csv``: one row per method (the rows of :func:`summarize`); a diagnostic's
#: columns are empty where no run measured it.
CSV_FIELDS = ["method", "registry_name", "test_acc_mean", "test_acc_std", "test_loss_mean", "test_loss_std",
              "train_loss_mean", "train_loss_std", "train_acc_mean", "train_acc_std", "memorized_mean", "memorized_std",
              "time_per_step_s_mean", "time_per_step_s_std", "time_ratio",
              *[f"{k}_{s}" for k in DIAGNOSTIC_KEYS for s in ("mean", "std")], "seeds", "hyperparameters"]

_METRIC_COLUMNS = (("ACC", "average_accuracy"), ("LA", "learning_accuracy"), ("BWT", "backward_transfer"),
                   ("forgetting", "forgetting"), ("FWT", "forward_transfer"))
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of a non-empty list (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


@dataclass(frozen=True)
class Cell:
    """One cell. ``text`` is what is printed; a statistic over runs also carries its ``mean``, its
    ``std`` (None over fewer than two values) and ``n``, the number of values behind it; a label
    or a count has only ``text`` (and ``mean`` for a count). ``numeric``: right-aligned."""

    text: str
    mean: Optional[float] = None
    std: Optional[float] = None
    n: Optional[int] = None

    @property
    def numeric(self) -> bool:
        return self.mean is not None or self.text == "–"


@dataclass
class Table:
    """A table of an experiment's results, ready to render.

    * ``key``: a stable identifier (``"results"``, ``"flatness"``, ``"continual_task"``,
      ``"continual_class"``, ``"lambda_max_<space>"``, ``"continual_time"``);
    * ``section``: the report section it belongs to (``"Results"``, ``"Flatness"``, ``"Continual learning"``);
    * ``caption``: the sentence printed before it (may be empty);
    * ``columns``: the column titles, the first one the row label's;
    * ``rows``: one list of :class:`Cell` per row, as many as columns, the label first.

    :meth:`markdown` is the pipe table of ``results.md``; :meth:`to_dict` a JSON-ready copy.
    """

    key: str
    section: str
    caption: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)

    def markdown(self) -> str:
        """The caption, a blank line and the pipe table (numeric columns right-aligned)."""
        numeric = [i > 0 and any(row[i].numeric for row in self.rows) for i in range(len(self.columns))]
        lines = ["| " + " | ".join(_escape(c) for c in self.columns) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(_escape(c.text) for c in row) + " |" for row in self.rows]
        return (f"{self.caption}\n\n" if self.caption else "") + "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_column(means: Sequence[Optional[float]]) -> tuple[int, int]:
    """``(decimals, exponent)`` of a column whose cells have these means: three significant digits
    of the largest finite magnitude, in units of ``10**exponent`` (0 unless that magnitude is below
    0.001 or at least 100,000); ``(2, 0)`` for a column of zeros or no values."""
    finite = [abs(m) for m in means if m is not None and math.isfinite(m) and m != 0]
    if not finite:
        return 2, 0
    top = math.floor(math.log10(max(finite)))
    exponent = top if top >= 5 or top < -3 else 0
    return max(0, 2 - (top - exponent)), exponent


def _number(x: float, decimals: int) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else f"{x:.{decimals}f}"


def stat_cells(columns: Sequence[Sequence[Sequence[float]]], spread: Sequence[bool] = (),
               expected: Sequence[int] = ()) -> tuple[list[list[Cell]], list[int]]:
    """Format a block of statistics: ``columns[c][r]`` holds the values of column ``c``, row ``r``
    (None and NaN already dropped or kept as the caller decides). Returns the cells, indexed
    ``[r][c]``, and each column's exponent (:func:`format_column`). ``spread[c]`` False prints the
    mean alone; ``expected[r]``: the runs of row ``r`` (a cell over fewer says ``(n=k)``)."""
    rows = len(columns[0]) if columns else 0
    out: list[list[Cell]] = [[] for _ in range(rows)]
    exponents = []
    for c, column in enumerate(columns):
        stats = [mean_std(v) if v else None for v in column]
        decimals, exponent = format_column([s[0] for s in stats if s is not None])
        exponents.append(exponent)
        unit = 10.0 ** exponent
        for r, (values, s) in enumerate(zip(column, stats)):
            if s is None:
                out[r].append(Cell("–", n=0))
                continue
            mean, std = s
            show_std = len(values) > 1 and (spread[c] if c < len(spread) else True)
            text = _number(mean / unit, decimals)
            if show_std:
                text += f" ± {_number(std / unit, decimals)}"
            if r < len(expected) and len(values) < expected[r]:
                text += f" (n={len(values)})"
            out[r].append(Cell(text, mean, std if len(values) > 1 else None, len(values)))
    return out, exponents


def _titled(title: str, exponent: int) -> str:
    return title if exponent == 0 else f"{title} (×10{str(exponent).translate(_SUPERSCRIPT)})"


def _table(key: str, section: str, caption: str, label: str, titles: Sequence[str], groups: dict[str, list],
           columns: Sequence[Sequence[Sequence[float]]], spread: Sequence[bool] = (), counts: bool = False,
           expected: Sequence[int] = ()) -> Table:
    cells, exponents = stat_cells(columns, spread, expected)
    heads = [label] + [_titled(t, e) for t, e in zip(titles, exponents)] + (["seeds"] if counts else [])
    rows = [[Cell(g)] + row + ([Cell(str(len(runs)), float(len(runs)))] if counts else [])
            for (g, runs), row in zip(groups.items(), cells)]
    return Table(key, section, caption, heads, rows)


def _finite(values: Sequence[Any]) -> list[float]:
    """Values that are numbers and not NaN (undefined metrics are NaN or None)."""
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def reference_method(records: Sequence[dict]) -> Optional[str]:
    """The group (method, or method / strategy) of the first run of the plain base optimizer: the
    timing reference; None without one."""
    for r in records:
        if _methods.get(r["registry_name"]) is _methods.Base:
            return record_group(r)
    return None


def summarize(records: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): metric means and standard deviations over seeds
    (``train_acc`` and ``memorized`` None where no run evaluated the training set),
    the mean time per step relative to the reference method (NaN without one), and for every
    headline diagnostic some run measured, ``<key>_mean``, ``<key>_std`` and ``<key>_n``."""
    groups = group_records(records)
    ref = reference_method(records)
    ref_time = mean_std([r["final"]["time_per_step_s"] for r in groups[ref]])[0] if ref else math.nan
    measured = [k for k in DIAGNOSTIC_KEYS if any(k in r.get("diagnostics", {}).get("summary", {}) for r in records)]
    rows = []
    for label, runs in groups.items():
        row: dict[str, Any] = {"method": label, "registry_name": runs[0]["registry_name"],
                               "hyperparameters": runs[0]["hyperparameters"], "seeds": [r["seed"] for r in runs]}
        for key in ("test_acc", "test_loss", "train_loss", "time_per_step_s"):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r["final"][key] for r in runs])
        row["time_ratio"] = row["time_per_step_s_mean"] / ref_time
        for key in ("train_acc", "memorized"):  # with eval_train (label noise: memorized)
            values = [r["final"][key] for r in runs if key in r["final"]]
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values) if values else (None, None)
        for key in measured:
            values = [v for r in runs if (v := r.get("diagnostics", {}).get("summary", {}).get(key)) is not None]
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values) if values else (None, None)
            row[f"{key}_n"] = len(values)
        rows.append(row)
    return rows


def results_table(records: Sequence[dict], continual: bool = False) -> Table:
    """The main table: test accuracy (%), with ``eval_train`` the accuracy on the training labels and
    under label noise the share of wrong labels memorized (%), final train loss, time per step
    against the reference method and in ms, and the number of runs, one row per method (× strategy)."""
    groups = group_records(records)
    ref = reference_method(records)
    ref_time = mean_std([r["final"]["time_per_step_s"] for r in groups[ref]])[0] if ref else math.nan
    titles = {"test_acc": "test accuracy (%)", "train_acc": "train accuracy (labels trained on, %)",
              "memorized": "wrong labels memorized (%)", "train_loss": "final train loss"}
    keys = [k for k in titles if k in ("test_acc", "train_loss") or any(k in r["final"] for r in records)]
    final = [[[r["final"][key] * (1.0 if key == "train_loss" else 100.0) for r in runs if key in r["final"]]
              for runs in groups.values()] for key in keys]
    ratio = [[r["final"]["time_per_step_s"] / ref_time for r in runs] for runs in groups.values()]
    ms = [[1000 * r["final"]["time_per_step_s"] for r in runs] for runs in groups.values()]
    caption = "Test accuracy = average accuracy over all tasks after the last one." if continual else ""
    return _table("results", "Results", caption, "method",
                  [titles[k] for k in keys] + [f"time/step vs {ref or 'the base optimizer'}", "ms/step"],
                  groups, final + [ratio, ms], spread=(True,) * len(keys) + (False, False), counts=True)


def flatness_table(records: Sequence[dict], samples: Optional[int] = None) -> Optional[Table]:
    """The headline diagnostics per method, mean ± std over seeds (None when no run has diagnostics)."""
    groups = {g: [r["diagnostics"]["summary"] for r in rs if "diagnostics" in r]
              for g, rs in group_records(records).items()}
    groups = {g: s for g, s in groups.items() if s}
    if not groups:
        return None
    keys = [(k, t) for k, t in DIAGNOSTIC_COLUMNS if any(k in s for runs in groups.values() for s in runs)]
    columns = [[[s[k] for s in runs if s.get(k) is not None] for runs in groups.values()] for k, _ in keys]
    where = f"first {samples} test examples, " if samples else ""
    return _table("flatness", "Flatness", f"Flatness at the end of training ({where}mean ± std over seeds):",
                  "method", [t for _, t in keys], groups, columns, expected=[len(s) for s in groups.values()])


def continual_tables(records: Sequence[dict]) -> list[Table]:
    """The continual metrics per method × strategy (in %, mean ± std over seeds and task orders)
    in the training scenario and every other one evaluated, the top Hessian eigenvalue after each
    task per space, AAA/FAA/forgetting/BWT per evaluation (:func:`continual_summary_table`), the
    time per step, and, when the runs measured per-task flatness, its correlation with forgetting
    (:func:`flatness_forgetting_table`)."""
    groups = group_records(records)
    scenario = records[0]["scenario"]
    tables = []
    for s in [scenario] + [s for s in records[0]["metrics"] if s != scenario]:
        columns = [[_finite([100 * v if v is not None else None for v in (r["metrics"][s][key] for r in runs)])
                    for runs in groups.values()] for _, key in _METRIC_COLUMNS]
        caption = (f"Continual metrics ({s}-incremental, in %; mean ± std over seeds × orders):" if s == scenario
                   else "The same models scored by nearest class mean:" if s == "nme"
                   else f"The same models evaluated {s}-incremental:")
        tables.append(_table(f"continual_{s}", "Continual learning", caption, "label", [c for c, _ in _METRIC_COLUMNS],
                             groups, columns, counts=True, expected=[len(rs) for rs in groups.values()]))
    tasks = records[0]["tasks"]
    for space in [s for s in records[0].get("lambda_max", {}) if records[0]["lambda_max"][s]]:
        columns = [[[r["lambda_max"][space][j] for r in runs] for runs in groups.values()] for j in range(len(tasks))]
        tables.append(_table(f"lambda_max_{space}", "Continual learning",
                             f"Top Hessian eigenvalue ({space} parameters) on the task just learned:",
                             "method / strategy", [f"after {t}" for t in tasks], groups, columns))
    tables.append(continual_summary_table(records))
    ref = reference_method(records)
    ref_time = mean_std([r["final"]["time_per_step_s"] for r in groups[ref]])[0] if ref else math.nan
    ms = [[1000 * r["final"]["time_per_step_s"] for r in runs] for runs in groups.values()]
    ratio = [[r["final"]["time_per_step_s"] / ref_time for r in runs] for runs in groups.values()]
    tables.append(_table("continual_time", "Continual learning", "Training time:", "method / strategy",
                         ["ms/step", "time/step vs reference"], groups, [ms, ratio], spread=(False, False)))
    correlation = flatness_forgetting_table(records)  # its own section, after the continual one
    return tables + ([correlation] if correlation is not None else [])


def evaluations(records: Sequence[dict]) -> list[str]:
    """The evaluations of continual records ("task", "class", "domain", "nme"), the training
    scenario first, then in first-seen order."""
    seen = [records[0]["scenario"]] + [e for r in records for e in r.get("accuracy", {})]
    return [e for e in dict.fromkeys(seen) if any(e in r.get("accuracy", {}) for r in records)]


def _aaa(record: dict, evaluation: str) -> Optional[float]:
    value = record.get("metrics", {}).get(evaluation, {}).get("average_incremental_accuracy")
    if value is None and evaluation in record.get("accuracy", {}):  # older records: from the matrix
        value = average_incremental_accuracy(record["accuracy"][evaluation])
    return value


def continual_summary_table(records: Sequence[dict]) -> Table:
    """AAA, FAA, forgetting and BWT (in %, mean ± std over seeds × orders) per method × strategy and
    evaluation: AAA the average incremental accuracy (iCaRL), FAA the final average accuracy."""
    groups = {f"{g} ({e})": [r for r in runs if e in r.get("metrics", {})]
              for g, runs in group_records(records).items() for e in evaluations(records)}
    groups = {g: runs for g, runs in groups.items() if runs}
    evaluation = {g: g.rsplit(" (", 1)[1][:-1] for g in groups}
    getters = [lambda r, e: _aaa(r, e)] + [lambda r, e, k=k: r["metrics"][e].get(k)
                                          for k in ("average_accuracy", "forgetting", "backward_transfer")]
    columns = [[_finite([None if (v := get(r, evaluation[g])) is None else 100 * v for r in runs])
                for g, runs in groups.items()] for get in getters]
    return _table("continual_summary", "Continual learning", "Average incremental accuracy (AAA), final average "
                  "accuracy (FAA), forgetting and BWT per evaluation (in %; mean ± std over seeds × orders):",
                  "method / strategy (evaluation)", ["AAA", "FAA", "forgetting", "BWT"], groups, columns,
                  counts=True, expected=[len(rs) for rs in groups.values()])


def _interval(value: Optional[float], ci: Optional[Sequence[float]]) -> Cell:
    if value is None:
        return Cell("–", n=0)
    text = f"{value:+.2f}" + ("" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]")
    return Cell(text, value)


def flatness_forgetting_table(records: Sequence[dict], quantity: str = "lambda_max") -> Optional[Table]:
    """Per method × strategy and parameter space, the correlation between λ_max of task i right
    after learning it and its final forgetting
    (:func:`~flatminima.continual.flatness.flatness_forgetting_correlation`, training scenario),
    with bootstrap 95 % CIs over units; None when no record has per-task flatness (older runs)."""
    keys = [k for r in records for k in ((r.get("flatness") or {}).get("quantities") or {})]
    spaces = [k.split("/", 1)[1] for k in dict.fromkeys(keys) if k.startswith(f"{quantity}/")]
    if not spaces:
        return None
    rows = []
    for g, runs in group_records(records).items():
        for space in spaces:
            c = flatness_forgetting_correlation(runs, space, quantity)
            if c["n_units"]:
                rows.append([Cell(f"{g} ({space})"), Cell(str(c["n_units"]), float(c["n_units"])),
                             Cell(str(c["n_points"]), float(c["n_points"])), _interval(c["pearson"], c["pearson_ci"]),
                             _interval(c["spearman"], c["spearman_ci"])])
    if not rows:
        return None
    return Table("flatness_forgetting", "Flatness across tasks", "Correlation between λ_max of each task right after "
                 "learning it and its forgetting at the end (tasks before the last, pooled over seeds × orders; "
                 "[95 % bootstrap CI over units, 1000 resamples]):",
                 ["method / strategy (space)", "units", "points", "Pearson r", "Spearman ρ"], rows)


def experiment_tables(records: Sequence[dict], diagnostics_samples: Optional[int] = None) -> list[Table]:
    """Every table of an experiment's results, in the order of ``results.md``: the main table
    (:func:`results_table`), the flatness table when runs have diagnostics (:func:`flatness_table`),
    and for continual runs :func:`continual_tables`. ``diagnostics_samples`` (the config's) goes
    into the flatness caption."""
    continual = "accuracy" in records[0]
    tables = [results_table(records, continual)]
    flatness = flatness_table(records, diagnostics_samples)
    if flatness is not None:
        tables.append(flatness)
    if continual:
        tables += continual_tables(records)
    return tables


def tables_markdown(tables: Sequence[Table]) -> str:
    """The tables' Markdown (:meth:`Table.markdown`), separated by blank lines."""
    return "\n\n".join(t.markdown() for t in tables)


def mean_matrices(records: Sequence[dict], scenario: str) -> dict[str, list[list[float]]]:
    """Per method × strategy, the accuracy matrix averaged over seeds and orders — orders averaged
    by task *position* (row j, column i: the i-th task of the order after its j-th)."""
    out = {}
    for g, rs in group_records(records).items():
        mats = [r["accuracy"][scenario] for r in rs]
        T = len(mats[0])
        out[g] = [[sum(m[j][i] for m in mats) / len(mats) for i in range(T)] for j in range(T)]
    return out


def mean_flatness(records: Sequence[dict[str, Any]]) -> dict[str, list[list[Optional[float]]]]:
    """Entry-wise mean of the runs' flatness matrices (None where no run has a value)."""
    out: dict[str, list[list[Optional[float]]]] = {}
    for key in dict.fromkeys(k for r in records for k in ((r.get("flatness") or {}).get("quantities") or {})):
        mats = [r["flatness"]["quantities"][key] for r in records if key in (r.get("flatness") or {}).get(
            "quantities", {})]
        T = len(mats[0])
        cells = [[[m[j][i] for m in mats if m[j][i] is not None] for i in range(T)] for j in range(T)]
        out[key] = [[sum(c) / len(c) if c else None for c in row] for row in cells]
    return out
