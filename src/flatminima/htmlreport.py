"""One self-contained HTML report per experiment.

The page has no external references: the CSS is inline, figures are embedded as base64 ``data:``
URIs, and a Content-Security-Policy ``<meta>`` forbids the browser from loading anything else, so the
file can be mailed, archived or opened offline and looks the same everywhere. No JavaScript.

    from flatminima.htmlreport import Section, Table, table_from_markdown, write_html_report

    write_html_report("results/exp/report.html", "CIFAR-10 ResNet-18", [
        Section("Results", text="Mean ± std over 3 seeds.", tables=[table_from_markdown(md)],
                figures=["results/exp/curves.png"]),
        Section("Configuration", details=config_dict),
    ])
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

from .core.validation import check

__all__ = ["Section", "Table", "table_from_markdown", "write_html_report"]

#: Figure formats that can be embedded, by file suffix.
_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
         ".gif": "image/gif", ".webp": "image/webp"}

#: What a number-like cell starts with (right-aligned in tables): "91.2", "-0.3", "1e-4 ± 2", "−1".
_NUMERIC = re.compile(r"^[-+−]?(\d|\.\d|inf|nan)", re.IGNORECASE)


@dataclass
class Table:
    """A table: column titles and rows of cells (str, int, float or None; None shows as "–")."""

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Section:
    """One section of the report: paragraphs, then tables, then figures, then collapsible details.

    ``text`` is plain text (HTML-escaped; blank lines split paragraphs, single newlines are kept);
    ``figures`` are image paths (PNG, SVG, JPEG, GIF, WebP) embedded into the page; ``details`` is
    shown as pretty-printed JSON in a collapsed ``<details>`` block (e.g. the experiment config).
    """

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Union[Path, str]] = field(default_factory=list)
    details: Optional[dict[str, Any]] = None


# --------------------------------------------------------------------------------------- tables


def _split_row(line: str) -> list[str]:
    """The cells of one pipe-table line; ``\\|`` is a literal pipe inside a cell."""
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells = re.split(r"(?<!\\)\|", line)
    return [c.strip().replace("\\|", "|") for c in cells]


def _is_delimiter(cells: list[str]) -> bool:
    return bool(cells) and all(re.fullmatch(r":?-+:?", c.replace(" ", "")) for c in cells)


def table_from_markdown(md: str, caption: str = "") -> Table:
    """Parse a GitHub-style pipe table (header line, ``|---|`` delimiter line, rows) into a Table.

    Cells stay strings. Lines before the header and after the table (blank or not starting with
    ``|``) are ignored, so a Markdown fragment with a heading above the table parses too. Rows with
    fewer cells than columns are padded with empty cells, extra cells are dropped.
    """
    lines = md.strip().splitlines()
    for i in range(len(lines) - 1):
        if "|" in lines[i] and _is_delimiter(_split_row(lines[i + 1])):
            columns = _split_row(lines[i])
            if len(_split_row(lines[i + 1])) != len(columns):
                raise ValueError(f"Markdown table: the delimiter line does not match the header {lines[i]!r}")
            rows = []
            for line in lines[i + 2:]:
                if not line.strip() or "|" not in line:
                    break
                cells = _split_row(line)
                rows.append((cells + [""] * len(columns))[:len(columns)])
            return Table(columns=columns, rows=rows, caption=caption)
    raise ValueError("no Markdown pipe table found (need a header line followed by a |---| line)")


def _format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
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
    if isinstance(value, int):
        return str(value)
    return str(value)


def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, str) and bool(_NUMERIC.match(value.strip()))


def _render_table(table: Table) -> str:
    out = ['<div class="table-wrap"><table>']
    if table.caption:
        out.append(f"<caption>{html.escape(table.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f'<th scope="col">{html.escape(str(c))}</th>' for c in table.columns)
               + "</tr></thead>")
    out.append("<tbody>")
    for row in table.rows:
        cells = []
        for value in row:
            cls = ' class="num"' if _is_numeric(value) else ""
            cells.append(f"<td{cls}>{html.escape(_format_cell(value))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


# -------------------------------------------------------------------------------------- figures


def _embed_figure(path: Union[Path, str]) -> str:
    p = Path(path)
    check("figure", p.is_file(), str(path), "an existing image file (figure not found)")
    mime = _MIME.get(p.suffix.lower())
    check("figure", mime is not None, str(path), f"one of the formats {sorted(_MIME)} (unsupported format {p.suffix!r})")
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    name = html.escape(p.name)
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{name}">'
            f"<figcaption>{name}</figcaption></figure>")


# ------------------------------------------------------------------------------------- the page


def _paragraphs(text: str) -> str:
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]
    return "\n".join("<p>" + "<br>\n".join(html.escape(ln) for ln in b.splitlines()) + "</p>" for b in blocks)


def _slug(title: str, index: int) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:48].strip("-")
    return f"s{index}-{words}" if words else f"s{index}"


def _version() -> str:
    try:
        import flatminima

        version = getattr(flatminima, "__version__", None)
        if version:
            return str(version)
    except ImportError:  # pragma: no cover - the module lives inside the package
        pass
    try:
        from importlib.metadata import version as _dist_version

        return _dist_version("flatminima")
    except Exception:  # noqa: BLE001 - an uninstalled checkout still gets a report
        return "unknown"


_CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --zebra: #f6f8fa;
        --accent: #0969da; --head: #eef1f4; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.5; font-size: 15px;
       font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main, header, footer { max-width: 1100px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 28px; padding-bottom: 8px; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.8em; margin: 0 0 4px; }
.subtitle { color: var(--muted); margin: 0 0 12px; }
nav.toc { margin: 16px 0 8px; padding: 12px 16px; background: var(--zebra); border: 1px solid var(--line);
          border-radius: 6px; }
nav.toc h2 { font-size: 1em; margin: 0 0 6px; border: 0; padding: 0; }
nav.toc ol { margin: 0; padding-left: 22px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
section { padding-top: 8px; }
h2 { font-size: 1.35em; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
p { margin: 0 0 12px; max-width: 80ch; }
.table-wrap { overflow-x: auto; margin: 12px 0 20px; }
table { border-collapse: collapse; font-size: 0.93em; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: var(--muted); padding: 0 0 6px; font-style: italic; }
th, td { border: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--zebra); }
tbody tr:hover { background: #eaf2fd; }
figure { margin: 16px 0 24px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.85em; margin-top: 4px; }
details { margin: 12px 0 20px; border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; }
summary { cursor: pointer; font-weight: 600; }
pre { background: var(--zebra); padding: 10px; overflow-x: auto; font-size: 0.85em; border-radius: 4px;
      font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
footer { margin-top: 36px; padding-top: 12px; padding-bottom: 28px; border-top: 1px solid var(--line);
         color: var(--muted); font-size: 0.85em; }
@media print { nav.toc { display: none; } tbody tr:hover { background: inherit; } }
"""

