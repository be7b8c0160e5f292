"""The result files of an experiment: ``config.yaml``, ``results.{json,csv,md}``, the figures and the report.

The numbers and tables come from :mod:`.tables`, the provenance summary from :mod:`.provenance`;
this module only writes them.

Wall time: every unit record holds its own wall time (``provenance.wall_time_s``: training,
evaluation, diagnostics, checkpoint), so a resumed experiment reports the time of all its units
whichever invocation trained them (``unit_wall_time_s``, and ``invocations``: how many ``run``
invocations trained them); ``wall_time_s`` is the time of the invocation that wrote the files.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .._files import write_json, write_text
from .comparisons import paired_comparisons, paired_table
from .config import ExperimentConfig
from .plots import method_colours, write_figures
from .provenance import format_provenance, provenance_summary
from .report import write_experiment_report
from .tables import CSV_FIELDS, experiment_tables, reference_method, summarize, tables_markdown


def write_config(out: Path, config: ExperimentConfig) -> Path:
    """``config.yaml`` (``config.json`` without PyYAML): the experiment's config, runnable as is."""
    try:
        import yaml
    except ImportError:
        return write_json(out / "config.json", config.to_dict(), indent=1)
    return write_text(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """``results.csv``: the :data:`~flatminima.experiment.tables.CSV_FIELDS` of every summary row
    (:func:`~flatminima.experiment.tables.summarize`); seeds and hyperparameters as JSON, a
    diagnostic no run measured empty."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, CSV_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(r[k]) if k in ("seeds", "hyperparameters") else
                         ("" if r.get(k) is None else r[k]) for k in CSV_FIELDS})
    return text.getvalue()


def unfinished_note(unfinished: Sequence[dict[str, Any]], planned: int) -> str:
    """The line said when the tables leave units out (``--report-only`` of a partial folder)."""
    if not unfinished:
        return ""
    ids = [r["unit"] for r in unfinished]
    shown = ", ".join(ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
    return f"{len(ids)} of {planned} units are missing from these tables: {shown}."


def write_results(out: Path, config: ExperimentConfig, records: list[dict], wall_time: float,
                  device: Optional[torch.device] = None, log: Callable[[str], None] = print,
                  interpolation: Optional[dict[str, Any]] = None,
                  unfinished: Sequence[dict[str, Any]] = ()) -> str:
    """Write ``config.yaml``, ``results.{json,csv,md}``, the figures (``learning_curves.png``, ``sharpness.png``,
    ``interpolation.png``; for continual runs ``continual.png`` and the accuracy matrices under
    ``matrices/``; skipped, with a note, without matplotlib) and the self-contained ``report.html``
    into ``out``; return the Markdown tables. ``unfinished``: the plan rows
    (:func:`~flatminima.experiment.units.plan_rows`) of the units the tables leave out."""
    rows = summarize(records)
    ref = reference_method(records)
    tables = experiment_tables(records, config.diagnostics_samples)
    paired = paired_table(records, config.compare)  # each method against the reference on common seeds
    tables += [paired] if paired is not None else []
    provenance = provenance_summary(records)
    planned = len(records) + len(unfinished)
    write_json(out / "results.json", {
        "config": config.to_dict(), "reference": ref, "wall_time_s": wall_time,
        "unit_wall_time_s": provenance["unit_wall_time_s"], "invocations": provenance["invocations"],
        "summary": rows, "paired": paired_comparisons(records, config.compare), "tables": [t.to_dict() for t in tables],
        "runs": [f"runs/{r['unit']}.json" for r in records],
        "unfinished": list(unfinished), "provenance": provenance,
        "diagnostics": {r["unit"]: r["diagnostics"] for r in records if "diagnostics" in r},
        "continual": {r["unit"]: {"accuracy": r["accuracy"], "metrics": r["metrics"], "lambda_max": r["lambda_max"]}
                      for r in records if "accuracy" in r},
        "interpolation": {k: v.to_dict() for k, v in (interpolation or {}).items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}},
        indent=1)
    write_text(out / "results.csv", csv_text(rows))
    epochs = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}" + (" per task" if config.continual else "")
    header = (f"# {config.name}: {config.task}, {config.model}, {epochs}, "
              f"{len(config.seeds)} seed(s)\n\n")
    note = unfinished_note(unfinished, planned)
    full = ((f"**Partial:** {note}\n\n" if note else "") + tables_markdown(tables)
            + f"\n\nProvenance:\n\n{format_provenance(provenance)}")
    write_text(out / "results.md", header + full + "\n")
    colours = method_colours([*config.expanded_methods(), *(r["method"] for r in records)])
    figures = write_figures(out, config, records, interpolation, log, colours)
    write_config(out, config)
    devices = ", ".join(str(d) for d in provenance["devices"]) or str(device)
    notes = (f"{len(records)} runs; {provenance['unit_wall_time_s']:.0f} s of unit wall time over "
             f"{provenance['invocations']} invocation(s) on {devices} (this invocation: {wall_time:.0f} s)."
             + (f" {note}" if note else ""))
    write_experiment_report(out, config, tables, figures, notes=notes, provenance=provenance, colours=colours)
    return full
