"""One self-contained HTML page per experiment (``flatminima run``) or diagnosis (``flatminima
diagnose``), filled from data by the jinja2 template ``templates/report.html.j2``.

The page has no external references: the CSS is inline, figures are embedded as base64 ``data:``
URIs, and a Content-Security-Policy ``<meta>`` forbids the browser from loading anything else, so the
file can be mailed, archived or opened offline and looks the same everywhere. No JavaScript. Every
text is HTML-escaped (the template's autoescape). Each page ends with "How this was produced": what
reruns it, the versions, the device and the data, and the configuration.

    from flatminima.experiment.report import Figure, Section, write_html_report
    from flatminima.experiment.tables import results_table

    write_html_report("results/exp/report.html", "CIFAR-10 ResNet-18", [
        Section("Results", text="Mean ± std over 3 seeds.", tables=[results_table(records)],
                figures=[Figure("results/exp/curves.png", "Training loss and test accuracy.")]),
    ], provenance={"rerun": "flatminima run results/exp/config.yaml"}, colours={"sgd": "#1f77b4"})

Tables are :class:`flatminima.experiment.tables.Table` objects (:func:`~flatminima.experiment.tables.
experiment_tables`); :func:`value_table` makes one from plain values.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import jinja2

from .. import __version__
from .._files import write_text
from ..core.validation import check
from ..diagnostics.report import SUMMARY_LABELS
from .provenance import device_info, git_state, package_versions
from .tables import Cell, Table

__all__ = ["SECTION_TEXTS", "Figure", "Section",
           "diagnose_facts", "format_value", "provenance_facts", "provenance_section",
           "render_html", "value_cell", "value_table", "write_diagnose_report", "write_experiment_report",
           "write_html_report"]

#: Figure formats that can be embedded, by file suffix.
MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
        ".gif": "image/gif", ".webp": "image/webp"}
#: Nothing but the inline style and data: images may load: the page is self-contained by construction.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
#: The title of the section every report ends with.
PROVENANCE_TITLE = "How this was produced"
#: What a section of an experiment's page measures, printed above its tables.
SECTION_TEXTS = {"Paired comparison": (
    "Seeds fix the initialization, the data order and the method's noise, so a method and the reference "
    "trained on the same seed share them: the paired differences cancel what they share. An interval that "
    "contains 0 means the runs do not establish a difference either way."), "Flatness across tasks": (
    "After each task j, for every task i learned so far: the top Hessian eigenvalue λ_max (Lanczos) and the "
    "Hessian trace (Hutchinson) of task i's loss at the weights after task j, in each parameter space (lora: the "
    "active adapters' factors; all: every weight), on the first test batches of task i; and the loss of task i on "
    "the straight line θ(t) = (1 − t)·θ_i + t·θ_j from the weights after task i, summarized by its barrier "
    "max_t L(θ(t)) − max(L(θ(0)), L(θ(1))). Row j, column i of each matrix; undefined cells hatched.\n\n"
    "The table correlates λ_max of each task right after it was learned (the diagonal) with its forgetting at "
    "the end, max over the rows since it was learned minus the final accuracy, for the tasks before the last.")}

_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
                          autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass
class Figure:
    """An image file (PNG, SVG, JPEG, GIF, WebP) embedded into the page, with its caption;
    ``small`` ones sit two to a row."""

    path: Union[Path, str]
    caption: str = ""
    small: bool = False


@dataclass
class Section:
    """One section of the report: paragraphs, then tables, then figures, then collapsible details.

    ``text`` is plain text (blank lines split paragraphs, single newlines are kept); ``tables``
    are :class:`~flatminima.experiment.tables.Table` objects (each with its caption); ``figures``
    are :class:`Figure` objects or image paths; ``details`` is shown as pretty-printed JSON in a
    collapsed ``<details>`` block titled ``details_title`` (e.g. the experiment config).
    """

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Union[Figure, Path, str]] = field(default_factory=list)
    details: Optional[Any] = None
    details_title: str = "details"


# ------------------------------------------------------------------------------ plain values


def format_value(value: Any) -> str:
    """A plain value as the report shows it: None → ``–``; a float to 4 significant digits
    (thousands with separators, very small or large magnitudes in exponent form; ``nan``, ``∞``);
    a list or tuple comma-separated; anything else ``str()``."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if value == 0:
            return "0"
        if 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def value_cell(value: Any) -> Cell:
    """A :class:`~flatminima.experiment.tables.Cell` of a plain value (:func:`format_value`); a
    number keeps its value as ``mean`` (right-aligned)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return Cell(format_value(value), float(value) if number else None)


def value_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "", key: str = "",
                section: str = "") -> Table:
    """A :class:`~flatminima.experiment.tables.Table` of plain values (:func:`value_cell`); a
    :class:`Cell` among them is kept as is."""
    return Table(key, section, caption, [str(c) for c in columns],
                 [[v if isinstance(v, Cell) else value_cell(v) for v in row] for row in rows])


# --------------------------------------------------------------------------------- rendering


def _cell(cell: Cell, colours: Optional[Mapping[str, str]], first: bool) -> dict[str, Any]:
    swatch = None
    if first and colours:
        swatch = colours.get(cell.text, colours.get(cell.text.split(" / ")[0]))
        swatch = swatch if isinstance(swatch, str) and _COLOUR.fullmatch(swatch) else None
    title = f"mean ± std over n = {cell.n}" if cell.n and cell.std is not None else None
    return {"text": cell.text, "num": not first and cell.numeric, "title": title, "n": cell.n, "swatch": swatch}


def _table(table: Table, colours: Optional[Mapping[str, str]], facts: bool = False) -> dict[str, Any]:
    rows = [[_cell(c if isinstance(c, Cell) else value_cell(c), colours, i == 0) for i, c in enumerate(row)]
            for row in table.rows]
    if facts:  # name → value: text, left-aligned
        rows = [[{**c, "num": False} for c in row] for row in rows]
    return {"columns": [str(c) for c in table.columns], "rows": rows, "caption": table.caption, "facts": facts,
            "key": table.key}


def _figure(figure: Union[Figure, Path, str]) -> dict[str, Any]:
    figure = figure if isinstance(figure, Figure) else Figure(figure)
    p = Path(figure.path)
    check("figure", p.is_file(), str(p), "an existing image file (figure not found)")
    mime = MIME.get(p.suffix.lower())
    check("figure", mime is not None, str(p), f"one of the formats {sorted(MIME)} (unsupported format {p.suffix!r})")
    return {"mime": mime, "data": base64.b64encode(p.read_bytes()).decode("ascii"), "name": p.name,
            "alt": figure.caption or p.name, "caption": figure.caption, "small": figure.small}


def _paragraphs(text: str) -> list[list[str]]:
    return [b.strip().splitlines() for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]


def _slug(title: str, index: int) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:48].strip("-")
    return f"s{index}-{words}" if words else f"s{index}"


def provenance_section(facts: Mapping[str, Any], text: str = "", details: Optional[Any] = None,
                       details_title: str = "Configuration") -> Section:
    """The "How this was produced" section: ``facts`` (name → value: the command that reruns it,
    the versions, the device, ...) as a two-column table, then ``details``."""
    return Section(PROVENANCE_TITLE, text=text, tables=[value_table([], list(facts.items()), key="provenance")],
                   details=details, details_title=details_title)


def render_html(title: str, sections: Sequence[Section], subtitle: str = "",
                provenance: Optional[Mapping[str, Any]] = None,
                colours: Optional[Mapping[str, str]] = None) -> str:
    """The report as an HTML5 string (what :func:`write_html_report` writes). ``provenance``:
    name → value facts, appended as a last section (:func:`provenance_section`) unless a section
    of that title is there already; ``colours``: label → ``#rrggbb``, a swatch before each table
    row whose label is (or starts with ``label / ``) one of them."""
    sections = list(sections)
    if provenance and not any(s.title == PROVENANCE_TITLE for s in sections):
        sections.append(provenance_section(provenance))
    view = []
    for i, s in enumerate(sections):
        facts = s.title == PROVENANCE_TITLE
        details = s.details if s.details is None or isinstance(s.details, str) else json.dumps(
            s.details, indent=2, default=str, ensure_ascii=False)
        view.append({"id": _slug(s.title, i + 1), "title": s.title, "paragraphs": _paragraphs(s.text),
                     "tables": [_table(t, colours, facts=facts and not t.columns) for t in s.tables],
                     "figures": [_figure(f) for f in s.figures],  # every figure checked before any write
                     "details": details, "details_title": s.details_title})
    generated = datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return _ENV.get_template("report.html.j2").render(title=title, subtitle=subtitle, sections=view, csp=CSP,
                                                      version=__version__, generated=generated)


def write_html_report(path: Union[Path, str], title: str, sections: Sequence[Section], subtitle: str = "",
                      provenance: Optional[Mapping[str, Any]] = None,
                      colours: Optional[Mapping[str, str]] = None) -> Path:
    """Write :func:`render_html` to ``path`` (atomically: a temporary file, then a rename); return it.

    Raises ValueError naming the figure when a figure file is missing or of an unsupported format
    (before anything is written).
    """
    return write_text(path, render_html(title, sections, subtitle, provenance, colours))


# ------------------------------------------------------------------------- the experiment's page


def provenance_facts(summary: Mapping[str, Any]) -> dict[str, str]:
    """:func:`flatminima.experiment.provenance.provenance_summary` as the rows of "How this was
    produced": units and invocations, unit wall time, config hash, code (git commit), packages,
    device and data; a field with several values lists them all (the units were made under
    different conditions)."""
    def each(key: str, show) -> str:
        values = summary.get(key) or []
        return "; ".join(show(v) for v in values) if values else "not recorded"

    def git(g: Optional[Mapping]) -> str:
        if not g or g.get("commit") is None:
            return "not a git checkout"
        return str(g["commit"])[:12] + (" (with uncommitted changes)" if g.get("dirty") else "")

    facts = {"units": f"{summary.get('units', 0)} ({summary.get('recorded', 0)} with provenance), trained in "
                      f"{summary.get('invocations', 0)} invocation(s)"}
    if summary.get("unit_wall_time_s") is not None:
        facts["unit wall time"] = f"{summary['unit_wall_time_s']:.1f} s"
    facts.update({
        "config SHA-256": each("config_sha256", lambda h: str(h)[:16]),
        "code": each("git", git),
        "packages": each("packages", lambda p: " ".join(f"{k} {v}" for k, v in (p or {}).items() if v is not None)),
        "device": each("devices", str),
        "data": each("data", lambda d: f"{d.get('name')} (tensors {str(d.get('tensors_sha256'))[:16]})"),
    })
    return facts


def write_experiment_report(out: Path, config: Any, tables: Sequence[Table], figures: Mapping[str, Sequence[Figure]],
                            notes: str = "", provenance: Optional[Mapping[str, Any]] = None,
                            colours: Optional[Mapping[str, str]] = None) -> Path:
    """``out/report.html`` of an experiment: one section per table section (``Results``,
    ``Flatness``, ``Continual learning``, ``Flatness across tasks``: each :class:`Table`'s ``section``)
    with its tables and the figures of ``figures[section]``, ``notes`` under Results (and
    :data:`SECTION_TEXTS` under the others), then "How this was produced"
    (the command that reruns it, :func:`provenance_facts` of ``provenance``, the configuration).
    ``colours``: the experiment's method colours (:func:`flatminima.experiment.plots.method_colours`)."""
    sections = []
    for title in dict.fromkeys([*(t.section for t in tables), *figures]):
        sections.append(Section(title, text=notes if title == "Results" else SECTION_TEXTS.get(title, ""),
                                tables=[t for t in tables if t.section == title], figures=list(figures.get(title, []))))
    config_file = next((out / n for n in ("config.yaml", "config.json") if (out / n).is_file()), out / "config.yaml")
    facts = {"rerun": f"flatminima run {config_file}", "report only": f"flatminima run {config_file} --report-only",
             **(provenance_facts(provenance) if provenance else {"flatminima": __version__})}
    sections.append(provenance_section(
        facts, text="Rerunning the config loads every finished unit (runs/*.json) instead of training it again, so "
        "it rewrites these tables, figures and this page; --report-only trains nothing.",
        details=config.to_dict(), details_title=f"Configuration ({config_file.name})"))
    per_task = " per task" if config.continual else ""
    subtitle = f"{len(config.seeds)} seed(s), {config.epochs} epoch(s){per_task}"
    return write_html_report(out / "report.html", f"{config.name}: {config.task} / {config.model}", sections,
                             subtitle=subtitle, colours=colours)


# -------------------------------------------------------------------------- the diagnosis page


def diagnose_facts(config: Any, device: Any, preset: str, diagnostics: Sequence[str], params: Any, mode: str,
                   seed: int, checkpoint: Optional[str] = None, config_path: Optional[str] = None,
                   items: Sequence[str] = ()) -> dict[str, Any]:
    """The "How this was produced" rows of a diagnosis: the ``flatminima diagnose`` command that
    reruns it (``items``: its ``KEY=VALUE`` overrides as typed), the model, the data, the
    parameters measured, the device, the code and the package versions."""
    command = ["flatminima", "diagnose", *([config_path] if config_path else []), *items, "--preset", preset,
               *(["--checkpoint", checkpoint] if checkpoint else []), "--diagnostics", ",".join(diagnostics),
               "--samples", str(config.diagnostics_samples), "--params", str(params), "--mode", mode,
               "--seed", str(seed), "--device", str(config.device), "--out", str(config.out_dir)]
    git = git_state()
    info = device_info(device)
    return {"rerun": shlex.join(command),
            "model": f"{config.model} {config.model_options or ''}".strip() + (
                f", weights from {checkpoint}" if checkpoint else f", at its seed-{config.seeds[0]} initialization"),
            "data": f"{config.task}: the first {config.diagnostics_samples} test examples",
            "parameters": params, "mode": mode, "seed": seed, "device": f"{info['name']} ({info['type']}, "
            f"{info['threads']} threads)",
            "code": "not a git checkout" if git["commit"] is None else git["commit"][:12] + (
                " (with uncommitted changes)" if git["dirty"] else ""),
            "packages": " ".join(f"{k} {v}" for k, v in package_versions().items() if v is not None)}


def write_diagnose_report(out: Union[Path, str], result: Mapping[str, Any], title: str,
                          facts: Optional[Mapping[str, Any]] = None, subtitle: str = "") -> Path:
    """``out/report.html`` of :func:`flatminima.diagnostics.report`'s ``result``: the headline
    numbers and the time of each diagnostic, then one section per diagnostic with its tables and
    figure (``result["sections"]``, :func:`flatminima.diagnostics.report.report_sections`), then
    "How this was produced" (``facts`` and every diagnostic's settings)."""
    out = Path(out)
    summary = [[SUMMARY_LABELS.get(k, k), v] for k, v in result.get("summary", {}).items()]
    seconds = [[name, round(s, 3)] for name, s in result.get("seconds", {}).items()]
    sections = [Section("Summary", tables=[
        value_table(["quantity", "value"], summary, caption="The headline numbers:", key="summary"),
        value_table(["diagnostic", "wall time (s)"], seconds, caption="Time per diagnostic:", key="seconds")])]
    for part in result.get("sections", []):
        tables = [value_table(t["columns"], t["rows"], caption=t.get("caption", ""), key=f"{part['name']}_{i}")
                  for i, t in enumerate(part.get("tables", []))]
        figures = [Figure(out / part["figure"], part.get("caption", ""))] if part.get("figure") else []
        sections.append(Section(part["title"], text=part.get("text", ""), tables=tables, figures=figures))
    sections.append(provenance_section(dict(facts or {"flatminima": __version__}),
                                       text="The numbers are also in report.json, the landscapes' arrays in "
                                       ".npz files.",
                                       details=result.get("settings"), details_title="Settings per diagnostic"))
    return write_html_report(out / "report.html", title, sections, subtitle=subtitle)