#: Nothing but the inline style and data: images may load: the page is self-contained by construction.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _render_section(section: Section, sid: str) -> str:
    out = [f'<section id="{sid}">', f"<h2>{html.escape(section.title)}</h2>"]
    if section.text:
        out.append(_paragraphs(section.text))
    out.extend(_render_table(t) for t in section.tables)
    out.extend(_embed_figure(f) for f in section.figures)
    if section.details is not None:
        pretty = json.dumps(section.details, indent=2, default=str, ensure_ascii=False)
        out.append(f"<details><summary>details</summary><pre>{html.escape(pretty)}</pre></details>")
    out.append("</section>")
    return "\n".join(out)


def render_html(title: str, sections: list[Section], subtitle: str = "") -> str:
    """The report as an HTML5 string (what :func:`write_html_report` writes)."""
    ids = [_slug(s.title, i + 1) for i, s in enumerate(sections)]
    body = [_render_section(s, sid) for s, sid in zip(sections, ids)]  # figures checked before any write
    toc = "\n".join(f'<li><a href="#{sid}">{html.escape(s.title)}</a></li>' for s, sid in zip(sections, ids))
    generated = datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    head_sub = f'<p class="subtitle">{html.escape(subtitle)}</p>' if subtitle else ""
    nav = f'<nav class="toc"><h2>Contents</h2><ol>\n{toc}\n</ol></nav>' if sections else ""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f'<meta name="generator" content="flatminima {html.escape(_version())}">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<header><h1>{html.escape(title)}</h1>{head_sub}{nav}</header>",
        "<main>",
        *body,
        "</main>",
        f"<footer>Generated {html.escape(generated)} by flatminima {html.escape(_version())}.</footer>",
        "</body>",
        "</html>",
        "",
    ])


def write_html_report(path: Union[Path, str], title: str, sections: list[Section], subtitle: str = "") -> Path:
    """Write one self-contained HTML file (atomically: a temporary file, then a rename); return its path.

    Raises ValueError naming the figure when a figure file is missing or of an unsupported format
    (before anything is written).
    """
    from ._files import write_text

    return write_text(path, render_html(title, sections, subtitle))
