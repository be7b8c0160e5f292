"""The experiment runner's bookkeeping: units, resuming, TensorBoard, continual summaries and the
HTML report. :func:`flatminima.experiment.run_experiment` drives it.

A *unit* is one training run: (method label, seed) or, for a continual experiment, (method label,
seed, strategy, task order). Each finished unit is written atomically to ``runs/<unit id>.json``
with a *fingerprint*: a hash of every config value that shapes its result (not the output folder,
the device spec, the lists of seeds/methods/strategies/orders, nor the reporting switches). A
restarted run loads every unit whose file holds the same fingerprint and passes the record checks
(:mod:`flatminima._records`; its checkpoint too, where the run needs one) and trains the others,
saying why for a file it does not trust, so a killed run continues from its last finished unit and
ends with the same tables.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ._extras import install_hint
from ._files import load_state_dict, write_json, write_text
from ._records import record_problem
from .core.validation import check

#: Config fields that do not change a unit's result.
_NOT_IN_FINGERPRINT = ("out_dir", "device", "seeds", "methods", "save_models", "tensorboard", "name")


@dataclass(frozen=True)
class Unit:
    label: str
    seed: int
    strategy: Optional[str] = None
    order: Optional[tuple] = None
    order_name: Optional[str] = None

    @property
    def id(self) -> str:
        """``<label>_seed<s>`` or ``<label>_<strategy>_<order>_seed<s>`` (the run file's name)."""
        parts = [self.label] + [p for p in (self.strategy, self.order_name) if p]
        return "_".join(parts) + f"_seed{self.seed}"


def record_group(record: dict[str, Any]) -> str:
    """The row a run is averaged into: its method, and its strategy in a continual run."""
    return record["method"] if record.get("strategy") is None else f"{record['method']} / {record['strategy']}"


def plan_units(config, sequence=None) -> list[Unit]:
    """Every unit of ``config``, seed-major (methods interleave in time, so a partial run has every
    method at its first seeds), then task order, strategy and method."""
    labels = list(config.expanded_methods())
    if config.continual is None:
        return [Unit(label, seed) for seed in config.seeds for label in labels]
    from .continual.train import ContinualSettings, order_name

    settings = ContinualSettings.from_dict(config.continual)
    units = []
    for seed in config.seeds:
        for order in settings.order_list(sequence):
            name = order_name(sequence, order)
            for strategy in settings.strategies:
                units += [Unit(label, seed, strategy, tuple(order), name) for label in labels]
    return units


def fingerprint(config, unit: Unit) -> str:
    values = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    values["method"] = config.expanded_methods()[unit.label]
    values["unit"] = [unit.label, unit.seed, unit.strategy, list(unit.order) if unit.order else None]
    if values.get("continual"):
        continual = dict(values["continual"])
        continual["strategy_options"] = continual.get("strategy_options", {}).get(unit.strategy, {})
        continual.pop("strategies", None)
        continual.pop("orders", None)
        values["continual"] = continual
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_finished(config, units: Sequence[Unit], runs: Path, checkpoint: Callable[[Unit], Optional[Path]],
                  model_shapes: Callable[[], dict[str, tuple]],
                  log: Callable[[str], None]) -> dict[Unit, Optional[dict]]:
    """The trusted record of every unit (None: to train). A file is trusted when it parses, holds
    the unit's fingerprint and passes :func:`~flatminima._records.record_problem`, and the
    unit's checkpoint (``checkpoint(unit)``, where one is needed) loads and fits the model
    (``model_shapes()``, built once). A file with another fingerprint is another config's: it is
    trained again silently; any other problem is logged, one line per unit, before retraining."""
    finished: dict[Unit, Optional[dict]] = {}
    shapes = None
    for unit in units:
        finished[unit] = None
        path = runs / f"{unit.id}.json"
        if not path.exists():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log(f"redoing {unit.id}: {path.name} does not read as JSON ({type(exc).__name__})")
            continue
        if not isinstance(record, dict) or record.get("fingerprint") != fingerprint(config, unit):
            continue
        problem = record_problem(record, unit)
        pt = checkpoint(unit)
        if problem is None and pt is not None:
            try:
                state = load_state_dict(pt)
                shapes = model_shapes() if shapes is None else shapes
                check("checkpoint", {k: tuple(v.shape) for k, v in state.items()} == shapes, str(pt),
                      "the state dict of this config's model")
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            log(f"redoing {unit.id}: {problem}")
            continue
        finished[unit] = record
    return finished


# --------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoard:
    """Scalars per unit under ``<out>/tensorboard/<unit id>`` (``torch.utils.tensorboard``, which
    needs the ``tensorboard`` package): the per-step training loss, test accuracy and loss at every
    evaluation, and for continual units the accuracy on every task after every task. ``enabled``:
    None writes when tensorboard is installed; True without it is an error."""

    def __init__(self, out: Path, enabled: Optional[bool]):
        self.out, self.writer_class = out, None
        if enabled is False:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            check("tensorboard", not enabled, enabled,
                  f"null or false: the tensorboard package is not installed ({install_hint('tensorboard')})")
            return
        self.writer_class = SummaryWriter

    @property
    def enabled(self) -> bool:
        return self.writer_class is not None

    def write(self, unit: Unit, record: dict[str, Any]) -> None:
        if self.writer_class is None:
            return
        writer = self.writer_class(str(self.out / "tensorboard" / unit.id))
        try:
            parts = record.get("per_task") or [record]
            offset = 0
            for j, part in enumerate(parts):
                prefix = f"task{j}/" if "per_task" in record else ""
                curves = part["curves"]
                for step, loss in enumerate(curves["train_loss"]):
                    writer.add_scalar(f"{prefix}train_loss", loss, offset + step + 1)
                for step, acc, loss in zip(curves["eval_step"], curves["test_acc"], curves["test_loss"]):
                    writer.add_scalar(f"{prefix}test_acc", acc, offset + step)
                    writer.add_scalar(f"{prefix}test_loss", loss, offset + step)
                offset += len(curves["train_loss"])
            for scenario, matrix in record.get("accuracy", {}).items():
                for j, row in enumerate(matrix):
                    for i, acc in enumerate(row):
                        writer.add_scalar(f"{scenario}_accuracy/on_{record['tasks'][i]}", acc, j)
            for key, value in record["final"].items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(f"final/{key}", value, 0)
        finally:
            writer.close()


# --------------------------------------------------------------------------------------------
# continual summaries


def _by_group(records: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(record_group(r), []).append(r)
    return groups


def continual_tables(records: Sequence[dict], reference_time: Optional[float]) -> str:
    """Markdown: the continual metrics per method × strategy (mean ± std over seeds and task
    orders) in the training scenario, the other scenario when there is one, the top Hessian
    eigenvalue after each task, and the time per step."""
    from .continual.metrics import format_metrics_table
    from .experiment import _mean_std

    groups = _by_group(records)
    scenario = records[0]["scenario"]
    parts = [f"Continual metrics ({scenario}-incremental, in %; mean ± std over seeds × orders):\n\n"
             + format_metrics_table({g: [_nan(r["metrics"][scenario]) for r in rs] for g, rs in groups.items()})]
    others = [s for s in records[0]["metrics"] if s != scenario]
    for other in others:
        parts.append(f"The same models evaluated {other}-incremental:\n\n"
                     + format_metrics_table({g: [_nan(r["metrics"][other]) for r in rs] for g, rs in groups.items()}))
    spaces = [s for s in records[0].get("lambda_max", {}) if records[0]["lambda_max"][s]]
    tasks = records[0]["tasks"]
    for space in spaces:
        lines = ["| method / strategy | " + " | ".join(f"after {t}" for t in tasks) + " |",
                 "|---" * (len(tasks) + 1) + "|"]
        for g, rs in groups.items():
            cells = []
            for j in range(len(tasks)):
                mean, std = _mean_std([r["lambda_max"][space][j] for r in rs])
                cells.append(f"{mean:.4g} ± {std:.2g}")
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        parts.append(f"Top Hessian eigenvalue ({space} parameters) on the task just learned:\n\n" + "\n".join(lines))
    lines = ["| method / strategy | ms/step | time/step vs reference |", "|---|---|---|"]
    for g, rs in groups.items():
        mean, _ = _mean_std([r["final"]["time_per_step_s"] for r in rs])
        ratio = mean / reference_time if reference_time else math.nan
        lines.append(f"| {g} | {1000 * mean:.1f} | {ratio:.2f} |")
    parts.append("Training time:\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def _nan(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (math.nan if v is None else v) for k, v in metrics.items()}


def mean_matrices(records: Sequence[dict], scenario: str) -> dict[str, list[list[float]]]:
    """Per method × strategy, the accuracy matrix averaged over seeds and orders — orders averaged
    by task *position* (row j, column i: the i-th task of the order after its j-th)."""
    out = {}
    for g, rs in _by_group(records).items():
        mats = [r["accuracy"][scenario] for r in rs]
        T = len(mats[0])
        out[g] = [[sum(m[j][i] for m in mats) / len(mats) for i in range(T)] for j in range(T)]
    return out


def figures_skipped(exc: ImportError) -> str:
    """The one line said when a figure library is missing, with the extra that brings it."""
    hint = "" if "pip install" in str(exc) else f"; {install_hint('plots')}"
    return f"figures not written ({exc}{hint})"


def write_continual_figures(out: Path, records: Sequence[dict], log: Callable[[str], None]) -> list[Path]:
    """Accuracy matrices (CSV/JSON/PNG per method × strategy, mean over seeds), and the curves of
    average accuracy on the tasks seen so far and of λ_max after each task."""
    from .continual.metrics import save_accuracy_matrix
    from .plots import plot_continual

    scenario = records[0]["scenario"]
    single_order = len({tuple(r["order"]) for r in records}) == 1
    names = records[0]["tasks"] if single_order else [f"task {i + 1}" for i in range(len(records[0]["tasks"]))]
    figures = []
    for g, matrix in mean_matrices(records, scenario).items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in g.replace(" / ", "__"))
        paths = save_accuracy_matrix(matrix, out / "matrices", name=safe, task_names=names,
                                     extra={"group": g, "scenario": scenario, "averaged_over": len(_by_group(records)[g])})
        if "png" in paths:
            figures.append(paths["png"])
    try:
        figures.insert(0, plot_continual(records, out / "continual.png"))
    except ImportError as exc:
        log(figures_skipped(exc))
    return figures


# --------------------------------------------------------------------------------------------
# the HTML report


def write_config(out: Path, config) -> Path:
    """``config.yaml`` (``config.json`` without PyYAML): the experiment's config, runnable as is."""
    try:
        import yaml
    except ImportError:
        return write_json(out / "config.json", config.to_dict(), indent=1)
    return write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


def write_report(out: Path, config, table: str, extra_tables: Sequence[tuple[str, str]],
                 figures: Sequence[Path], notes: str = "") -> Path:
    """``report.html``: one self-contained page with the results tables, every figure and the
    configuration."""
    from .htmlreport import Section, table_from_markdown, write_html_report

    def tables(markdown: str) -> list:
        # A block may hold several tables separated by text: parse each.
        found, current = [], []
        for line in markdown.splitlines() + [""]:
            if line.strip().startswith("|"):
                current.append(line)
            elif current:
                found.append(table_from_markdown("\n".join(current)))
                current = []
        return found

    sections = [Section("Results", text=notes, tables=tables(table))]
    for title, markdown in extra_tables:
        if markdown:
            prose = "\n".join(line for line in markdown.splitlines() if line and not line.startswith("|"))
            sections.append(Section(title, text=prose, tables=tables(markdown)))
    sections.append(Section("Figures", figures=[f for f in figures if Path(f).is_file()]))
    sections.append(Section("Configuration", text=f"The exact configuration of this experiment; "
                            f"`flatminima run {out / 'config.yaml'}` runs it again (finished units are loaded).",
                            details=config.to_dict()))
    title = f"{config.name}: {config.task} / {config.model}"
    subtitle = f"{len(config.seeds)} seed(s), {config.epochs} epoch(s)" + (" per task" if config.continual else "")
    return write_html_report(out / "report.html", title, sections, subtitle=subtitle)
